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

            speeds = {}
            for use_cache in (True, False):
                g = studio.wait(studio.submit("tinylm_generate", {
                    "checkpoint": job.id, "prompt": "\n", "max_new_tokens": args.gen_tokens, "temperature": 0.8,
                    "seed": 1, "kv_cache": use_cache}).id, timeout=600)
                speeds[use_cache] = g.result["tokens_per_s"]
            print(f"generation of {args.gen_tokens} tokens: {speeds[True]:.0f} tok/s with KV cache, "
                  f"{speeds[False]:.0f} tok/s without")
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
        "submit_to_start_ms_p50": statistics.median(lat),
        "submit_to_start_ms_max": max(lat),
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
