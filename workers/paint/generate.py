"""Job kind `paint`: Stable Diffusion 1.5 / SDXL images with diffusers — text to image, img2img (init_image +
strength) and inpainting (mask) — with LoRAs, a live latent preview, and the settings in each PNG as A1111 writes
them. The gate picks the memory flags (fp16, VAE tiling/slicing, text encoders off the GPU, CPU offload)."""
from __future__ import annotations

import random
import time
from dataclasses import dataclass, replace
from pathlib import Path

from studio.gate import Estimate
from workers.paint import pipeline as P

PACKAGES = ("diffusers", "transformers", "peft")  # versions for the run card
PATHS = ("model", "init_image", "mask", "loras")  # params that name a server path or a job (studio.access)
MIN_SIDE = 16  # smallest init image / mask side accepted


@dataclass(frozen=True)
class Params:
    prompt: str = "a watercolor painting of a lighthouse at dawn"  # what to paint; <lora:…> tags are not parsed
    model: str = "sd15"  # a preset (sd15, sdxl-base-1.0), a diffusers folder, or a single-file .safetensors
    negative_prompt: str = ""  # what to steer away from
    width: int = 0  # pixels, a multiple of 8; 0: the model's native size (512 for SD 1.5, 1024 for SDXL)
    height: int = 0  # pixels, a multiple of 8; 0: the model's native size
    steps: int = 25  # denoising steps
    cfg: float = 7.0  # classifier-free guidance scale; 1 or less: no guidance (half the UNet work)
    sampler: str = "Euler a"  # Euler a, Euler, DPM++ 2M Karras, DPM++ SDE Karras, DDIM or UniPC
    seed: int = -1  # -1: a random seed (the one used is recorded); image i of a batch uses seed + i
    batch: int = 1  # images per run
    loras: str = ""  # `path:weight, path:weight`; a path may be a paint_lora job id; weight 1 when left out
    init_image: str = ""  # img2img: the image to start from (resized to width x height)
    strength: float = 0.75  # img2img / inpainting: how much of init_image is repainted (1: all of it)
    mask: str = ""  # inpainting: white where to repaint, black where to keep (needs init_image)
    memory: str = "auto"  # auto: the flags the gate chooses; offload: model CPU offload too; none: all on the GPU
    preview_every: int = 2  # steps between live previews (a cheap latent->RGB map, no VAE decode); 0: none
    threads: int = 0  # CPU threads (on the CPU); 0 uses every core

    def __post_init__(self):
        for name in ("width", "height"):
            v = getattr(self, name)
            if v and not (64 <= v <= 4096 and v % 8 == 0):
                raise ValueError(f"{name} must be a multiple of 8 between 64 and 4096 (or 0: native); got {v}")
        if not 1 <= self.steps <= 500:
            raise ValueError(f"steps must be between 1 and 500; got {self.steps}")
        if not 0 <= self.cfg <= 30:
            raise ValueError(f"cfg must be between 0 and 30; got {self.cfg}")
        if self.sampler not in P.SAMPLERS:
            raise ValueError(f"sampler must be one of {', '.join(P.SAMPLERS)}; got {self.sampler!r}")
        if not -1 <= self.seed <= 2**32 - 1:
            raise ValueError(f"seed must be -1 (random) or between 0 and {2**32 - 1}; got {self.seed}")
        if not 1 <= self.batch <= 16:
            raise ValueError(f"batch must be between 1 and 16; got {self.batch}")
        if not 0 < self.strength <= 1:
            raise ValueError(f"strength must be above 0 and at most 1; got {self.strength}")
        if self.memory not in P.MEMORY:
            raise ValueError(f"memory must be one of {', '.join(P.MEMORY)}; got {self.memory!r}")
        if not 0 <= self.threads <= 1024:
            raise ValueError(f"threads must be between 0 and 1024; got {self.threads}")
        if self.preview_every < 0:
            raise ValueError(f"preview_every must be 0 or more; got {self.preview_every}")
        if not self.model.strip():
            raise ValueError("model is empty: pick a preset (sd15, sdxl-base-1.0), a diffusers folder or a "
                             ".safetensors checkpoint")
        P.parse_loras(self.loras)


