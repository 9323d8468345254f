"""A `finetune` job across several processes: DDP over the GPUs `devices` names (or, without CUDA, N CPU processes
joined with gloo), or DeepSpeed ZeRO-2/3 when `deepspeed` asks, all through accelerate's launcher.

The worker process keeps the job's real context and starts `python -m accelerate.commands.launch` (torchrun
underneath), which starts one process per device; each runs `workers.finetune.train.train_job`, the same code a
single-device run takes, and transformers' Trainer does the DDP/DeepSpeed part. Rank 0 alone writes the run folder
(events, metrics, checkpoints, run card, adapter), so the result is laid out as a single-process run's and everything
downstream (finetune_merge, Chat with the adapter, Resume) works unchanged; the other ranks only train.

The worker and the ranks talk through files in `runs/<job>/distributed/`:

    spec.json           what the ranks run: the params, the run folder, a resume's checked checkpoint
    accelerate.json     the launcher's config (distributed type, processes, port, mixed precision, DeepSpeed file)
    deepspeed.json      the ZeRO config (deepspeed="zero2"/"zero3"), read by accelerate's DeepSpeed plugin and the
                        Trainer
    progress.jsonl      rank 0's progress, a line a call; the worker relays each to its own ctx.progress (the meter,
                        the UI, and the worker's cancel point), so none is lost between two reads
    cancel              written by the worker when the job is cancelled; the ranks stop at the same micro-batch, rank 0
                        saves the checkpoint as a single-process cancel does, and all exit
    result.json         rank 0's result, which the worker returns
    rank<k>.log         everything rank k printed; rank<k>.error.json its error, which fails the job
    launch.log          the launcher's own output

Processes never outlive the job: the worker kills the launcher and every rank when the job ends any other way (after
`CANCEL_WAIT_S` on cancel), and each rank exits by itself when the worker or its launcher is gone.

Importable without torch: the studio's core reads `parse_devices` to hold several cards for one job.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the repository root: the ranks import workers.* and studio.* from it
MAX_CPU_PROCESSES = 256  # a CPU process count past this is a typo, not a plan
CANCEL_WAIT_S = 8.0  # ranks still running this long after a cancel are killed; inside the studio's 10 s cancel grace
RELAY_S = 0.25  # the worker reads rank 0's new progress lines this often
CANCELLED_RC = 3  # a rank's exit code after a cancel (non-zero, so torchrun stops the other ranks at once)
FOLDER = "distributed"

# ---- what `devices` means ---------------------------------------------------------------------------------------
_HOW = ("give GPU ids such as 0,1, 'all', or on a machine without CUDA a number of CPU processes such as 2 "
        "(empty: the worker's one device)")


def _ids(text: str) -> str | list[int] | None:
    """The syntax alone: None (empty), "all", or the integers listed. ValueError for anything else."""
    t = (text or "").strip().lower()
    if not t:
        return None
    if t == "all":
        return "all"
    parts = [s.strip() for s in t.split(",")]
    if not all(s.isascii() and s.isdigit() for s in parts):  # "", "-1", "1.5", "gpu0" all fail here
        raise ValueError(f"devices {text!r} is not understood: {_HOW}")
    ids = [int(s) for s in parts]
    if len(set(ids)) != len(ids):
        raise ValueError(f"devices {text!r} names a GPU twice")
    return ids


def check_syntax(text: str) -> None:
    """A malformed `devices` fails when the params are built, before anything looks at the machine."""
    _ids(text)


def parse_devices(text: str, cuda_count: int) -> list[int] | int | None:
    """What `devices` asks for on a machine with `cuda_count` CUDA devices: None for the worker's one device (empty),
    a list of CUDA ids ("0,1", "all"), or without CUDA an int, the number of CPU processes ("2"). ValueError, said
    plainly, for a malformed value, GPUs on a machine without CUDA, or a GPU that does not exist."""
    ids = _ids(text)
    if ids is None:
        return None
    if cuda_count < 1:
        if ids == "all" or len(ids) > 1:
            raise ValueError(f"devices={text!r} asks for GPUs, and this machine has no CUDA device; on the CPU give a "
                             "number of processes, such as devices=2")
        n = ids[0]
        if not 1 <= n <= MAX_CPU_PROCESSES:
            raise ValueError(f"devices={text!r}: without CUDA, devices is a number of CPU processes, from 1 to "
                             f"{MAX_CPU_PROCESSES}")
        return n
    if ids == "all":
        return list(range(cuda_count))
    missing = [i for i in ids if i >= cuda_count]
    if missing:
        raise ValueError(f"devices={text!r}: there is no GPU {missing[0]}; this machine has {cuda_count} "
                         f"(ids 0 to {cuda_count - 1})")
    return ids


def processes(parsed: list[int] | int | None) -> int:
    """How many training processes a parsed `devices` starts (1: the worker trains by itself)."""
    if parsed is None:
        return 1
    return len(parsed) if isinstance(parsed, list) else int(parsed)


def cuda_count() -> int:
    """CUDA devices on this machine, as NVML counts them (PCI bus order, the ids `devices` names); 0 without a driver.
    NVML, not torch: the core calls this at submit without loading torch."""
    try:
        import pynvml

        pynvml.nvmlInit()
        return int(pynvml.nvmlDeviceGetCount())
    except Exception:  # no nvidia-ml-py, no driver, no GPU
        return 0


def estimate_processes(devices: str, kind: str) -> int:
    """The process count the gate sizes for, without looking at the machine (the estimate is pure): "all" on CUDA
    counts as one, since validate resolves it to the ids before the gate sees it."""
    try:
        ids = _ids(devices)
    except ValueError:
        return 1
    if ids is None or ids == "all":
        return 1
    if kind == "cuda":
        return len(ids)
    return ids[0] if len(ids) == 1 else 1


# ---- submit-time checks (the core process: no torch) ---------------------------------------------------------------
def check(p, count: int | None = None) -> str:
    """Refuse what cannot run here (ValueError); returns `devices` with "all" resolved to the ids it stands for."""
    count = cuda_count() if count is None else count
    parsed = parse_devices(p.devices, count)
    if p.deepspeed:
        import importlib.util

        if importlib.util.find_spec("deepspeed") is None:
            raise ValueError(f"deepspeed={p.deepspeed!r} needs DeepSpeed, which is not installed: pip install "
                             "deepspeed (into the studio's environment), or leave deepspeed empty for plain DDP")
        if not isinstance(parsed, list) or len(parsed) < 2:
            raise ValueError(f"deepspeed={p.deepspeed!r} shards a run across GPUs: give at least two in devices "
                             "(e.g. devices=all)")
    return ",".join(map(str, parsed)) if isinstance(parsed, list) else p.devices


# ---- the worker side ------------------------------------------------------------------------------------------------
def plan(p, device: str) -> tuple[int, list[int] | None]:
    """(processes, CUDA ids or None for CPU processes) for a run on the worker's `device` ("cuda"/"cpu")."""
    parsed = parse_devices(p.devices, cuda_count() if device == "cuda" else 0)
    return processes(parsed), (parsed if isinstance(parsed, list) else None)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def deepspeed_config(stage: str) -> dict:
    """ZeRO-2 (optimizer state and gradients sharded) or ZeRO-3 (the weights too); "auto" values are filled in from
    the Trainer's own arguments (batch sizes, accumulation, clipping, bf16) by transformers' DeepSpeed integration."""
    zero3 = stage == "zero3"
    zero = {"stage": 3 if zero3 else 2, "overlap_comm": True, "contiguous_gradients": True,
            "reduce_bucket_size": "auto"}
    if zero3:  # one full copy of the 16-bit weights at save time: the adapter is written as a single-GPU run writes it
        zero.update(stage3_gather_16bit_weights_on_model_save=True, stage3_prefetch_bucket_size="auto",
                    stage3_param_persistence_threshold="auto")
    return {"zero_optimization": zero, "bf16": {"enabled": "auto"}, "train_micro_batch_size_per_gpu": "auto",
            "train_batch_size": "auto", "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
            "zero_allow_untested_optimizer": True}  # the Trainer's own AdamW, sharded by ZeRO


