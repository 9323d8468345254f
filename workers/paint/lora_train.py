"""Job kind `paint_lora`: train a Stable Diffusion 1.5 LoRA on 20-150 of your images into a `.safetensors` file in
kohya's layout (A1111, Forge and ComfyUI load it unchanged; so does the `paint` kind and diffusers'
`load_lora_weights`).

The loop is diffusers' train_text_to_image_lora / train_dreambooth_lora recipe, compact: frozen VAE, text encoder
and UNet; peft LoRA on the UNet's attention projections (to_q, to_k, to_v, to_out.0) and, with
train_text_encoder, on CLIP's (q_proj, k_proj, v_proj, out_proj); epsilon- or v-prediction MSE at uniformly drawn
timesteps. Latents are encoded once (kohya's cache_latents: each image's latent mean and std, a fresh sample every
step), and so are the captions' embeddings when the text encoder is not trained (the VAE and text encoder stay for
the samples, in fp16 they are ~0.4 GiB). Prior
preservation (DreamBooth): class images generated with the base once, cached under the data folder by base, prompt
and resolution, and reused by every later run (more are added when a run asks for more).

Every step is a cancel point; the noise, timesteps and image order of step s come from (seed, s), so Resume
continues the same run. Run folder (runs/<job id>/):

    run.json, events.jsonl        the run card; progress, metric (loss, lr, eta_s, peak_bytes), image_report, sample
    image_report.json             the image-set report (workers.paint.images)
    samples/step-<n>-<i>.png      fixed-seed samples every sample_every steps
    checkpoint/state.json         {"step", "files": {name: sha256}, "data_hash", ...}; Resume reads only a checkpoint
    checkpoint/lora-<step>.safetensors, optim-<step>.safetensors   of this studio's runs folder whose hashes match
    NAME.safetensors              the LoRA, kohya layout + ss_ metadata
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Literal

from studio.gate import Estimate
from studio.hashing import sha256

PACKAGES = ("diffusers", "transformers", "peft", "bitsandbytes", "Pillow")  # versions for the run card
PATHS = ("base", "images", "resume_from")  # params that name a server path or a job (studio.access)

DEFAULT_BASE = "sd15"  # the SD 1.5 preset (assets/presets/paint.json, table "sd")
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]  # diffusers' LoRA examples; kohya's attention modules
TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
# resident memory of diffusers + transformers + peft + PIL imported into a torch process (measured ~0.55 GiB on
# the CPU with the tiny test pipeline); host memory only
LIBRARIES_CPU = 700 * 2**20


@dataclass(frozen=True)
class Params:
    base: str = DEFAULT_BASE  # sd15 (the SD 1.5 preset) or an SD 1.5-style diffusers folder (model_index.json, unet/)
    images: str = ""  # a folder or a .zip of 20-150 images; captions from .txt beside them; kohya's N_concept folders
    instance_prompt: str = ""  # caption for images without a .txt, e.g. "a photo of sks mug"
    class_prompt: str = ""  # what the subject is in general ("a photo of a mug"): prior preservation's prompt
    prior_preservation: bool = False  # DreamBooth's prior loss on class images the base generates (keeps the class)
    num_class_images: int = 100  # class images to generate once and reuse (DreamBooth's default)
    prior_loss_weight: float = 1.0  # weight of the class images' loss
    name: str = ""  # the file's name (NAME.safetensors); empty: lora-<job id>
    rank: int = 8  # LoRA rank (4-16 for a style or subject)
    alpha: float = 8.0  # LoRA alpha: the update is scaled by alpha / rank (kohya's network_alpha)
    lr: float = 1e-4  # learning rate (diffusers' and kohya's LoRA default)
    steps: int = 1000  # optimizer steps
    batch_size: int = 1  # images per step (each step's images share a bucket); out of memory: in halves, accumulated
    resolution: int = 512  # training size (SD 1.5: 512); a multiple of 64
    bucketing: bool = True  # aspect-ratio buckets: portrait and landscape images are not cropped to squares
    train_text_encoder: bool = False  # LoRA on the CLIP text encoder too (more memory, learns captions' words faster)
    gradient_checkpointing: bool = True  # recompute activations in backward: far less memory for ~25% more time
    mixed_precision: Literal["fp16", "bf16", "no"] = "fp16"  # frozen weights and compute on CUDA (the CPU uses fp32)
    optimizer: Literal["adamw", "adamw8bit"] = "adamw"  # adamw8bit: bitsandbytes' 8-bit AdamW (CUDA)
    lr_warmup_steps: int = 0  # linear warm-up; constant after (diffusers' default schedule)
    max_grad_norm: float = 1.0  # gradient clipping; 0 turns it off
    sample_every: int = 100  # steps between fixed-seed samples; 0: no samples
    sample_prompts: str = ""  # prompts for samples, one a line (or | between); empty: the first caption
    sample_steps: int = 20  # denoising steps per sample
    checkpoint_every: int = 100  # steps between checkpoints (one is also written on cancel and at the end)
    seed: int = 42  # image order, noise, timesteps, LoRA init, class images and samples
    threads: int = 0  # CPU threads; 0 uses every core
    resume_from: str = ""  # a paint_lora job id whose checkpoint this run continues (set by Resume)

    def __post_init__(self):
        for n, lo, hi in [("rank", 1, 256), ("alpha", 0.01, 1024.0), ("lr", 1e-7, 1.0), ("steps", 1, 1_000_000),
                          ("batch_size", 1, 64), ("resolution", 64, 2048), ("num_class_images", 1, 10_000),
                          ("prior_loss_weight", 0.0, 100.0), ("lr_warmup_steps", 0, 1_000_000),
                          ("max_grad_norm", 0.0, 1000.0), ("sample_every", 0, 1_000_000), ("sample_steps", 1, 200),
                          ("checkpoint_every", 1, 1_000_000), ("seed", 0, 2**31 - 1), ("threads", 0, 1024)]:
            v = getattr(self, n)
            if not lo <= v <= hi:
                raise ValueError(f"{n} must be between {lo} and {hi}; got {v}")
        if self.resolution % 64:
            raise ValueError(f"resolution must be a multiple of 64 (SD's latent grid); got {self.resolution}, "
                             f"try {max(64, self.resolution // 64 * 64)}")
        if not self.images.strip():
            raise ValueError("no images given: a folder or a .zip of 20-150 images")
        if not self.base.strip():
            raise ValueError(f"no base model given: {DEFAULT_BASE} or a diffusers folder")
        if self.prior_preservation and not self.class_prompt.strip():
            raise ValueError("prior_preservation needs a class_prompt, e.g. 'a photo of a mug'")
        if self.name and (Path(self.name).name != self.name or self.name.startswith(".")):
            raise ValueError(f"name must be a plain file name without folders; got {self.name!r}")


# ---- the base model ------------------------------------------------------------------------------------------------
def _preset(base: str) -> dict | None:
    from studio.presets import presets

    return presets().get("sd", {}).get(base)


def base_source(base: str) -> str:
    """What from_pretrained loads: the preset's hub repo, or the folder."""
    preset = _preset(base)
    return preset["repo"] if preset else str(Path(base).expanduser())


