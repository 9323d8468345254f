"""The Studio: submit through the gate, a durable queue, and a scheduler that supervises the device worker."""
from __future__ import annotations

import fcntl
import logging
import multiprocessing as mp
import os
import queue
import signal
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterator

from . import events, registry
from . import params as params_mod
from .config import Config
from .device import Device, DeviceReading, detect
from .gate import Refused, gate
from .jobs import Job, JobStatus
from .store import Store

log = logging.getLogger("studio")

POLL_S = 0.25  # how often the scheduler looks at the store for jobs and cancels from other processes


@dataclass
class WorkerInfo:
    pid: int | None = None
    ready: bool = False
    device: str | None = None
    device_name: str | None = None
    torch: str | None = None
    torch_cuda: str | None = None
    restarts: int = 0
    last_exit: str | None = None
    failed_starts: int = 0  # deaths in a row before the worker got ready


class _Worker:
    """One incarnation of the device worker process, with its own queues and cancel flag."""

    def __init__(self, generation: int, inbox: queue.Queue, settings: dict):
        ctx = mp.get_context("spawn")  # a fresh interpreter: CUDA is never forked
        from .cudalibs import export_library_path

        export_library_path()  # faster-whisper's CUDA 12 libraries, read by the loader when the worker starts
        self.generation = generation
        self.inq, self.outq, self.cancel = ctx.Queue(), ctx.Queue(), ctx.Event()
        from . import worker

        self.proc = ctx.Process(
            target=worker.main, args=(self.inq, self.outq, self.cancel, settings), name="studio-worker", daemon=True
        )
        self.proc.start()
        self._inbox = inbox
        threading.Thread(target=self._forward, name=f"worker-forward-{generation}", daemon=True).start()

    def _forward(self) -> None:
        while True:
            try:
                msg = self.outq.get(timeout=0.1)
            except queue.Empty:
                if not self.proc.is_alive():
                    self._inbox.put(("died", self.generation, self.proc.exitcode))
                    return
                continue
            except (EOFError, OSError):
                self.proc.join(1)
                self._inbox.put(("died", self.generation, self.proc.exitcode))
                return
            self._inbox.put(("worker", self.generation, msg))
            if msg.get("type") == "stopped":
                return

    def kill(self) -> None:
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join(5)


def describe_exit(code: int | None) -> str:
    if code is None:
        return "exit status unknown"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with status {code}"


