"""Device jobs on a Ray cluster: the studio stays the one UI, queue and store, and each job runs as a Ray task
through the same `studio.worker._run_job` as the local worker.

`RayWorker` has the interface of the core's local worker (`inq`, `cancel`, `proc`, `kill()`, reports into the
core's inbox), so the core supervises it the same way: reports stream back while the job runs, cancel reaches the
task at its next progress call, and a task that is lost (its node died, its process crashed or was killed) is
reported as a dead worker, which makes the job INTERRUPTED and resumable.

What a remote cluster needs. Each node imports `studio` and `workers` and the packages the job kinds use, so every
node holds the studio's checkout and its Python environment at the same path as here (Ray itself already requires
the same Python and Ray versions): tasks get `PYTHONPATH=<checkout>`. Through Ray Client (`ray://host:10001`) the
studio's own packages are also uploaded (`py_modules`), the third-party ones still have to be installed there. Set
`STUDIO_RAY_RUNTIME_ENV` to a JSON Ray runtime_env to replace all of this (`{"working_dir": ...}`, a `pip` list,
a conda env). Run folders: with a shared data folder (NFS, or one machine) a task writes its run folder directly;
when the run folder does not exist on the node, the task writes into a temporary folder there and ships it back
with its result (the run folders its params name, a checkpoint to resume from, are shipped in). Other inputs (data
files, model folders) must be readable on the node at the path the job names.
"""
from __future__ import annotations

import io
import json
import logging
import os
import platform
import queue
import shutil
import tarfile
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from .device import DeviceReading

log = logging.getLogger("studio.ray")

ROOT = Path(__file__).resolve().parent.parent  # the checkout: what a node puts on PYTHONPATH
SEND_EVERY_S = 0.1  # how often a task sends its reports and learns of a cancel: the cancel's latency
READ_WAIT_S = 1.0  # how long one read of the channel waits for a report (a long poll: no busy loop)
READING_TTL_S = 1.0  # a remote device reading is reused this long (the meter and the gate read often)
FINAL = ("done", "failed", "cancelled", "idle")  # reports that wait for the shipped run folder
_EVENTS = "_events"  # a channel item holding event lines of a run folder written on the node

_connect_lock = threading.Lock()


def connect(address: str) -> None:
    """Connect this process to Ray, once (every RayWorker and ray_devices share the connection): "local" starts a
    Ray instance on this machine with all its cores; any other address joins that cluster."""
    import ray

    with _connect_lock:
        if ray.is_initialized():
            return
        kwargs: dict[str, Any] = {"include_dashboard": False} if address == "local" else {"address": address}
        if address != "local" or threading.current_thread() is threading.main_thread():
            ray.init(**kwargs)
            return
        # Ray ties the processes of a local instance to the thread that starts them (PR_SET_PDEATHSIG): started from
        # the scheduler thread, which ends with its Studio, they would be killed with it. A thread that lives as
        # long as the process starts them instead.
        started: queue.Queue = queue.Queue()

        def keep_local_ray():
            try:
                ray.init(**kwargs)
            except BaseException as e:  # handed to the caller
                started.put(e)
                return
            started.put(None)
            threading.Event().wait()

        threading.Thread(target=keep_local_ray, name="ray-local", daemon=True).start()
        error = started.get()
        if error is not None:
            raise error


def runtime_env(address: str) -> dict:
    """What a task needs on its node to import the job modules (see the module's docstring)."""
    override = os.environ.get("STUDIO_RAY_RUNTIME_ENV")
    if override:
        return json.loads(override)
    from .cudalibs import export_library_path

    env_vars = {"PYTHONPATH": str(ROOT)}
    libs = export_library_path()  # faster-whisper's CUDA 12 libraries, read by the loader when a Ray worker starts
    if libs:
        env_vars["LD_LIBRARY_PATH"] = libs
    env: dict[str, Any] = {"env_vars": env_vars}
    if address.startswith("ray://"):  # a remote cluster through Ray Client: ship the studio's own packages
        env["py_modules"] = [str(ROOT / "studio"), str(ROOT / "workers")]
    return env


