"""Scale benchmark: a queue of small jobs on two devices vs one, and what dispatching a job through Ray costs.

Run inside the project's .venv:

    python tests/benchmarks/scale.py [--jobs 12] [--seconds 1.0] [--ray-runs 5] [--no-ray]

Devices: two fake GPUs (their NVML readings are faked; each has a real CPU worker process underneath, as on a box
with two cards) against one, the same queue of `--jobs` CPU-light jobs (the tests' `test_steps` kind: 10 progress
calls over `--seconds`, the shape of a job that waits on its device rather than the host's CPU) submitted at once;
`speedup` = one-device wall time / two-device wall time (goal >= 1.8 on a 2-core machine).
Ray: `ray_overhead_ms` = the median submit -> done time of a small job through a Studio on a local Ray (ray.init in
this process) minus the same through the local worker (goal < 200; needs `pip install -r requirements-ray.txt`,
null without Ray). The last line printed is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from studio import Config, GiB, JobStatus, Studio, registry  # noqa: E402
from studio.device import DeviceReading  # noqa: E402


class FakeGpu:
    """A 12 GiB card as NVML would read it (the only thing faked)."""

    def __init__(self, index: int):
        self.name = f"Fake GPU {index}"

    def read(self, pids=()):
        return DeviceReading(kind="cuda", name=self.name, total=12 * GiB, used=GiB, free=11 * GiB)


def queue_seconds(n_devices: int, jobs: int, seconds: float, data: Path) -> float:
    """Wall time from submitting `jobs` jobs at once to the last one done, on `n_devices` fake cards."""
    studio = Studio(Config.load(data), devices=[FakeGpu(i) for i in range(n_devices)]).start()
    try:
        t0 = time.time()
        while not all(lane.info.ready for lane in studio.device_lanes()):
            if time.time() - t0 > 180:
                raise SystemExit("the device workers did not start")
            time.sleep(0.05)
        warm = studio.wait(studio.submit("test_steps", {"steps": 1, "seconds": 0.0}).id, 60)  # imports paid
        assert warm.status is JobStatus.DONE, warm.error
        t0 = time.perf_counter()
        ids = [studio.submit("test_steps", {"steps": 10, "seconds": seconds / 10}).id for _ in range(jobs)]
        for job_id in ids:
            job = studio.wait(job_id, 600)
            if job.status is not JobStatus.DONE:
                raise SystemExit(f"job {job_id} ended {job.status.value}: {job.error}")
        return time.perf_counter() - t0
    finally:
        studio.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=12, help="jobs in the queue")
    ap.add_argument("--seconds", type=float, default=1.0, help="how long each job takes")
    ap.add_argument("--ray-runs", type=int, default=5, help="jobs timed each way for the Ray overhead")
    ap.add_argument("--no-ray", action="store_true", help="skip the Ray measurement")
    args = ap.parse_args()
    if "test_steps" not in registry.WORKERS:
        registry.register("test_steps", "helpers_steps")
    with tempfile.TemporaryDirectory() as tmp:
        one = queue_seconds(1, args.jobs, args.seconds, Path(tmp) / "one")
        two = queue_seconds(2, args.jobs, args.seconds, Path(tmp) / "two")
    figures = {"jobs": args.jobs, "job_seconds": args.seconds, "one_device_s": round(one, 2),
               "two_devices_s": round(two, 2), "speedup": round(one / two, 3), "ray_overhead_ms": None}
    print(f"{args.jobs} jobs of {args.seconds} s: {one:.2f} s on one device, {two:.2f} s on two "
          f"(speedup {one / two:.2f})")
    if not args.no_ray:
        try:
            import ray  # noqa: F401
        except ImportError:
            print("Ray is not installed (pip install -r requirements-ray.txt): no ray_overhead_ms")
        else:
            from benchmarks.scale_ray import ray_overhead_ms

            figures["ray_overhead_ms"] = round(ray_overhead_ms(args.ray_runs), 1)
            print(f"Ray dispatch overhead: {figures['ray_overhead_ms']} ms per job")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
