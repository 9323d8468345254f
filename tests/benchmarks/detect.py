"""Detect benchmark: YOLO training time through the studio vs `yolo train` directly, same data and settings.

Run inside the project's .venv:
    python tests/benchmarks/detect.py --data PATH [--model yolov8n.yaml] [--epochs 30] [--imgsz 128] [--batch 16]
PATH is a dataset zip, folder or data.yaml (without it, a synthetic shapes set is made). Both runs train from
the same data.yaml (the studio's import of PATH), seed and dataloader workers; each is timed from the request to
the finished run (the studio: submit → final status, its worker already started; direct: the `yolo` command).
The last line printed is one JSON object with speed_ratio (studio speed ÷ direct speed) and both mAP50s.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from studio import Config, JobStatus, Studio  # noqa: E402


def best_map50(results_csv: Path) -> float:
    rows = list(csv.DictReader(results_csv.open()))
    return max(float(r["metrics/mAP50(B)"]) for r in rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=None)
    ap.add_argument("--model", default="yolov8n.yaml")
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--imgsz", type=int, default=128)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("YOLO_OFFLINE", "1")

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = args.data
        if not data:
            from detect_fixtures import make_shapes

            data = str(make_shapes(tmp / "shapes", n=200, size=args.imgsz))
        settings = {"epochs": args.epochs, "imgsz": args.imgsz, "batch": args.batch, "workers": args.workers,
                    "seed": args.seed}
        studio = Studio(Config.load(tmp / "studio")).start()
        try:
            while not studio.worker_info.ready:
                time.sleep(0.05)
            t0 = time.perf_counter()
            job = studio.wait(studio.submit("detect_train", {"data": data, "model": args.model, **settings}).id,
                              timeout=24 * 3600)
            studio_s = time.perf_counter() - t0
            if job.status is not JobStatus.DONE:
                raise SystemExit(f"studio run {job.status.value}: {job.error}")
            run_dir = studio.run_dir(job.id)
        finally:
            studio.shutdown()
        data_yaml = run_dir / "dataset" / "data.yaml"  # the same import, split and all
        yolo = Path(sys.executable).with_name("yolo")
        import torch

        device = "0" if torch.cuda.is_available() else "cpu"
        cmd = [str(yolo), "train", f"data={data_yaml}", f"model={args.model}", f"project={tmp / 'direct'}",
               "name=run", "exist_ok=True", "deterministic=True", f"device={device}", "plots=True", "verbose=False",
               *[f"{k}={v}" for k, v in settings.items()]]
        env = {**os.environ, "YOLO_CONFIG_DIR": str(tmp / "studio" / "ultralytics")}  # same fonts, settings
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
        direct_s = time.perf_counter() - t0
        out = {"speed_ratio": round(direct_s / studio_s, 3), "studio_seconds": round(studio_s, 1),
               "direct_seconds": round(direct_s, 1),
               "map50_studio": round(best_map50(run_dir / "train" / "results.csv"), 4),
               "map50_direct": round(best_map50(tmp / "direct" / "run" / "results.csv"), 4),
               "model": args.model, "device": device, **settings}
        print(f"studio {studio_s:.1f} s, mAP50 {out['map50_studio']}; yolo train {direct_s:.1f} s, "
              f"mAP50 {out['map50_direct']}")
        print(json.dumps(out))


if __name__ == "__main__":
    main()