def _check_base(base: str) -> None:
    preset = _preset(base)
    if preset:
        if preset.get("arch") != "sd15":
            raise ValueError(f"paint_lora trains SD 1.5 LoRAs; {base} is {preset.get('arch')}: use {DEFAULT_BASE} or "
                             "an SD 1.5-style diffusers folder")
        return
    p = Path(base).expanduser()
    if not (p / "model_index.json").is_file() or not (p / "unet").is_dir():
        raise ValueError(f"base {base!r} is neither the {DEFAULT_BASE} preset nor a diffusers folder "
                         "(model_index.json, unet/, vae/, text_encoder/, tokenizer/)")
    idx = json.loads((p / "model_index.json").read_text())
    if "text_encoder_2" in idx:
        raise ValueError(f"{p.name} is an SDXL pipeline; paint_lora trains SD 1.5-style bases (one text encoder)")


def _count(folder: Path) -> int:
    """Parameters in a component folder, from its safetensors headers (no tensor is read)."""
    total = 0
    for f in folder.glob("*.safetensors"):
        with open(f, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(n))
        for k, v in header.items():
            if k != "__metadata__":
                size = 1
                for d in v["shape"]:
                    size *= d
                total += size
    return total


def _shape(base: str) -> dict:
    """Parameter counts and the UNet's shape: from the folder's files, or SD 1.5's for the preset."""
    preset = _preset(base)
    if preset:
        m = preset["params_m"]
        return {"unet": int(m["unet"] * 1e6), "text_encoder": int(m["text_encoder"] * 1e6), "vae": int(m["vae"] * 1e6),
                "unet_config": preset["unet"], "vae_scale": 2 ** (len(preset["vae"]["block_out_channels"]) - 1),
                "te_layers": preset["text_encoder"]["num_hidden_layers"],
                "te_hidden": preset["text_encoder"]["hidden_size"]}
    p = Path(base).expanduser()
    ucfg = json.loads((p / "unet" / "config.json").read_text())
    tcfg = json.loads((p / "text_encoder" / "config.json").read_text())
    vcfg = json.loads((p / "vae" / "config.json").read_text())
    return {"unet": _count(p / "unet"), "text_encoder": _count(p / "text_encoder"), "vae": _count(p / "vae"),
            "unet_config": ucfg, "vae_scale": 2 ** (len(vcfg.get("block_out_channels", [1, 2, 3, 4])) - 1),
            "te_layers": tcfg.get("num_hidden_layers", 12), "te_hidden": tcfg.get("hidden_size", 768)}


def _file_bytes(base: str, s: dict) -> int:
    """Bytes of the UNet, text encoder and VAE weight files (the preset's fp16 files when it is not a folder)."""
    p = Path(base).expanduser()
    if _preset(base) or not p.is_dir():
        return 2 * (s["unet"] + s["text_encoder"] + s["vae"])
    return sum(f.stat().st_size for sub in ("unet", "text_encoder", "vae") for f in (p / sub).glob("*.safetensors"))


