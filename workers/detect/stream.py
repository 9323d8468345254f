"""Job kind `detect_stream`: live detection on frames the browser's webcam sends.

The Detect tab writes each webcam frame to `uploads/streams/<session>/in.jpg`; this job (in the worker that owns
the GPU, the model loaded once) predicts on each new frame and writes `out.jpg` beside it, until no frame has
come for `idle_s` seconds or the user cancels.
"""
from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path

from studio.gate import Estimate
from workers.detect import predict as detect_predict
from workers.detect import yolo


PACKAGES = ("ultralytics", "opencv-python")  # versions for the run card
PATHS = ("model",)  # params that name a server path or a job (studio.access)


@dataclass(frozen=True)
class Params:
    model: str  # as for detect_predict
    session: str  # the stream's folder name under uploads/streams (letters, digits, dashes)
    conf: float = 0.25  # lowest confidence a box is shown with
    iou: float = 0.7  # boxes overlapping more than this are merged (NMS)
    imgsz: int = 640  # frames are resized to this many pixels on their long side
    classes: str = ""  # only these classes (names or ids, comma separated); empty: all
    trust: bool = False  # load a .pt the studio did not write (pickle: only files you trust)
    idle_s: float = 10.0  # stop when no frame has come for this long
    max_minutes: float = 60.0  # a stream stops after this long

    def __post_init__(self):
        if not re.fullmatch(r"[A-Za-z0-9-]{1,64}", self.session):
            raise ValueError("session must be 1-64 letters, digits or dashes")
        if not 0.5 <= self.idle_s <= 600 or not 0 < self.max_minutes <= 24 * 60:
            raise ValueError("idle_s must be 0.5..600 and max_minutes 0..1440")
        for name, lo, hi in [("conf", 0.0, 1.0), ("iou", 0.0, 1.0), ("imgsz", 32, 4096)]:  # as detect_predict
            v = getattr(self, name)
            if not lo <= v <= hi:
                raise ValueError(f"{name} must be between {lo} and {hi}; got {v}")


def folder(data_dir: Path, session: str) -> Path:
    from studio.config import Config

    return Config.load(data_dir).uploads_dir / "streams" / session


def validate(p: Params, config) -> None:
    yolo.resolve(p.model, config.data_dir, p.trust)


def estimate(p: Params, device) -> Estimate:
    return detect_predict.estimate(detect_predict.Params(model=p.model, source="-", imgsz=p.imgsz), device)


def run(p: Params, ctx) -> dict:
    import cv2

    model, _ = detect_predict.load_model(ctx, p.model, p.trust)
    names = dict(model.names)
    kw = dict(conf=p.conf, iou=p.iou, imgsz=p.imgsz, verbose=False, device="0" if ctx.device == "cuda" else "cpu",
              classes=detect_predict.class_ids(detect_predict.Params(model=p.model, source="-", classes=p.classes),
                                              names))
    d = folder(ctx.data_dir, p.session)
    d.mkdir(parents=True, exist_ok=True)
    frame_in, frame_out = d / "in.jpg", d / "out.jpg"
    n, last_seen, last_frame, t0 = 0, time.time(), 0.0, time.time()
    while time.time() - last_seen < p.idle_s and time.time() - t0 < p.max_minutes * 60:
        ctx.check_cancel()
        stamp = frame_in.stat().st_mtime if frame_in.exists() else 0.0
        if stamp <= last_frame:
            time.sleep(0.01)
            continue
        last_frame, last_seen = stamp, time.time()
        img = cv2.imread(str(frame_in))
        if img is None:  # caught mid-write: the next frame replaces it
            continue
        r = model.predict(img, **kw)[0]
        tmp = d / "out.tmp.jpg"
        cv2.imwrite(str(tmp), r.plot())
        tmp.replace(frame_out)
        n += 1
        counts = {}
        for b in detect_predict.boxes_of(r, names):
            counts[b["class"]] = counts.get(b["class"], 0) + 1
        ctx.progress(n, None, f"{n} frames · {n / max(time.time() - t0, 1e-6):.1f} fps · "
                     + (", ".join(f"{v} {k}" for k, v in counts.items()) or "nothing detected"))
    return {"frames": n, "seconds": time.time() - t0, "session": p.session}
