"""Ray dispatch overhead: what running a device job as a Ray task costs over the local worker, per job.

Run inside the project's .venv (with `pip install -r requirements-ray.txt`):

    python tests/benchmarks/scale_ray.py [--runs 20]

The same small job (`selftest` with 1 MiB: about a millisecond of work, so what is timed is the way to the job and
back) is submitted `--runs` times, one at a time, alternately to a normal Studio (its local worker process) and to a
Studio with ray_address="local" (a local Ray started in this process: a Ray task per job, reports through the channel
actor). `ray_overhead_ms` = the median submit -> done time through Ray minus the median through the local worker
(goal < 200). Both Studios are warm first (worker started, torch imported, one job run). The last line printed is one
JSON object.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

JOB = ("selftest", {"mib": 1})  # the job's own work is ~1 ms: the figure is the dispatch, not the job


def _submit_to_done_ms(studio) -> float:
    from studio import JobStatus

    t0 = time.perf_counter()
    job = studio.wait(studio.submit(*JOB).id, 120)
    if job.status is not JobStatus.DONE:
        raise RuntimeError(f"the timed job ended {job.status.value}: {job.error}")
    return (time.perf_counter() - t0) * 1000


def measure(runs: int = 20) -> dict:
    """Median submit -> done times (ms) of the same small job through the local worker and through Ray."""
    import ray

    from studio import Config, Studio
    from studio.raylane import connect

    ours = not ray.is_initialized()
    connect("local")  # from this thread, which outlives the Studios (Ray's local processes die with their thread)
    with tempfile.TemporaryDirectory() as tmp:
        local = Studio(Config.load(Path(tmp) / "local")).start()
        on_ray = Studio(replace(Config.load(Path(tmp) / "ray"), ray_address="local")).start()
        try:
            t0 = time.time()
            while not (local.worker_info.ready and on_ray.worker_info.ready):
                if time.time() - t0 > 300:
                    raise RuntimeError("the workers did not start in 300 s")
                time.sleep(0.05)
            for s in (local, on_ray):  # first jobs pay for imports and the Ray worker's start
                _submit_to_done_ms(s)
                _submit_to_done_ms(s)
            times: dict[str, list[float]] = {"local": [], "ray": []}
            for _ in range(runs):  # alternately, so a busy moment of the machine falls on both
                times["local"].append(_submit_to_done_ms(local))
                times["ray"].append(_submit_to_done_ms(on_ray))
        finally:
            on_ray.shutdown()
            local.shutdown()
            if ours:
                ray.shutdown()
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"runs": runs, "local_ms": round(med["local"], 1), "ray_ms": round(med["ray"], 1),
            "ray_overhead_ms": round(med["ray"] - med["local"], 1)}


def ray_overhead_ms(runs: int = 20) -> float:
    """Per-job Ray dispatch overhead (ms): the median submit -> done time of a small job through a Studio on a local
    Ray minus the same through a normal Studio."""
    return measure(runs)["ray_overhead_ms"]


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=20, help="jobs timed each way")
    args = ap.parse_args()
    print(json.dumps({**measure(args.runs), "goal_ms": 200}))
