"""What Paint knows about a Stable Diffusion model without loading it (arch, parameter counts, VAE factor, read
from the preset table or from config.json / safetensors headers), the memory plan the gate chooses, samplers, LoRA
specs, the cheap latent->RGB preview and model hashes. No torch or diffusers at import time."""
from __future__ import annotations

import json
import os
import struct
from functools import lru_cache
from pathlib import Path

from studio.presets import presets

# the names A1111 shows -> (diffusers scheduler class, from_config overrides)
SAMPLERS = {
    "Euler a": ("EulerAncestralDiscreteScheduler", {}),
    "Euler": ("EulerDiscreteScheduler", {}),
    "DPM++ 2M Karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    # k-diffusion's dpmpp_sde with Karras sigmas, as A1111's: Brownian-tree noise (torchsde) seeded per image, two
    # UNet calls per step
    "DPM++ SDE Karras": ("DPMSolverSDEScheduler", {"use_karras_sigmas": True}),
    "DDIM": ("DDIMScheduler", {}),
    "UniPC": ("UniPCMultistepScheduler", {}),
}
MEMORY = ("auto", "offload", "none")

# approx-cheap preview: latent channel -> RGB (ComfyUI's latent_formats, as A1111's "Approx cheap")
LATENT_RGB = {
    "sd15": ([[0.3512, 0.2297, 0.3227], [0.3250, 0.4974, 0.2350], [-0.2829, 0.1762, 0.2721],
              [-0.2120, -0.2616, -0.7177]], [0.0, 0.0, 0.0]),
    "sdxl": ([[0.3651, 0.4232, 0.4341], [-0.2533, -0.0042, 0.1068], [0.1076, 0.1111, -0.0362],
              [-0.3165, -0.2492, -0.2188]], [0.1084, -0.0175, -0.0011]),
}


def table() -> dict:
    return presets()["sd"]


def _header_params(path: Path) -> dict[str, int]:
    """Tensor name -> element count, from a safetensors header (reads a few KB, not the weights)."""
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        if n > 100 * 2**20:
            raise ValueError(f"{path.name} is not a safetensors file (header of {n} bytes)")
        header = json.loads(f.read(n))
    out = {}
    for k, v in header.items():
        if k != "__metadata__":
            c = 1
            for d in v["shape"]:
                c *= d
            out[k] = c
    return out


def _folder_params(folder: Path) -> int:
    files = sorted(folder.glob("*.safetensors"))
    fp16 = [f for f in files if ".fp16." in f.name]
    return sum(sum(_header_params(f).values()) for f in (fp16 or files))


def resolve_model(model: str) -> tuple[str, str]:
    """(kind, where): ("preset", name), ("folder", path) or ("file", path); ValueError naming what to give."""
    model = model.strip()
    if model in table():
        return "preset", model
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise ValueError(f"model: {path} is a folder without model_index.json; give a diffusers pipeline folder "
                             "(as save_pretrained writes it), a .safetensors checkpoint or a preset")
        return "folder", str(path.resolve())
    if path.is_file():
        if path.suffix.lower() != ".safetensors":
            raise ValueError(f"model: {path.name} is not a .safetensors checkpoint; .ckpt files are pickles the "
                             "studio does not load — convert it or download the .safetensors version")
        return "file", str(path.resolve())
    raise ValueError(f"model: {model!r} is neither a preset ({', '.join(table())}), a diffusers folder nor a "
                     ".safetensors checkpoint on this machine")



COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")  # the weight folders of an SD pipeline


def download_patterns(name: str) -> tuple[list[str], list[str]]:
    """(allow, ignore) patterns for the files of preset `name`'s hub repo that Paint's load_pipeline asks for (its
    `variant`, safetensors only, the safety checker passed as None), as diffusers' from_pretrained works them out:
    model_index.json, the scheduler, the feature extractor's config, each component's config and tokenizer, and
    every folder's variant safetensors (SDXL's spare vae_1_0 too: from_pretrained fetches it). Not the fp32 copies,
    .bin, ONNX/Flax/OpenVINO exports or single-file checkpoints beside them (~10 GB more for SD 1.5)."""
    t = table()[name]
    suffix = f".{t['variant']}" if t.get("variant") else ""
    allow = ["model_index.json", "scheduler/*", "feature_extractor/*", f"*/*{suffix}.safetensors"]
    for c in COMPONENTS:
        if c in t:
            allow.append(f"{c}/config.json")
            if c.startswith("text_encoder"):
                allow.append(f"tokenizer{c[len('text_encoder'):]}/*")
    return allow, ["safety_checker/*"]


