"""The Studio: submit through the gate, a durable queue, and a scheduler that supervises the workers.

Lanes, each a supervised worker process running one job at a time: a device lane per device in use owns that GPU
(and its model cache); the io lane runs kinds that never touch the device (downloads, dataset checks), so they neither
wait behind a training run nor block the next one. Device jobs go to the idle device where they fit best, or to the
one they are pinned to.
"""
from __future__ import annotations

import dataclasses
import fcntl
import json
import logging
import multiprocessing as mp
import os
import queue
import signal
import sqlite3
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator

from . import access, events, registry
from . import params as params_mod
from .config import Config, DataDirError, GiB
from .device import Device, DeviceReading, detect_all, resident_bytes
from .gate import Estimate, Refused, gate, short_key
from .jobs import Job, JobStatus
from .store import Store

log = logging.getLogger("studio")

POLL_S = 0.25  # how often the scheduler looks at the store for jobs and cancels from other processes
WAIT_REWRITE_S = 15.0  # a waiting job's reason is rewritten at most this often while only its figures change


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
    stopped: str | None = None  # why the worker is not running (after failed starts); Resume queue restarts it
    baseline: int | None = None  # the worker's own memory when idle and empty (the runtime context), measured


class _Worker:
    """One incarnation of a worker process, with its own queues and cancel flag."""

    def __init__(self, generation: int, inbox: queue.Queue, settings: dict):
        ctx = mp.get_context("spawn")  # a fresh interpreter: CUDA is never forked
        from .cudalibs import export_library_path

        export_library_path()  # faster-whisper's CUDA 12 libraries, read by the loader when the worker starts
        self.generation = generation
        self.inq, self.cancel = ctx.Queue(), ctx.Event()
        # Reports come back over a plain pipe, written synchronously: a Queue's feeder thread would wait for the GIL
        # while the worker runs gc after a job, and hold the job's outcome back by ~100 ms.
        self.reports, writer = ctx.Pipe(duplex=False)
        from . import worker

        self.proc = ctx.Process(target=worker.main, args=(self.inq, writer, self.cancel, settings),
                                name=f"studio-{settings['lane']}-worker", daemon=True)
        self.proc.start()
        self._inbox = inbox
        threading.Thread(target=self._forward, name=f"worker-forward-{generation}", daemon=True).start()

    def _forward(self) -> None:
        while True:
            try:
                if not self.reports.poll(0.1):
                    if not self.proc.is_alive():
                        self._inbox.put(("died", self.generation, self.proc.exitcode))
                        return
                    continue
                msg = self.reports.recv()
            except (EOFError, OSError):  # the worker is gone (its end of the pipe closed)
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


@dataclass
class Lane:
    """A worker and the one job it runs: `device` owns the GPU and the model cache, `io` stays off the device."""

    name: str
    index: int | None = None  # the device lane's device (its place in Studio.devices); None for the io lane
    worker: _Worker | None = None
    info: WorkerInfo = field(default_factory=WorkerInfo)
    running: str | None = None  # job id the worker is running
    settling: bool = False  # the job ended and the worker is still freeing its memory
    cancel_sent_at: float | None = None
    held_by: str | None = None  # a job running on another lane's worker that holds this device too (devices=0,1)
    cache: dict[str, int] = field(default_factory=dict)  # the worker's cached models: key -> measured bytes, LRU first


def describe_exit(code: int | None) -> str:
    if code is None:
        return "stopped (exit status unknown)"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with status {code}"


