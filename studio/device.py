"""The device layer: GPU readings through NVML (nvidia-ml-py), or RAM readings when there is no NVIDIA driver."""
from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass
from typing import Iterable, Protocol

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DeviceReading:
    kind: str  # "cuda" or "cpu": what jobs run on and what the gate measures
    name: str
    total: int  # bytes
    used: int  # bytes, by every process
    free: int  # bytes available now
    studio_used: int = 0  # bytes held by the studio's own processes
    utilization: int | None = None  # percent
    temperature: int | None = None  # degrees C
    power_w: float | None = None
    driver: str | None = None
    cuda: str | None = None  # CUDA version the driver supports
    note: str = ""  # shown to the user as is

    def to_dict(self) -> dict:
        return asdict(self)


class Device(Protocol):
    """Anything that can be read; tests inject a fake with the same method."""

    def read(self, pids: Iterable[int] = ()) -> DeviceReading: ...


class NvmlDevice:
    """One NVIDIA GPU through NVML (memory info v2, so `used` excludes reserved memory)."""

    kind_hint = "cuda"

    def __init__(self, index: int = 0):
        import pynvml

        self._nvml = pynvml
        pynvml.nvmlInit()
        self.index = self.cuda_index = index  # the worker on this card sees only it (CUDA_VISIBLE_DEVICES)
        self.handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        self.name = pynvml.nvmlDeviceGetName(self.handle)
        self.driver = pynvml.nvmlSystemGetDriverVersion()
        v = pynvml.nvmlSystemGetCudaDriverVersion_v2()
        self.cuda = f"{v // 1000}.{v % 1000 // 10}"

    def read(self, pids: Iterable[int] = ()) -> DeviceReading:
        nv = self._nvml
        try:
            mem = nv.nvmlDeviceGetMemoryInfo(self.handle, version=nv.nvmlMemory_v2)
        except (nv.NVMLError, TypeError):
            mem = nv.nvmlDeviceGetMemoryInfo(self.handle)
        pids = set(pids)
        studio = 0
        try:
            for p in nv.nvmlDeviceGetComputeRunningProcesses(self.handle):
                if p.pid in pids and p.usedGpuMemory:
                    studio += p.usedGpuMemory
        except nv.NVMLError:
            pass

        def opt(fn, *a):
            try:
                return fn(self.handle, *a)
            except nv.NVMLError:
                return None

        util = opt(nv.nvmlDeviceGetUtilizationRates)
        power = opt(nv.nvmlDeviceGetPowerUsage)
        return DeviceReading(
            kind="cuda",
            name=self.name,
            total=mem.total,
            used=mem.used,
            free=mem.free,
            studio_used=studio,
            utilization=util.gpu if util else None,
            temperature=opt(nv.nvmlDeviceGetTemperature, nv.NVML_TEMPERATURE_GPU),
            power_w=power / 1000 if power else None,
            driver=self.driver,
            cuda=self.cuda,
        )


def resident_bytes(pids: Iterable[int]) -> int:
    """RAM these processes hold (their resident sets); a process that is gone counts nothing."""
    import psutil

    total = 0
    for pid in pids:
        try:
            total += psutil.Process(pid).memory_info().rss
        except psutil.Error:
            pass
    return total


class CpuDevice:
    """No NVIDIA GPU: jobs run on the CPU and are gated against RAM."""

    kind_hint = "cpu"
    cuda_index = None  # the worker sets no CUDA_VISIBLE_DEVICES

    def __init__(self, note: str):
        self.note = note
        self.name = f"CPU ({os.cpu_count()} cores)"

    def read(self, pids: Iterable[int] = ()) -> DeviceReading:
        import psutil

        vm = psutil.virtual_memory()
        studio = resident_bytes(pids)
        return DeviceReading(
            kind="cpu",
            name=self.name,
            total=vm.total,
            used=vm.total - vm.available,
            free=vm.available,
            studio_used=studio,
            utilization=int(psutil.cpu_percent(interval=None)),
            note=self.note,
        )


def detect_all() -> list[Device]:
    """Every NVIDIA GPU NVML finds, in NVML's order (the order CUDA uses with CUDA_DEVICE_ORDER=PCI_BUS_ID, which each
    worker sets), restricted to CUDA_VISIBLE_DEVICES when the studio was started with it; else the CPU."""
    first = detect(0)
    if first.kind_hint != "cuda":
        return [first]
    import pynvml

    count = pynvml.nvmlDeviceGetCount()
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    indexes = list(range(count))
    if visible is not None and all(v.strip().isdigit() for v in visible.split(",") if v.strip()):
        indexes = [int(v) for v in visible.split(",") if v.strip() and int(v) < count]
    return [first if i == 0 else NvmlDevice(i) for i in indexes] if indexes else [first]


def detect(index: int = 0) -> Device:
    """The GPU when NVML finds one, else the CPU with a plain reason."""
    try:
        import pynvml
    except ImportError:
        return CpuDevice("nvidia-ml-py is not installed: jobs run on the CPU, gated against RAM.")
    try:
        return NvmlDevice(index)
    except pynvml.NVMLError_LibraryNotFound:
        return CpuDevice("No NVIDIA driver found: jobs run on the CPU, gated against RAM.")
    except pynvml.NVMLError as e:
        log.warning("NVML failed: %s", e)
        return CpuDevice(f"NVML could not read the GPU ({e}): jobs run on the CPU, gated against RAM.")
