"""Job kind `detect_check`: import and check a labelled dataset before any training (off the device: io lane).

It reports images without labels, labels without images, boxes out of range, class ids outside the names,
malformed lines and duplicates, and the split training would use. The imported copy (an extracted zip, converted
COCO labels) is removed afterwards: only the report is kept, in the job's run folder.
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from studio.gate import Estimate

PACKAGES = ("pyyaml",)
PATHS = ("data",)  # params that name a server path (studio.access)


@dataclass(frozen=True)
class Params:
    data: str  # a dataset zip, folder or data.yaml (YOLO, Roboflow YOLOv8, Label Studio YOLO, COCO JSON)
    val_split: float = 0.2  # fraction for validation when the dataset has no split (as detect_train would use)
    seed: int = 0  # the split's seed

    def __post_init__(self):
        if not self.data.strip():
            raise ValueError("no dataset given: upload a zip, or give a folder or data.yaml path")
        if not 0.0 < self.val_split < 0.9:
            raise ValueError(f"val_split must be between 0 and 0.9; got {self.val_split}")
        if not 0 <= self.seed <= 2**31 - 1:  # as detect_train takes it, so the check shows the split training uses
            raise ValueError(f"seed must be between 0 and {2**31 - 1}; got {self.seed}")


def validate(p: Params, config) -> None:
    from workers.detect.data import check_zip

    if not Path(p.data).expanduser().exists():
        raise ValueError(f"dataset not found: {p.data}")
    check_zip(Path(p.data), config.runs_dir)  # it is extracted into the job's run folder


def estimate(p: Params, device) -> Estimate:
    return Estimate(parts={"workspace": 256 * 2**20})  # file lists and one label file at a time; no device


def run(p: Params, ctx) -> dict:
    from workers.detect import data as detect_data

    ctx.progress(0, None, "checking the dataset")
    work = ctx.run_dir / "import"
    try:
        _, report = detect_data.prepare(Path(p.data), work, p.val_split, p.seed)
    finally:
        shutil.rmtree(work, ignore_errors=True)  # the extracted copy: only the report is worth keeping
    summary = detect_data.summary(report)
    ctx.emit("dataset", report=report, summary=summary)
    (ctx.run_dir / "report.md").write_text(summary)
    ctx.artifact(ctx.run_dir / "report.md", "dataset report")
    ctx.progress(1, 1, "checked")
    report.pop("data_yaml", None)  # it pointed into the removed import folder
    return {"summary": summary, "report": report}