class Studio:
    """The core object. `start()` makes this process the device owner; without it, it is a client of the store."""

    def __init__(self, config: Config, device: Device | None = None):
        self.config = config
        config.ensure_dirs()
        self.store = Store(config.db_path)
        self.device = device or detect()
        self.owner = False
        self.worker_info = WorkerInfo()
        self._inbox: queue.Queue = queue.Queue()
        self._worker: _Worker | None = None
        self._generation = 0
        self._running: str | None = None  # job id the worker is running
        self._cancel_sent_at: float | None = None
        self._cache_bytes = 0
        self._cache_keys: list[str] = []
        self._stopping = threading.Event()
        self._lock_fd: int | None = None
        self._thread: threading.Thread | None = None

    # ---- ownership and lifecycle --------------------------------------------------
    def try_start(self) -> bool:
        """Become the device owner for this data folder; False when another studio process already is."""
        fd = os.open(self.config.data_dir / "studio.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._lock_fd = fd
        self.owner = True
        self._recover()
        self._start_worker()
        self._thread = threading.Thread(target=self._loop, name="studio-scheduler", daemon=True)
        self._thread.start()
        return True

    def start(self) -> "Studio":
        if not self.try_start():
            raise RuntimeError(f"another studio process already owns {self.config.data_dir}")
        return self

    def _recover(self) -> None:
        """After an unclean stop: RUNNING jobs become INTERRUPTED and the queue starts paused."""
        clean = self.store.get_meta("clean_shutdown", "1") == "1"
        interrupted = []
        for job in self.store.with_status(JobStatus.RUNNING):
            self._finish(
                job.id,
                JobStatus.INTERRUPTED,
                error="The studio stopped while this job was running. Resume it to continue from its last checkpoint.",
            )
            interrupted.append(job.id)
        if not clean or interrupted:
            self.store.set_paused(True, "Paused after an unclean stop, so a job that crashed the studio does not run "
                                  "again by itself. Check the queue, then resume it.")
        self.store.set_meta("clean_shutdown", "0")

    def shutdown(self) -> None:
        """Stop the worker and mark a clean stop (queued jobs stay queued for next time)."""
        if not self.owner:
            return
        self._stopping.set()
        if self._thread:
            self._thread.join(5)
        w = self._worker
        if w:
            if self._running:  # a job still running at shutdown is interrupted, its checkpoint kept
                w.cancel.set()
                self._finish(self._running, JobStatus.INTERRUPTED, error="The studio was shut down while this job ran. "
                             "Resume it to continue from its last checkpoint.")
            try:
                w.inq.put({"type": "stop"})
            except (OSError, ValueError):
                pass
            w.proc.join(5)
            w.kill()
        self.store.set_meta("clean_shutdown", "1")
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
        self.owner = False

    def _settings(self) -> dict:
        return {"parent_pid": os.getpid(), "idle_unload_s": self.config.idle_unload_s}

    def _start_worker(self) -> None:
        self._generation += 1
        self.worker_info = replace(self.worker_info, pid=None, ready=False)
        self._worker = _Worker(self._generation, self._inbox, self._settings())
        self.worker_info.pid = self._worker.proc.pid
        self._cache_bytes, self._cache_keys = 0, []

    def update_config(self, **changes: Any) -> Config:
        """Apply new settings now (budget, reserve, idle unload) and save them."""
        self.config = replace(self.config, **changes)
        self.config.save()
        if self._worker:
            self._worker.inq.put({"type": "settings", "idle_unload_s": self.config.idle_unload_s})
        return self.config

    # ---- submitting -------------------------------------------------------------
    def run_dir(self, job_id: str) -> Path:
        return self.config.runs_dir / job_id

    def submit(
        self,
        kind: str,
        params: dict[str, Any] | None = None,
        *,
        owner: str | None = None,
        budget_bytes: int | None = None,
        resume_of: str | None = None,
    ) -> Job:
        """Validate, estimate and gate a job. Bad params raise ValueError (nothing queued); over budget -> REFUSED."""
        module = registry.module_for(kind)
        p = params_mod.build(module.Params, dict(params or {}))
        if hasattr(module, "validate"):
            module.validate(p, self.config)
        reading = self.device.read()
        budget = budget_bytes or self.config.budget_bytes(reading.total)
        if hasattr(module, "fit"):  # kinds that size themselves to the budget (an LLM's GPU layers)
            p = module.fit(p, reading, budget)
        values = params_mod.to_dict(p)
        try:
            est = gate(p, module.estimate, reading, budget, getattr(module, "shrink", None))
        except Refused as r:
            job = self.store.add(kind, values, JobStatus.REFUSED, estimate=r.estimate.to_dict() if r.estimate else None,
                                 error=r.reason, owner=owner, resume_of=resume_of, budget_bytes=budget)
            self.run_dir(job.id).mkdir(parents=True, exist_ok=True)
            events.append(self.run_dir(job.id), "end", status=JobStatus.REFUSED.value, error=r.reason,
                          suggestion=r.suggestion)
            return job
        job = self.store.add(kind, values, JobStatus.QUEUED, estimate=est.to_dict(), owner=owner,
                             resume_of=resume_of, budget_bytes=budget)
        self.run_dir(job.id).mkdir(parents=True, exist_ok=True)
        events.append(self.run_dir(job.id), "queued", estimate=est.to_dict())
        self._inbox.put(("wake",))
        return job

    def cancel(self, job_id: str) -> Job:
        job = self.store.get(job_id)
        if job.status is JobStatus.QUEUED:
            self._finish(job_id, JobStatus.CANCELLED, error="Cancelled before it started.", frm=(JobStatus.QUEUED,))
        elif job.status is JobStatus.RUNNING:
            self.store.request_cancel(job_id)
            self._inbox.put(("wake",))
        return self.store.get(job_id)

    def retry(self, job_id: str, owner: str | None = None) -> Job:
        """Run a finished job again from scratch, with the same params."""
        old = self.store.get(job_id)
        params = {k: v for k, v in old.params.items() if k != "resume_from"}
        if "resume_from" in old.params:
            params["resume_from"] = ""
        return self.submit(old.kind, params, owner=owner or old.owner)

    def resume(self, job_id: str, owner: str | None = None) -> Job:
        """Continue an interrupted, cancelled or failed training job from its last checkpoint, as a new job."""
        old = self.store.get(job_id)
        if not old.status.final or old.status in (JobStatus.DONE, JobStatus.REFUSED):
            raise ValueError(f"job {job_id} is {old.status.value}; only interrupted, cancelled or failed jobs resume")
        if "resume_from" not in old.params:
            raise ValueError(f"{old.kind} jobs have no checkpoints to resume from; use Retry")
        if not (self.run_dir(job_id) / "checkpoint" / "state.json").exists():
            raise ValueError(f"job {job_id} saved no checkpoint before it stopped; use Retry to start over")
        return self.submit(old.kind, {**old.params, "resume_from": job_id}, owner=owner or old.owner, resume_of=job_id)

    def unload_models(self) -> None:
        """Empty the worker's model cache now (it also empties itself after the idle timeout)."""
        if self._worker:
            self._worker.inq.put({"type": "evict"})

    def pause(self, reason: str = "Paused by the user.") -> None:
        self.store.set_paused(True, reason)

    def resume_queue(self) -> None:
        self.store.set_paused(False)
        self._inbox.put(("wake",))

    # ---- reading ---------------------------------------------------------------
    def job(self, job_id: str) -> Job:
        return self.store.get(job_id)

    def jobs(self, limit: int = 200, owner: str | None = None, kind: str | None = None) -> list[Job]:
        return self.store.list(limit=limit, owner=owner, kind=kind)

    def events(self, job_id: str, offset: int = 0) -> tuple[list[dict], int]:
        return events.read(self.run_dir(job_id), offset)

    def follow(self, job_id: str, poll_s: float = 0.1, timeout: float | None = None) -> Iterator[dict]:
        """Yield a job's events as they are written, until its final event (works from any process)."""
        offset, t0 = 0, time.time()
        while True:
            evs, offset = self.events(job_id, offset)
            for e in evs:
                yield e
                if e["type"] == "end":
                    return
            if timeout is not None and time.time() - t0 > timeout:
                raise TimeoutError(f"job {job_id} did not finish in {timeout:.0f} s")
            time.sleep(poll_s)

    def wait(self, job_id: str, timeout: float = 600) -> Job:
        t0 = time.time()
        while True:
            job = self.store.get(job_id)
            if job.status.final:
                return job
            if time.time() - t0 > timeout:
                raise TimeoutError(f"job {job_id} still {job.status.value} after {timeout:.0f} s")
            time.sleep(0.05)

    def studio_pids(self) -> list[int]:
        pids = [os.getpid()]
        if self.worker_info.pid:
            pids.append(self.worker_info.pid)
        return pids

    def meter(self, owner: str | None = None) -> dict[str, Any]:
        """What the header shows: device memory, the studio's share, the running job and the queue."""
        reading: DeviceReading = self.device.read(self.studio_pids())
        running = self.store.with_status(JobStatus.RUNNING)
        queued = self.store.queued()
        return {
            "device": reading.to_dict(),
            "budget": self.config.budget_bytes(reading.total),
            "running": [{"id": j.id, "kind": j.kind, "progress": j.progress, "message": j.message} for j in running],
            "queued": len(queued),
            "waiting": queued[0].wait_reason if queued else None,
            "paused": self.store.paused,
            "pause_reason": self.store.get_meta("pause_reason", ""),
            "cache_bytes": self._cache_bytes,
            "cache": list(self._cache_keys),
            "worker": vars(self.worker_info).copy(),
            "owner": self.owner,
        }

    # ---- the scheduler -------------------------------------------------------------
    def _finish(self, job_id: str, status: JobStatus, frm: tuple[JobStatus, ...] = (JobStatus.RUNNING,),
                **fields: Any) -> bool:
        """Move a job to its one final status and write its one final event."""
        moved = self.store.transition(job_id, frm, status, finished=time.time(), **fields)
        if moved:
            events.append(self.run_dir(job_id), "end", status=status.value, error=fields.get("error"),
                          result=fields.get("result"))
        return moved

    def _loop(self) -> None:
        while not self._stopping.is_set():
            try:
                msg = self._inbox.get(timeout=POLL_S)
            except queue.Empty:
                msg = None
            try:
                if msg is not None:
                    self._handle(msg)
                self._tick()
            except Exception:  # the device loop never dies
                log.exception("scheduler step failed")

    def _handle(self, msg: tuple) -> None:
        if msg[0] == "wake":
            return
        gen = msg[1]
        if self._worker is None or gen != self._worker.generation:
            return  # from a worker we already replaced
        if msg[0] == "died":
            self._worker_died(msg[2])
            return
        m = msg[2]
        t = m["type"]
        if t == "ready":
            self.worker_info = replace(self.worker_info, pid=m["pid"], ready=True, failed_starts=0, device=m["device"],
                                       device_name=m["device_name"], torch=m["torch"], torch_cuda=m["torch_cuda"])
        elif t == "started":
            self.store.update(m["job_id"], started=m["t"])
            events.append(self.run_dir(m["job_id"]), "started", worker_pid=self.worker_info.pid,
                          device=self.worker_info.device)
        elif t == "progress":
            self.store.update(m["job_id"], progress=m["fraction"], message=m["message"])
        elif t == "cache":
            self._cache_bytes, self._cache_keys = m["bytes"], m["keys"]
        elif t in ("done", "failed", "cancelled"):
            job_id = m["job_id"]
            status = {"done": JobStatus.DONE, "failed": JobStatus.FAILED, "cancelled": JobStatus.CANCELLED}[t]
            fields: dict[str, Any] = {"peak_bytes": m.get("peak"), "progress": 1.0 if t == "done" else None}
            if t == "done":
                fields["result"] = m.get("result") or {}
            elif t == "failed":
                fields["error"], fields["traceback"] = m["error"], m.get("traceback")
            else:
                fields["error"] = "Cancelled by the user." + self._checkpoint_hint(job_id)
            self._finish(job_id, status, **fields)
            if self._running == job_id:
                self._running, self._cancel_sent_at = None, None

    def _checkpoint_hint(self, job_id: str) -> str:
        if (self.run_dir(job_id) / "checkpoint" / "state.json").exists():
            return " Its last checkpoint is kept: Resume continues from it."
        return ""

    def _worker_died(self, exitcode: int | None) -> None:
        how = describe_exit(exitcode)
        self.worker_info.restarts += 1
        self.worker_info.last_exit = how
        log.error("device worker %s", how)
        if self._running:
            job_id = self._running
            self._running = None
            if self._cancel_sent_at is not None:
                self._finish(job_id, JobStatus.CANCELLED,
                             error="Cancelled: the job did not stop in time, so its worker was stopped."
                             + self._checkpoint_hint(job_id))
            else:
                self._finish(job_id, JobStatus.INTERRUPTED,
                             error=f"The device worker {how} while this job ran (out of memory, a crash, or killed). "
                             "The worker was restarted and the queue goes on." + self._checkpoint_hint(job_id))
            self._cancel_sent_at = None
        if not self.worker_info.ready:
            self.worker_info.failed_starts += 1
        else:
            self.worker_info.failed_starts = 0
        if self.worker_info.failed_starts >= 3:  # a broken install would otherwise respawn forever
            self._worker = None
            self.pause(f"The device worker failed to start 3 times ({how}); see the studio's log, fix the "
                       "installation (python app.py doctor), then restart the studio.")
            return
        if not self._stopping.is_set():
            self._start_worker()

    def _tick(self) -> None:
        w = self._worker
        if w is None:
            return
        if self._running:
            if self._cancel_sent_at is None and self.store.cancel_requested(self._running):
                w.cancel.set()
                self._cancel_sent_at = time.monotonic()
                events.append(self.run_dir(self._running), "log", message="Cancel requested; stopping at the next step.")
            elif self._cancel_sent_at is not None and time.monotonic() - self._cancel_sent_at > self.config.cancel_grace_s:
                log.warning("job %s ignored cancel for %.0f s; killing the worker", self._running, self.config.cancel_grace_s)
                w.kill()  # the forwarder reports the death; _worker_died records CANCELLED
            return
        if not self.worker_info.ready or self.store.paused:
            return
        queued = self.store.queued()
        if not queued:
            return
        job = queued[0]  # strict submission order: a big job waiting for room is not overtaken
        need = job.estimate_bytes or 0
        reading = self.device.read(self.studio_pids())
        room = reading.free + self._cache_bytes  # cached models are evicted to make room
        if need > room:
            where = "VRAM" if reading.kind == "cuda" else "RAM"
            reason = (f"Waiting for memory: needs {need / 2**30:.2f} GiB, {room / 2**30:.2f} GiB of {where} is free now "
                      "(other programs hold the rest).")
            if job.wait_reason != reason:
                self.store.update(job.id, wait_reason=reason)
            return
        if not self.store.transition(job.id, (JobStatus.QUEUED,), JobStatus.RUNNING, started=time.time(),
                                     wait_reason=None):
            return  # cancelled meanwhile
        self._running = job.id
        self._cancel_sent_at = None
        w.cancel.clear()
        module = registry.WORKERS[job.kind]
        w.inq.put({
            "type": "run",
            "job_id": job.id,
            "kind": job.kind,
            "module": module,
            "params": job.params,
            "run_dir": str(self.run_dir(job.id)),
            "data_dir": str(self.config.data_dir),
            "evict_bytes": max(0, need - reading.free),
        })