def _here(ray) -> dict:
    """Scheduling options that keep an actor on this process's node (softly: any node when that one cannot)."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    try:
        node = ray.get_runtime_context().get_node_id()
    except Exception:  # Ray Client: the driver has no node of its own
        return {}
    return {"scheduling_strategy": NodeAffinitySchedulingStrategy(node_id=node, soft=True)}


def _on_node(ray, node_id: str) -> dict:
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return {"scheduling_strategy": NodeAffinitySchedulingStrategy(node_id=node_id, soft=False)}


_remotes: dict[str, Any] = {}


def _remote(obj):
    """`ray.remote(obj)`, made once per process (each call would export the function to the cluster again)."""
    import ray

    key = obj.__name__
    if key not in _remotes:
        _remotes[key] = ray.remote(obj)
    return _remotes[key]


# ---- the channel: reports from the task to the studio, cancel from the studio to the task --------------------------
class _Channel:
    """A Ray actor beside the studio that holds a job's reports until the studio reads them, and the cancels the
    studio sent. Reports keep one running index across jobs, so a read that comes late never drops unread ones."""

    def __init__(self):
        import asyncio

        self._items: list = []
        self._base = 0  # index of self._items[0]
        self._cancelled: set[str] = set()
        self._more = asyncio.Condition()

    async def push(self, job_id: str, batch: list) -> bool:
        """Append the task's reports; True when the user cancelled the job."""
        if batch:
            async with self._more:
                self._items.extend(batch)
                self._more.notify_all()
        return job_id in self._cancelled

    async def read(self, after: int, wait: float) -> tuple[list, int]:
        """The reports from index `after` on (those before it were read: dropped), waiting up to `wait` s for one;
        and the index to read from next."""
        import asyncio

        drop = min(max(0, after - self._base), len(self._items))
        del self._items[:drop]
        self._base += drop
        if self._base + len(self._items) <= after and wait > 0:
            async with self._more:
                try:
                    await asyncio.wait_for(self._more.wait_for(lambda: self._base + len(self._items) > after), wait)
                except asyncio.TimeoutError:
                    pass
        start = max(0, after - self._base)
        return self._items[start:], self._base + len(self._items)

    async def cancel(self, job_id: str) -> None:
        self._cancelled.add(job_id)


class _TaskLink:
    """The task's end of the channel, in the place of the local worker's pipe: the job's reports go out every
    SEND_EVERY_S (from any thread of the job), each send brings back whether the user cancelled, and the outcome is
    kept for the task's result, so it reaches the studio after the run folder it describes."""

    def __init__(self, chan, job_id: str, shipped_dir: Path | None, rewrite: tuple[str, str] | None):
        self.cancel = threading.Event()  # the job's cancel flag (JobContext reads is_set at each progress call)
        self.final: list[dict] = []
        self._chan, self._job_id = chan, job_id
        self._events = shipped_dir / "events.jsonl" if shipped_dir else None  # streamed line by line
        self._offset = 0
        self._rewrite = rewrite  # (the node's temporary run folder, the studio's run folder)
        self._buf: list[dict] = []
        self._lock, self._send_lock, self._stop = threading.Lock(), threading.Lock(), threading.Event()
        self._thread = threading.Thread(target=self._loop, name="ray-task-link", daemon=True)

    def start(self) -> "_TaskLink":
        self._thread.start()
        return self

    def put(self, msg: dict) -> None:
        """The reporter interface `_run_job` writes to."""
        if msg.get("type") in FINAL:
            self.final.append(self._fix(msg))
            return
        with self._lock:
            self._buf.append(msg)

    def _fix(self, msg: dict) -> dict:
        if not self._rewrite:
            return msg
        return json.loads(json.dumps(msg).replace(json.dumps(self._rewrite[0])[1:-1],
                                                  json.dumps(self._rewrite[1])[1:-1]))

    def _take(self) -> list[dict]:
        with self._lock:
            batch, self._buf = self._buf, []
        if self._events is not None:
            try:
                with open(self._events, "rb") as f:
                    f.seek(self._offset)
                    data = f.read()
            except FileNotFoundError:
                data = b""
            end = data.rfind(b"\n") + 1  # whole lines only
            if end:
                self._offset += end
                text = data[:end].decode()
                if self._rewrite:
                    text = text.replace(json.dumps(self._rewrite[0])[1:-1], json.dumps(self._rewrite[1])[1:-1])
                batch.append({"type": _EVENTS, "text": text})
        return batch

    def _send(self) -> None:
        import ray

        with self._send_lock:  # batches leave in order
            if ray.get(self._chan.push.remote(self._job_id, self._take())):
                self.cancel.set()

    def _loop(self) -> None:
        while not self._stop.wait(SEND_EVERY_S):
            try:
                self._send()
            except Exception as e:  # the studio is gone: Ray ends its tasks with it
                log.warning("could not report to the studio: %s", e)

    def close(self) -> list[dict]:
        """Stop sending; what was not sent yet goes with the task's result."""
        self._stop.set()
        self._thread.join()
        with self._send_lock:
            return self._take()


