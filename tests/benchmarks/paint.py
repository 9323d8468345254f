"""Paint benchmark: steps/s of a `paint` job through the studio (its live preview and progress/cancel callback on
every step included) against the same diffusers pipeline called directly, same model, size, sampler and seed.

Run inside the project's .venv:
    python tests/benchmarks/paint.py [--model FOLDER_OR_PRESET] [--size 64] [--steps 30] [--runs 7] [--threads 1]
Without --model it builds the tests' tiny SD-1.5-shaped pipeline (CPU, offline). The last line printed is one JSON
object; `speed_ratio` (studio / direct steps/s, the median of the interleaved pairs' ratios) has the goal >= 0.97.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from studio import Config, Studio  # noqa: E402

PROMPT = "a watercolor painting of a lighthouse at dawn"


def direct_call(model: str, size: int, steps: int, sampler: str, threads: int):
    """The same pipeline loaded in this process: a function of the seed that returns steps/s of one call."""
    import os

    import torch

    from workers.paint import generate as G
    from workers.paint import pipeline as P

    info = P.model_info(model)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.set_num_threads(threads or os.cpu_count() or 1)  # as the job does
    pipe, _ = G.load_pipeline(info, device, offload=False)
    G.set_sampler(pipe, sampler)

    def call(seed: int) -> float:
        with torch.no_grad():
            pe, npe = pipe.encode_prompt(PROMPT, torch.device(device), 1, True)
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        pipe(prompt_embeds=pe, negative_prompt_embeds=npe, width=size, height=size, num_inference_steps=steps,
             guidance_scale=7.0, generator=[torch.Generator("cpu").manual_seed(seed)])
        if device == "cuda":
            torch.cuda.synchronize()
        return steps / (time.perf_counter() - t0)

    return call


def studio_call(studio, model: str, size: int, steps: int, sampler: str, threads: int):
    """A `paint` job with the same settings: a function of the seed that returns the job's own steps/s."""
    def call(seed: int) -> float:
        job = studio.wait(studio.submit("paint", {"model": model, "prompt": PROMPT, "width": size, "height": size,
                                                  "steps": steps, "sampler": sampler, "seed": seed,
                                                  "threads": threads}).id, 1200)
        if job.status.value != "DONE":
            raise SystemExit(f"paint job {job.status.value}: {job.error}")
        return job.result["steps_per_s"]  # the denoising call timed inside the job, as the direct one

    return call


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None, help="a preset, diffusers folder or .safetensors (default: tiny)")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--runs", type=int, default=7, help="timed runs each way, interleaved (medians)")
    ap.add_argument("--sampler", default="Euler a")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads for both (0: every core)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = args.model
        if model is None:
            from paint_fixtures import make_tiny_sd

            model = str(make_tiny_sd(tmp / "tiny-sd"))
        studio = Studio(Config.load(tmp / "data")).start()
        try:
            direct = direct_call(model, args.size, args.steps, args.sampler, args.threads)
            through = studio_call(studio, model, args.size, args.steps, args.sampler, args.threads)
            s, d = [], []
            for i in range(args.runs + 1):  # interleaved, so drift on a noisy machine hits both alike; 0 warms up
                for fn, out in ((through, s), (direct, d)):
                    rate = fn(1 + i)
                    if i:
                        out.append(rate)
        finally:
            studio.shutdown()
    med = statistics.median
    print(f"direct diffusers:   {med(d):.2f} steps/s")
    print(f"through the studio: {med(s):.2f} steps/s (preview every 2 steps, progress and cancel on every step)")
    # each studio run and the direct run after it ran back to back: the median of their ratios cancels the drift of
    # a noisy machine within each pair (`median_ratio`, the ratio of the medians, is kept beside it)
    pairs = med(x / y for x, y in zip(s, d))
    print(json.dumps({"speed_ratio": pairs, "median_ratio": med(s) / med(d), "studio_steps_s": med(s),
                      "direct_steps_s": med(d),
                      "size": args.size, "steps": args.steps, "sampler": args.sampler,
                      "model": Path(model).name if Path(model).exists() else model}))


if __name__ == "__main__":
    main()
