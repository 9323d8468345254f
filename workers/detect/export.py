"""Job kind `detect_export`: export a YOLO model to ONNX (always) or a TensorRT engine (with TensorRT and a GPU),
then time it: ms per image and FPS for PyTorch vs ONNX Runtime vs TensorRT at the same size and batch, warm-up
excluded, through the same Ultralytics predictor (same pre- and post-processing)."""
from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from studio.gate import Estimate
from workers.detect import yolo


PACKAGES = ("ultralytics", "onnx", "onnxruntime")  # versions for the run card
PATHS = ("model",)  # params that name a server path or a job (studio.access)


@dataclass(frozen=True)
class Params:
    model: str  # a preset, a yaml, weights a detect_train job wrote, or a trusted .pt
    format: Literal["onnx", "engine"] = "onnx"  # engine: TensorRT (needs an NVIDIA GPU and the tensorrt package)
    imgsz: int = 640  # the exported model's fixed input size in pixels
    batch: int = 1  # the exported model's fixed batch size
    half: bool = False  # FP16 (CUDA only: ONNX on the GPU, TensorRT)
    latency: bool = True  # time PyTorch vs ONNX Runtime (vs TensorRT)
    runs: int = 30  # timed runs per backend, after the warm-up
    warmup: int = 5  # untimed runs before the latency is measured
    trust: bool = False  # load a .pt the studio did not write (pickle: only files you trust)

    def __post_init__(self):
        for name, lo, hi in [("imgsz", 32, 4096), ("batch", 1, 64), ("runs", 1, 10_000), ("warmup", 0, 1000)]:
            v = getattr(self, name)
            if not lo <= v <= hi:
                raise ValueError(f"{name} must be between {lo} and {hi}; got {v}")
        if self.imgsz % 32:
            raise ValueError(f"imgsz must be a multiple of 32; got {self.imgsz}")


def tensorrt_missing(device: str) -> str | None:
    """Why a TensorRT engine cannot be built here, or None when it can."""
    if device != "cuda":
        return "TensorRT needs an NVIDIA GPU; this job runs on the CPU"
    import importlib.util

    if importlib.util.find_spec("tensorrt") is None:
        return "the tensorrt package is not installed (pip install tensorrt)"
    return None


def validate(p: Params, config) -> None:
    name = yolo.resolve(p.model, config.data_dir, p.trust)
    if name.endswith(".onnx"):  # Ultralytics exports only from PyTorch weights
        raise ValueError(f"{Path(name).name} is already an exported (ONNX) model: export a .pt, a model yaml or a "
                         "preset")


def estimate(p: Params, device) -> Estimate:
    params_m, scale = yolo.size_of(p.model)
    return Estimate(parts={"weights": int(params_m * 1e6 * 4 * 3),  # PyTorch + ONNX Runtime (+ TensorRT) copies
                           "activations": yolo.activation_bytes(scale, p.imgsz, p.batch, False, training=False) * 2,
                           "workspace": (1024 if p.format == "engine" else 256) * 2**20},
                    note=f"{Path(p.model).stem} → {p.format} at {p.imgsz} px, batch {p.batch}")


def time_backend(model, imgsz: int, batch: int, runs: int, warmup: int, device: str, half: bool, ctx,
                 label: str) -> dict:
    import numpy as np

    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (imgsz, imgsz, 3), dtype=np.uint8) for _ in range(batch)]
    kw = dict(imgsz=imgsz, device="0" if device == "cuda" else "cpu", verbose=False, batch=batch,
              **({"half": True} if half else {}))
    for _ in range(warmup):
        model.predict(images, **kw)
    inference, total = [], []
    for i in range(runs):
        t0 = time.perf_counter()
        results = model.predict(images, **kw)
        total.append((time.perf_counter() - t0) * 1000 / batch)
        inference.append(sum(r.speed["inference"] for r in results) / batch)
        ctx.progress(i + 1, runs, f"timing {label}: run {i + 1} of {runs}")
    ms = float(np.median(total))
    return {"backend": label, "ms_per_image": round(ms, 2), "inference_ms": round(float(np.median(inference)), 2),
            "fps": round(1000 / ms, 1)}


def _export(model, run_dir: Path, name: str, **kw) -> Path:
    """Export into this job's folder: Ultralytics writes beside the weights (or into the current folder for a
    yaml), so run it from the run folder and move what lands elsewhere."""
    import os

    cwd = os.getcwd()
    os.chdir(run_dir)
    try:
        made = Path(model.export(**kw)).resolve()
    finally:
        os.chdir(cwd)
    dst = run_dir / name
    if made != dst.resolve():
        shutil.move(str(made), dst)
    return dst


def run(p: Params, ctx) -> dict:
    from ultralytics import YOLO

    model = yolo.load(p.model, ctx.data_dir, p.trust, progress=ctx.progress)
    if p.format == "engine" and (why := tensorrt_missing(ctx.device)):
        raise ValueError(f"cannot build a TensorRT engine: {why}. Export to ONNX instead (format=onnx)")
    device = "0" if ctx.device == "cuda" else "cpu"
    half = p.half and ctx.device == "cuda"
    ctx.progress(0, None, "exporting to ONNX")
    out = _export(model, ctx.run_dir, f"{Path(p.model).stem}.onnx", format="onnx", imgsz=p.imgsz, batch=p.batch,
                  quantize=16 if half else 32, device=device, simplify=False, dynamic=False, verbose=False)
    ctx.artifact(out, "ONNX model")
    exported = {"onnx": out.name}
    engine = None
    trt_note = tensorrt_missing(ctx.device)
    if p.format == "engine" or (p.latency and trt_note is None):
        ctx.progress(0, None, "building the TensorRT engine")
        engine = _export(model, ctx.run_dir, f"{Path(p.model).stem}.engine", format="engine", imgsz=p.imgsz,
                         batch=p.batch, quantize=16, device=device, verbose=False)
        ctx.artifact(engine, "TensorRT engine (FP16)")
        exported["engine"] = engine.name
    table = []
    if p.latency:
        table.append(time_backend(model, p.imgsz, p.batch, p.runs, p.warmup, ctx.device, half, ctx, "PyTorch"))
        table.append(time_backend(YOLO(str(out), task="detect"), p.imgsz, p.batch, p.runs, p.warmup, ctx.device,
                                  half, ctx, "ONNX Runtime"))
        if engine:
            table.append(time_backend(YOLO(str(engine), task="detect"), p.imgsz, p.batch, p.runs, p.warmup,
                                      ctx.device, True, ctx, "TensorRT"))
        else:
            table.append({"backend": "TensorRT", "ms_per_image": None, "inference_ms": None, "fps": None,
                          "note": trt_note})
        ctx.emit("latency", table=table, imgsz=p.imgsz, batch=p.batch, device=ctx.device)
    return {"exported": exported, "latency": table, "imgsz": p.imgsz, "batch": p.batch, "device": ctx.device,
            "tensorrt": trt_note or "available"}
