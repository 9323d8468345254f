"""Job kind `detect_predict`: YOLO on images (annotated copies and a table of boxes) or a video (an annotated
video, frame by frame; a cancel keeps the frames done so far)."""
from __future__ import annotations

import csv
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from studio.gate import Estimate
from workers.detect import yolo

VIDEO_EXT = {".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg"}


PACKAGES = ("ultralytics", "torchvision")  # versions for the run card
PATHS = ("model", "source")  # params that name a server path or a job (studio.access)


@dataclass(frozen=True)
class Params:
    model: str  # a preset (yolov8n, yolo11s, …), weights a detect_train job wrote, an .onnx, or a trusted .pt
    source: str  # an image, a video, a folder of images, or several image paths separated by newlines
    conf: float = 0.25  # confidence threshold
    iou: float = 0.7  # NMS IoU threshold
    imgsz: int = 640  # images are resized to this many pixels on their long side
    classes: str = ""  # keep only these classes: names or ids, comma-separated; empty: all
    max_det: int = 300  # most boxes kept per image
    trust: bool = False  # load a .pt the studio did not write (pickle: only files you trust)

    def __post_init__(self):
        if not self.source.strip():
            raise ValueError("no source given (an image, a video or a folder)")
        for name, lo, hi in [("conf", 0.0, 1.0), ("iou", 0.0, 1.0), ("imgsz", 32, 4096), ("max_det", 1, 10_000)]:
            v = getattr(self, name)
            if not lo <= v <= hi:
                raise ValueError(f"{name} must be between {lo} and {hi}; got {v}")


def sources(p: Params) -> list[Path]:
    out = []
    for item in (s.strip() for s in p.source.splitlines()):
        if not item:
            continue
        path = Path(item).expanduser()
        if path.is_dir():
            from workers.detect.data import _images

            out += _images(path)
        else:
            out.append(path)
    return out


def validate(p: Params, config) -> None:
    paths = sources(p)
    missing = [str(x) for x in paths if not x.is_file()]
    if missing or not paths:
        raise ValueError(f"not found: {', '.join(missing) or p.source}")
    videos = [x for x in paths if x.suffix.lower() in VIDEO_EXT]
    if videos and len(paths) > 1:
        raise ValueError("give one video at a time (or images only)")
    yolo.resolve(p.model, config.data_dir, p.trust)


def estimate(p: Params, device) -> Estimate:
    """The model's fp32 weights (kept in the worker's cache) and one image's activations."""
    params_m, scale = yolo.size_of(p.model)
    return Estimate(parts={"activations": yolo.activation_bytes(scale, p.imgsz, 1, False, training=False),
                           "workspace": 256 * 2**20},
                    models={model_key(p.model): int(params_m * 1e6 * 4)}, note=f"{Path(p.model).stem} at {p.imgsz} px")


def model_key(model: str) -> str:
    """The worker-cache key of a YOLO model: the same in the estimate and the run."""
    local = Path(model).expanduser()
    return f"yolo:{local.resolve() if local.is_file() else model}"


def class_ids(p: Params, names: dict) -> list[int] | None:
    if not p.classes.strip():
        return None
    by_name = {v.lower(): k for k, v in names.items()}
    out = []
    for c in (x.strip() for x in p.classes.split(",") if x.strip()):
        if c.isdigit() and int(c) in names:
            out.append(int(c))
        elif c.lower() in by_name:
            out.append(by_name[c.lower()])
        else:
            raise ValueError(f"class {c!r} is not one this model detects ({', '.join(names.values())})")
    return out


def load_model(ctx, model: str, trust: bool):
    def load():
        m = yolo.load(model, ctx.data_dir, trust, progress=ctx.progress)
        path = Path(m.ckpt_path or "") if getattr(m, "ckpt_path", None) else None
        return m, (path.stat().st_size if path and path.exists() else 50 * 2**20)  # used when it measured nothing

    return ctx.cached(model_key(model), load)


def boxes_of(result, names: dict) -> list[dict]:
    out = []
    b = result.boxes
    if b is None:
        return out
    for xyxy, conf, cls in zip(b.xyxy.tolist(), b.conf.tolist(), b.cls.tolist()):
        out.append({"class": names.get(int(cls), str(int(cls))), "class_id": int(cls), "confidence": round(conf, 4),
                    "x1": round(xyxy[0], 1), "y1": round(xyxy[1], 1), "x2": round(xyxy[2], 1), "y2": round(xyxy[3], 1)})
    return out