def _lora_count(s: dict, rank: int, text_encoder: bool) -> int:
    """LoRA parameters: r x (in + out) per adapted projection."""
    u = s["unet_config"]
    chans, cross = u["block_out_channels"], u.get("cross_attention_dim", 768)
    n = 0
    for i, t in enumerate(u["down_block_types"]):
        if "CrossAttn" in t:
            c = chans[i]
            per_block = 4 * 2 * c + 2 * (c + c) + 2 * (cross + c)  # attn1 q,k,v,out; attn2 q,out; attn2 k,v
            n += per_block * (u.get("layers_per_block", 2) * 2 + 1)  # down + up (one more) transformer blocks
    if text_encoder:
        n += s["te_layers"] * 4 * 2 * s["te_hidden"]
    return n * rank


def validate(p: Params, config) -> None:
    """Bad input fails here, before anything is queued: the base, the image set, the checkpoint."""
    from workers.paint import images

    _check_base(p.base)
    images.read_set(p.images, p.instance_prompt, p.resolution, p.bucketing, config.data_dir / "paint" / "datasets")
    if p.resume_from:
        if not (config.runs_dir / p.resume_from / "checkpoint" / "state.json").exists():
            raise ValueError(f"job {p.resume_from} has no paint_lora checkpoint to resume from")