@lru_cache(maxsize=32)
def _info(kind: str, where: str, stamp: float) -> dict:
    if kind == "preset":
        t = table()[where]
        m = t["params_m"]
        return {"arch": t["arch"], "name": where, "unet": int(m["unet"] * 1e6), "vae": int(m["vae"] * 1e6),
                "text": int(sum(v for k, v in m.items() if k.startswith("text_encoder")) * 1e6),
                "act_per_px": t["act_bytes_per_latent_px"], "decode_per_px": t["vae_decode_bytes_per_px"],
                "factor": 2 ** (len(t["vae"]["block_out_channels"]) - 1), "default_size": t["default_size"]}
    if kind == "folder":
        root = Path(where)
        index = json.loads((root / "model_index.json").read_text())
        arch = "sdxl" if "XL" in index.get("_class_name", "") else "sd15"
        unet_cfg = json.loads((root / "unet" / "config.json").read_text())
        vae_cfg = json.loads((root / "vae" / "config.json").read_text())
        counts = {c: _folder_params(root / c) for c in ("unet", "vae", "text_encoder", "text_encoder_2")
                  if (root / c).is_dir()}
        base = table()["sdxl-base-1.0" if arch == "sdxl" else "sd15"]
        width = unet_cfg.get("block_out_channels", [320])[0] / 320
        attn_first = str(unet_cfg.get("down_block_types", ["CrossAttn"])[0]).startswith("CrossAttn")
        act = int((140000 if attn_first else 56000) * width)  # the presets' figures, by width
        return {"arch": arch, "name": root.name, "unet": counts.get("unet", 0), "vae": counts.get("vae", 0),
                "text": counts.get("text_encoder", 0) + counts.get("text_encoder_2", 0), "act_per_px": act,
                "decode_per_px": int(base["vae_decode_bytes_per_px"] * vae_cfg.get("block_out_channels", [128])[0]
                                     / 128),
                "factor": 2 ** (len(vae_cfg.get("block_out_channels", [0] * 4)) - 1),
                "default_size": unet_cfg.get("sample_size", 64) * 2 ** (len(vae_cfg.get("block_out_channels",
                                                                                          [0] * 4)) - 1)}
    counts = _header_params(Path(where))
    arch = "sdxl" if any(k.startswith("conditioner.embedders.1") for k in counts) else "sd15"
    if not any(k.startswith("model.diffusion_model.") for k in counts):
        raise ValueError(f"model: {Path(where).name} holds no Stable Diffusion UNet (no model.diffusion_model.* "
                         "keys): is it a LoRA or a VAE? Give it under loras, or pick a full checkpoint")
    base = _info("preset", "sdxl-base-1.0" if arch == "sdxl" else "sd15", 0)

    def total(*prefixes):
        return sum(v for k, v in counts.items() if k.startswith(prefixes))

    return base | {"name": Path(where).stem, "unet": total("model.diffusion_model."),
                   "vae": total("first_stage_model."), "text": total("cond_stage_model.", "conditioner.")}


def model_info(model: str) -> dict:
    """Arch (sd15 / sdxl), parameter counts (unet, vae, text), working-memory figures, VAE factor; cheap."""
    kind, where = resolve_model(model)
    stamp = os.stat(where).st_mtime if kind != "preset" else 0.0
    return _info(kind, where, stamp) | {"kind": kind, "where": where}


def memory_plan(memory: str, arch: str, width: int, height: int, batch: int, cuda: bool) -> list[str]:
    """The flags a run uses, chosen from the size, the model and the device (shown to the user)."""
    flags = ["fp16" if cuda else "fp32", "SDPA attention"]
    large = width * height >= 1024 * 1024
    if memory == "none":
        return flags
    if large or (memory == "offload"):
        flags.append("VAE tiling")
    if batch > 1:
        flags.append("VAE slicing")
    if memory == "offload" and cuda:
        flags.append("model CPU offload")
    elif cuda and (arch == "sdxl" or large):
        flags.append("text encoders off the GPU after encoding")
    return flags