# ---- what runs on the node ---------------------------------------------------------------------------------------
def _probe() -> dict:
    """The task side's 'ready': the device a job gets with these resources, as the local worker reports it."""
    import ray
    import torch

    from . import worker

    device = "cuda" if torch.cuda.is_available() else "cpu"
    return {"pid": os.getpid(), "node": ray.get_runtime_context().get_node_id(), "host": platform.node(),
            "device": device,
            "device_name": torch.cuda.get_device_name(0) if device == "cuda" else platform.processor() or "cpu",
            "torch": torch.__version__, "torch_cuda": torch.version.cuda, "baseline": worker.memory_reader(device)()}


def _run_task(msg: dict, chan, ship: bool, inputs: bytes | None) -> dict:
    """One job on a Ray node, through the local worker's own `_run_job`. Returns the reports not sent yet, the
    outcome, and (when the run folder is not reachable here) the run folder's files as tar bytes."""
    import ray
    import torch

    from . import worker
    from .context import ModelCache

    device = "cuda" if torch.cuda.is_available() else "cpu"
    real = Path(msg["run_dir"])
    tmp = None
    if ship or not real.is_dir():
        tmp = Path(tempfile.mkdtemp(prefix="studio-ray-"))
        run_dir = tmp / "runs" / msg["job_id"]
        run_dir.mkdir(parents=True)
        if inputs:  # run folders the params name (a checkpoint to resume from) beside this one, as at home
            _unpack(inputs, tmp / "runs")
        msg = {**msg, "run_dir": str(run_dir)}
    else:
        run_dir = real
    link = _TaskLink(chan, msg["job_id"], run_dir if tmp else None, (str(run_dir), str(real)) if tmp else None)
    measure = worker.memory_reader(device)
    high_water = worker.rss_high_water() if device == "cpu" else None
    # The job's own cache: a task's process is Ray's, not the studio's, so no model is kept past the job (and the
    # studio is told of none, so it never plans a next job on models that are gone).
    cache = ModelCache(measure=measure)
    try:
        worker._run_job(msg, link.start(), link.cancel, cache, device, measure, lambda: None, high_water)
    finally:
        tail = link.close()
        cache.clear()
    card = run_dir / "run.json"
    if card.exists():  # provenance: which node ran the job
        data = json.loads(card.read_text())
        data["ray"] = {"node_id": ray.get_runtime_context().get_node_id(), "host": platform.node(),
                       "pid": os.getpid(), "shipped": tmp is not None}
        card.write_text(json.dumps(data, indent=2, default=str))
    out: dict[str, Any] = {"reports": tail, "final": link.final}
    if tmp is not None:
        out["tar"] = _pack(run_dir, skip={"events.jsonl"})  # its lines were streamed
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _pack(folder: Path, skip: Iterable[str] = ()) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for p in sorted(folder.iterdir()):
            if p.name not in set(skip):
                tar.add(p, arcname=p.name)
    return buf.getvalue()