def estimate(p: Params, device) -> Estimate:
    """Frozen weights in the compute dtype, fp32 LoRA weights, grads and optimizer moments, the UNet's activations at
    the largest bucket (from its shape), the VAE while latents are cached, and the sampler's decode."""
    cuda = getattr(device, "kind", "cpu") == "cuda"
    s = _shape(p.base)
    half = 2 if cuda and p.mixed_precision != "no" else 4
    lora = _lora_count(s, p.rank, p.train_text_encoder)
    u = s["unet_config"]
    chans = u["block_out_channels"]
    side = p.resolution // s["vae_scale"]
    # the largest bucket has the same area as resolution²; activations scale with area
    pixels = [side * side // 4**i for i in range(len(chans))]
    attn = ["CrossAttn" in t for t in u["down_block_types"]]
    # tensors of c x h x w kept for backward per level (down: layers_per_block blocks, up: one more): a resnet keeps
    # ~8 (norms, SiLUs, convs), a transformer block ~28 (norms, q/k/v/out, GEGLU's 8c and 4c, projections); GroupNorm
    # and softmax run in fp32 under autocast, so their saved inputs count twice
    lpb = u.get("layers_per_block", 2)
    per_level = [(2 * lpb + 1) * (8 + (28 if a else 0)) * 1.5 for a in attn]
    elems = sum(k * c * px for k, c, px in zip(per_level, chans, pixels))
    if p.gradient_checkpointing:
        # diffusers checkpoints each resnet and transformer block: their inputs stay, one block is recomputed
        elems = sum((2 * lpb + 1) * 2 * c * px for c, px in zip(chans, pixels)) + max(
            k / (2 * lpb + 1) * c * px for k, c, px in zip(per_level, chans, pixels))
    acts = elems * half * p.batch_size * (2 if p.prior_preservation else 1)
    if not cuda and any(attn):
        # the CPU's attention may build the (tokens x tokens) score matrix of the first attention level
        first = attn.index(True)
        heads = max(1, chans[first] // u.get("attention_head_dim", 8)) if isinstance(
            u.get("attention_head_dim", 8), int) else 8
        acts += 3 * heads * pixels[first] ** 2 * 4 * p.batch_size
    if p.train_text_encoder:
        acts += p.batch_size * 77 * s["te_hidden"] * s["te_layers"] * 20 * half
    frozen = (s["unet"] + s["text_encoder"] + s["vae"]) * half
    moments = lora * (2 if p.optimizer == "adamw8bit" and cuda else 8)
    # the VAE's encoder (latent caching) and decoder (samples) at the resolution: its 128-channel full-size maps
    vae_work = 6 * 128 * p.resolution * p.resolution * half
    parts = {
        "weights": int(frozen + lora * 4),
        "grads": int(lora * 4),
        "optimizer": int(moments),
        "activations": int(acts + vae_work),
        "workspace": (256 if cuda else 64) * 2**20,
    }
    if not cuda:
        parts["libraries"] = LIBRARIES_CPU
        # loading on the CPU maps each weights file while its tensors are copied into the model (measured at the
        # SD 1.5 shape: the resident peak is the fp32 weights plus the fp16 files, ~2 GiB over)
        parts["weights"] += _file_bytes(p.base, s)
    note = (f"UNet {s['unet'] / 1e6:.0f} M params frozen in {'fp32' if half == 4 else p.mixed_precision}; "
            f"{lora / 1e6:.2f} M LoRA params (r {p.rank}{', + text encoder' if p.train_text_encoder else ''}); "
            f"{p.resolution}² x batch {p.batch_size}" + (", checkpointing" if p.gradient_checkpointing else "")
            + (", 8-bit AdamW" if p.optimizer == "adamw8bit" else ""))
    return Estimate(parts=parts, note=note)


def shrink(p: Params):
    """Changes to try when over budget, most preferred first (the gate takes the first that fits)."""
    seen = []

    def once(change):
        change = {k: v for k, v in change.items() if getattr(p, k) != v}
        if change and change not in seen:
            seen.append(change)
            return change
        return None

    # half-precision weights first (halves the largest part), then activations, then the small parts
    steps = [{"mixed_precision": "fp16"} if p.mixed_precision == "no" else {}, {"gradient_checkpointing": True},
             {"batch_size": 1}, {"optimizer": "adamw8bit"}, {"train_text_encoder": False}]
    acc: dict = {}
    for s in steps:
        acc = {**acc, **s}
        c = once(acc)
        if c:
            yield c
    r = p.resolution
    while r > 256:
        r -= 128 if r > 512 else 64
        c = once({**acc, "resolution": r})
        if c:
            yield c


# ---- checkpoints the studio wrote ------------------------------------------------------------------------------
def save_checkpoint(ckpt: Path, step: int, lora: dict, optim, extra: dict) -> None:
    """The LoRA weights and optimizer state as safetensors, then state.json with their hashes (a crash leaves the
    last whole checkpoint)."""
    import torch
    from safetensors.torch import save_file

    ckpt.mkdir(parents=True, exist_ok=True)
    osd = optim.state_dict()
    flat = {f"{i}.{k}": (v if torch.is_tensor(v) else torch.tensor(v)).detach().cpu().contiguous()
            for i, st in osd["state"].items() for k, v in st.items()}
    names = {"lora": f"lora-{step}.safetensors", "optim": f"optim-{step}.safetensors"}
    save_file({k: v.detach().cpu().contiguous() for k, v in lora.items()}, str(ckpt / (names["lora"] + ".tmp")))
    save_file(flat, str(ckpt / (names["optim"] + ".tmp")))
    for n in names.values():
        os.replace(ckpt / (n + ".tmp"), ckpt / n)
    state = {"step": step, "files": {n: sha256(ckpt / n) for n in names.values()}, **names,
             "param_groups": osd["param_groups"], **extra}
    (ckpt / "state.json.tmp").write_text(json.dumps(state, indent=1, default=str))
    os.replace(ckpt / "state.json.tmp", ckpt / "state.json")
    for f in ckpt.glob("*.safetensors"):
        if f.name not in names.values():
            f.unlink()


def load_checkpoint(runs_dir: Path, job_id: str) -> tuple[dict, dict, dict]:
    """(state, lora tensors, flat optimizer tensors) of job_id's checkpoint, after checking it lies in this studio's
    runs folder and every file matches the hash its job recorded."""
    from safetensors.torch import load_file

    runs = Path(runs_dir).resolve()
    ckpt = (runs / job_id / "checkpoint").resolve()
    if not ckpt.is_relative_to(runs) or ckpt.parent.parent != runs:
        raise ValueError(f"{job_id} is not a job of this studio")
    state = json.loads((ckpt / "state.json").read_text())
    for name, digest in state["files"].items():
        f = ckpt / name
        if not f.is_file() or sha256(f) != digest:
            raise ValueError(f"job {job_id}'s checkpoint changed since the studio wrote it ({name}); not loading it. "
                             "Retry to train from scratch")
    return state, load_file(str(ckpt / state["lora"])), load_file(str(ckpt / state["optim"]))


# ---- the run ----------------------------------------------------------------------------------------------------
def _sample_prompts(p: Params, first_caption: str) -> list[str]:
    raw = p.sample_prompts.replace("|", "\n")
    prompts = [x.strip() for x in raw.splitlines() if x.strip()]
    return prompts or [first_caption]


def _step_rng(seed: int, step: int):
    import torch

    return torch.Generator().manual_seed((seed * 1_000_003 + step) % 2**63)


def _order(n: int, seed: int, epoch: int) -> list[int]:
    idx = list(range(n))
    random.Random(seed * 7919 + epoch).shuffle(idx)
    return idx


def class_images(p: Params, ctx, source: str, components, device, dtype) -> list[Path]:
    """The prior-preservation class images: generated once with the base (no LoRA), kept under
    data/paint/class_images/<base, prompt, resolution>/ and reused by every later run."""
    import torch

    src = Path(source)
    stamp = f"{src.resolve()}:{(src / 'model_index.json').stat().st_mtime}" if src.is_dir() else source
    key = hashlib.sha256(f"{stamp}\0{p.class_prompt}\0{p.resolution}".encode()).hexdigest()[:16]
    folder = ctx.data_dir / "paint" / "class_images" / key
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "prompt.txt").write_text(f"{p.class_prompt}\n{source}\n{p.resolution}\n")
    have = sorted(folder.glob("class-*.png"))[: p.num_class_images]
    missing = p.num_class_images - len(have)
    if missing <= 0:
        ctx.log(f"reusing {len(have)} class images for '{p.class_prompt}' ({folder.name})")
        return have
    ctx.log(f"generating {missing} class images for '{p.class_prompt}' with the base "
            f"({len(have)} already cached)")
    pipe = _pipeline(components)
    pipe.set_progress_bar_config(disable=True)
    made = 0
    for i in range(p.num_class_images):
        out = folder / f"class-{i:05d}.png"
        if out.exists():
            continue
        ctx.progress(made, missing, f"class image {made + 1}/{missing}")
        gen = torch.Generator().manual_seed(p.seed + i)
        with torch.autocast(device, dtype=dtype, enabled=device == "cuda" and dtype != torch.float32):
            img = pipe(p.class_prompt, num_inference_steps=p.sample_steps, height=p.resolution, width=p.resolution,
                       generator=gen, callback_on_step_end=lambda *a, **k: (ctx.check_cancel(), a[3])[1]
                       ).images[0]
        img.save(out.with_suffix(".png.tmp"), format="PNG")
        os.replace(out.with_suffix(".png.tmp"), out)
        made += 1
    return sorted(folder.glob("class-*.png"))[: p.num_class_images]