def parse_loras(spec: str) -> list[tuple[str, float]]:
    """`path:weight, path:weight` (commas or newlines; weight 1 when left out) -> [(path or job id, weight)]."""
    out = []
    for item in (x.strip() for x in spec.replace("\n", ",").split(",")):
        if not item:
            continue
        name, sep, w = item.rpartition(":")
        try:
            weight = float(w) if sep else 1.0
        except ValueError:
            name, weight = item, 1.0
        if not sep or not name:
            name = item if not sep else name
        if not -4 <= weight <= 4:
            raise ValueError(f"loras: weight {weight} for {name} is outside -4..4")
        out.append((name.strip(), weight))
    return out


def resolve_lora(name: str, data_dir: Path) -> Path:
    """A paint_lora job id (its run folder's .safetensors) or a .safetensors file; ValueError otherwise."""
    run = Path(data_dir) / "runs" / name
    if name and "/" not in name and run.is_dir():
        files = sorted((f for f in run.rglob("*.safetensors") if "checkpoint" not in f.parts
                        and "class_images" not in f.parts), key=lambda f: (len(f.parts), f.name))
        if not files:
            raise ValueError(f"loras: job {name} has no .safetensors LoRA (has it finished?)")
        return files[0]
    path = Path(name).expanduser()
    if not path.is_file():
        raise ValueError(f"loras: {name!r} is neither a .safetensors file nor a paint_lora job")
    if path.suffix.lower() != ".safetensors":
        raise ValueError(f"loras: {path.name} is not a .safetensors file")
    return path.resolve()


def file_hash(path: Path, cache_dir: Path | None = None, n: int = 10) -> str:
    """sha256 of a file, the first `n` hex digits (A1111's model hash is 10); cached by path, size and mtime."""
    st = path.stat()
    key = f"{path}|{st.st_size}|{st.st_mtime_ns}"
    store = Path(cache_dir) / "paint_hashes.json" if cache_dir else None
    known = {}
    if store and store.exists():
        try:
            known = json.loads(store.read_text())
        except (OSError, json.JSONDecodeError):
            known = {}
    if key not in known:  # a 2-7 GB checkpoint takes seconds to hash: done once per file version
        from studio.hashing import sha256

        known[key] = sha256(path)
        if store:
            store.parent.mkdir(parents=True, exist_ok=True)
            store.write_text(json.dumps(known))
    return known[key][:n]


def weights_file(info: dict) -> Path | None:
    """The file whose hash names the model: the checkpoint itself, or the folder's UNet weights."""
    if info["kind"] == "file":
        return Path(info["where"])
    if info["kind"] == "folder":
        files = sorted((Path(info["where"]) / "unet").glob("*.safetensors"))
        return files[0] if files else None
    try:
        from huggingface_hub import try_to_load_from_cache

        t = table()[info["where"]]
        for name in ("unet/diffusion_pytorch_model.fp16.safetensors", "unet/diffusion_pytorch_model.safetensors"):
            got = try_to_load_from_cache(t["repo"], name)
            if isinstance(got, str):
                return Path(got)
    except Exception:  # noqa: BLE001 (no hub, no cache)
        pass
    return None


def latent_preview(latents, arch: str):
    """One image's latents (C, h, w) -> a PIL image through a fixed linear map: no VAE decode."""
    import numpy as np
    import torch
    from PIL import Image

    factors, bias = LATENT_RGB.get(arch, LATENT_RGB["sd15"])
    lat = latents.detach().float().cpu()[:4]
    f = torch.tensor(factors[:lat.shape[0]])
    rgb = torch.einsum("chw,cr->hwr", lat, f) + torch.tensor(bias)
    arr = ((rgb.clamp(-1, 1) + 1) * 127.5).to(torch.uint8).numpy()
    return Image.fromarray(np.ascontiguousarray(arr))