class Studio:
    """The core object. `start()` makes this process the device owner; without it, it is a client of the store."""

    def __init__(self, config: Config, device: Device | None = None, devices: list[Device] | None = None):
        """`devices`: the devices jobs run on, numbered by their place in the list (every NVIDIA GPU NVML finds, or
        the CPU); `device`: a single one (tests inject fakes either way)."""
        self.config = config
        config.ensure_dirs()
        try:
            self.store = Store(config.db_path)
        except (sqlite3.Error, OSError) as e:
            raise DataDirError(DataDirError.explain(config.data_dir, e)) from None
        if not devices and not device and config.ray_address:  # the cluster's cards, read on their nodes
            from .raylane import ray_devices

            devices = ray_devices(config.ray_address)
        self.devices: list[Device] = list(devices) if devices else [device] if device else detect_all()
        self.device = self.devices[0]
        self.cuda_count = len(self.devices) if self.device.read().kind == "cuda" else 0  # what devices=0,1 can name
        self.owner = False
        self.admin: str | None = None  # with auth: the user who may do everything (see studio.access)
        # one device worker per device in use, each seeing only its own card; the first one's lane keeps the name
        # "device" (a one-device studio is unchanged), the others are "device:N"
        self.lanes: dict[str, Lane] = {}
        for i in range(len(self.devices)):
            if config.device_used(i):
                name = "device" if not self.lanes else f"device:{i}"
                self.lanes[name] = Lane(name, index=i)
        self.lanes["io"] = Lane("io")
        self._inbox: queue.Queue = queue.Queue()
        self._generation = 0
        self._pending: dict[str, dict] = {}  # final outcomes the store could not take yet (disk full): job id -> fields
        self._last_error: str | None = None  # the scheduler's last failure, shown by the meter
        self._wait_written: dict[str, float] = {}  # job id -> when its wait reason was last written
        self._readings: dict[int, DeviceReading] = {}  # the scheduler pass's device readings (_reading)
        self._shutting_down = False
        self._ended = threading.Condition()  # notified whenever a job ends here: wait() in the owner need not poll
        self._stopping = threading.Event()
        self._lock_fd: int | None = None
        self._thread: threading.Thread | None = None

    def user(self, name: str | None) -> access.User:
        """The role of a request's user: no name (no auth) or the admin may do everything."""
        return access.User(name, admin=name is None or name == self.admin)

    @property
    def worker_info(self) -> WorkerInfo:
        """The (first) device worker's state (pid, device, restarts)."""
        lanes = self.device_lanes()
        return lanes[0].info if lanes else WorkerInfo(stopped="every device is marked 'do not use' in Settings")

    def device_lanes(self) -> list[Lane]:
        return [lane for lane in self.lanes.values() if lane.index is not None]

    def device_label(self, index: int, reading: DeviceReading | None = None) -> str:
        """How messages name a device: "GPU 1 (NVIDIA GeForce RTX 4070 Ti)", or "the CPU"."""
        dev = self.devices[index]
        if (reading.kind if reading else getattr(dev, "kind_hint", "cuda")) == "cpu":
            return "the CPU"
        return f"GPU {index} ({getattr(dev, 'name', '') or (reading.name if reading else '?')})"

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
        for lane in self.lanes.values():
            self._start_worker(lane)
        self._thread = threading.Thread(target=self._loop, name="studio-scheduler", daemon=True)
        self._thread.start()
        return True

    def start(self) -> "Studio":
        if not self.try_start():
            raise RuntimeError(f"another studio process already owns {self.config.data_dir}")
        return self

    def server_running(self) -> bool:
        """Whether some process (this one or another) owns this data folder and runs its queue."""
        if self.owner:
            return True
        try:
            fd = os.open(self.config.data_dir / "studio.lock", os.O_RDONLY)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return False
        except BlockingIOError:
            return True
        finally:
            os.close(fd)

    def _recover(self) -> None:
        """After an unclean stop: RUNNING jobs become INTERRUPTED and the queue starts paused."""
        clean = self.store.get_meta("clean_shutdown", "1") == "1"
        interrupted = []
        for job in self.store.with_status(JobStatus.RUNNING):
            self._finish(job.id, JobStatus.INTERRUPTED, error="The studio stopped while this job was running. "
                         + (self._checkpoint_hint(job.id) or "Retry runs it again."))
            interrupted.append(job.id)
        if not clean or interrupted:
            self.store.set_paused(True, "Paused after an unclean stop, so a job that crashed the studio does not run "
                                  "again by itself. Check the queue, then resume it.")
        self.store.set_meta("clean_shutdown", "0")

    def shutdown(self) -> None:
        """Stop the workers and mark a clean stop (queued jobs stay queued for next time). A running job is asked to
        stop first and given the cancel grace to write its checkpoint."""
        if not self.owner:
            return
        running = [lane for lane in self.lanes.values() if lane.running and lane.worker]
        self._shutting_down = True  # a job stopped now ends INTERRUPTED (resumable), not CANCELLED
        for lane in running:
            lane.worker.cancel.set()
            lane.cancel_sent_at = time.monotonic()
        deadline = time.monotonic() + self.config.cancel_grace_s
        while any(lane.running for lane in running) and time.monotonic() < deadline:
            time.sleep(0.05)  # the scheduler thread records each job's end as its worker reports it
        self._stopping.set()
        if self._thread:
            self._thread.join(5)
        for lane in self.lanes.values():
            w = lane.worker
            if not w:
                continue
            if lane.running:  # it did not stop in time: interrupted, its last checkpoint kept
                self._finish(lane.running, JobStatus.INTERRUPTED, error="The studio was shut down while this job "
                             "ran. " + (self._checkpoint_hint(lane.running) or "Retry runs it again."))
                lane.running = None
            try:
                w.inq.put({"type": "stop"})
            except (OSError, ValueError):
                pass
            w.proc.join(5)
            w.kill()
        self._flush_pending()
        try:
            self.store.set_meta("clean_shutdown", "1")
        except sqlite3.Error as e:
            log.error("could not record the clean stop: %s", e)
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
        self.owner = False

    def _settings(self, lane: Lane) -> dict:
        cuda = getattr(self.devices[lane.index], "cuda_index", None) if lane.index is not None else None
        return {"parent_pid": os.getpid(), "idle_unload_s": self.config.idle_unload_s, "lane": lane.name,
                "cuda_device": cuda, "data_dir": str(self.config.data_dir)}

    def _start_worker(self, lane: Lane) -> None:
        self._generation += 1
        lane.info = replace(lane.info, pid=None, ready=False, stopped=None)
        if self.config.ray_address and lane.index is not None:  # device jobs run as tasks on a Ray cluster
            from .raylane import RayWorker

            lane.worker = RayWorker(self._generation, self._inbox, self._settings(lane), self.config.ray_address)
        else:
            lane.worker = _Worker(self._generation, self._inbox, self._settings(lane))
        lane.info.pid = lane.worker.proc.pid
        lane.cache, lane.settling = {}, False

    def update_config(self, **changes: Any) -> Config:
        """Apply new settings now (budget, reserve, idle unload) and save them."""
        self.config = replace(self.config, **changes)
        self.config.save()
        for lane in self.device_lanes():
            if lane.worker:
                lane.worker.inq.put({"type": "settings", "idle_unload_s": self.config.idle_unload_s})
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
        device: int | str | None = None,
    ) -> Job:
        """Validate, estimate and gate a job. Bad params raise ValueError (nothing queued); over budget -> REFUSED.
        The job keeps the params as asked (Retry and Resume use them) and the ones `fit` resolved (the run uses
        them). A remote user's params are checked against what they own first (studio.access).

        `device` (also `--param device=N` for a kind without a param of that name) pins the job to one device; left
        out, the job is gated against every device in use and the scheduler places it where it fits best."""
        module = registry.module_for(kind)
        params = dict(params or {})
        if "device" in params and "device" not in {f.name for f in dataclasses.fields(module.Params)}:
            asked = params.pop("device")
            device = asked if device is None else device
        uses_device = registry.uses_device(kind)
        pin = self._pinned_device(device) if uses_device else None
        p = params_mod.build(module.Params, params)
        requested = params_mod.to_dict(p)
        access.check(self, kind, module, requested, self.user(owner))  # before validate reads any file it names
        p = self._validated(module, p)
        if uses_device:
            candidates = [pin] if pin is not None else [lane.index for lane in self.device_lanes()]
            if not candidates:
                raise ValueError("every device is marked 'do not use' in Settings: allow one to run this job")
        else:
            candidates = [0]
        fitting, refused = [], []
        for index in candidates:
            try:
                fitting.append(self._gate_on(index, module, p, budget_bytes, uses_device))
            except Refused as r:
                refused.append((index, r))
        if not fitting:
            index, r = max(refused, key=lambda ir: ir[1].budget)  # the biggest card's answer, with its suggestion
            if len(refused) > 1:
                r.reason = "Fits on no device: " + "; ".join(
                    f"{self.device_label(i)} has a budget of {x.budget / GiB:.2f} GiB" for i, x in refused) + \
                    ". " + r.reason
            job = self.store.add(kind, requested, JobStatus.REFUSED,
                                 estimate=r.estimate.to_dict() if r.estimate else None, error=r.reason, owner=owner,
                                 resume_of=resume_of, budget_bytes=r.budget, resolved=r.resolved, device_pin=pin,
                                 device=index)
            self.run_dir(job.id).mkdir(parents=True, exist_ok=True)
            events.append(self.run_dir(job.id), "end", status=JobStatus.REFUSED.value, error=r.reason,
                          suggestion=r.suggestion)
            return job
        # queued on the device with the most room to spare; the scheduler may still start it on another one
        index, resolved, est, budget = max(fitting, key=lambda f: f[3] - f[2].total)
        job = self.store.add(kind, requested, JobStatus.QUEUED, estimate=est.to_dict(), owner=owner,
                             resume_of=resume_of, budget_bytes=budget, resolved=resolved, device_pin=pin,
                             device=index if uses_device else None)
        self.run_dir(job.id).mkdir(parents=True, exist_ok=True)
        events.append(self.run_dir(job.id), "queued", estimate=est.to_dict())
        self._inbox.put(("wake",))
        return job

    def _validated(self, module, p):
        """The kind's cheap checks at submit (raise on bad input); they may return the params with names resolved
        to paths."""
        checked = module.validate(p, self.config) if hasattr(module, "validate") else None
        return checked if isinstance(checked, module.Params) else p

    def _pinned_device(self, device: int | str | None) -> int | None:
        """The device number a user asked for, checked; None for "wherever it fits"."""
        if device is None or str(device).strip().lower() in ("", "auto", "any"):
            return None
        try:
            index = int(str(device).strip().lower().removeprefix("gpu").removeprefix("cuda:").strip())
        except ValueError:
            raise ValueError(f"device must be a device number such as 0 or 1, or auto; got {device!r}") from None
        known = ", ".join(f"{i}: {self.device_label(i)}" for i in range(len(self.devices)))
        if not 0 <= index < len(self.devices):
            raise ValueError(f"there is no device {index}; this studio has {known}")
        if not self.config.device_used(index):
            raise ValueError(f"device {index} is marked 'do not use' in Settings; allow it there or pick another "
                             f"({known})")
        return index

    def _gate_on(self, index: int, module, p, budget_bytes: int | None, uses_device: bool):
        """(index, resolved params, estimate, budget) of a job on one device; raises Refused (with .budget and
        .resolved) when it does not fit there."""
        reading = self.devices[index].read()
        budget = budget_bytes or self.config.budget_bytes(reading.total, index)
        why = ""
        if reading.kind == "cpu" and budget_bytes is None:  # RAM the studio's other processes hold is never free
            held = self._resident_beside_device_worker()
            if reading.total - held < budget:
                budget = reading.total - held
                why = f" (all RAM less the {held / 2**30:.2f} GiB the studio's UI and io processes hold)"
        if hasattr(module, "fit"):  # kinds that size themselves to the budget (an LLM's GPU layers, a batch)
            p = module.fit(p, reading, budget)
        resolved = params_mod.to_dict(p)
        try:
            est = gate(p, module.estimate, reading, budget, getattr(module, "shrink", None), uses_device)
        except Refused as r:
            if why:
                r.reason = r.reason.replace(" budget ", " budget" + why + " ", 1)
            r.budget, r.resolved = budget, resolved
            raise
        return index, resolved, est, budget

    def cancel(self, job_id: str) -> Job:
        """Cancel a queued or running job. The request is recorded first, so a job the scheduler is taking at this
        very moment still sees it (the scheduler never starts a job with a cancel request)."""
        job = self.job(job_id)
        if job.status.final:
            return job
        self.store.request_cancel(job_id)
        self._finish(job_id, JobStatus.CANCELLED, frm=(JobStatus.QUEUED,),
                     error="Cancelled before it started." + self._checkpoint_hint(job_id, lead=" "))
        self._inbox.put(("wake",))
        return self.job(job_id)

    def retry(self, job_id: str, owner: str | None = None) -> Job:
        """Run a finished job again from scratch, with the params it was asked for ("auto" stays auto)."""
        old = self.store.get(job_id)
        params = dict(old.params)
        if "resume_from" in params:
            params["resume_from"] = ""
        return self.submit(old.kind, params, owner=owner or old.owner, device=old.device_pin)

    def checkpoint_of(self, job_id: str) -> tuple[str, dict] | None:
        """The newest checkpoint along a job's resume chain (itself, the job it resumed, …): (job id, its state)."""
        import json

        best: tuple[str, dict] | None = None
        seen: set[str] = set()
        jid: str | None = job_id
        while jid and jid not in seen:
            seen.add(jid)
            state = self.run_dir(jid) / "checkpoint" / "state.json"
            try:
                st = json.loads(state.read_text())
            except (OSError, ValueError):
                st = None
            if st is not None and (best is None or st.get("step", 0) > best[1].get("step", 0)):
                best = (jid, st)
            try:
                jid = self.store.get(jid).resume_of
            except KeyError:
                break
        return best

    def resume(self, job_id: str, owner: str | None = None) -> Job:
        """Continue an interrupted, cancelled or failed training job from the newest checkpoint along its chain."""
        old = self.store.get(job_id)
        if not old.status.final or old.status in (JobStatus.DONE, JobStatus.REFUSED):
            raise ValueError(f"job {job_id} is {old.status.value}; only interrupted, cancelled or failed jobs resume")
        if "resume_from" not in old.params:
            raise ValueError(f"{old.kind} jobs have no checkpoints to resume from; use Retry")
        found = self.checkpoint_of(job_id)
        if found is None:
            raise ValueError(f"job {job_id} saved no checkpoint before it stopped (nor did a job it resumed); "
                             "use Retry to start over")
        return self.submit(old.kind, {**old.params, "resume_from": found[0]}, owner=owner or old.owner,
                           resume_of=job_id, device=old.device_pin)

    def unload_models(self) -> None:
        """Empty the device workers' model caches now (each also empties itself after the idle timeout)."""
        for lane in self.device_lanes():
            if lane.worker:
                lane.worker.inq.put({"type": "evict"})

    def pause(self, reason: str = "Paused by the user.") -> None:
        self.store.set_paused(True, reason)

    def resume_queue(self) -> None:
        """Run the queue again; a worker stopped after failed starts is started again (by the owning process)."""
        self.store.set_paused(False)
        self._inbox.put(("wake",))

    # ---- reading ---------------------------------------------------------------
    def job(self, job_id: str) -> Job:
        return self._overlay(self.store.get(job_id))

    def jobs(self, limit: int = 200, owner: str | None = None, kind: str | None = None) -> list[Job]:
        return [self._overlay(j) for j in self.store.list(limit=limit, owner=owner, kind=kind)]

    def _overlay(self, job: Job) -> Job:
        """A job as it really stands: an outcome the store could not take yet (disk full) is shown anyway."""
        pending = self._pending.get(job.id)
        if pending is None:
            return job
        return replace(job, status=pending["status"], error=pending["fields"].get("error"),
                       finished=pending["fields"].get("finished"))

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
            job = self.job(job_id)
            if job.status.final:
                return job
            if time.time() - t0 > timeout:
                raise TimeoutError(f"job {job_id} still {job.status.value} after {timeout:.0f} s")
            if self.owner:  # the scheduler runs here: sleep until some job ends (the poll is only a safety net)
                with self._ended:
                    self._ended.wait(0.5)
            else:  # another process runs the queue: read the row again soon (cheap), less often as time goes on
                time.sleep(0.01 if time.time() - t0 < 5 else 0.05)

    def _resident_beside_device_worker(self) -> int:
        """RAM held by this process and the io worker: on the CPU no job can have it, however long it waits."""
        io = self.lanes["io"].info.pid if self.owner else None
        return resident_bytes([os.getpid()] + ([io] if io else []))

    def studio_pids(self) -> list[int]:
        return [os.getpid()] + [lane.info.pid for lane in self.lanes.values() if lane.info.pid]

    def meter(self, owner: str | None = None) -> dict[str, Any]:
        """What the header shows: device memory, the studio's share, the running jobs, the queue, and any trouble
        (a stopped worker, a data folder that cannot be written) in one line. With auth, a remote `owner` is shown
        only her own jobs."""
        pids = self.studio_pids()
        lanes = {lane.index: lane for lane in self.device_lanes()}
        first = min(lanes) if lanes else 0
        readings = [d.read(pids) for d in self.devices]
        reading = readings[first]
        out: dict[str, Any] = {"device": reading.to_dict(), "budget": self.config.budget_bytes(reading.total, first),
                               "owner": self.owner, "server": self.server_running()}
        dev = lanes.get(first) or Lane("device")
        out.update(cache_bytes=sum(dev.cache.values()), cache=[short_key(k) for k in dev.cache],
                   worker=vars(dev.info).copy(), trouble=None)
        try:
            running = self.store.with_status(JobStatus.RUNNING)
            queued = self.store.queued()
            mine = self.user(owner).admin  # a remote user sees the device and the queue's length, not others' jobs
            own = [j for j in queued if mine or j.owner == owner]
            visible = {j.id for j in running if mine or j.owner == owner}

            def job_on(i: int) -> str | None:  # a remote user sees her own job's id, and only "busy" for others'
                j = (lanes[i].running or lanes[i].held_by) if i in lanes else None
                return j if j in visible or j is None else "busy"

            # one row per device: its memory, budget, worker and the job on it
            out["devices"] = [{
                "index": i, "label": self.device_label(i, r), "reading": r.to_dict(),
                "budget": self.config.budget_bytes(r.total, i), "use": i in lanes, "job": job_on(i),
                "cache_bytes": sum(lanes[i].cache.values()) if i in lanes else 0,
                "ready": lanes[i].info.ready if i in lanes else False,
            } for i, r in enumerate(readings)]
            out.update(running=[{"id": j.id, "kind": j.kind, "progress": j.progress, "message": j.message}
                                for j in running if j.id not in self._pending and (mine or j.owner == owner)],
                       queued=len(queued), waiting=own[0].wait_reason if own else None,
                       paused=self.store.paused, pause_reason=self.store.get_meta("pause_reason", ""))
        except (sqlite3.Error, OSError) as e:
            out.update(running=[], queued=0, waiting=None, paused=False, pause_reason="")
            out["trouble"] = DataDirError.explain(self.config.data_dir, e)
            return out
        stopped = [f"{lane.name} worker stopped: {lane.info.stopped}" for lane in self.lanes.values()
                   if lane.info.stopped]
        if stopped:
            out["trouble"] = "; ".join(stopped)
        elif self._last_error:
            out["trouble"] = self._last_error
        return out

    # ---- the scheduler -------------------------------------------------------------
    def _finish(self, job_id: str, status: JobStatus, frm: tuple[JobStatus, ...] = (JobStatus.RUNNING,),
                **fields: Any) -> bool:
        """Move a job to its one final status and write its one final event. When the store or the run folder
        cannot be written (disk full, folder gone), the outcome is kept in memory and written as soon as it can be;
        this never raises, so whoever calls it can always free the job's slot."""
        fields["finished"] = time.time()
        # the last progress note ("generating", "assembling …") and a queue wait reason describe a job in flight, not
        # one that ended: a final job says what became of it (its error, or nothing more than its status)
        fields.setdefault("message", None)
        fields.setdefault("wait_reason", None)
        try:
            moved = self.store.transition(job_id, frm, status, **fields)
        except (sqlite3.Error, OSError) as e:
            log.error("could not record %s for job %s (%s); kept until the store can be written", status.value,
                      job_id, e)
            self._pending[job_id] = {"status": status, "frm": frm, "fields": fields}
            self._last_error = f"job {job_id} ended {status.value} but could not be recorded: " + \
                DataDirError.explain(self.config.data_dir, e)
            moved = True
        else:
            if moved:
                self._end_event(job_id, status, fields)
        for lane in self.lanes.values():  # the other devices a multi-device job held are free again
            if lane.held_by == job_id:
                lane.held_by = None
        with self._ended:
            self._ended.notify_all()
        return moved

    def _end_event(self, job_id: str, status: JobStatus, fields: dict) -> None:
        try:
            events.append(self.run_dir(job_id), "end", status=status.value, error=fields.get("error"),
                          result=fields.get("result"))
        except OSError as e:
            log.error("could not write the end event of job %s: %s", job_id, e)

    def _flush_pending(self) -> None:
        for job_id, p in list(self._pending.items()):
            try:
                moved = self.store.transition(job_id, p["frm"], p["status"], **p["fields"])
            except (sqlite3.Error, OSError):
                return
            del self._pending[job_id]
            if moved:
                self._end_event(job_id, p["status"], p["fields"])
        if not self._pending:
            self._last_error = None

    def _loop(self) -> None:
        last_logged: tuple[str, float] = ("", 0.0)
        while not self._stopping.is_set():
            try:
                msg = self._inbox.get(timeout=POLL_S)
            except queue.Empty:
                msg = None
            try:
                if msg is not None:
                    self._handle(msg)
                if self._pending:
                    self._flush_pending()
                self._tick()
            except Exception as e:  # the device loop never dies; a repeated failure is logged once a minute
                text = f"{type(e).__name__}: {e}"
                if isinstance(e, (sqlite3.Error, OSError)):
                    text = DataDirError.explain(self.config.data_dir, e)
                self._last_error = f"the scheduler cannot go on: {text}"
                if text != last_logged[0] or time.monotonic() - last_logged[1] > 60:
                    log.exception("scheduler step failed")
                    last_logged = (text, time.monotonic())
                time.sleep(POLL_S)
            else:
                if self._last_error and self._last_error.startswith("the scheduler") and not self._pending:
                    self._last_error = None

    def _lane_of_generation(self, gen: int) -> Lane | None:
        for lane in self.lanes.values():
            if lane.worker is not None and lane.worker.generation == gen:
                return lane
        return None

    def _handle(self, msg: tuple) -> None:
        if msg[0] == "wake":
            return
        lane = self._lane_of_generation(msg[1])
        if lane is None:
            return  # from a worker we already replaced
        if msg[0] == "died":
            self._worker_died(lane, msg[2])
            return
        m = msg[2]
        t = m["type"]
        if t == "ready":
            lane.info = replace(lane.info, pid=m["pid"], ready=True, failed_starts=0, device=m["device"],
                                device_name=m["device_name"], torch=m.get("torch"), torch_cuda=m.get("torch_cuda"),
                                baseline=m.get("baseline"), stopped=None)
        elif t == "started":
            self.store.update(m["job_id"], started=m["t"])
            events.append(self.run_dir(m["job_id"]), "started", worker_pid=lane.info.pid, device=lane.info.device)
        elif t == "progress":
            self.store.update(m["job_id"], progress=m["fraction"], message=m["message"])
        elif t == "cache":
            lane.cache = dict(m["sizes"])
        elif t == "idle":
            lane.settling = False
        elif t in ("done", "failed", "cancelled"):
            job_id = m["job_id"]
            if lane.running == job_id:  # the slot is free whatever happens to the record below
                lane.running, lane.cancel_sent_at, lane.settling = None, None, True
            status = {"done": JobStatus.DONE, "failed": JobStatus.FAILED, "cancelled": JobStatus.CANCELLED}[t]
            fields: dict[str, Any] = {"peak_bytes": m.get("peak"), "progress": 1.0 if t == "done" else None}
            if t == "done":
                fields["result"] = m.get("result") or {}
            elif t == "failed":
                fields["error"], fields["traceback"] = m["error"], m.get("traceback")
            elif self._shutting_down:
                status = JobStatus.INTERRUPTED
                fields["error"] = "The studio was shut down while this job ran. " + \
                    (self._checkpoint_hint(job_id) or "Retry runs it again.")
            else:
                fields["error"] = "Cancelled by the user." + self._checkpoint_hint(job_id, lead=" ")
            self._finish(job_id, status, **fields)

    def _checkpoint_hint(self, job_id: str, lead: str = "") -> str:
        try:
            found = self.checkpoint_of(job_id)
        except (sqlite3.Error, OSError):
            found = None
        if found is None:
            return ""
        step = found[1].get("step")
        where = f" (step {step})" if step else ""
        own = "Its" if found[0] == job_id else f"The last checkpoint along its resume chain, job {found[0]}'s,"
        return f"{lead}{own} last checkpoint{where} is kept: Resume continues from it."

    def _worker_died(self, lane: Lane, exitcode: int | None) -> None:
        how = describe_exit(exitcode)
        lane.info.restarts += 1
        lane.info.last_exit = how
        log.error("%s worker %s", lane.name, how)
        if lane.running:
            job_id = lane.running
            lane.running = None
            if self._shutting_down:
                self._finish(job_id, JobStatus.INTERRUPTED, error="The studio was shut down while this job ran. "
                             + (self._checkpoint_hint(job_id) or "Retry runs it again."))
            elif lane.cancel_sent_at is not None:
                self._finish(job_id, JobStatus.CANCELLED, error="Cancelled: the job did not stop in time, so its "
                             "worker was stopped." + self._checkpoint_hint(job_id, lead=" "))
            else:
                self._finish(job_id, JobStatus.INTERRUPTED,
                             error=f"The {lane.name} worker {how} while this job ran (out of memory, a crash, or "
                             "killed). The worker was restarted and the queue goes on."
                             + self._checkpoint_hint(job_id, lead=" "))
            lane.cancel_sent_at = None
        lane.cache = {}
        if not lane.info.ready:
            lane.info.failed_starts += 1
        else:
            lane.info.failed_starts = 0
        if lane.info.failed_starts >= 3:  # a broken install would otherwise respawn forever
            self.pause(f"The {lane.name} worker failed to start 3 times ({how}); see the studio's log, fix the "
                       "installation (python app.py doctor), then resume the queue to start it again.")
            lane.worker = None
            lane.info.pid = None
            lane.info.stopped = f"it failed to start 3 times ({how}); fix the installation (python app.py doctor), " \
                                "then Resume queue"
            return
        if not self._stopping.is_set():
            self._start_worker(lane)

    def _tick(self) -> None:
        self._readings = {}  # fresh readings for this pass
        paused = self.store.paused
        queued = None
        idle = []
        for lane in self.lanes.values():
            if lane.worker is None:
                if lane.info.stopped and not paused and not self._stopping.is_set():
                    log.info("queue resumed: starting the %s worker again", lane.name)
                    lane.info.failed_starts = 0
                    self._start_worker(lane)
                continue
            if lane.running:
                self._watch_running(lane)
            elif lane.info.ready and not lane.settling and not lane.held_by:
                idle.append(lane)
        if idle and not paused:
            queued = self.store.queued()
            moved = False
            if self.lanes["io"] in idle:
                moved = self._dispatch(self.lanes["io"], [j for j in queued if registry.lane_of(j.kind) == "io"])
            devices = [lane for lane in idle if lane.index is not None]
            if devices:
                moved = self._place([j for j in queued if registry.lane_of(j.kind) == "device"], devices) or moved
            if moved:
                queued = None  # some left the queue: read it again below
        if queued is None and (paused or any(lane.running for lane in self.lanes.values())):
            queued = self.store.queued()
        if queued:
            self._note_queue_positions(queued, paused)

    def _watch_running(self, lane: Lane) -> None:
        w = lane.worker
        if lane.cancel_sent_at is None and self.store.cancel_requested(lane.running):
            w.cancel.set()
            lane.cancel_sent_at = time.monotonic()
            events.append(self.run_dir(lane.running), "log", message="Cancel requested; stopping at the next step.")
        elif lane.cancel_sent_at is not None and time.monotonic() - lane.cancel_sent_at > self.config.cancel_grace_s:
            log.warning("job %s ignored cancel for %.0f s; killing the worker", lane.running,
                        self.config.cancel_grace_s)
            w.kill()  # the forwarder reports the death; _worker_died records CANCELLED

    def _dispatch(self, lane: Lane, queued: list[Job]) -> bool:
        """Start the io lane's first queued job; True when it left the queue (started, failed or cancelled)."""
        if not queued:
            return False
        return self._start(lane, queued[0], [])

    def _place(self, queued: list[Job], idle: list[Lane]) -> bool:
        """Start queued device jobs, in submission order, on the idle devices where they fit best; True when any
        left the queue. A job that cannot start yet keeps the devices it could use for itself (a big job waiting
        for room, or a pinned job waiting for its card, is not overtaken there), but not the other ones."""
        kept: set[str] = set()
        moved = False
        for job in queued:
            if not idle:
                break
            if job.kind not in registry.WORKERS:
                moved = self._start(idle[0], job, []) or moved  # fails it with the reason
                continue
            try:
                held = self._devices_held(job)
            except ValueError as e:  # queued by a studio with other cards
                self._finish(job.id, JobStatus.FAILED, frm=(JobStatus.QUEUED,), error=str(e))
                moved = True
                continue
            lanes = self._lanes_for(job, held)
            if isinstance(lanes, str):
                self._set_wait(job, lanes)
                continue
            several = bool(held) and len(held) > 1
            free = [lane for lane in lanes if lane in idle and lane.name not in kept]
            if several and len(free) < len(lanes):  # a job that holds several devices waits for all of them
                kept.update(lane.name for lane in lanes)
                continue
            if not free:
                kept.update(lane.name for lane in lanes)
                continue
            plans, reasons = [], []
            for lane in free[:1] if several else free:
                plan = self._plan_memory(lane, job)
                (reasons if isinstance(plan, str) else plans).append((lane, plan))
            if not plans:
                self._set_wait(job, reasons[0][1])
                kept.update(lane.name for lane in lanes)
                continue

            def preference(lp):  # where its models are cached first, then the device with the most free memory
                lane, _ = lp
                est = Estimate.from_dict(job.estimate)
                return (sum(b for k, b in lane.cache.items() if k in est.models), self._reading(lane.index).free)

            lane, evict = max(plans, key=preference)
            moved = self._start(lane, job, evict, also=[x for x in lanes if x is not lane] if several else []) or moved
            idle = [x for x in idle if x is not lane and x.held_by is None]
        return moved

    def _devices_held(self, job: Job) -> list[int] | None:
        """The devices a job's own params name (a fine-tune across GPUs: `devices=0,1`; one id: that card), held
        together while it runs; None when the kind names none (it goes where it fits)."""
        module = registry.module_for(job.kind)
        if not hasattr(module, "devices_of"):
            return None
        held = module.devices_of(params_mod.build(module.Params, job.resolved or job.params), self.cuda_count)
        return sorted(held) if held else None

    def _lanes_for(self, job: Job, held: list[int] | None) -> list[Lane] | str:
        """The device lanes a job may start on (its pinned card, the cards it holds, or every card whose budget it
        fits), or why there is none."""
        by_index = {lane.index: lane for lane in self.device_lanes()}
        if held:
            missing = [i for i in held if i not in by_index]
            if missing:
                return (f"Waiting for device(s) {', '.join(map(str, missing))}, which this studio does not use now "
                        "(Settings: do not use); Cancel drops it.")
            return [by_index[i] for i in held]
        if job.device_pin is not None:
            lane = by_index.get(job.device_pin)
            return [lane] if lane else (f"Waiting for device {job.device_pin}, which this studio does not use now "
                                        "(Settings: do not use); Cancel drops it.")
        if len(by_index) == 1:
            return list(by_index.values())
        total = Estimate.from_dict(job.estimate).total if job.estimate else 0
        lanes = [lane for lane in by_index.values()  # the budget it was gated on holds for the device it was gated on
                 if total <= (job.budget_bytes if lane.index == job.device else self._budget(lane.index))]
        return lanes or "Waiting: its estimate fits no device's budget now (the budgets changed in Settings); " \
                        "Cancel drops it."

    def _reading(self, index: int) -> DeviceReading:
        """A device's reading, taken once per scheduler pass (placing, budgets and queue notes all ask for it)."""
        if index not in self._readings:
            self._readings[index] = self.devices[index].read(self.studio_pids())
        return self._readings[index]

    def _budget(self, index: int) -> int:
        return self.config.budget_bytes(self._reading(index).total, index)

    def _start(self, lane: Lane, job: Job, evict: list[str], also: list[Lane] = ()) -> bool:
        """Send a job to a lane's worker (`also`: the other devices it holds while it runs); True when it left the
        queue (started, failed or cancelled)."""
        if job.kind not in registry.WORKERS:
            self._finish(job.id, JobStatus.FAILED, frm=(JobStatus.QUEUED,),
                         error=f"This studio has no job kind {job.kind!r} (it was queued by another version); "
                               f"known kinds: {', '.join(sorted(registry.WORKERS))}.")
            return True
        params = job.resolved or job.params
        fields: dict[str, Any] = {"started": time.time()}
        if lane.index is not None:
            fields["device"] = lane.index
            module = registry.module_for(job.kind)
            if job.device is not None and job.device != lane.index and hasattr(module, "fit"):
                # gated on another card: size it to this one (an LLM's GPU layers on a smaller card)
                try:  # from the params as asked, checked again, so "auto" is chosen for this card
                    p = self._validated(module, params_mod.build(module.Params, job.params))
                    _, params, est, budget = self._gate_on(lane.index, module, p, None, True)
                    fields.update(resolved=json.dumps(params), estimate=json.dumps(est.to_dict()),
                                  budget_bytes=budget)
                except (Refused, ValueError) as e:
                    log.info("job %s does not fit device %s after all: %s", job.id, lane.index, e)
                    return False
        if not self.store.start(job.id, **fields):
            # cancelled meanwhile: record the cancel if nobody has yet (one final state either way)
            self._finish(job.id, JobStatus.CANCELLED, frm=(JobStatus.QUEUED,),
                         error="Cancelled before it started." + self._checkpoint_hint(job.id, lead=" "))
            return True
        lane.running = job.id
        lane.cancel_sent_at = None
        for other in also:
            other.held_by = job.id
        lane.worker.cancel.clear()
        lane.worker.inq.put({
            "type": "run",
            "job_id": job.id,
            "kind": job.kind,
            "module": registry.WORKERS[job.kind],
            "params": params,
            "run_dir": str(self.run_dir(job.id)),
            "data_dir": str(self.config.data_dir),
            "owner": job.owner,
            "evict": evict,
            "models": sorted(Estimate.from_dict(job.estimate).models),
        })
        return True

    def _plan_memory(self, lane: Lane, job: Job) -> list[str] | str:
        """The cached models to evict so the job fits (never the ones it names), or why it has to wait.

        What a job needs now is its working memory plus the models it names that are not cached yet; the worker
        already holds its runtime context, and a named model that is cached costs nothing more."""
        est = Estimate.from_dict(job.estimate)
        cached = lane.cache
        missing = sum(b for k, b in est.models.items() if k not in cached)
        need = est.working + missing
        reading = self._reading(lane.index)
        evictable = [(k, b) for k, b in cached.items() if k not in est.models]  # least recently used first
        room = reading.free + sum(b for _, b in evictable)
        if need > room:
            where = "VRAM" if reading.kind == "cuda" else "RAM"
            studio_held = sum(cached.values())
            others = max(0, reading.used - (reading.studio_used or 0))
            return (f"Waiting for memory: needs {need / GiB:.1f} GiB of {where} ({est.working / GiB:.1f} working"
                    f"{f', {missing / GiB:.1f} to load' if missing else ''}); {room / GiB:.1f} GiB can be had now"
                    f"{f' after unloading the studio’s idle models' if evictable else ''}. Other programs use "
                    f"{others / GiB:.1f} GiB" + (f"; the studio's cached models it reuses hold {studio_held / GiB:.1f}"
                                                 " GiB" if studio_held else "")
                    + ". It starts when they free memory; Cancel drops it.")
        evict, short = [], need - reading.free
        for key, size in evictable:
            if short <= 0:
                break
            evict.append(key)
            short -= size
        return evict

    def _set_wait(self, job: Job, reason: str) -> None:
        """Record why a job waits, once: rewritten when its wording changes, and only every WAIT_REWRITE_S when
        only its figures move (so a follower prints one line, not one a tick)."""
        old = job.wait_reason or ""
        if old == reason:
            return
        same_kind = old.split(":", 1)[0] == reason.split(":", 1)[0]
        if same_kind and time.monotonic() - self._wait_written.get(job.id, 0.0) < WAIT_REWRITE_S:
            return
        self._wait_written[job.id] = time.monotonic()
        self.store.update(job.id, wait_reason=reason)

    def _note_queue_positions(self, queued: list[Job], paused: bool) -> None:
        """Every queued job says what it waits for: the jobs running on the devices it can use, or a job ahead of
        it in the queue that can use them too."""
        ahead: dict[str, Job] = {}  # lane name -> the first queued job that can use it
        for job in queued:
            held = None
            if job.kind not in registry.WORKERS:
                continue
            if registry.lane_of(job.kind) == "io":
                lanes = [self.lanes["io"]]
            else:
                try:
                    held = self._devices_held(job)
                except ValueError:
                    continue
                lanes = self._lanes_for(job, held)
                if isinstance(lanes, str):
                    continue  # it has its own reason
            before = next((ahead[lane.name] for lane in lanes if lane.name in ahead), None)
            for lane in lanes:
                ahead.setdefault(lane.name, job)
            busy = [lane for lane in lanes if lane.running or lane.held_by]
            together = registry.lane_of(job.kind) != "io" and held is not None and len(held) > 1
            if paused:
                reason = "Queue paused: Resume queue starts it."
            elif before is not None:
                reason = f"Queued behind job {before.id} ({before.kind})."
            elif busy and (together or len(busy) == len(lanes)):  # a job on several cards waits for each
                jobs = [f"job {lane.running or lane.held_by}"
                        + (f" on {self.device_label(lane.index)}" if len(self.device_lanes()) > 1 and lane.index
                           is not None else "") for lane in busy]
                reason = f"Waiting for {' and '.join(jobs)} to finish."
            else:
                continue  # about to start, or waiting for memory with its own reason
            if job.wait_reason != reason:
                self.store.update(job.id, wait_reason=reason)
