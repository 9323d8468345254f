"""Memory of a fine-tuning run, from the model's config alone (no weights, no CUDA): what the gate reads.

The memory path the studio takes (and so what is estimated):
- CUDA: the 4-bit NF4 weights (double-quantised: ~0.52 bytes per parameter) with every other weight (embeddings, LM
  head, norms) kept in bf16, not upcast to fp32 as `prepare_model_for_kbit_training` does (+2 bytes per such
  parameter: 1.8 GiB at the Llama-3.1-8B shape); non-reentrant gradient checkpointing; paged 8-bit AdamW for the
  LoRA weights; bf16 autocast with SDPA attention (no seq^2 term); trl's fused LM head, which scores the vocabulary
  in chunks of 32768 so the (seq x 128k vocab) fp32 logits are never materialised.
- CPU (no Triton, no paged optimizer): the same 4-bit weights with fp32 compute, fp32 everywhere else, AdamW
  (torch) with two fp32 moments, trl's chunked LM head in plain torch, and the libraries' own resident memory.
"""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

GiB = 2**30
FUSED_CHUNK = 32768  # trl's _CHUNKED_LOGPROB_CHUNK_SIZE: vocabulary entries scored at a time
LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
FUSED_NAMES = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
# resident memory of transformers + peft + trl + datasets + pyarrow + bitsandbytes imported into a torch process
# (measured: ~0.45 GiB on the CPU); host memory only, so it counts on the CPU and not in VRAM
LIBRARIES_CPU = 640 * 2**20


def presets() -> dict[str, dict]:
    from studio.presets import presets as all_presets

    return all_presets()["finetune"]


@lru_cache(maxsize=64)
def _folder_config(path: str, mtime: float) -> dict:
    return json.loads((Path(path) / "config.json").read_text())


def model_config(base: str) -> dict:
    """The base model's config: a preset's from assets/, a local folder's config.json. ValueError otherwise."""
    table = presets()
    if base in table:
        return dict(table[base]["config"])
    p = Path(base).expanduser()
    if (p / "config.json").is_file():
        cfg = _folder_config(str(p), (p / "config.json").stat().st_mtime)
        return dict(cfg.get("text_config") or cfg)
    if p.is_dir():
        raise ValueError(f"{base} has no config.json: name a transformers model folder")
    raise ValueError(f"base {base!r} is neither a preset ({', '.join(table)}) nor a transformers model folder")