def run(p: Params, ctx) -> dict:
    model, cached = load_model(ctx, p.model, p.trust)
    names = dict(model.names)
    kw = dict(conf=p.conf, iou=p.iou, imgsz=p.imgsz, classes=class_ids(p, names), max_det=p.max_det,
              device="0" if ctx.device == "cuda" else "cpu", verbose=False)
    paths = sources(p)
    if paths[0].suffix.lower() in VIDEO_EXT:
        return _video(model, paths[0], kw, names, ctx) | {"model_cached": cached}
    return _images(model, paths, kw, names, ctx) | {"model_cached": cached}


def _images(model, paths: list[Path], kw: dict, names: dict, ctx) -> dict:
    import cv2

    out_dir = ctx.run_dir / "pred"
    out_dir.mkdir(exist_ok=True)
    rows, t0 = [], time.perf_counter()
    for i, path in enumerate(paths):
        ctx.progress(i, len(paths), f"image {i + 1} of {len(paths)}")
        img = cv2.imread(str(path))
        if img is None:
            shutil.rmtree(out_dir, ignore_errors=True)  # the job fails: no half-annotated set is left
            raise ValueError(f"could not read {path.name} as an image")
        r = model.predict(img, **kw)[0]
        dst = out_dir / f"{i:04d}_{path.stem}.jpg"
        cv2.imwrite(str(dst), r.plot())
        boxes = boxes_of(r, names)
        rows += [{"image": path.name, **b} for b in boxes]
        ctx.emit("detections", image=path.name, annotated=str(dst.relative_to(ctx.run_dir)), boxes=boxes,
                 ms=round(sum(r.speed.values()), 1))
    (ctx.run_dir / "detections.json").write_text(json.dumps(rows, indent=1))
    with open(ctx.run_dir / "detections.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["image", "class", "class_id", "confidence", "x1", "y1", "x2", "y2"])
        w.writeheader()
        w.writerows(rows)
    ctx.artifact(ctx.run_dir / "detections.csv", "boxes (CSV)")
    ctx.progress(len(paths), len(paths), "done")
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["class"]] = counts.get(r["class"], 0) + 1
    return {"images": len(paths), "boxes": len(rows), "counts": counts, "seconds": time.perf_counter() - t0,
            "annotated": sorted(str(x.relative_to(ctx.run_dir)) for x in out_dir.glob("*.jpg"))}


def _writer(path_stem: Path, fps: float, size: tuple[int, int]):
    """A video writer browsers can play when OpenCV can make one (H.264, else VP8 WebM), else MPEG-4 part 2."""
    import cv2

    for fourcc, ext in (("avc1", ".mp4"), ("VP80", ".webm"), ("mp4v", ".mp4")):
        path = path_stem.with_suffix(ext)
        w = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), fps, size)
        if w.isOpened():
            return w, path
        w.release()
        path.unlink(missing_ok=True)
    raise RuntimeError("OpenCV can write no video format here")


def _video(model, path: Path, kw: dict, names: dict, ctx) -> dict:
    import cv2

    from studio.context import JobCancelled

    cap = cv2.VideoCapture(str(path))
    if not cap.isOpened():
        raise ValueError(f"could not read {path.name} as a video")
    total = int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) or None
    fps = cap.get(cv2.CAP_PROP_FPS) or 25.0
    ok, frame = cap.read()
    if not ok:
        raise ValueError(f"{path.name} holds no readable frames")
    writer, out = _writer(ctx.run_dir / "annotated", fps, (frame.shape[1], frame.shape[0]))
    counts: dict[str, int] = {}
    n, t0 = 0, time.perf_counter()
    try:
        while ok:
            r = model.predict(frame, **kw)[0]
            writer.write(r.plot())
            for b in boxes_of(r, names):
                counts[b["class"]] = counts.get(b["class"], 0) + 1
            n += 1
            ctx.progress(n, total, f"frame {n}" + (f" of {total}" if total else ""))
            ok, frame = cap.read()
    except JobCancelled:
        writer.release()
        ctx.artifact(out, f"annotated video (partial: {n} frames)")
        raise
    finally:
        writer.release()
        cap.release()
    ctx.artifact(out, "annotated video")
    seconds = time.perf_counter() - t0
    return {"frames": n, "fps_processed": n / seconds if seconds else None, "counts": counts, "seconds": seconds,
            "video": out.name}
