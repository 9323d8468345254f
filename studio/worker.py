"""The device worker: a separate process (spawn) that owns the GPU, runs one job at a time and keeps a model cache."""
from __future__ import annotations

import gc
import importlib
import json
import logging
import os
import platform
import queue
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

from . import params as params_mod
from .context import JobCancelled, JobContext, ModelCache

log = logging.getLogger("studio.worker")

VERSIONED = ("torch", "numpy", "safetensors", "tokenizers", "gradio", "nvidia-ml-py")


def package_versions() -> dict[str, str]:
    from importlib import metadata

    out = {"python": platform.python_version()}
    for name in VERSIONED:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


class PeakSampler:
    """Samples this process's device memory while a job runs (NVML on CUDA, RSS on the CPU)."""

    def __init__(self, device: str):
        self.device = device
        self.peak = 0
        self._stop = threading.Event()
        self._read = self._reader()

    def _reader(self):
        import psutil

        proc = psutil.Process()
        if self.device == "cuda":
            try:
                import pynvml

                pynvml.nvmlInit()
                h = pynvml.nvmlDeviceGetHandleByIndex(int(os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0] or 0))
                pid = os.getpid()

                import torch

                def read_nvml() -> int:
                    for p in pynvml.nvmlDeviceGetComputeRunningProcesses(h):
                        if p.pid == pid and p.usedGpuMemory:
                            return p.usedGpuMemory
                    # in a container NVML may not see our pid: fall back to what torch holds
                    return torch.cuda.memory_reserved()

                read_nvml()
                return read_nvml
            except Exception:  # NVML missing or per-process info not allowed: fall back to torch's counter
                import torch

                return lambda: torch.cuda.memory_reserved()
        return lambda: proc.memory_info().rss

    def __enter__(self):
        self.peak = self._read()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.wait(0.05):
            try:
                self.peak = max(self.peak, self._read())
            except Exception:
                return

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=1)
        try:
            self.peak = max(self.peak, self._read())
        except Exception:
            pass


def _watch_parent(parent_pid: int) -> None:
    # If the app is killed outright, the worker must not go on holding the GPU.
    while True:
        time.sleep(1.0)
        if os.getppid() != parent_pid:
            os._exit(3)


def main(inq, outq, cancel_flag, settings: dict[str, Any]) -> None:
    """Entry point of the worker process."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s worker %(levelname)s %(message)s")
    threading.Thread(target=_watch_parent, args=(settings["parent_pid"],), daemon=True).start()
    # The parent starts this process as a daemon (it dies with the studio); inside, jobs may start their own
    # processes (Ultralytics' dataloader workers), which multiprocessing refuses to a daemon.
    import multiprocessing

    multiprocessing.current_process().daemon = False
    import torch  # imported here, in the one process that owns the device, so a job starts warm

    device = "cuda" if torch.cuda.is_available() else "cpu"
    idle_unload_s = float(settings.get("idle_unload_s", 600))

    def free_device_memory():
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()

    cache = ModelCache(on_evict=free_device_memory)
    versions = package_versions()
    outq.put({
        "type": "ready",
        "pid": os.getpid(),
        "device": device,
        "device_name": torch.cuda.get_device_name(0) if device == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
    })

    def report_cache():
        outq.put({"type": "cache", "bytes": cache.bytes, "keys": cache.keys()})

    while True:
        try:
            msg = inq.get(timeout=min(5.0, idle_unload_s))
        except queue.Empty:
            if cache.evict_idle(idle_unload_s):
                report_cache()
            continue
        mtype = msg["type"]
        if mtype == "stop":
            break
        if mtype == "settings":
            idle_unload_s = float(msg.get("idle_unload_s", idle_unload_s))
            continue
        if mtype == "evict":
            cache.clear()
            report_cache()
            continue
        if mtype != "run":
            log.warning("unknown message %r", mtype)
            continue
        _run_job(msg, outq, cancel_flag, cache, device, versions)
        report_cache()


def _run_job(msg, outq, cancel_flag, cache: ModelCache, device: str, versions: dict) -> None:
    job_id = msg["job_id"]
    run_dir = Path(msg["run_dir"])
    run_dir.mkdir(parents=True, exist_ok=True)
    if msg.get("evict_bytes", 0) > 0:
        cache.evict(msg["evict_bytes"])
    outq.put({"type": "started", "job_id": job_id, "t": time.time()})
    ctx = JobContext(
        job_id=job_id,
        kind=msg["kind"],
        run_dir=run_dir,
        data_dir=Path(msg["data_dir"]),
        device=device,
        cancel_flag=cancel_flag,
        cache=cache,
        notify=outq.put,
    )
    sampler = PeakSampler(device)
    try:
        with sampler:
            module = importlib.import_module(msg["module"])
            p = params_mod.build(module.Params, msg["params"])
            ctx.card(
                job_id=job_id,
                kind=msg["kind"],
                params=params_mod.to_dict(p),
                seed=getattr(p, "seed", None),
                versions=versions,
                device={"kind": device, "host": platform.node()},
                started=time.time(),
            )
            if device == "cuda":
                import torch

                torch.cuda.reset_peak_memory_stats()
            result = module.run(p, ctx)
        outq.put({"type": "done", "job_id": job_id, "result": _jsonable(result), "peak": sampler.peak})
    except JobCancelled:
        outq.put({"type": "cancelled", "job_id": job_id, "peak": sampler.peak})
    except Exception as e:  # the loop never dies: the job carries its error
        log.exception("job %s failed", job_id)
        outq.put({
            "type": "failed",
            "job_id": job_id,
            "error": _explain(e),
            "traceback": traceback.format_exc(),
            "peak": sampler.peak,
        })
    finally:
        cancel_flag.clear()
        gc.collect()
        if device == "cuda":
            import torch

            torch.cuda.empty_cache()


def _explain(e: Exception) -> str:
    name = type(e).__name__
    text = str(e).strip() or name
    if "out of memory" in text.lower():
        return (f"{name}: the device ran out of memory ({text.splitlines()[0]}). "
                "Lower the batch size or context, or free memory held by other programs, then retry.")
    if isinstance(e, (ValueError, FileNotFoundError, PermissionError)):
        return text
    return f"{name}: {text}"


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj if obj is not None else {}, default=str))


if __name__ == "__main__":  # pragma: no cover
    sys.exit("the worker is started by the studio, not run directly")
