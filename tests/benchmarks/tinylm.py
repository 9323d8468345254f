"""Tiny LM benchmark: time for the CPU preset to reach a val loss, KV-cache speed-up, and queue latency.

Run inside the project's .venv:  python tests/benchmarks/tinylm.py --data PATH [--target 1.88]
The last line printed is one JSON object.
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

from studio import Config, Studio  # noqa: E402
from studio.params import parse_cli  # noqa: E402


def make_baby_checkpoint(folder: Path, res_vocab: int) -> Path:
    """A Tiny LM checkpoint at the gpu-baby preset's shape with random weights (nothing trained, nothing downloaded)."""
    import torch

    from workers.tinylm.train import PRESETS, save_checkpoint
    from workers.tinylm.data import CharTokenizer, save_tokenizer
    from workers.tinylm.model import GPT, GPTConfig

    b = PRESETS["gpu-baby"]
    cfg = GPTConfig(vocab_size=res_vocab, block_size=b["block_size"], n_layer=b["n_layer"], n_head=b["n_head"],
                    n_embd=b["n_embd"], pos="rope")
    model = GPT(cfg)
    ckpt = folder / "checkpoint"
    save_checkpoint(ckpt, model, torch.optim.AdamW(model.parameters()), {"step": 0, "config": cfg.to_dict(),
                                                                         "n_params": model.num_params()})
    save_tokenizer(CharTokenizer([chr(10)] + [chr(32 + i) for i in range(res_vocab - 1)]), ckpt / "tokenizer.json")
    return folder


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="a text file (e.g. TinyShakespeare's input.txt)")
    ap.add_argument("--target", type=float, default=1.88, help="val loss to reach")
    ap.add_argument("--preset", default="cpu-quick")
    ap.add_argument("--param", action="append", default=[], help="extra tinylm params, key=value")
    ap.add_argument("--gen-tokens", type=int, default=256)
    ap.add_argument("--latency-jobs", type=int, default=20)
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        studio = Studio(Config.load(tmp)).start()
        try:
            # a warm worker: the first job waits for the worker process to import torch
            studio.wait(studio.submit("selftest", {"mib": 1}).id, timeout=120)

            lat = []
            for _ in range(args.latency_jobs):
                job = studio.wait(studio.submit("selftest", {"mib": 1}).id, timeout=60)
                lat.append((job.started - job.created) * 1000)

            params = {"data": args.data, "preset": args.preset, "target_val_loss": args.target, **parse_cli(args.param)}
            t0 = time.time()
            job = studio.submit("tinylm", params)
            job = studio.wait(job.id, timeout=3600)
            wall = time.time() - t0
            if job.status.value != "DONE":
                raise SystemExit(f"training {job.status.value}: {job.error}")
            res = job.result
            print(f"trained {res['steps']} steps, val loss {res['val_loss']:.4f}, "
                  f"reached target: {res['reached_target']}, job wall {wall:.1f} s, "
                  f"{res['tokens_per_s']:.0f} tok/s, estimate {job.estimate['total'] / 2**20:.0f} MiB, "
                  f"peak RSS {job.peak_bytes / 2**20:.0f} MiB")

            def gen_speeds(checkpoint, tokens):
                out = {}
                for use_cache in (True, False):
                    g = studio.wait(studio.submit("tinylm_generate", {
                        "checkpoint": checkpoint, "prompt": "\n", "max_new_tokens": tokens, "temperature": 0.8,
                        "seed": 1, "kv_cache": use_cache}).id, timeout=600)
                    out[use_cache] = g.result["tokens_per_s"]
                return out

            # the trained cpu-quick model has a 64-token context: past it, each step re-encodes the window
            quick = gen_speeds(job.id, args.gen_tokens)
            print(f"cpu-quick (context 64), {args.gen_tokens} tokens: {quick[True]:.0f} tok/s with KV cache, "
                  f"{quick[False]:.0f} without")
            # the gpu-baby shape (context 256, 10.7 M params) with random weights: speed does not depend on them
            baby = make_baby_checkpoint(Path(tmp) / "baby", res_vocab=65)
            speeds = gen_speeds(str(baby), args.gen_tokens - 1)  # a 1-token prompt + 255 = the full context
            print(f"gpu-baby shape (context 256), {args.gen_tokens} tokens: {speeds[True]:.0f} tok/s with KV "
                  f"cache, {speeds[False]:.0f} without")
        finally:
            studio.shutdown()

    summary = {
        "seconds_to_target": wall if res["reached_target"] else None,
        "train_seconds_to_target": res["seconds_to_target"],
        "val_loss": res["val_loss"],
        "steps": res["steps"],
        "tokens_per_s": res["tokens_per_s"],
        "kv_tok_s": speeds[True],
        "nocache_tok_s": speeds[False],
        "kv_speedup": speeds[True] / speeds[False],
        "kv_speedup_cpu_quick": quick[True] / quick[False],
        "submit_to_start_ms_p50": statistics.median(lat),
        "submit_to_start_ms_max": max(lat),
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
