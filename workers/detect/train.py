"""Job kind `detect_train`: Ultralytics YOLO training on the user's labelled set, with live losses and mAP.

The dataset is imported and checked first (workers.detect.data); Ultralytics' own callbacks report each batch
(a cancel point) and epoch (losses, mAP50, mAP50-95, a sample prediction); last.pt is saved every epoch, so a
cancelled or interrupted job resumes from it (a new job with resume_from, as everywhere in the studio).
The run folder holds best.pt and last.pt (hashes in weights.json), results.csv and Ultralytics' plots.
"""
from __future__ import annotations

import csv
import json
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path

from studio.gate import Estimate
from workers.detect import yolo


PACKAGES = ("ultralytics", "torchvision")  # versions for the run card
PATHS = ("data", "model", "resume_from")  # params that name a server path or a job (studio.access)


@dataclass(frozen=True)
class Params:
    data: str  # a dataset zip, folder or data.yaml (YOLO, Roboflow YOLOv8, Label Studio YOLO, COCO JSON)
    model: str = "yolov8n.yaml"  # a yaml trains from scratch; a preset (yolov8n, yolo11s, …) or .pt fine-tunes
    epochs: int = 50  # passes over the training images
    imgsz: int = 640  # training image size (pixels, a multiple of 32)
    batch: int = 16  # images per step; -1: the largest that fits the budget (the gate decides)
    amp: bool = True  # mixed precision on CUDA (ignored on the CPU)
    patience: int = 20  # stop after this many epochs without a better fitness; 0: never
    mosaic: float = 1.0  # probability of mosaic augmentation
    fliplr: float = 0.5  # probability of a horizontal flip
    flipud: float = 0.0  # probability of a vertical flip
    hsv_h: float = 0.015  # hue jitter (fraction)
    hsv_s: float = 0.7  # saturation jitter
    hsv_v: float = 0.4  # value (brightness) jitter
    lr0: float = 0.01  # initial learning rate
    val_split: float = 0.2  # fraction for validation when the dataset has no split
    seed: int = 0  # the split, augmentation and initial weights
    workers: int = 2  # dataloader processes
    trust: bool = False  # load a .pt the studio did not write (pickle: only files you trust)
    resume_from: str = ""  # a detect_train job id whose last.pt this run continues (set by Resume)

    def __post_init__(self):
        if not self.data.strip():
            raise ValueError("no dataset given")
        for name, lo, hi in [("epochs", 1, 10_000), ("imgsz", 32, 4096), ("patience", 0, 10_000),
                             ("workers", 0, 64), ("val_split", 0.01, 0.9), ("lr0", 1e-6, 1.0),
                             ("seed", 0, 2**31 - 1)]:  # Ultralytics seeds numpy (32 bits) with seed + 1
            v = getattr(self, name)
            if not lo <= v <= hi:
                raise ValueError(f"{name} must be between {lo} and {hi}; got {v}")
        if self.imgsz % 32:
            raise ValueError(f"imgsz must be a multiple of 32; got {self.imgsz}")
        if self.batch != -1 and not 1 <= self.batch <= 1024:
            raise ValueError(f"batch must be -1 (fit the budget) or 1..1024; got {self.batch}")
        for name in ("mosaic", "fliplr", "flipud", "hsv_h", "hsv_s", "hsv_v"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be between 0 and 1")


def _checkpoint(runs_dir: Path, job_id: str) -> Path:
    return runs_dir / job_id / "checkpoint" / "state.json"


def validate(p: Params, config) -> None:
    from workers.detect.data import check_zip

    if not Path(p.data).expanduser().exists():
        raise ValueError(f"dataset not found: {p.data}")
    check_zip(Path(p.data), config.runs_dir)  # it is extracted into the job's run folder
    yolo.resolve(p.model, config.data_dir, p.trust)
    if p.resume_from and not _checkpoint(config.runs_dir, p.resume_from).exists():
        raise ValueError(f"job {p.resume_from} has no checkpoint to resume from")


def estimate(p: Params, device) -> Estimate:
    cuda = getattr(device, "kind", "cpu") == "cuda"
    params_m, scale = yolo.size_of(p.model)
    n = params_m * 1e6
    batch = max(p.batch, 1)
    amp = p.amp and cuda
    return Estimate(
        parts={"weights": int(n * 4 * 2), "optimizer": int(n * 8),  # fp32 weights + EMA copy; AdamW/SGD state
               "activations": yolo.activation_bytes(scale, p.imgsz, batch, amp, training=True),
               "workspace": (384 if cuda else 1024) * 2**20},  # cuDNN workspace / dataloader buffers and mosaic
        note=f"{Path(p.model).stem} ({params_m:.1f} M params), batch {batch} at {p.imgsz} px"
             + (", AMP" if amp else ""))


def fit(p: Params, device, budget: int) -> Params:
    """batch=-1: the largest power of two (up to 64) that fits the budget."""
    if p.batch != -1:
        return p
    from studio.gate import full_estimate

    best = 1
    for b in (2, 4, 8, 16, 32, 64):
        if full_estimate(replace(p, batch=b), estimate, device).total <= budget:
            best = b
    return replace(p, batch=best)


def shrink(p: Params):
    b = max(p.batch, 1)
    while b > 1:
        b //= 2
        yield {"batch": b}
    for size in (512, 416, 320):
        if size < p.imgsz:
            yield {"imgsz": size, "batch": max(1, min(p.batch, 8))}


def _metrics(trainer) -> dict:
    losses = trainer.label_loss_items(trainer.tloss, prefix="train")
    out = {k.replace("train/", "train_"): round(float(v), 5) for k, v in losses.items()}
    m = trainer.metrics or {}
    for key, name in (("metrics/mAP50(B)", "map50"), ("metrics/mAP50-95(B)", "map50_95"),
                      ("metrics/precision(B)", "precision"), ("metrics/recall(B)", "recall"),
                      ("val/box_loss", "val_box_loss"), ("val/cls_loss", "val_cls_loss"),
                      ("val/dfl_loss", "val_dfl_loss")):
        if key in m:
            out[name] = round(float(m[key]), 5)
    return out


def _sample(trainer, image: Path, out: Path, names: dict) -> Path | None:
    """A prediction of the current EMA model on one validation image, drawn to `out`."""
    import cv2
    import numpy as np
    import torch
    from ultralytics.data.augment import LetterBox
    from ultralytics.utils.nms import non_max_suppression
    from ultralytics.utils.plotting import Annotator, colors

    model = trainer.ema.ema if trainer.ema else trainer.model
    img0 = cv2.imread(str(image))
    if img0 is None:
        return None
    img = LetterBox(trainer.args.imgsz, auto=False)(image=img0)
    x = torch.from_numpy(np.ascontiguousarray(img[..., ::-1].transpose(2, 0, 1))).float().div(255)[None]
    x = x.to(next(model.parameters()).device, dtype=next(model.parameters()).dtype)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        pred = model(x)
    if was_training:
        model.train()
    det = non_max_suppression(pred[0] if isinstance(pred, (list, tuple)) else pred, 0.25, 0.7)[0]
    annotator = Annotator(img.copy(), line_width=1)
    for *xyxy, conf, cls in det.tolist():
        annotator.box_label(xyxy, f"{names.get(int(cls), int(cls))} {conf:.2f}", color=colors(int(cls), True))
    cv2.imwrite(str(out), annotator.result())
    return out


def run(p: Params, ctx) -> dict:
    from studio.context import JobCancelled
    from workers.detect import data as detect_data

    yolo.setup(ctx.data_dir)
    ctx.progress(0, None, "checking the dataset")
    try:
        data_yaml, report = detect_data.prepare(Path(p.data), ctx.run_dir / "dataset", p.val_split, p.seed)
    except BaseException:
        shutil.rmtree(ctx.run_dir / "dataset", ignore_errors=True)  # a half-imported dataset is no output
        raise
    ctx.emit("dataset", report=report, summary=detect_data.summary(report))
    ctx.card(dataset=report, dataset_source=p.data)

    resume = None
    if p.resume_from:
        state = json.loads(_checkpoint(ctx.run_dir.parent, p.resume_from).read_text())
        src = ctx.run_dir.parent / p.resume_from / state["last"]
        if not yolo.studio_wrote(src, ctx.run_dir.parent):
            raise ValueError(f"{src} changed since job {p.resume_from} wrote it; not loading it")
        resume = ctx.run_dir / "resume" / "last.pt"
        resume.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src, resume)
        yolo.record_weights(ctx.run_dir, resume)
        ctx.log(f"resuming job {p.resume_from} after epoch {state['epoch']}")
        model = yolo.load(str(resume), ctx.data_dir, trust=False)
    else:
        model = yolo.load(p.model, ctx.data_dir, p.trust, progress=ctx.progress)

    save_dir = ctx.run_dir / "train"
    val_images = [Path(x) for x in (ctx.run_dir / "dataset" / "val.txt").read_text().split()]
    t0 = time.perf_counter()
    state = {"epoch": 0}

    def on_batch_end(trainer):  # a cancel point, and progress within the epoch for the ETA
        state["batch"] = state.get("batch", 0) + 1
        per_epoch = max(1, len(trainer.train_loader))
        done = trainer.epoch + min(state["batch"] % per_epoch or per_epoch, per_epoch) / per_epoch
        ctx.progress(done, trainer.epochs, f"epoch {trainer.epoch + 1}/{trainer.epochs}")

    def on_fit_epoch_end(trainer):
        epoch = trainer.epoch + 1
        if epoch == state["epoch"] or epoch > trainer.epochs:  # the final validation of best.pt calls it again
            return
        state["epoch"], state["batch"] = epoch, 0
        weights = Path(trainer.wdir)
        yolo.record_weights(ctx.run_dir, *(weights / f for f in ("last.pt", "best.pt")))
        ckpt = ctx.run_dir / "checkpoint"
        ckpt.mkdir(exist_ok=True)
        (ckpt / "state.json").write_text(json.dumps({"epoch": epoch, "epochs": trainer.epochs,
                                                     "last": str((weights / "last.pt").relative_to(ctx.run_dir))}))
        values = _metrics(trainer)
        ctx.metric(epoch, **values, seconds=round(time.perf_counter() - t0, 2))
        if val_images and (epoch == 1 or epoch % max(1, trainer.epochs // 10) == 0 or epoch == trainer.epochs):
            out = _sample(trainer, val_images[0], ctx.run_dir / f"sample_epoch{epoch:04d}.jpg", trainer.data["names"])
            if out:
                ctx.emit("sample", epoch=epoch, path=out.name)
        ctx.progress(epoch, trainer.epochs, f"epoch {epoch}/{trainer.epochs} · mAP50 {values.get('map50', 0):.3f}")

    model.add_callback("on_train_batch_end", on_batch_end)
    model.add_callback("on_fit_epoch_end", on_fit_epoch_end)
    # validation takes seconds per epoch: its batches are cancel points too (the trainer hands its callbacks on)
    model.add_callback("on_val_batch_end", lambda validator: ctx.check_cancel())
    device = "0" if ctx.device == "cuda" else "cpu"
    args = dict(data=str(data_yaml), epochs=p.epochs, imgsz=p.imgsz, batch=p.batch, amp=p.amp,
                patience=p.patience or 10_000, mosaic=p.mosaic, fliplr=p.fliplr, flipud=p.flipud, hsv_h=p.hsv_h,
                hsv_s=p.hsv_s, hsv_v=p.hsv_v, lr0=p.lr0, seed=p.seed, deterministic=True, workers=p.workers,
                device=device, project=str(ctx.run_dir), name="train", exist_ok=True, plots=True, verbose=False)
    try:
        if resume:
            # Ultralytics resumes with the checkpoint's own settings; save_dir and data may be overridden
            model.train(resume=True, save_dir=str(save_dir), data=str(data_yaml), workers=p.workers, device=device)
        else:
            model.train(**args)
    except JobCancelled:
        ctx.log(f"cancelled after epoch {state['epoch']}; last.pt is kept and Resume continues from it")
        raise
    return _finish(ctx, save_dir, state, time.perf_counter() - t0)


def _finish(ctx, save_dir: Path, state: dict, seconds: float) -> dict:
    weights = save_dir / "weights"
    for name in ("best.pt", "last.pt"):
        if (weights / name).exists():
            shutil.copy(weights / name, ctx.run_dir / name)
    hashes = yolo.record_weights(ctx.run_dir, ctx.run_dir / "best.pt", ctx.run_dir / "last.pt",
                                 weights / "best.pt", weights / "last.pt")
    ctx.card(weights_sha256=hashes)
    for f in ("results.csv", "confusion_matrix.png", "confusion_matrix_normalized.png", "results.png"):
        if (save_dir / f).exists():
            ctx.artifact(save_dir / f, f)
    for f in sorted(save_dir.glob("*PR_curve.png")):
        ctx.artifact(f, f.name)
    ctx.artifact(ctx.run_dir / "best.pt", "best weights")
    results = save_dir / "results.csv"
    rows = list(csv.DictReader(results.open())) if results.exists() else []
    final = {k.strip(): float(v) for k, v in rows[-1].items() if v.strip()} if rows else {}
    best_map50 = max((float(r.get("metrics/mAP50(B)") or 0) for r in rows), default=0.0)
    return {"epochs": state["epoch"], "seconds": seconds, "best": str(ctx.run_dir / "best.pt"),
            "map50": final.get("metrics/mAP50(B)"), "map50_95": final.get("metrics/mAP50-95(B)"),
            "best_map50": best_map50, "plots": sorted(f.name for f in save_dir.glob("*.png"))}
