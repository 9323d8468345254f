"""The device worker: a separate process (spawn) that owns the GPU, runs one job at a time and keeps a model cache."""
from __future__ import annotations

import functools
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

CORE_PACKAGES = ("torch", "numpy", "safetensors", "gradio", "nvidia-ml-py")  # every run card names these


@functools.lru_cache(maxsize=64)  # installed versions do not change under a running worker; looking them up costs ms
def package_versions(names=CORE_PACKAGES) -> dict[str, str]:
    from importlib import metadata

    out = {"python": platform.python_version()}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def descendants(pid: int) -> list[int]:
    """The processes a job started (a multi-process fine-tune's launcher and its ranks), through Linux's per-thread
    children lists: one small read when there are none, so the 50 ms sampler stays cheap. A process forks from the
    thread that calls it, and the jobs that start processes do so from their main thread."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/task/{p}/children") as f:
                kids = [int(x) for x in f.read().split()]
        except (OSError, ValueError):
            kids = []
        out += kids
        todo += kids
    return out


def _rss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def memory_reader(device: str, nvml_index: int | None = None):
    """A function that returns the memory this process and the processes its job started hold on its device now:
    NVML's per-process figures on CUDA (what llama.cpp and CTranslate2 allocate too), torch's reserved memory where
    NVML cannot see the process (containers), resident sets on the CPU."""
    import psutil

    proc = psutil.Process()
    if device != "cuda":
        me = os.getpid()
        return lambda: proc.memory_info().rss + sum(_rss(k) for k in descendants(me))
    import torch

    try:
        import pynvml

        pynvml.nvmlInit()
        if nvml_index is None:
            nvml_index = int(os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0] or 0)
        h = pynvml.nvmlDeviceGetHandleByIndex(nvml_index)
        pid = os.getpid()

        def read_nvml() -> int:
            mine = {pid, *descendants(pid)}  # a DDP run's rank on this card is a process of the job's
            used = [p.usedGpuMemory for p in pynvml.nvmlDeviceGetComputeRunningProcesses(h)
                    if p.pid in mine and p.usedGpuMemory]
            return sum(used) if used else torch.cuda.memory_reserved()

        read_nvml()
        return read_nvml
    except Exception:  # NVML missing or per-process info not allowed
        return lambda: torch.cuda.memory_reserved()


def rss_high_water():
    """(reset, read) of this process's peak resident set (Linux's VmHWM, reset through /proc/self/clear_refs), so a
    spike shorter than the sampler's 50 ms still counts; None where /proc does not allow it."""
    import re

    def reset() -> None:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")

    def read() -> int:
        with open("/proc/self/status") as f:
            return int(re.search(r"VmHWM:\s+(\d+) kB", f.read()).group(1)) * 1024

    try:
        reset()
        read()
    except (OSError, AttributeError):
        return None
    return reset, read


class PeakSampler:
    """Samples this process's device memory while a job runs, every 50 ms (and on the CPU, the kernel's own record of
    the peak in between)."""

    def __init__(self, read, high_water=None):
        self._read = read
        self._high_water = high_water  # rss_high_water(): (reset, read), or None
        self.start = self.peak = 0
        self._stop = threading.Event()

    def __enter__(self):
        if self._high_water:
            self._high_water[0]()
        self.start = self.peak = self._read()
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
            self.peak = max(self.peak, self._read(), self._high_water[1]() if self._high_water else 0)
        except Exception:
            pass


def _watch_parent(parent_pid: int) -> None:
    # If the app is killed outright, the worker must not go on holding the GPU.
    while True:
        time.sleep(1.0)
        if os.getppid() != parent_pid:
            os._exit(3)


class Reporter:
    """Sends reports to the studio over the pipe, whole, from any thread of the job (progress may come from a
    library's thread)."""

    def __init__(self, conn):
        self._conn, self._lock = conn, threading.Lock()

    def put(self, msg: dict) -> None:
        with self._lock:
            self._conn.send(msg)


