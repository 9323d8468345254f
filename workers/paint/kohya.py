"""LoRA weights in kohya's key layout (sd-scripts' networks/lora.py), the file A1111, Forge and ComfyUI load.

kohya names a LoRA module by its place in the model with dots turned into underscores, prefixed by the model it
lives in: `lora_unet_` + the UNet module path (SD 1.5: diffusers' own module names, e.g.
`lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q`), `lora_te_` + the CLIP text encoder's
(`lora_te_text_model_encoder_layers_0_self_attn_q_proj`). Each module has `.lora_down.weight` (r x in, peft's
lora_A), `.lora_up.weight` (out x r, peft's lora_B) and `.alpha` (a scalar: the update is scaled by alpha / r, as
peft's lora_alpha / r). Metadata is kohya's `ss_` keys, every value a string.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

UNET_PREFIX = "lora_unet_"
TE_PREFIX = "lora_te_"


def kohya_name(prefix: str, module_path: str) -> str:
    return prefix + module_path.replace(".", "_")


def te_path(module_path: str) -> str:
    """CLIP's module path as kohya (and A1111) name it: under `text_model.` (transformers 4's CLIPTextModel; 5 drops
    that level, its state dict on disk keeps it)."""
    return module_path if module_path.startswith("text_model.") else "text_model." + module_path


def from_peft(state: dict, prefix: str, alpha: float) -> dict:
    """peft's `<module>.lora_A.weight` / `.lora_B.weight` state dict -> kohya's keys (fp16, as kohya saves)."""
    import torch

    out = {}
    for key, value in state.items():
        for peft_part, kohya_part in ((".lora_A.weight", ".lora_down.weight"), (".lora_B.weight", ".lora_up.weight")):
            if key.endswith(peft_part):
                name = kohya_name(prefix, key[: -len(peft_part)])
                out[name + kohya_part] = value.detach().to("cpu", torch.float16).contiguous()
                out[name + ".alpha"] = torch.tensor(float(alpha), dtype=torch.float16)
                break
        else:
            raise ValueError(f"unexpected LoRA weight {key!r} (only lora_A / lora_B weights are written)")
    return out


def metadata(**fields) -> dict[str, str]:
    """kohya's ss_ metadata: every value a string (None becomes "None", as sd-scripts writes it)."""
    meta = {"ss_network_module": "networks.lora", "ss_training_finished_at": str(time.time())}
    for k, v in fields.items():
        key = k if k.startswith(("ss_", "modelspec.")) else f"ss_{k}"
        meta[key] = v if isinstance(v, str) else json.dumps(v) if isinstance(v, (dict, list)) else str(v)
    return meta


def save(path: Path, unet_state: dict, te_state: dict | None, alpha: float, meta: dict[str, str]) -> dict:
    """Write NAME.safetensors in kohya's layout; returns the tensors written."""
    from safetensors.torch import save_file

    tensors = from_peft(unet_state, UNET_PREFIX, alpha)
    if te_state:
        tensors.update(from_peft({te_path(k): v for k, v in te_state.items()}, TE_PREFIX, alpha))
    tmp = Path(str(path) + ".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    tmp.replace(path)
    return tensors


def describe(path: Path | str) -> dict:
    """What a kohya-layout LoRA holds: modules per model, rank, alpha, and its ss_ metadata. ValueError on a file
    that is not a kohya-layout LoRA."""
    from safetensors import safe_open

    path = Path(path)
    try:
        with safe_open(str(path), "pt") as f:
            keys = list(f.keys())
            meta = f.metadata() or {}
            ranks = {f.get_slice(k).get_shape()[0] for k in keys if k.endswith(".lora_down.weight")}
    except Exception as e:  # safetensors raises its own error types for a file that is not safetensors
        raise ValueError(f"{path.name} is not a safetensors file ({str(e).splitlines()[0][:120]})") from None
    modules = {k.split(".", 1)[0] for k in keys}
    bad = [k for k in keys if not k.startswith((UNET_PREFIX, TE_PREFIX, "lora_te1_", "lora_te2_"))
           or not k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha"))]
    if not keys or bad:
        raise ValueError(f"{path.name} is not in kohya's LoRA layout (e.g. key {(bad or ['none'])[0]!r})")
    return {"unet_modules": sum(m.startswith(UNET_PREFIX) for m in modules),
            "te_modules": sum(m.startswith("lora_te") for m in modules),
            "ranks": sorted(ranks), "metadata": meta}