def _unpack(data: bytes, dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        tar.extractall(dest, filter="data")  # no absolute paths, links out of `dest` or devices


# ---- the studio's side ---------------------------------------------------------------------------------------------
class _Flag:
    """The core's cancel flag for the lane's running job: `set()` also tells the task, through the channel."""

    def __init__(self, on_set):
        self._event, self._on_set = threading.Event(), on_set

    def set(self) -> None:
        self._event.set()
        self._on_set()

    def clear(self) -> None:
        self._event.clear()

    def is_set(self) -> bool:
        return self._event.is_set()


class _Proc:
    """What the core reads of a worker's process: here the RayWorker's own thread stands for it."""

    def __init__(self, thread: threading.Thread):
        self._thread = thread
        self.pid: int | None = None  # a Ray worker process on this machine, else None (its memory is not ours to read)
        self.exitcode: int | None = None  # 0 after a stop; a lost task reports no status

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def join(self, timeout: float | None = None) -> None:
        if self._thread is not threading.current_thread() and self._thread.ident is not None:
            self._thread.join(timeout)


class RayWorker:
    """A device lane's worker whose jobs run as Ray tasks (`num_gpus` each, or a job's device count): the local
    worker's interface, so the core supervises it unchanged. `ship=True` always ships the run folder through Ray's
    object store (tests; a cluster whose nodes see a different folder at the same path); None: when the node does
    not have the run folder."""

    def __init__(self, generation: int, inbox: queue.Queue, settings: dict, address: str,
                 num_gpus: float | None = None, num_cpus: float = 1, ship: bool | None = None):
        self.generation = generation
        self.inq: queue.Queue = queue.Queue()
        self.cancel = _Flag(self._send_cancel)
        self.address, self.num_cpus, self.ship = address, num_cpus, ship
        self.num_gpus = num_gpus  # None: 1 when the cluster has GPUs, else 0
        # `settings` (the parent's pid, the idle unload) has nothing to act on here: Ray ends a driver's tasks with
        # it, and no model outlives its job
        self._inbox = inbox
        self._chan = None
        self._env: dict = {}
        self._job: str | None = None
        self._ref = None  # the running task
        self._cursor = 0  # the channel's next report
        self._shipped = False  # a task here had to ship: the nodes do not see the data folder, so inputs go too
        self._dead = threading.Event()
        self._thread = threading.Thread(target=self._serve, name=f"ray-worker-{generation}", daemon=True)
        self.proc = _Proc(self._thread)
        self._thread.start()

    # -- the interface the core uses
    def kill(self) -> None:
        """Stop the running task at once (its process is killed); the lane reports a dead worker."""
        ref = self._ref
        if ref is not None:
            import ray

            try:
                ray.cancel(ref, force=True)
            except Exception as e:
                log.warning("could not cancel the Ray task: %s", e)
        elif self._thread.is_alive():
            self.inq.put({"type": "_kill"})
        self.proc.join(5)

    def _send_cancel(self) -> None:
        job, chan = self._job, self._chan
        if job and chan is not None:
            chan.cancel.remote(job)

    # -- the worker's own thread
    def _report(self, msg: dict) -> None:
        self._inbox.put(("worker", self.generation, msg))

    def _died(self, why: str) -> None:
        if not self._dead.is_set():
            self._dead.set()
            log.error("Ray worker %s: %s", self.generation, why)
            self._inbox.put(("died", self.generation, None))

    def _serve(self) -> None:
        try:
            try:
                ready = self._start()
            except Exception as e:
                self._died(f"could not start on Ray at {self.address!r}: {type(e).__name__}: {e}")
                return
            self._report(ready)
            while True:
                msg = self.inq.get()
                t = msg.get("type")
                if t == "stop":
                    self.proc.exitcode = 0
                    return
                if t == "_kill":
                    self._died("killed while idle")
                    return
                if t == "run" and not self._run(msg):
                    return
                # "settings" and "evict": nothing is kept between jobs on Ray
        finally:
            self._close()  # the channel actor goes with this worker (a new one comes with the next)

    def _start(self) -> dict:
        connect(self.address)
        import ray

        self._env = runtime_env(self.address)
        if self.num_gpus is None:
            self.num_gpus = 1 if ray.cluster_resources().get("GPU", 0) else 0
        self._chan = _remote(_Channel).options(num_cpus=0, runtime_env=self._env, **_here(ray)).remote()
        # A first task with the jobs' resources: it reports the device they get and warms a Ray worker (torch
        # imported) for the first job.
        p = ray.get(_remote(_probe).options(num_cpus=self.num_cpus, num_gpus=self.num_gpus,
                                            runtime_env=self._env).remote())
        try:
            here = ray.get_runtime_context().get_node_id()
        except Exception:
            here = None
        self.proc.pid = p["pid"] if p["node"] == here else None
        where = "" if p["node"] == here else f" on {p['host']}"
        return {"type": "ready", "pid": self.proc.pid, "device": p["device"],
                "device_name": f"{p['device_name']}{where} (Ray)", "torch": p["torch"],
                "torch_cuda": p["torch_cuda"], "baseline": p["baseline"]}

    def _close(self) -> None:
        if self._chan is not None:
            import ray

            try:
                ray.kill(self._chan)
            except Exception:
                pass

    def _gpus(self, msg: dict) -> float:
        """GPUs for one job: a job that asks for several devices (`devices=0,1`) holds that many."""
        asked = str((msg.get("params") or {}).get("devices") or "")
        count = len([d for d in asked.split(",") if d.strip().isdigit()])
        return self.num_gpus * count if self.num_gpus and count > 1 else self.num_gpus

    def _inputs(self, msg: dict) -> bytes | None:
        """The run folders the job's params name by job id (a checkpoint to resume from), for a node without them."""
        runs = Path(msg["run_dir"]).parent
        named = {item.strip() for value in (msg.get("params") or {}).values() if isinstance(value, str)
                 for item in value.split(",")}
        found = sorted(j for j in named if j and j != msg["job_id"] and "/" not in j and j not in (".", "..")
                       and (runs / j).is_dir())
        if not found:
            return None
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            for j in found:
                tar.add(runs / j, arcname=j)
        return buf.getvalue()

    def _run(self, msg: dict) -> bool:
        """Run one job as a task and report it as the local worker would; False when the task was lost."""
        import ray
        from ray import exceptions as rex

        job_id = msg["job_id"]
        self._job = job_id
        if self.cancel.is_set():  # set before this thread took the job
            self._send_cancel()
        ship = bool(self.ship) or self._shipped
        inputs = self._inputs(msg) if ship else None
        task = _remote(_run_task).options(num_cpus=self.num_cpus, num_gpus=self._gpus(msg), runtime_env=self._env,
                                          max_retries=0)  # a lost job is resumed by the user, not rerun by Ray
        ref = self._ref = task.remote(msg, self._chan, bool(self.ship), inputs)
        run_dir = Path(msg["run_dir"])
        try:
            self._follow(ref, run_dir)
            out = ray.get(ref)
        except (rex.RayTaskError, rex.RuntimeEnvSetupError, rex.TaskUnschedulableError) as e:
            # the task's own code failed, not the job's (whose errors _run_job catches): the node cannot run it
            cause = getattr(e, "cause", None) or e
            error = (f"The Ray cluster could not run this job: {type(cause).__name__}: {str(cause).strip()[:500]} "
                     "(each node needs the studio's checkout and packages; see studio/raylane.py)")
            log.error("job %s: %s", job_id, error)
            out = {"reports": [], "final": [{"type": "failed", "job_id": job_id, "error": error,
                                              "traceback": str(e), "peak": None}, {"type": "idle"}]}
        except rex.RayError as e:  # the node died, the task's process crashed or was killed, the channel was lost
            try:
                ray.cancel(ref, force=True)  # when only the channel was lost, the task must not run on unwatched
            except Exception:
                pass
            self._died(f"job {job_id}'s task was lost: {type(e).__name__}: {str(e).strip()[:300]}")
            return False
        finally:
            self._ref = None
        self._forward(out["reports"], run_dir)
        if "tar" in out:
            self._shipped = True
            try:
                _unpack(out["tar"], run_dir)
            except (OSError, tarfile.TarError) as e:
                log.exception("could not unpack job %s's run folder", job_id)
                out["final"] = [m if m.get("type") == "idle" else
                                {"type": "failed", "job_id": job_id, "peak": m.get("peak"),
                                 "error": f"the job ran on Ray but its run folder could not be written here: {e}"}
                                for m in out["final"]]
        for m in out["final"]:
            self._report(m)
        self._job = None
        return True

    def _follow(self, ref, run_dir: Path) -> None:
        """Forward the task's reports while it runs; returns once it has ended, every report before its end sent."""
        import ray

        pending = self._chan.read.remote(self._cursor, READ_WAIT_S)
        while True:
            ready, _ = ray.wait([ref, pending], num_returns=1)
            if ref in ready:
                break
            items, self._cursor = ray.get(pending)
            self._forward(items, run_dir)
            pending = self._chan.read.remote(self._cursor, READ_WAIT_S)
        # Every send of the task was answered before it returned: one more read has them all.
        items, self._cursor = ray.get(self._chan.read.remote(self._cursor, 0))
        self._forward(items, run_dir)

    def _forward(self, items: list[dict], run_dir: Path) -> None:
        for m in items:
            if m.get("type") == _EVENTS:  # lines of a run folder written on the node: appended whole, as events does
                fd = os.open(run_dir / "events.jsonl", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
                try:
                    os.write(fd, m["text"].encode())
                finally:
                    os.close(fd)
            else:
                self._report(m)


# ---- devices a cluster reports -------------------------------------------------------------------------------------
def _read_gpus() -> list[dict] | None:
    """Every GPU of this node through NVML (no GPU claimed, so a busy card is read too); None without NVML."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:
        return None
    out = []
    driver = pynvml.nvmlSystemGetDriverVersion()
    v = pynvml.nvmlSystemGetCudaDriverVersion_v2()
    for i in range(pynvml.nvmlDeviceGetCount()):
        h = pynvml.nvmlDeviceGetHandleByIndex(i)
        mem = pynvml.nvmlDeviceGetMemoryInfo(h)
        try:
            util = pynvml.nvmlDeviceGetUtilizationRates(h).gpu
        except pynvml.NVMLError:
            util = None
        out.append({"index": i, "name": pynvml.nvmlDeviceGetName(h), "total": mem.total, "used": mem.used,
                    "free": mem.free, "utilization": util, "driver": driver, "cuda": f"{v // 1000}.{v % 1000 // 10}",
                    "host": platform.node()})
    return out


def _read_gpus_torch() -> list[dict]:
    """The GPUs this task holds, through torch (a node without nvidia-ml-py)."""
    import torch

    out = []
    for i in range(torch.cuda.device_count()):
        free, total = torch.cuda.mem_get_info(i)
        out.append({"index": i, "name": torch.cuda.get_device_name(i), "total": total, "used": total - free,
                    "free": free, "utilization": None, "driver": None, "cuda": torch.version.cuda,
                    "host": platform.node()})
    return out


def _read_memory() -> dict:
    import psutil

    vm = psutil.virtual_memory()
    return {"available": vm.available, "total": vm.total, "host": platform.node()}


class _Cached:
    """A reading reused for READING_TTL_S, so the meter and the gate do not send a task to a node each time."""

    def __init__(self):
        self._at, self._value = 0.0, None

    def get(self, read):
        if self._value is None or time.monotonic() - self._at > READING_TTL_S:
            self._value, self._at = read(), time.monotonic()
        return self._value


@dataclass
class RayGpu:
    """One GPU of a Ray node, read on that node."""

    node: str  # Ray node id
    host: str
    index: int  # the GPU's NVML index on its node
    name: str
    total: int
    env: dict

    kind_hint = "cuda"

    def __post_init__(self):
        self._cache = _Cached()

    def read(self, pids: Iterable[int] = ()) -> DeviceReading:
        import ray

        def read_node():
            try:
                task = _remote(_read_gpus).options(num_cpus=0, runtime_env=self.env, **_on_node(ray, self.node))
                return {g["index"]: g for g in ray.get(task.remote(), timeout=10) or ()}
            except Exception as e:  # the node is gone or busy: nothing can be placed on it now
                return {"error": f"{type(e).__name__}: {e}"}

        got = self._cache.get(read_node)
        g = got.get(self.index)
        if g is None:
            return DeviceReading(kind="cuda", name=f"{self.name} ({self.host})", total=self.total, used=self.total,
                                 free=0, note=f"Ray node {self.host} cannot be read now: {got.get('error', '?')}")
        return DeviceReading(kind="cuda", name=f"{g['name']} ({self.host})", total=g["total"], used=g["used"],
                             free=g["free"], utilization=g["utilization"], driver=g["driver"], cuda=g["cuda"],
                             note=f"on Ray node {self.host}")


@dataclass
class RayCpu:
    """A Ray cluster without GPUs: jobs run on the nodes' CPUs, gated against the cluster's `memory` resource."""

    total: int  # the cluster's `memory` resource, bytes
    nodes: int
    env: dict

    kind_hint = "cpu"
    name = "CPUs of a Ray cluster"

    def __post_init__(self):
        self._cache = _Cached()

    def read(self, pids: Iterable[int] = ()) -> DeviceReading:
        import ray

        def read_nodes():
            refs = [_remote(_read_memory).options(num_cpus=0, runtime_env=self.env, **_on_node(ray, n["NodeID"]))
                    .remote() for n in ray.nodes() if n.get("Alive")]
            try:
                return ray.get(refs, timeout=10)
            except Exception as e:
                log.warning("could not read the Ray nodes' memory: %s", e)
                return []

        nodes = self._cache.get(read_nodes)
        # a job runs on one node: what it can have is the most any one node has free, within the cluster's resource
        free = min(self.total, max((n["available"] for n in nodes), default=0))
        return DeviceReading(kind="cpu", name=f"CPUs of {len(nodes)} Ray node{'s' * (len(nodes) != 1)}",
                             total=self.total, used=self.total - free, free=free,
                             note="Jobs run on a Ray cluster's CPUs, gated against its memory resource.")


def ray_devices(address: str) -> list:
    """The devices a Ray cluster reports: one per GPU of each live node (read on that node), or, with no GPU in the
    cluster, one CPU device whose total is the cluster's `memory` resource. Each is a studio.device.Device."""
    connect(address)
    import ray

    env = runtime_env(address)
    alive = sorted((n for n in ray.nodes() if n.get("Alive")), key=lambda n: (n["NodeManagerAddress"], n["NodeID"]))
    devices: list = []
    for node in alive:
        count = int(node["Resources"].get("GPU", 0))
        if not count:
            continue
        where = _on_node(ray, node["NodeID"])
        gpus = ray.get(_remote(_read_gpus).options(num_cpus=0, runtime_env=env, **where).remote())
        if gpus is None:  # no NVML there: torch in a task holding the node's GPUs (waits for them if they are busy)
            gpus = ray.get(_remote(_read_gpus_torch).options(num_cpus=0, num_gpus=count, runtime_env=env, **where)
                           .remote())
        for g in gpus[:count]:  # Ray's GPUs of the node are the first ones it sees
            devices.append(RayGpu(node["NodeID"], g["host"], g["index"], g["name"], g["total"], env))
    if devices:
        return devices
    return [RayCpu(int(ray.cluster_resources().get("memory", 0)), len(alive), env)]