def accelerate_config(n: int, cuda: bool, port: int, ds_file: Path | None, zero3: bool) -> dict:
    """The launcher's config file. Written per run (and passed with --config_file) so a default config the user made
    with `accelerate config` cannot change which devices or precision a studio job uses."""
    cfg = {"compute_environment": "LOCAL_MACHINE", "distributed_type": "DEEPSPEED" if ds_file else "MULTI_GPU",
           "mixed_precision": "bf16" if cuda else "no", "use_cpu": not cuda, "num_processes": n, "num_machines": 1,
           "machine_rank": 0, "gpu_ids": "all",  # CUDA_VISIBLE_DEVICES (set here) already holds just the chosen cards
           "main_process_ip": "127.0.0.1", "main_process_port": port, "rdzv_backend": "static",
           "same_network": True, "debug": False}
    if ds_file:
        cfg["deepspeed_config"] = {"deepspeed_config_file": str(ds_file), "zero3_init_flag": zero3}
    return cfg


def launch_command(folder: Path, n: int, cuda: bool, port: int, deepspeed: str) -> list[str]:
    """`accelerate launch` for this run (flags as accelerate 1.15's launcher takes them). On the CPU too the launcher's
    torchrun path (--multi_gpu) starts the N processes: its --cpu mode starts one (several only through mpirun); each
    rank's Trainer (use_cpu) then joins the group with gloo."""
    mode = ["--use_deepspeed", "--deepspeed_config_file", str(folder / "deepspeed.json")] if deepspeed else \
        ["--multi_gpu"]
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(folder / "accelerate.json"),
            *mode, "--num_processes", str(n), "--num_machines", "1", "--main_process_ip", "127.0.0.1",
            "--main_process_port", str(port), "--mixed_precision", "bf16" if cuda else "no", "--dynamo_backend", "no",
            "--max_restarts", "0", "--monitor_interval", "0.2",  # a failed rank stops the others within 0.2 s
            "-m", "workers.finetune.distributed", str(folder / "spec.json")]


