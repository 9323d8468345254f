"""The one table of job kinds: kind -> worker module, and the lane it runs in. Modules are imported only when used.

Kinds run in one of two lanes: `device` (the worker that owns the GPU and its model cache) or `io` (a worker that
never touches the device: downloads, dataset checks), so a download does not wait behind a training run.
"""
from __future__ import annotations

import importlib
from types import ModuleType

WORKERS: dict[str, str] = {}
LANES: dict[str, str] = {}


def register(kind: str, module: str, lane: str = "device") -> None:
    if kind in WORKERS:
        raise ValueError(f"duplicate worker kind {kind!r}")
    if lane not in ("device", "io"):
        raise ValueError(f"lane must be 'device' or 'io'; got {lane!r}")
    WORKERS[kind] = module
    LANES[kind] = lane


#        kind               module                           lane
register("selftest",        "workers.system.selftest")
register("model_download",  "workers.system.model_download", lane="io")
register("tinylm",          "workers.tinylm.train")
register("tinylm_generate", "workers.tinylm.generate")
register("chat",            "workers.chat.chat")
register("rag_ingest",      "workers.rag.ingest")
register("rag_eval",        "workers.rag.evaluate")
register("transcribe",      "workers.speech.transcribe")
register("detect_check",    "workers.detect.check",          lane="io")
register("detect_train",    "workers.detect.train")
register("detect_predict",  "workers.detect.predict")
register("detect_export",   "workers.detect.export")
register("detect_stream",   "workers.detect.stream")
register("finetune",        "workers.finetune.train")
register("finetune_check",  "workers.finetune.check",        lane="io")
register("finetune_merge",  "workers.finetune.merge")
register("paint",           "workers.paint.generate")
register("paint_lora",      "workers.paint.lora_train")
register("vision_chat",     "workers.vision.chat")
register("vision_check",    "workers.vision.check",          lane="io")
register("vision_finetune", "workers.vision.train")
register("asr_finetune",    "workers.speech.finetune")
register("asr_check",       "workers.speech.finetune_check", lane="io")


def module_for(kind: str) -> ModuleType:
    try:
        name = WORKERS[kind]
    except KeyError:
        raise ValueError(f"unknown job kind {kind!r}; known kinds: {', '.join(sorted(WORKERS))}") from None
    return importlib.import_module(name)


def lane_of(kind: str) -> str:
    """The lane a kind runs in; an unknown kind goes to the device lane, which fails it with the reason."""
    return LANES.get(kind, "device")


def uses_device(kind: str) -> bool:
    return lane_of(kind) == "device"