def shape(cfg: dict) -> dict:
    h = int(cfg["hidden_size"])
    H = int(cfg.get("num_attention_heads") or max(1, h // 128))
    kv = int(cfg.get("num_key_value_heads") or H)
    hd = int(cfg.get("head_dim") or h // H)
    i = int(cfg.get("intermediate_size") or 4 * h)
    L = int(cfg["num_hidden_layers"])
    V = int(cfg["vocab_size"])
    tied = bool(cfg.get("tie_word_embeddings", False))
    io = {"q_proj": (h, H * hd), "k_proj": (h, kv * hd), "v_proj": (h, kv * hd), "o_proj": (H * hd, h),
          "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}
    linear = L * sum(a * b for a, b in io.values())
    other = V * h * (1 if tied else 2) + L * 2 * h + h  # embeddings, LM head, norms
    return {"h": h, "H": H, "kv": kv, "hd": hd, "i": i, "L": L, "V": V, "io": io, "linear": linear, "other": other,
            "max_pos": int(cfg.get("max_position_embeddings") or 0)}


def targets(target_modules: str) -> list[str]:
    """The projection names LoRA adapts: all-linear, or a comma-separated list (Phi-3's fused names expand)."""
    t = target_modules.strip()
    if t in ("all-linear", "all", ""):
        return list(LINEAR)
    out: list[str] = []
    for name in [x.strip() for x in t.split(",") if x.strip()]:
        out += FUSED_NAMES.get(name, (name,))
    return out


def lora_params(s: dict, r: int, target_modules: str) -> int:
    return s["L"] * sum(r * (a + b) for name, (a, b) in s["io"].items() if name in targets(target_modules))


def breakdown(p, device) -> tuple[dict, str]:
    """The parts of the estimate (bytes) and a note; `p` is a finetune Params."""
    cuda = getattr(device, "kind", "cpu") == "cuda"
    s = shape(model_config(p.base))
    n_all = s["linear"] + s["other"]
    half = 2 if cuda else 4  # bf16 on CUDA, fp32 on the CPU
    B, T, h, i, L = p.micro_batch, p.max_seq_len, s["h"], s["i"], s["L"]
    if p.method == "qlora":
        weights = s["linear"] * 0.52 + s["other"] * half
    elif p.method == "lora":
        weights = n_all * half
    else:
        weights = n_all * 4  # fp32 master weights (bf16 autocast on CUDA)
    if p.method == "full":
        trainable = n_all
        grads, optim = trainable * 4, trainable * 8
    else:
        trainable = lora_params(s, p.lora_r, p.target_modules)
        weights += trainable * 4  # LoRA weights stay fp32
        grads = trainable * 4
        optim = trainable * (2 if cuda else 8)  # paged 8-bit AdamW on CUDA; two fp32 moments on the CPU
    # one decoder layer's activations (q/k/v/o, MLP gate/up/act/product, norms, LoRA dropout copies)
    layer = B * T * (10 * h + 4 * i) * half
    if not cuda:
        layer += B * s["H"] * T * T * 4  # the CPU's attention may build the score matrix
    if p.gradient_checkpointing:
        acts = L * B * T * h * half + 2 * layer  # each layer's input kept; one layer recomputed with its grads
    else:
        acts = L * layer + layer
    logits = B * T * min(s["V"], FUSED_CHUNK) * 4 * 2  # trl's fused head: one vocabulary chunk and its grad
    parts = {
        "weights": int(weights),
        "grads": int(grads),
        "optimizer": int(optim),
        "activations": int(acts + logits),
        "workspace": (256 if cuda else 128) * 2**20,
    }
    if not cuda:
        parts["libraries"] = LIBRARIES_CPU
    where = "4-bit NF4 + bf16" if p.method == "qlora" and cuda else (
        "4-bit NF4 + fp32" if p.method == "qlora" else ("bf16" if cuda and p.method == "lora" else "fp32"))
    what = (f"{trainable / 1e6:.1f} M LoRA params (r {p.lora_r})" if p.method != "full"
            else f"{trainable / 1e9:.2f} B params, all trained")
    note = (f"{p.method}, {n_all / 1e9:.2f} B base params in {where}; {what}; seq {T} x micro-batch {B}"
            + (", checkpointing" if p.gradient_checkpointing else ""))
    return parts, note


def shrinks(p, names_by_size: list[str]):
    """Changes to try, most preferred first: shorter sequences, micro-batch 1 (same effective batch), checkpointing,
    a smaller rank, then smaller presets."""
    if not p.gradient_checkpointing:
        yield {"gradient_checkpointing": True}
    if p.micro_batch > 1:
        yield {"micro_batch": 1, "grad_accum": p.grad_accum * p.micro_batch}
    mb = {"micro_batch": 1, "grad_accum": p.grad_accum * p.micro_batch} if p.micro_batch > 1 else {}
    t = p.max_seq_len
    while t > 512:
        t //= 2
        yield {**mb, "max_seq_len": t, **({"gradient_checkpointing": True} if not p.gradient_checkpointing else {})}
    if p.method != "full":
        r = p.lora_r
        while r > 4:
            r //= 2
            yield {**mb, "max_seq_len": max(512, min(p.max_seq_len, 512)), "lora_r": r}
    if p.method in ("lora", "full"):
        yield {**mb, "method": "qlora", "gradient_checkpointing": True}
    size = _params_of(p.base)
    for name in names_by_size:
        if name == p.base or _params_of(name) >= size:
            continue
        cap = shape(model_config(name))["max_pos"] or p.max_seq_len
        t = min(p.max_seq_len, cap)
        while True:
            yield {**mb, "base": name, "max_seq_len": t, "method": "qlora" if p.method == "full" else p.method,
                   "gradient_checkpointing": True}
            if t <= 512:
                break
            t //= 2


def _params_of(base: str) -> int:
    s = shape(model_config(base))
    return s["linear"] + s["other"]


def smaller_presets() -> list[str]:
    """Preset names, largest first (the gate tries the largest that fits first)."""
    return sorted(presets(), key=_params_of, reverse=True)