def path_items(name: str, value: str) -> list[str]:
    """The paths and job ids a param names, for studio.access: each LoRA of `loras` without its weight."""
    return [spec for spec, _ in P.parse_loras(value)] if name == "loras" else value.splitlines()


def check_image(path: str, what: str) -> tuple[int, int]:
    """The image's size; a clear ValueError when it is missing, not an image, or too small."""
    from PIL import Image, UnidentifiedImageError

    p = Path(path).expanduser()
    if not p.is_file():
        raise ValueError(f"{what}: {path} not found")
    try:
        with Image.open(p) as im:
            im.verify()
        with Image.open(p) as im:
            size = im.size
    # ImportError: once Ultralytics is imported (Detect ran in this process) its patched Image.open answers a file it
    # cannot identify by trying the HEIF plugin, and raises ModuleNotFoundError('pi_heif') instead
    except (UnidentifiedImageError, OSError, SyntaxError, ImportError) as e:
        why = "" if isinstance(e, ImportError) else f" ({type(e).__name__})"
        raise ValueError(f"{what}: {p.name} is not an image PIL can read{why}; give a PNG, JPEG or WebP") from None
    if min(size) < MIN_SIDE:
        raise ValueError(f"{what}: {p.name} is {size[0]}x{size[1]} pixels, too small; give an image at least "
                         f"{MIN_SIDE}x{MIN_SIDE} (it is resized to width x height)")
    return size


def validate(p: Params, config) -> Params:
    """The model found (a folder or file as its absolute path), images checked, LoRAs resolved to files."""
    if p.mask.strip() and not p.init_image.strip():
        raise ValueError("mask needs init_image: inpainting repaints the masked part of that image")
    if why := sampler_missing(p.sampler):
        raise ValueError(why)
    kind, where = P.resolve_model(p.model)
    info = P.model_info(p.model)
    if p.init_image.strip():
        check_image(p.init_image, "init_image")
    if p.mask.strip():
        check_image(p.mask, "mask")
    loras = [(str(P.resolve_lora(name, config.data_dir)), w) for name, w in P.parse_loras(p.loras)]
    side = info["default_size"]
    return replace(p, model=where if kind != "preset" else p.model, width=p.width or side, height=p.height or side,
                   loras=", ".join(f"{path}:{w:g}" for path, w in loras))


def size_of(p: Params, info: dict) -> tuple[int, int]:
    return p.width or info["default_size"], p.height or info["default_size"]


def model_key(info: dict, cuda: bool, offload: bool) -> str:
    return f"paint:{info['where']}:{'fp16' if cuda else 'fp32'}:{'offload' if offload else 'device'}"