def run(p, ctx) -> dict:
    """Train across the processes `p.devices` asks for; called by train.run in the worker, which keeps `ctx`."""
    from workers.finetune import data, train

    n, ids = plan(p, ctx.device)
    cuda = ids is not None
    folder = ctx.run_dir / FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    ctx.progress(0, None, f"starting {n} training processes")
    # a resume's checkpoint is copied and hash-checked once, here, before any rank starts
    resumed = train.resume_state(ctx, p.resume_from, data.file_hash(p.data), p.micro_batch, p.grad_accum)
    port = free_port()
    ds_file = folder / "deepspeed.json" if p.deepspeed else None
    if ds_file:
        ds_file.write_text(json.dumps(deepspeed_config(p.deepspeed), indent=1))
    (folder / "accelerate.json").write_text(json.dumps(accelerate_config(n, cuda, port, ds_file,
                                                                         p.deepspeed == "zero3"), indent=1))
    me = _process_identity(os.getpid())
    spec = {"params": asdict(p), "job_id": ctx.job_id, "kind": ctx.kind, "run_dir": str(ctx.run_dir),
            "data_dir": str(ctx.data_dir), "device": ctx.device, "owner": ctx.owner, "parent": me,
            "resumed": [str(resumed[0]) if resumed[0] else None, resumed[1], resumed[2], resumed[3]]}
    (folder / "spec.json").write_text(json.dumps(spec, indent=1, default=str))
    backend = f"DeepSpeed ZeRO-{p.deepspeed[-1]}" if p.deepspeed else ("DDP (nccl)" if cuda else "DDP (gloo)")
    ctx.card(distributed={"processes": n, "devices": ids if cuda else "cpu", "backend": backend,
                          "launcher": "accelerate launch", "micro_batch_per_process": p.micro_batch,
                          "effective_batch": p.micro_batch * p.grad_accum * n})
    ctx.log(f"training on {n} processes ({backend}{', GPUs ' + ','.join(map(str, ids)) if cuda else ''}); effective "
            f"batch {p.micro_batch} x {p.grad_accum} x {n} = {p.micro_batch * p.grad_accum * n}")
    path = os.pathsep.join(x for x in (str(ROOT), os.environ.get("PYTHONPATH", "")) if x)
    env = {**os.environ, "PYTHONPATH": path, "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    if cuda:
        env.update(CUDA_DEVICE_ORDER="PCI_BUS_ID", CUDA_VISIBLE_DEVICES=",".join(map(str, ids)))
    else:
        env["CUDA_VISIBLE_DEVICES"] = ""  # CPU processes never touch a GPU
        env["OMP_NUM_THREADS"] = str(p.threads or max(1, (os.cpu_count() or 1) // n))
    with open(folder / "launch.log", "wb") as log:
        proc = subprocess.Popen(launch_command(folder, n, cuda, port, p.deepspeed), cwd=str(ROOT), env=env,
                                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        _follow(proc, ctx, folder)
    except BaseException:  # cancelled (JobCancelled), or the worker itself is stopping
        (folder / "cancel").touch()
        try:
            proc.wait(timeout=CANCEL_WAIT_S)
        except subprocess.TimeoutExpired:
            pass
        raise
    finally:
        _stop(proc, folder)
    if proc.returncode != 0:
        raise _failure(folder, proc.returncode, n)
    return json.loads((folder / "result.json").read_text())


def _follow(proc, ctx, folder: Path) -> None:
    """Relay rank 0's progress to the worker's ctx until the launcher exits; each pass is a cancel point."""
    offset = 0
    while proc.poll() is None:
        ctx.check_cancel()
        offset = _relay(ctx, folder, offset)
        time.sleep(RELAY_S)
    _relay(ctx, folder, offset)


def _relay(ctx, folder: Path, offset: int) -> int:
    """Pass on every whole progress line rank 0 wrote since `offset` (the ctx keeps its own pace: only the last
    of a burst and each final "done of total" reach the events); returns the new offset."""
    try:
        with open(folder / "progress.jsonl", "rb") as f:
            f.seek(offset)
            data = f.read()
    except FileNotFoundError:
        return offset
    whole = data[:data.rfind(b"\n") + 1]
    for line in whole.splitlines():
        try:
            pr = json.loads(line)
        except ValueError:  # one write a line, so never half a line; a reader must not fail the job on it anyway
            continue
        ctx.progress(pr["done"], pr["total"], pr["message"], **pr.get("extra", {}))
    return offset + len(whole)


def _process_identity(pid: int) -> list:
    import psutil

    return [pid, psutil.Process(pid).create_time()]


def _stop(proc, folder: Path) -> None:
    """Kill the launcher and every rank still running (ranks run in sessions of their own, so by their pids)."""
    import psutil

    victims = []
    try:
        victims = [psutil.Process(proc.pid)]
        victims += victims[0].children(recursive=True)
    except psutil.NoSuchProcess:
        pass
    for f in folder.glob("rank*.pid"):
        try:
            pid, started = json.loads(f.read_text())
            p = psutil.Process(pid)
            if abs(p.create_time() - started) < 0.01 and all(v.pid != pid for v in victims):
                victims.append(p)
        except (psutil.NoSuchProcess, ValueError, OSError):
            pass
    for v in victims:
        try:
            v.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(victims, timeout=5)
    proc.wait()


class RankError(RuntimeError):
    """A training process failed; the message is its error and the last lines it printed."""


def _tail(path: Path, lines: int) -> str:
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return ""
    return "\n".join([line for line in text.splitlines() if line.strip()][-lines:])


def _failure(folder: Path, rc: int, n: int) -> Exception:
    """The error of the rank that failed first (the others stop because it did), else the launcher's last lines."""
    errors = []
    for f in folder.glob("rank*.error.json"):
        try:
            errors.append(json.loads(f.read_text()))
        except ValueError:
            pass
    if not errors:
        return RankError(f"the training processes stopped (launcher exit code {rc}) before any reported an error; "
                         f"its last lines:\n{_tail(folder / 'launch.log', 15)}")
    first = min(errors, key=lambda e: e["t"])
    if first["type"] in ("ValueError", "FileNotFoundError"):  # bad input: said as a single-process run says it
        return ValueError(first["message"])
    return RankError(f"process {first['rank']} of {n} failed: {first['type']}: {first['message']}\n"
                     + _tail(folder / f"rank{first['rank']}.log", 6))


# ---- the rank side ----------------------------------------------------------------------------------------------
class CancelFile:
    """The worker's cancel as a rank sees it: the `cancel` file. While a Trainer runs, every rank acts on the same
    reading (all-reduced at each micro-batch and dev batch by CancelSync), so all stop at the same step and save one
    checkpoint together; outside it (loading, rank 0's dev answers) each rank reads the file itself."""

    def __init__(self, path: Path):
        self.path = path
        self.synced = False  # True from the first Trainer on
        self.seen = False  # the last all-reduced reading

    def is_set(self) -> bool:
        return self.seen if self.synced else self.path.exists()

    def sync(self) -> None:
        import torch
        import torch.distributed as dist

        device = f"cuda:{torch.cuda.current_device()}" if dist.get_backend() == "nccl" else "cpu"
        flag = torch.tensor([1.0 if self.path.exists() else 0.0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        self.seen = bool(flag.item())


def _cancel_sync(flag: CancelFile):
    from transformers import TrainerCallback

    class CancelSync(TrainerCallback):
        """Reads the cancel file together on every rank, at points every rank passes the same number of times."""

        def __init__(self):
            flag.synced = True

        def on_step_begin(self, args, state, control, **kw):
            flag.sync()

        def on_substep_end(self, args, state, control, **kw):
            flag.sync()

        def on_prediction_step(self, args, state, control, **kw):
            flag.sync()

    return CancelSync()


def _rank_context(spec: dict, rank: int, folder: Path):
    from studio.context import JobContext

    class RankContext(JobContext):
        """A rank's view of the job: rank 0 writes the run folder's events, card and progress (progress to a file the
        worker relays); the other ranks only train, their calls left as cancel points."""

        def __init__(self):
            super().__init__(spec["job_id"], spec["kind"], Path(spec["run_dir"]), Path(spec["data_dir"]),
                             spec["device"], CancelFile(folder / "cancel"), owner=spec.get("owner"))
            self.rank = rank
            self.world = int(os.environ.get("WORLD_SIZE", "1"))  # torchrun's

        def progress(self, done, total=None, message="", **extra):
            self.check_cancel()
            now = time.time()
            if self.rank or (now - self._last_progress < 0.2 and not (total is not None and done >= total)):
                return
            self._last_progress = now
            line = json.dumps({"done": done, "total": total, "message": message, "extra": extra}, default=str)
            fd = os.open(folder / "progress.jsonl", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, (line + "\n").encode())  # one write: the worker never reads half a line
            finally:
                os.close(fd)

        def metric(self, step, **values):
            if self.rank:
                return self.check_cancel()
            super().metric(step, **values)

        def log(self, message):
            if self.rank:
                return self.check_cancel()
            super().log(message)

        def emit(self, type, **data):
            if self.rank:
                return self.check_cancel()
            super().emit(type, **data)

        def artifact(self, path, label=""):
            if not self.rank:
                super().artifact(path, label)

        def card(self, **fields):
            if not self.rank:
                super().card(**fields)

        def trainer_callbacks(self) -> list:
            return [_cancel_sync(self._cancel)]

        def alone(self) -> None:
            """From here rank 0 works by itself (the others have finished): it reads the cancel file directly."""
            self._cancel.synced = False

    return RankContext()


def _watch(parent: list, launcher_pid: int) -> None:
    """Exit when the worker (the job's owner) or this rank's launcher is gone: a rank never outlives its job."""
    import psutil

    pid, started = parent

    def alive() -> bool:
        try:
            return abs(psutil.Process(pid).create_time() - started) < 0.01
        except psutil.NoSuchProcess:
            return False

    def loop():
        while True:
            time.sleep(1.0)
            if os.getppid() != launcher_pid or not alive():
                os._exit(CANCELLED_RC)

    threading.Thread(target=loop, daemon=True).start()


def rank_main(spec_path: str) -> int:
    """One training process: the same train_job a single-device run takes, with this rank's context."""
    spec_file = Path(spec_path)
    folder = spec_file.parent
    spec = json.loads(spec_file.read_text())
    rank = int(os.environ.get("RANK", "0"))
    out = os.open(folder / f"rank{rank}.log", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(out, 1)  # everything this rank prints, C libraries included, for the job's error message
    os.dup2(out, 2)
    (folder / f"rank{rank}.pid").write_text(json.dumps(_process_identity(os.getpid())))
    _watch(spec["parent"], os.getppid())
    from studio.context import JobCancelled
    from studio.params import build
    from workers.finetune import train

    try:
        p = build(train.Params, spec["params"])
        ckpt, state, mb, ga = spec["resumed"]
        result = train.train_job(p, _rank_context(spec, rank, folder),
                                 resumed=(Path(ckpt) if ckpt else None, state, mb, ga))
        if rank == 0:
            tmp = folder / "result.json.tmp"
            tmp.write_text(json.dumps(result, default=str))
            os.replace(tmp, folder / "result.json")
        return 0
    except JobCancelled:
        return CANCELLED_RC
    except BaseException as e:
        traceback.print_exc()
        (folder / f"rank{rank}.error.json").write_text(json.dumps(
            {"rank": rank, "t": time.time(), "type": type(e).__name__, "message": str(e).strip() or type(e).__name__}))
        return 1


if __name__ == "__main__":
    code = rank_main(sys.argv[1])
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # everything is written: skip the interpreter's teardown of torch and gloo (a second or more)