def main(inq, conn, cancel_flag, settings: dict[str, Any]) -> None:
    """Entry point of the worker process."""
    outq = Reporter(conn)
    # Ctrl-C in a terminal (SIGINT) and a service manager's stop (SIGTERM) reach the whole process group: the studio
    # stops its workers itself, after giving the running job the cancel grace to checkpoint.
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s worker %(levelname)s %(message)s")
    threading.Thread(target=_watch_parent, args=(settings["parent_pid"],), daemon=True).start()
    # The parent starts this process as a daemon (it dies with the studio); inside, jobs may start their own
    # processes (Ultralytics' dataloader workers), which multiprocessing refuses to a daemon.
    import multiprocessing

    multiprocessing.current_process().daemon = False
    lane = settings.get("lane", "device")
    cuda_device = settings.get("cuda_device")  # on a box with several GPUs, each device worker sees only its own
    if cuda_device is not None and lane != "io":
        os.environ["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"  # NVML's order, which the studio's device numbers follow
        os.environ["CUDA_VISIBLE_DEVICES"] = str(cuda_device)
    if lane == "io":  # downloads and dataset checks: this process never touches the GPU, nor loads torch up front
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
        torch, device = None, "cpu"
    else:
        import torch  # imported here, in the one process that owns the device, so a job starts warm

        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":  # hold the CUDA context from the start: the gate counts it once, and no job pays for it
        torch.zeros(1, device="cuda")
    idle_unload_s = float(settings.get("idle_unload_s", 600))

    def free_device_memory():  # after an eviction: the evicted model's cycles may sit among the frozen objects
        gc.unfreeze()
        gc.collect()
        gc.freeze()
        if device == "cuda":
            torch.cuda.empty_cache()

    gc.collect()
    gc.freeze()  # the imports never become garbage: later collections skip them
    measure = memory_reader(device, cuda_device)
    high_water = rss_high_water() if device == "cpu" else None
    baseline = measure()  # this process once started, before any job: its runtime context
    cache = ModelCache(on_evict=free_device_memory, measure=measure)
    outq.put({
        "type": "ready",
        "pid": os.getpid(),
        "device": device,
        "device_name": torch.cuda.get_device_name(0) if device == "cuda" else platform.processor() or "cpu",
        "torch": str(torch.__version__) if torch else None,
        "torch_cuda": torch.version.cuda if torch else None,
        "baseline": baseline,
    })

    def report_cache():
        outq.put({"type": "cache", "sizes": cache.sizes()})

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
        if msg.get("evict"):
            cache.evict_keys(msg["evict"])  # chosen by the scheduler: never a model this job names
            report_cache()
        _run_job(msg, outq, cancel_flag, cache, device, measure, report_cache, high_water)


def _run_job(msg, outq, cancel_flag, cache: ModelCache, device: str, measure, report_cache,
             high_water=None) -> None:
    job_id = msg["job_id"]
    run_dir = Path(msg["run_dir"])
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
        owner=msg.get("owner"),
    )
    sampler = PeakSampler(measure, high_water)
    # The job's own peak: the cached models it reuses, plus whatever the process grows by while it runs (the models
    # it loads, its working memory). Not the worker's baseline (its runtime context: the CUDA context, or 1-2 GiB
    # resident on the CPU once torch is imported, held whether a job runs or not), nor models other jobs cached.
    held = sum(b for k, b in cache.sizes().items() if k in set(msg.get("models") or ()))

    def job_peak() -> int:
        return held + max(0, sampler.peak - sampler.start)

    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        with sampler:
            module = importlib.import_module(msg["module"])
            p = params_mod.build(module.Params, msg["params"])
            ctx.card(
                job_id=job_id,
                kind=msg["kind"],
                params=params_mod.to_dict(p),
                seed=getattr(p, "seed", None),
                versions=dict(package_versions(CORE_PACKAGES + tuple(getattr(module, "PACKAGES", ())))),
                device={"kind": device, "host": platform.node()},
                started=time.time(),
            )
            if device == "cuda":
                import torch

                torch.cuda.reset_peak_memory_stats()
            result = module.run(p, ctx)
        outcome = {"type": "done", "job_id": job_id, "result": _jsonable(result), "peak": job_peak()}
    except JobCancelled:
        outcome = {"type": "cancelled", "job_id": job_id, "peak": job_peak()}
    except Exception as e:  # the loop never dies: the job carries its error
        log.exception("job %s failed", job_id)
        outcome = {"type": "failed", "job_id": job_id, "error": _explain(e), "traceback": traceback.format_exc(),
                   "peak": job_peak()}
    cancel_flag.clear()
    report_cache()  # the cache as this job leaves it goes first: the scheduler plans the next job on it
    outq.put(outcome)  # recorded now; the clean-up below is not the job's time
    # What survived earlier jobs (imports, cached models) is frozen, so this collects only what the job left:
    # milliseconds instead of the ~100 ms a full pass over torch's objects takes.
    gc.collect()
    gc.freeze()
    if device == "cuda":
        import torch

        torch.cuda.empty_cache()
    outq.put({"type": "idle"})  # the job's memory is back: the scheduler may read free memory for the next one


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