def _pipeline(c):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(vae=c["vae"], text_encoder=c["text_encoder"], tokenizer=c["tokenizer"],
                                   unet=c["unet"], scheduler=c["sampler"], safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)


def _load(source: str, base: str, device: str, dtype):
    from diffusers import AutoencoderKL, DDPMScheduler, DPMSolverMultistepScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    preset = _preset(base)
    # the preset's hub repo has fp16 files: half the download
    kw = {"variant": preset["variant"]} if preset and preset.get("variant") else {}
    try:
        tokenizer = CLIPTokenizer.from_pretrained(source, subfolder="tokenizer")
        text_encoder = CLIPTextModel.from_pretrained(source, subfolder="text_encoder", dtype=dtype, **kw)
        vae = AutoencoderKL.from_pretrained(source, subfolder="vae", torch_dtype=dtype, **kw)
        unet = UNet2DConditionModel.from_pretrained(source, subfolder="unet", torch_dtype=dtype, **kw)
        noise_scheduler = DDPMScheduler.from_pretrained(source, subfolder="scheduler")
    except OSError as e:
        if _preset(base):
            raise RuntimeError(f"{base} is not on disk and cannot be downloaded here ({str(e).splitlines()[0][:160]})."
                               f" Download {source} in the Models tab on a machine with internet, or give a local "
                               "diffusers folder as base") from None
        raise RuntimeError(f"cannot load {source}: {str(e).splitlines()[0][:200]}") from None
    for m in (text_encoder, vae, unet):
        m.requires_grad_(False)
        m.to(device)
    sampler = DPMSolverMultistepScheduler.from_config(noise_scheduler.config)
    return {"tokenizer": tokenizer, "text_encoder": text_encoder, "vae": vae, "unet": unet,
            "noise_scheduler": noise_scheduler, "sampler": sampler}


