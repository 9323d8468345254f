"""Job kind `selftest`: the worker starts, sees its device, allocates and frees memory (used by `doctor`)."""
from __future__ import annotations

import time
from dataclasses import dataclass

from studio.gate import Estimate


@dataclass(frozen=True)
class Params:
    mib: int = 64  # memory to allocate and free on the device

    def __post_init__(self):
        if not 1 <= self.mib <= 4096:
            raise ValueError(f"mib must be between 1 and 4096; got {self.mib}")


def estimate(p: Params, device) -> Estimate:
    return Estimate(parts={"workspace": p.mib * 2**20})


def run(p: Params, ctx) -> dict:
    import torch

    t0 = time.perf_counter()
    x = torch.ones(p.mib * 2**20 // 4, dtype=torch.float32, device=ctx.device)
    total = float(x.sum().item())
    if ctx.device == "cuda":
        torch.cuda.synchronize()
        allocated = torch.cuda.memory_allocated()
    else:
        allocated = x.numel() * 4
    del x
    if ctx.device == "cuda":
        torch.cuda.empty_cache()
    ctx.progress(1, 1, "allocated and freed")
    return {
        "device": ctx.device,
        "device_name": torch.cuda.get_device_name(0) if ctx.device == "cuda" else "cpu",
        "allocated_bytes": allocated,
        "checksum_ok": total == p.mib * 2**20 // 4,
        "alloc_ms": (time.perf_counter() - t0) * 1000,
        "cuda_available": torch.cuda.is_available(),
    }
