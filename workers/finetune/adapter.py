"""A fine-tune's result as other kinds use it: the PEFT adapter folder a `finetune` job wrote (or any LoRA adapter
folder), found from a job id or a path, checked without torch, and its base model named.

Pure: no torch, no downloads. Chat (`adapter=`) and `finetune_merge` both go through here, so a job id, a run folder
and an adapter folder mean the same thing everywhere.
"""
from __future__ import annotations

import json
import re
import struct
from pathlib import Path

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
JOB_ID = re.compile(r"[0-9a-f]{16}|\d{4}-\d{6}-[0-9a-f]{4}")  # the store's job ids (as studio.access reads them)


def adapter_dir(value: str, data_dir: Path) -> Path:
    """A finetune job id, its run folder, or an adapter folder -> the folder holding adapter_config.json."""
    v = value.strip()
    if not v:
        raise ValueError("adapter is empty: give a finetune job id or a folder with adapter_config.json")
    cands = []
    if JOB_ID.fullmatch(v):
        run = Path(data_dir) / "runs" / v
        if not run.is_dir():
            raise ValueError(f"adapter: no job {v!r}; give a finetune job id or an adapter folder")
        cands += [run / "adapter", run]
    else:
        p = Path(v).expanduser()
        if not p.exists():
            raise ValueError(f"adapter: {v} does not exist; give a finetune job id or a folder with {CONFIG}")
        if p.is_file() and p.name in (CONFIG, WEIGHTS):
            p = p.parent
        cands += [p, p / "adapter"]
    for c in cands:
        if (c / CONFIG).is_file():
            return c.resolve()
    where = cands[0]
    full = cands[-1] / "model" if JOB_ID.fullmatch(v) else Path(v).expanduser() / "model"
    if (full / "config.json").is_file():
        raise ValueError(f"adapter: {v} fine-tuned the whole model (method=full), so it has no adapter: use it as "
                         f"the model itself (model={full})")
    if JOB_ID.fullmatch(v):
        raise ValueError(f"adapter: job {v} has no adapter yet ({where} holds no {CONFIG}): it is still training, "
                         "was cancelled before its first save, or is not a finetune job; resume it or pick another")
    raise ValueError(f"adapter: {v} holds no {CONFIG}; give the folder a fine-tune saved (PEFT's format: "
                     f"{CONFIG} + {WEIGHTS}) or a finetune job id")


def read_adapter(folder: Path) -> dict:
    """The adapter's config, checked: a LoRA, its weights in safetensors (never a pickle) with a readable header.
    Adds `n_params` (the adapter's parameter count, from the header) and `bytes` (the file's size)."""
    folder = Path(folder)
    try:
        cfg = json.loads((folder / CONFIG).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{folder / CONFIG} is not readable JSON ({e}); save the adapter again") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{folder / CONFIG} holds no adapter config (a JSON object)")
    kind = str(cfg.get("peft_type", "")).upper()
    if kind not in ("LORA", ""):
        raise ValueError(f"{folder.name} is a {kind} adapter; only LoRA adapters (what the Fine-tune tab trains) are "
                         "supported")
    weights = folder / WEIGHTS
    if not weights.is_file():
        pickled = folder / "adapter_model.bin"
        raise ValueError(f"{folder} has no {WEIGHTS}" + (" (only adapter_model.bin, a pickle the studio does not load: "
                                                         "convert it to safetensors)" if pickled.exists() else
                                                         "; the adapter is incomplete: save it again"))
    cfg["n_params"] = safetensors_numel(weights)
    cfg["bytes"] = weights.stat().st_size
    return cfg


_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
                "F8_E4M3": 1, "F8_E5M2": 1}


def safetensors_numel(path: Path) -> int:
    """Elements in a safetensors file, from its JSON header alone (milliseconds for any size)."""
    path = Path(path)
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > min(size - 8, 100 * 2**20):
                raise ValueError("header length past the file's end")
            header = json.loads(f.read(n))
        total = 0
        for name, t in header.items():
            if name == "__metadata__":
                continue
            numel = 1
            for d in t["shape"]:
                numel *= int(d)
            total += numel
        return total
    except (struct.error, ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not a readable safetensors file ({e}); the adapter is truncated or damaged: "
                         "save it again") from None


def run_card(folder: Path) -> dict:
    """The run card of the finetune job that wrote this adapter ({} when the folder is not in a run folder)."""
    for cand in (Path(folder) / "run.json", Path(folder).parent / "run.json"):
        try:
            card = json.loads(cand.read_text(encoding="utf-8"))
            if isinstance(card, dict):
                return card
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            continue
    return {}


def adapter_base(folder: Path, cfg: dict | None = None) -> str:
    """The base model the adapter was trained on, as a `model` param names it: the finetune (or vision_finetune)
    job's `base` (a preset or a local folder) from its run card, else PEFT's `base_model_name_or_path` (a folder or a
    hub repo)."""
    card = run_card(folder)
    base = (card.get("params") or {}).get("base") if card.get("kind") in ("finetune", "vision_finetune") else None
    if isinstance(base, str) and base.strip():
        return base.strip()
    cfg = cfg if cfg is not None else read_adapter(folder)
    base = cfg.get("base_model_name_or_path")
    if not isinstance(base, str) or not base.strip():
        raise ValueError(f"{Path(folder) / CONFIG} does not name its base model (base_model_name_or_path): set model "
                         "to the base it was trained on")
    return base.strip()


def adapter_key(folder: Path) -> str:
    """Part of a cache key: the adapter's folder and its weights' size and time, so a retrained adapter reloads."""
    st = (Path(folder) / WEIGHTS).stat()
    return f"{Path(folder).resolve()}@{st.st_size}.{int(st.st_mtime_ns)}"


def same_base(a: str, b: str) -> bool:
    """Whether two model names mean the same base: equal names, or the same folder on disk."""
    if a.strip() == b.strip():
        return True
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    try:
        return pa.exists() and pb.exists() and pa.resolve() == pb.resolve()
    except OSError:
        return False