def estimate(p: Params, device) -> Estimate:
    """Weights at fp16 (fp32 on the CPU), the UNet's activations at this size and batch (doubled by CFG), the VAE
    decode (plain, or one tile), from the preset's figures or the folder's configs; the flags in the note."""
    info = P.model_info(p.model)
    cuda = getattr(device, "kind", "cpu") == "cuda"
    width, height = size_of(p, info)
    flags = P.memory_plan(p.memory, info["arch"], width, height, p.batch, cuda)
    b = 2 if cuda else 4
    f = info["factor"]
    eff_batch = p.batch * (2 if p.cfg > 1 else 1)
    act = int(info["act_per_px"] * (width // f) * (height // f) * eff_batch * b / 2)
    tile = 1024 * 1024 if info["arch"] == "sdxl" else 512 * 512
    pixels = min(width * height, tile) // 16 if "VAE tiling" in flags else width * height
    decode = int(info["decode_per_px"] * pixels * (1 if "VAE slicing" in flags else p.batch) * b / 2)
    lora_bytes = 0
    for name, _ in P.parse_loras(p.loras):
        path = Path(name)
        lora_bytes += path.stat().st_size * (2 if not cuda else 1) if path.is_file() else 0
    weights = (info["unet"] + info["vae"] + info["text"]) * b
    offload = "model CPU offload" in flags
    parts = {"activations": max(act, decode), "workspace": 256 * 2**20 + lora_bytes}
    if not cuda:
        parts["libraries"] = 600 * 2**20  # diffusers + transformers imported into the worker
    if offload:  # one component on the device at a time: the UNet is the largest
        parts["weights"] = info["unet"] * b
        models = {model_key(info, cuda, True): 0}
    else:
        models = {model_key(info, cuda, False): weights}
    return Estimate(parts=parts, models=models,
                    note=f"{info['name']} ({info['arch']}) {width}x{height} x{p.batch}: " + " · ".join(flags))


def shrink(p: Params):
    """Changes to try when over budget, most preferred first: one image, CPU offload, then smaller sizes."""
    info = P.model_info(p.model)
    width, height = size_of(p, info)
    if p.batch > 1:
        yield {"batch": 1}
    if p.memory != "offload":
        yield {"batch": 1, "memory": "offload"} if p.batch > 1 else {"memory": "offload"}
    for scale in (0.75, 0.5, 0.375, 0.25):
        w, h = max(64, int(width * scale) // 64 * 64), max(64, int(height * scale) // 64 * 64)
        yield {"width": w, "height": h} | ({"batch": 1} if p.batch > 1 else {})
        yield {"width": w, "height": h, "memory": "offload"} | ({"batch": 1} if p.batch > 1 else {})


def load_pipeline(info: dict, device: str, offload: bool):
    import torch
    from diffusers import DiffusionPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline

    cuda = device == "cuda"
    dtype = torch.float16 if cuda else torch.float32
    extra = {"safety_checker": None, "requires_safety_checker": False} if info["arch"] == "sd15" else {}
    if info["kind"] == "preset":
        t = P.table()[info["where"]]
        # the variant's files (fp16) on the CPU too, as fp32: they are the files model_download fetches
        pipe = DiffusionPipeline.from_pretrained(t["repo"], dtype=dtype, variant=t.get("variant"),
                                                 use_safetensors=True, **extra)
    elif info["kind"] == "folder":
        pipe = DiffusionPipeline.from_pretrained(info["where"], dtype=dtype, **extra)
    else:
        cls = StableDiffusionXLPipeline if info["arch"] == "sdxl" else StableDiffusionPipeline
        try:
            pipe = cls.from_single_file(info["where"], dtype=dtype, **extra)
        except OSError as e:  # offline, and the architecture's config files (a few KB) are not in the HF cache
            repo = P.table()["sdxl-base-1.0" if info["arch"] == "sdxl" else "sd15"]["repo"]
            raise RuntimeError(f"a single-file checkpoint needs the {info['arch']} pipeline's config files from "
                               f"{repo} on the Hugging Face Hub once (a few KB), and the hub cannot be reached: "
                               f"connect once, or use a diffusers folder ({type(e).__name__})") from None
    pipe.set_progress_bar_config(disable=True)
    try:
        import xformers  # noqa: F401  (optional: today's wheel is built for an older torch)

        if cuda:
            pipe.enable_xformers_memory_efficient_attention()
    except Exception:  # noqa: BLE001 (not installed, or built for another torch): SDPA, diffusers' default
        pass
    if offload and cuda:
        pipe.enable_model_cpu_offload()
        return pipe, 0
    pipe.to(device)
    size = sum(p.numel() * p.element_size() for name in ("unet", "vae", "text_encoder", "text_encoder_2")
               if getattr(pipe, name, None) is not None for p in getattr(pipe, name).parameters())
    return pipe, size


def sampler_missing(name: str) -> str | None:
    """What to install (or pick instead) when a sampler's package is not here; None when it runs."""
    import importlib.util

    if P.SAMPLERS[name][0] == "DPMSolverSDEScheduler" and importlib.util.find_spec("torchsde") is None:
        return (f"sampler {name} needs the torchsde package (pip install -r requirements.txt); or pick "
                "DPM++ 2M Karras")
    return None


def set_sampler(pipe, name: str, seeds: list[int] | None = None) -> None:
    """The A1111 sampler `name` on the pipeline; an SDE sampler's Brownian noise is seeded per image from `seeds`
    (image i: seeds[i], as its starting noise), so a seed paints the same image alone or in a batch."""
    import diffusers

    cls_name, overrides = P.SAMPLERS[name]
    if cls_name == "DPMSolverSDEScheduler":
        if why := sampler_missing(name):
            raise RuntimeError(why)
        overrides = overrides | {"noise_sampler_seed": list(seeds) if seeds else None}
    pipe.scheduler = getattr(diffusers, cls_name).from_config(pipe.scheduler.config, **overrides)


def _load_image(path: str, size: tuple[int, int], mode: str):
    from PIL import Image

    with Image.open(Path(path).expanduser()) as im:
        return im.convert(mode).resize(size, Image.LANCZOS)


def run(p: Params, ctx) -> dict:
    import os

    import torch
    from PIL.PngImagePlugin import PngInfo

    from workers.paint.pngmeta import format_parameters

    ctx.progress(0, p.steps, "loading the model")
    info = P.model_info(p.model)
    cuda = ctx.device == "cuda"
    if not cuda:
        torch.set_num_threads(p.threads or os.cpu_count() or 1)
    width, height = size_of(p, info)
    flags = P.memory_plan(p.memory, info["arch"], width, height, p.batch, cuda)
    offload = "model CPU offload" in flags
    ctx.emit("flags", flags=flags)
    pipe, hit = ctx.cached(model_key(info, cuda, offload), lambda: load_pipeline(info, ctx.device, offload))
    seed = p.seed if p.seed >= 0 else random.randrange(2**32 - p.batch)
    ctx.card(seed=seed, flags=flags)
    device = torch.device(ctx.device)
    if not offload:  # text encoders a previous job moved off the GPU come back for encoding
        for name in ("text_encoder", "text_encoder_2"):
            if getattr(pipe, name, None) is not None:
                getattr(pipe, name).to(device)
    (pipe.vae.enable_tiling if "VAE tiling" in flags else pipe.vae.disable_tiling)()
    (pipe.vae.enable_slicing if "VAE slicing" in flags else pipe.vae.disable_slicing)()
    set_sampler(pipe, p.sampler, [seed + i for i in range(p.batch)])

    loras = []
    names, weights = [], []
    try:
        for i, (spec, weight) in enumerate(P.parse_loras(p.loras)):
            path = P.resolve_lora(spec, ctx.data_dir)
            adapter = f"lora{i}"
            pipe.load_lora_weights(str(path), adapter_name=adapter)
            names.append(adapter)
            weights.append(weight)
            loras.append((spec, path.stem, weight, P.file_hash(path, ctx.data_dir / "cache", 12)))
        if names:
            pipe.set_adapters(names, adapter_weights=weights)

        mode = "inpaint" if p.mask.strip() else "img2img" if p.init_image.strip() else "txt2img"
        call = pipe
        kwargs: dict = {}
        if mode != "txt2img":
            from diffusers import AutoPipelineForImage2Image, AutoPipelineForInpainting

            call = (AutoPipelineForInpainting if mode == "inpaint" else AutoPipelineForImage2Image).from_pipe(pipe)
            call.set_progress_bar_config(disable=True)
            kwargs["image"] = _load_image(p.init_image, (width, height), "RGB")
            kwargs["strength"] = p.strength
            if mode == "inpaint":
                kwargs["mask_image"] = _load_image(p.mask, (width, height), "L")

        guided = p.cfg > 1
        with torch.no_grad():  # prompts encoded here, so the text encoders may leave the GPU before denoising
            if info["arch"] == "sdxl":
                pe, npe, pooled, npooled = pipe.encode_prompt(
                    p.prompt, device=device if not offload else None, num_images_per_prompt=p.batch,
                    do_classifier_free_guidance=guided, negative_prompt=p.negative_prompt or None)
                kwargs |= {"pooled_prompt_embeds": pooled}
                if guided:
                    kwargs |= {"negative_pooled_prompt_embeds": npooled}
            else:
                pe, npe = pipe.encode_prompt(p.prompt, device, p.batch, guided,
                                             negative_prompt=p.negative_prompt or None)
        kwargs["prompt_embeds"] = pe
        if guided:
            kwargs["negative_prompt_embeds"] = npe
        if "text encoders off the GPU after encoding" in flags:
            for name in ("text_encoder", "text_encoder_2"):
                if getattr(pipe, name, None) is not None:
                    getattr(pipe, name).to("cpu")
            torch.cuda.empty_cache()

        previews = ctx.run_dir / "preview"
        previews.mkdir(exist_ok=True)
        t_start = [0.0]

        def on_step(pipe_, i, t, cb):
            total = getattr(pipe_, "num_timesteps", None) or p.steps
            if p.preview_every and ((i + 1) % p.preview_every == 0 or i + 1 == total):
                img = P.latent_preview(cb["latents"][0], info["arch"])
                dst = previews / f"step{i + 1:03d}.png"
                img.save(dst, compress_level=1)  # small and quick: the preview is replaced in a moment
                ctx.emit("preview", step=i + 1, total=total, path=str(dst.relative_to(ctx.run_dir)))
            done = i + 1
            rate = done / (time.perf_counter() - t_start[0])
            ctx.progress(done, total, f"step {done} of {total}", steps_per_s=round(rate, 3))  # a cancel point
            return cb

        generators = [torch.Generator("cpu").manual_seed(seed + i) for i in range(p.batch)]
        ctx.progress(0, p.steps, "denoising")
        t_start[0] = time.perf_counter()
        out = call(width=width, height=height, num_inference_steps=p.steps, guidance_scale=p.cfg,
                   generator=generators, num_images_per_prompt=1 if "prompt_embeds" in kwargs else p.batch,
                   callback_on_step_end=on_step, callback_on_step_end_tensor_inputs=["latents"], **kwargs)
        seconds = time.perf_counter() - t_start[0]
    finally:
        if names:
            pipe.unload_lora_weights()  # the cached pipeline stays plain for the next job

    weights_path = P.weights_file(info)
    model_hash = P.file_hash(weights_path, ctx.data_dir / "cache") if weights_path else ""
    out_dir = ctx.run_dir / "images"
    out_dir.mkdir(exist_ok=True)
    images, texts = [], []
    for i, img in enumerate(out.images):
        text = format_parameters(
            prompt=p.prompt, negative_prompt=p.negative_prompt, steps=p.steps, sampler=p.sampler, cfg=p.cfg,
            seed=seed + i, width=width, height=height, model_name=info["name"], model_hash=model_hash, loras=loras,
            strength=p.strength if mode != "txt2img" else None,
            extra={"Mode": mode, "Memory": p.memory} if mode != "txt2img" or p.memory != "auto" else None)
        meta = PngInfo()
        meta.add_text("parameters", text)
        dst = out_dir / f"{i:02d}-{seed + i}.png"
        img.save(dst, pnginfo=meta)
        ctx.artifact(dst, f"image {i + 1} (seed {seed + i})")
        images.append(str(dst.relative_to(ctx.run_dir)))
        texts.append(text)
    steps_done = getattr(call, "num_timesteps", None) or p.steps
    ctx.progress(steps_done, steps_done, "done")
    return {"images": images, "seed": seed, "seeds": [seed + i for i in range(p.batch)], "parameters": texts,
            "mode": mode, "flags": flags, "width": width, "height": height, "model": info["name"],
            "model_hash": model_hash, "seconds": seconds, "steps": steps_done,
            "steps_per_s": steps_done / seconds if seconds else None, "model_cached": hit}
