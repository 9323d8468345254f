"""Job kind `finetune_merge`: a LoRA adapter merged into its base, saved as an ordinary transformers folder
(safetensors, 16-bit by default) that loads with `from_pretrained` anywhere, with the adapter's tokenizer and chat
template; optionally with the commands that turn it into a Q4_K_M GGUF for llama.cpp, Ollama and LM Studio.

The merge runs in RAM, not on the GPU: an 8B base in bf16 is 16 GB, more than a 12 GB card holds, and merging is a
one-off add per layer (seconds on a CPU). The 4-bit weights a QLoRA trained against are not what is merged into: the
base is loaded in 16 bits and W + (alpha/r)·B·A is added there, as PEFT's `merge_and_unload` does.

GGUF: llama.cpp's HF -> GGUF converter (`convert_hf_to_gguf.py`) is not published as a maintained package (the `gguf`
package on PyPI holds the file format's reader and writer, not the converter; a third-party repackaging exists but is
not llama.cpp's), so the job writes the exact commands into `to_gguf.sh` beside the merged model. Quantisation needs
no llama.cpp build: llama-cpp-python (installed with the studio) carries `llama_model_quantize`.
"""
from __future__ import annotations

import json
import shlex
import time
from dataclasses import dataclass, replace
from pathlib import Path

from studio.gate import Estimate

PACKAGES = ("transformers", "peft", "safetensors")  # versions for the run card
PATHS = ("adapter", "out")  # params that name a server path or a job (studio.access)
DTYPES = {"bfloat16": 2, "float16": 2, "float32": 4}  # bytes per weight
QUANTS = ("Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0", "F16", "BF16")  # llama.cpp types; the last three need no quantize step
CONVERT_TYPES = {"Q8_0": "q8_0", "F16": "f16", "BF16": "bf16"}  # what convert_hf_to_gguf.py writes itself
LLAMA_FTYPES = {"Q4_K_M": "LLAMA_FTYPE_MOSTLY_Q4_K_M", "Q5_K_M": "LLAMA_FTYPE_MOSTLY_Q5_K_M",
                "Q6_K": "LLAMA_FTYPE_MOSTLY_Q6_K"}


@dataclass(frozen=True)
class Params:
    adapter: str = ""  # a finetune job id, its run folder, or a folder with adapter_config.json
    out: str = ""  # the folder to write the merged model to (new or empty); empty: merged/ in this job's run folder
    gguf: bool = False  # also prepare the GGUF export for llama.cpp / Ollama / LM Studio (see the module's notes)
    quant: str = "Q4_K_M"  # the GGUF's quantisation: Q4_K_M (4.9 GB for an 8B), Q5_K_M, Q6_K, Q8_0, F16, BF16
    dtype: str = "bfloat16"  # the merged weights: bfloat16 (what the 7-8B bases ship in), float16, float32

    def __post_init__(self):
        if self.quant not in QUANTS:
            raise ValueError(f"quant must be one of {', '.join(QUANTS)}; got {self.quant!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}; got {self.dtype!r}")


def _base_ref(base: str, data_dir):
    from workers.chat.llm import resolve

    ref = resolve(base, data_dir)
    if ref.backend != "hf":
        raise ValueError(f"the adapter's base {base} is not a transformers model (a GGUF cannot be merged into): "
                         "merge needs the base it was trained on")
    return ref


def validate(p: Params, config) -> Params:
    """The adapter as its folder, checked (safetensors, LoRA), its base resolvable, and `out` a new or empty folder."""
    from workers.finetune.adapter import adapter_base, adapter_dir, read_adapter

    folder = adapter_dir(p.adapter, config.data_dir)  # raises with what to give when empty or not found
    cfg = read_adapter(folder)
    _base_ref(adapter_base(folder, cfg), config.data_dir)
    out = ""
    if p.out.strip():
        o = Path(p.out).expanduser().resolve()
        if o.exists() and (not o.is_dir() or any(o.iterdir())):
            raise ValueError(f"out: {o} already exists and is not an empty folder; name a new folder (nothing is "
                             "overwritten)")
        if not o.parent.is_dir():
            raise ValueError(f"out: {o.parent} does not exist; name a folder inside an existing one")
        out = str(o)
    return replace(p, adapter=str(folder), out=out)


def _sizes(p: Params) -> tuple[int, int, str]:
    """(base params, adapter params, base name) from the files' headers and configs."""
    from workers.finetune.adapter import adapter_base, read_adapter

    cfg = read_adapter(Path(p.adapter))
    base = adapter_base(Path(p.adapter), cfg)
    return _base_ref(base, None).shape["n_params"], cfg["n_params"], base


LIBRARIES = 512 * 2**20  # transformers' and peft's modules, imported by the worker for this job (RSS on the CPU)


