"""The one table of job kinds: kind -> worker module. Modules are imported only when used."""
from __future__ import annotations

import importlib
from types import ModuleType

WORKERS: dict[str, str] = {}


def register(kind: str, module: str) -> None:
    if kind in WORKERS:
        raise ValueError(f"duplicate worker kind {kind!r}")
    WORKERS[kind] = module


register("selftest", "workers.selftest")
register("tinylm", "workers.tinylm")
register("tinylm_generate", "workers.tinylm_generate")
register("chat", "workers.chat")
register("rag_ingest", "workers.rag_ingest")
register("rag_eval", "workers.rag_eval")
register("model_download", "workers.model_download")
register("transcribe", "workers.transcribe")
register("detect_train", "workers.detect_train")
register("detect_predict", "workers.detect_predict")
register("detect_export", "workers.detect_export")
register("detect_stream", "workers.detect_stream")


def module_for(kind: str) -> ModuleType:
    try:
        name = WORKERS[kind]
    except KeyError:
        raise ValueError(f"unknown job kind {kind!r}; known kinds: {', '.join(sorted(WORKERS))}") from None
    return importlib.import_module(name)