def _peak_bytes(cuda: bool) -> int:
    import resource

    if cuda:
        import torch

        return int(torch.cuda.max_memory_allocated())
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def run(p: Params, ctx) -> dict:
    ctx.progress(0, None, "reading the images")
    import torch

    from studio.context import JobCancelled
    from workers.paint import images, kohya

    cuda = ctx.device == "cuda"
    device = "cuda" if cuda else "cpu"
    torch.set_num_threads(p.threads or os.cpu_count() or 1)
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(p.mixed_precision, torch.float32) if cuda \
        else torch.float32
    if not cuda and p.mixed_precision != "no":
        ctx.log("on the CPU: training in fp32 (mixed_precision applies on CUDA)")
    if p.optimizer == "adamw8bit" and not cuda:
        raise ValueError("optimizer adamw8bit needs a CUDA GPU (bitsandbytes); use optimizer=adamw on the CPU")

    imgset = images.read_set(p.images, p.instance_prompt, p.resolution, p.bucketing,
                             ctx.data_dir / "paint" / "datasets")
    report = imgset.report
    (ctx.run_dir / "image_report.json").write_text(json.dumps(report, indent=1, ensure_ascii=False))
    ctx.emit("image_report", report=report)
    ctx.log(f"{report['images']} images ({report['repeats']} with repeats) in {len(report['buckets'])} bucket(s): "
            + ", ".join(f"{k} x{v}" for k, v in report["buckets"].items())
            + (f"; skipped {len(report['skipped'])}" if report["skipped"] else ""))
    data_hash = images.fingerprint(imgset.items)

    state, lora_sd, optim_flat, start = None, None, None, 0
    if p.resume_from:
        state, lora_sd, optim_flat = load_checkpoint(ctx.run_dir.parent, p.resume_from)
        if state["data_hash"] != data_hash:
            raise ValueError(f"the images changed since job {p.resume_from} ran; Retry to train from scratch")
        if state["rank"] != p.rank or state["train_text_encoder"] != p.train_text_encoder:
            raise ValueError(f"job {p.resume_from} trained rank {state['rank']}"
                             f"{' with' if state['train_text_encoder'] else ' without'} the text encoder; resume "
                             "with the same settings")
        start = state["step"]
        ctx.log(f"resuming job {p.resume_from} from step {start}")

    source = base_source(p.base)
    ctx.progress(0, None, f"loading {Path(source).name}")
    comps = _load(source, p.base, device, dtype)
    tok, te, vae, unet, noise_sched = (comps[k] for k in ("tokenizer", "text_encoder", "vae", "unet",
                                                          "noise_scheduler"))
    ctx.card(base=p.base, base_source=source, data_hash=data_hash, image_report={k: report[k] for k in (
        "images", "repeats", "buckets")}, resumed_from=p.resume_from or None, dtype=str(dtype).split(".")[-1])

    # Prior preservation first, with the base alone (no LoRA yet)
    class_files: list[Path] = []
    if p.prior_preservation:
        class_files = class_images(p, ctx, source, comps, device, dtype)

    # Latents once (kohya's cache_latents): mean and std of each image's latent distribution
    scale = vae.config.scaling_factor
    shift = getattr(vae.config, "shift_factor", None) or 0.0

    @torch.no_grad()
    def encode(path, bucket):
        px = images.load_pixels(path, bucket).unsqueeze(0).to(device, dtype)
        dist = vae.encode(px).latent_dist
        return dist.mean.float().cpu(), dist.std.float().cpu()

    latents = []
    for n, item in enumerate(imgset.items):
        ctx.progress(n, len(imgset.items), f"encoding image {n + 1}/{len(imgset.items)}")
        latents.append(encode(item.path, item.bucket))
    class_latents = []
    for n, f in enumerate(class_files):
        ctx.progress(n, len(class_files), f"encoding class image {n + 1}/{len(class_files)}")
        class_latents.append(encode(f, (p.resolution, p.resolution)))

    def tokens(texts):
        return tok(texts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                   return_tensors="pt").input_ids.to(device)

    # LoRA (seeded, so the A matrices are the same every run)
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

    torch.manual_seed(p.seed)
    unet.add_adapter(LoraConfig(r=p.rank, lora_alpha=p.alpha, init_lora_weights="gaussian",
                                target_modules=UNET_TARGETS))
    if p.train_text_encoder:
        # peft's own injection: transformers 5's add_adapter insists on a newer peft than the studio pins
        from peft import inject_adapter_in_model

        te_config = LoraConfig(r=p.rank, lora_alpha=p.alpha, init_lora_weights="gaussian", target_modules=TE_TARGETS)
        inject_adapter_in_model(te_config, te)
        te.peft_config = {"default": te_config}
    trainable = [q for m in (unet, te) for q in m.parameters() if q.requires_grad]
    for q in trainable:
        q.data = q.data.float()  # fp32 LoRA weights under fp16/bf16 frozen ones (diffusers' cast_training_params)

    if lora_sd is not None:
        set_peft_model_state_dict(unet, {k[5:]: v for k, v in lora_sd.items() if k.startswith("unet.")})
        if p.train_text_encoder:
            set_peft_model_state_dict(te, {k[3:]: v for k, v in lora_sd.items() if k.startswith("te.")})

    # Prompt embeddings cached when the text encoder is frozen
    captions = sorted({i.caption for i in imgset.items} | ({p.class_prompt} if class_files else set()))
    cached_emb = {}
    if not p.train_text_encoder:
        with torch.no_grad():
            for c in captions:
                cached_emb[c] = te(tokens([c]))[0].to(dtype)

    def embed(texts):
        if p.train_text_encoder:
            return te(tokens(texts))[0]
        return torch.cat([cached_emb[t] for t in texts])

    if p.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        if p.train_text_encoder:
            te.gradient_checkpointing_enable()
    if p.optimizer == "adamw8bit":
        import bitsandbytes as bnb

        optim = bnb.optim.AdamW8bit(trainable, lr=p.lr, weight_decay=1e-2)
    else:
        optim = torch.optim.AdamW(trainable, lr=p.lr, weight_decay=1e-2)
    if optim_flat is not None:
        per: dict[int, dict] = {}
        for key, v in optim_flat.items():
            idx, name = key.split(".", 1)
            per.setdefault(int(idx), {})[name] = v
        optim.load_state_dict({"state": per, "param_groups": state["param_groups"]})
    scaler = torch.amp.GradScaler("cuda") if cuda and dtype == torch.float16 else None

    # the run's schedule: each epoch the items (with their repeats) in a seeded order, grouped into bucket batches
    pool = [n for n, item in enumerate(imgset.items) for _ in range(item.repeats)]

    def epoch_batches(epoch):
        by_bucket: dict = {}
        for n in (pool[i] for i in _order(len(pool), p.seed, epoch)):
            by_bucket.setdefault(imgset.items[n].bucket, []).append(n)
        batches = [v[i:i + p.batch_size] for v in by_bucket.values() for i in range(0, len(v), p.batch_size)]
        random.Random(p.seed * 31 + epoch).shuffle(batches)
        return batches

    per_epoch = len(epoch_batches(0))  # the same count every epoch: the bucket sizes do not change

    def batch_at(step):  # a function of the step alone, so a resumed run picks up the same order
        return epoch_batches(step // per_epoch)[step % per_epoch]

    def loss_of(lat_pairs, texts, gen):
        mean = torch.cat([m for m, _ in lat_pairs]).to(device)
        std = torch.cat([s for _, s in lat_pairs]).to(device)
        x0 = (mean + std * torch.randn(mean.shape, generator=gen).to(device) - shift) * scale
        noise = torch.randn(x0.shape, generator=gen).to(device)
        t = torch.randint(0, noise_sched.config.num_train_timesteps, (x0.shape[0],), generator=gen).to(device)
        noisy = noise_sched.add_noise(x0, noise, t)
        target = noise if noise_sched.config.prediction_type == "epsilon" else noise_sched.get_velocity(x0, noise, t)
        with torch.autocast(device, dtype=dtype, enabled=cuda and dtype != torch.float32):
            pred = unet(noisy.to(dtype), t, embed(texts)).sample
        return torch.nn.functional.mse_loss(pred.float(), target.float())

    sample_prompts = _sample_prompts(p, imgset.items[0].caption)
    name = p.name.removesuffix(".safetensors") if p.name else f"lora-{ctx.job_id}"
    ckpt = ctx.run_dir / "checkpoint"
    # images per forward pass: batch_size, halved on out of memory (the step's gradients accumulated over the
    # pieces: the same effective batch); a resumed run starts from where its checkpoint was
    micro = min(p.batch_size, int((state or {}).get("micro_batch") or p.batch_size))
    extra = {"data_hash": data_hash, "rank": p.rank, "alpha": p.alpha, "train_text_encoder": p.train_text_encoder,
             "params": {f.name: getattr(p, f.name) for f in fields(p)}, "micro_batch": micro}

    def lora_state():
        out = {f"unet.{k}": v for k, v in get_peft_model_state_dict(unet).items()}
        if p.train_text_encoder:
            out.update({f"te.{k}": v for k, v in get_peft_model_state_dict(te).items()})
        return out

    def sample(step):
        unet.eval()
        pipe = _pipeline(comps)
        pipe.set_progress_bar_config(disable=True)
        out_dir = ctx.run_dir / "samples"
        out_dir.mkdir(exist_ok=True)
        paths = []
        for i, prompt in enumerate(sample_prompts):
            gen = torch.Generator().manual_seed(p.seed)  # the same seed every time: watch the style arrive
            with torch.autocast(device, dtype=dtype, enabled=cuda and dtype != torch.float32):
                img = pipe(prompt, num_inference_steps=p.sample_steps, height=p.resolution, width=p.resolution,
                           generator=gen, callback_on_step_end=lambda pipe_, i_, t_, kw: (ctx.check_cancel(), kw)[1]
                           ).images[0]
            path = out_dir / f"step-{step}-{i}.png"
            img.save(path)
            paths.append(str(path.relative_to(ctx.run_dir)))
            ctx.artifact(path, f"sample · step {step} · {prompt[:40]}")
        ctx.emit("sample", step=step, prompts=sample_prompts, paths=paths)
        unet.train()

    def train_step(step, batch, gen) -> float:
        """One optimizer step on `batch`, `micro` images per forward pass (gradients accumulated, each piece
        weighted by its share: the batch's mean loss); returns that loss."""
        total = 0.0
        for j0 in range(0, len(batch), micro):
            part = batch[j0:j0 + micro]
            loss = loss_of([latents[n] for n in part], [imgset.items[n].caption for n in part], gen)
            if class_latents:
                picks = [(step * p.batch_size + j) % len(class_latents) for j in range(j0, j0 + len(part))]
                prior = loss_of([class_latents[j] for j in picks], [p.class_prompt] * len(picks), gen)
                loss = loss + p.prior_loss_weight * prior
            share = len(part) / len(batch)
            (scaler.scale(loss * share) if scaler else loss * share).backward()
            total += loss.item() * share
        if scaler:
            scaler.unscale_(optim)
        if p.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(trainable, p.max_grad_norm)
        if scaler:
            scaler.step(optim)
            scaler.update()
        else:
            optim.step()
        optim.zero_grad(set_to_none=True)
        return total

    step, losses, t0, ooms = start, [], time.perf_counter(), 0
    unet.train()
    if p.train_text_encoder:
        te.train()
    try:
        while step < p.steps:
            gen = _step_rng(p.seed, step)
            lr = p.lr * min(1.0, (step + 1) / (p.lr_warmup_steps + 1)) if p.lr_warmup_steps else p.lr
            for g in optim.param_groups:
                g["lr"] = lr
            batch = batch_at(step)
            try:
                loss_value = train_step(step, batch, gen)
            except torch.OutOfMemoryError:
                loss_value = None  # the step's partial gradients go; its activations with the traceback
            if loss_value is None:  # out of memory: as Fine-tune's train_loop, save, halve, continue
                optim.zero_grad(set_to_none=True)
                if cuda:
                    torch.cuda.empty_cache()
                if scaler:  # a step cut short may have unscaled already
                    scaler = torch.amp.GradScaler("cuda", init_scale=scaler.get_scale())
                ooms += 1
                if micro == 1:
                    kept = ""
                    if step > 0:
                        save_checkpoint(ckpt, step, lora_state(), optim, extra)
                        kept = f"; the checkpoint at step {step} is kept, and Resume continues from it"
                    raise RuntimeError(f"Out of memory at step {step + 1} with 1 image per pass. {_advice(p)}, or "
                                       f"close other programs using the GPU{kept}.") from None
                micro //= 2
                extra["micro_batch"] = micro
                if step > 0:
                    save_checkpoint(ckpt, step, lora_state(), optim, extra)
                msg = (f"out of memory at step {step + 1}: "
                       + (f"saved a checkpoint at step {step}, " if step > 0 else "")
                       + f"{micro} image(s) per pass now, gradients accumulated over the batch of {p.batch_size} "
                       "(the same effective batch); continuing")
                ctx.emit("oom", step=step, micro_batch=micro, batch_size=p.batch_size, message=msg)
                ctx.log(msg)
                continue
            step += 1
            losses.append(loss_value)
            elapsed = time.perf_counter() - t0
            eta = (p.steps - step) * elapsed / (step - start)
            ctx.progress(step, p.steps, f"step {step}/{p.steps} · loss {losses[-1]:.4f}", eta_s=round(eta, 1))
            ctx.metric(step, loss=losses[-1], lr=lr, eta_s=round(eta, 1), peak_bytes=_peak_bytes(cuda),
                       s_per_step=round(elapsed / (step - start), 4))
            if p.sample_every and step % p.sample_every == 0:
                sample(step)
            if step % p.checkpoint_every == 0 and step < p.steps:
                save_checkpoint(ckpt, step, lora_state(), optim, extra)
    except JobCancelled:
        if step > start:
            save_checkpoint(ckpt, step, lora_state(), optim, extra)  # Resume continues from here
        raise
    except torch.OutOfMemoryError:  # outside a training step (a sample): nothing to halve
        if step > start:
            save_checkpoint(ckpt, step, lora_state(), optim, extra)
        raise RuntimeError(f"out of memory after step {step} (drawing a sample at {p.resolution}²). {_advice(p)}, or "
                           "sample_every=0; Resume continues from the checkpoint") from None
    save_checkpoint(ckpt, step, lora_state(), optim, extra)

    out = ctx.run_dir / f"{name}.safetensors"
    meta = kohya.metadata(
        ss_output_name=name, ss_sd_model_name=p.base, ss_base_model_version="sd_v1", ss_v2=False,
        ss_network_dim=p.rank, ss_network_alpha=p.alpha, ss_learning_rate=p.lr, ss_unet_lr=p.lr,
        ss_text_encoder_lr=p.lr if p.train_text_encoder else None, ss_max_train_steps=p.steps, ss_steps=step,
        ss_resolution=f"({p.resolution}, {p.resolution})", ss_enable_bucket=p.bucketing,
        ss_num_train_images=report["repeats"], ss_num_reg_images=len(class_files),
        ss_batch_size_per_device=micro, ss_gradient_accumulation_steps=-(-p.batch_size // micro),
        ss_total_batch_size=p.batch_size, ss_mixed_precision=p.mixed_precision if cuda else "no",
        ss_gradient_checkpointing=p.gradient_checkpointing, ss_optimizer=(
            "bitsandbytes.optim.AdamW8bit" if p.optimizer == "adamw8bit" else "torch.optim.AdamW"),
        ss_seed=p.seed, ss_lr_warmup_steps=p.lr_warmup_steps, ss_lr_scheduler="constant",
        ss_max_grad_norm=p.max_grad_norm,
        ss_prior_loss_weight=p.prior_loss_weight if class_files else None, ss_network_args={
            "target_modules": UNET_TARGETS + (TE_TARGETS if p.train_text_encoder else [])},
        ss_tag_frequency=_tag_frequency(imgset.items), ss_bucket_info={"buckets": report["buckets"]},
        ss_dataset_dirs={str(Path(p.images).name): {"n_repeats": max(i.repeats for i in imgset.items),
                                                    "img_count": report["images"]}},
        ss_training_comment=f"trained in the studio (job {ctx.job_id}) with diffusers + peft")
    tensors = kohya.save(out, get_peft_model_state_dict(unet),
                         get_peft_model_state_dict(te) if p.train_text_encoder else None, p.alpha, meta)
    ctx.artifact(out, f"LoRA (kohya layout, rank {p.rank})")
    seconds = time.perf_counter() - t0
    return {"file": str(out.relative_to(ctx.run_dir)), "name": name, "steps": step, "loss": losses[-1] if losses
            else None, "loss_first": losses[0] if losses else None, "seconds": seconds, "modules": len(
            {k.split(".")[0] for k in tensors}), "rank": p.rank, "alpha": p.alpha, "images": report["images"],
            "class_images": len(class_files), "device": device, "peak_bytes": _peak_bytes(cuda),
            "micro_batch": micro, "ooms": ooms}


def _advice(p: Params) -> str:
    """What to lower when one image per pass does not fit: the settings of this run that still have room."""
    what = ([] if p.gradient_checkpointing else ["gradient_checkpointing=true"]) + \
        (["optimizer=adamw8bit"] if p.optimizer == "adamw" else []) + \
        (["train_text_encoder=false"] if p.train_text_encoder else []) + \
        (["prior_preservation=false"] if p.prior_preservation else []) + \
        [f"a lower resolution (now {p.resolution}"
         + (f", try {p.resolution - (128 if p.resolution > 512 else 64)})" if p.resolution > 64 else ")")]
    return "Retry with " + " or ".join(what)


def _tag_frequency(items) -> dict:
    """kohya's ss_tag_frequency: per dataset folder, how often each comma-separated caption tag occurs."""
    freq: dict[str, dict[str, int]] = {}
    for i in items:
        d = freq.setdefault(i.path.parent.name, {})
        for tag in (t.strip() for t in i.caption.split(",")):
            if tag:
                d[tag] = d.get(tag, 0) + 1
    return freq