def estimate(p: Params, device) -> Estimate:
    """In RAM wherever it runs: the base in the merge dtype, the copy safetensors serialises from, the adapter in
    fp32. On a GPU machine nothing goes to the card, so it only holds the job's small workspace there."""
    n_base, n_adapter, base = _sizes(p)
    weights = n_base * DTYPES[p.dtype]
    note = f"merges {Path(p.adapter).name} into {base} in RAM ({p.dtype}, {weights / 2**30:.1f} GiB)"
    if getattr(device, "kind", "cpu") == "cuda":
        return Estimate(parts={"workspace": 64 * 2**20}, note=note + "; the GPU is not used")
    return Estimate(parts={"weights": 2 * weights, "workspace": 4 * n_adapter + 128 * 2**20, "libraries": LIBRARIES},
                    note=note)


def gguf_commands(merged: Path, quant: str) -> list[str]:
    """Shell commands that turn the merged folder into a `quant` GGUF with llama.cpp's converter (a checkout of its
    repo) and llama-cpp-python's quantizer (installed with the studio)."""
    stem = merged.name or "model"
    final, f16 = merged / f"{stem}-{quant}.gguf", merged / f"{stem}-F16.gguf"
    convert = f"python llama.cpp/convert_hf_to_gguf.py {shlex.quote(str(merged))} --outtype"
    cmds = ["git clone --depth 1 https://github.com/ggml-org/llama.cpp",
            "pip install -r llama.cpp/requirements/requirements-convert_hf_to_gguf.txt"]
    if quant in CONVERT_TYPES:
        return cmds + [f"{convert} {CONVERT_TYPES[quant]} --outfile {shlex.quote(str(final))}"]
    quantize = (f"import llama_cpp as l; q = l.llama_model_quantize_default_params(); "
                f"q.ftype = l.{LLAMA_FTYPES[quant]}; "
                f"assert l.llama_model_quantize({str(f16)!r}.encode(), {str(final)!r}.encode(), q) == 0")
    return cmds + [f"{convert} f16 --outfile {shlex.quote(str(f16))}", f"python -c {shlex.quote(quantize)}",
                   f"rm {shlex.quote(str(f16))}"]


def run(p: Params, ctx) -> dict:
    ctx.progress(0, 4, "reading the adapter")
    import psutil

    from workers.chat.llm import ensure_local
    from workers.finetune.adapter import adapter_base, read_adapter

    t0 = time.perf_counter()
    folder = Path(p.adapter)
    cfg = read_adapter(folder)
    base = adapter_base(folder, cfg)
    ref = _base_ref(base, ctx.data_dir)
    need = ref.shape["n_params"] * DTYPES[p.dtype] * 2
    free = psutil.virtual_memory().available
    if need > free:
        raise RuntimeError(f"merging into {base} in {p.dtype} needs about {need / 2**30:.1f} GiB of free RAM and "
                           f"{free / 2**30:.1f} GiB is free: close other programs (or unload models in the Models "
                           "tab) and run it again")
    path = ensure_local(ref, ctx.data_dir, lambda d, t, m: ctx.progress(0, 4, m))
    out = Path(p.out) if p.out else ctx.run_dir / "merged"

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ctx.progress(1, 4, f"loading {base} in {p.dtype}")
    dtype = getattr(torch, p.dtype)
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, device_map={"": "cpu"})
    ctx.progress(2, 4, "merging the adapter")
    model = PeftModel.from_pretrained(model, str(folder), is_trainable=False, torch_device="cpu")
    model = model.merge_and_unload()
    model.to(dtype)  # PEFT keeps LoRA weights in fp32; what it merged into is the base's dtype already
    ctx.progress(3, 4, f"saving to {out}")
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    tok_from = folder if (folder / "tokenizer_config.json").exists() else path  # the template it was trained with
    AutoTokenizer.from_pretrained(str(tok_from)).save_pretrained(str(out))
    card = {"base": base, "base_path": str(path), "adapter": str(folder), "dtype": p.dtype,
            "lora_r": cfg.get("r"), "lora_alpha": cfg.get("lora_alpha"), "merged_by": "studio finetune_merge"}
    (out / "studio_merge.json").write_text(json.dumps(card, indent=2))
    ctx.card(merge=card)
    size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    result = {"merged": str(out), "base": base, "dtype": p.dtype, "bytes": size, "seconds": time.perf_counter() - t0,
              "chat": {"model": str(out)}}
    if out.is_relative_to(ctx.run_dir):
        ctx.artifact(out / "config.json", "merged model config")
    if p.gguf:
        cmds = gguf_commands(out, p.quant)
        script = out / "to_gguf.sh"
        script.write_text("#!/bin/sh\n# " + GGUF_WHY + "\nset -e\n" + "\n".join(cmds) + "\n")
        script.chmod(0o755)
        ctx.log("GGUF: " + GGUF_WHY + " Run these commands (also in " + str(script) + "):\n" + "\n".join(cmds))
        if script.is_relative_to(ctx.run_dir):
            ctx.artifact(script, "GGUF export commands")
        result["gguf"] = {"done": False, "quant": p.quant, "script": str(script), "commands": cmds, "why": GGUF_WHY}
    ctx.progress(4, 4, f"merged into {out}")
    return result


GGUF_WHY = ("No maintained package ships llama.cpp's HF-to-GGUF converter, so the studio does not convert by itself: "
            "convert with a llama.cpp checkout, then quantise with llama-cpp-python (already installed).")
