"""Memory estimates and the gate that refuses what would not fit the budget."""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterable

from .config import GiB

PARTS = ("weights", "optimizer", "activations", "kv_cache", "workspace", "context")


def runtime_context_bytes(device) -> int:
    """Memory a job's process holds before any tensor: the CUDA context (~620 MiB of NVML-used memory),
    or on the CPU the worker's Python + torch resident set (~700 MiB measured)."""
    return (620 if getattr(device, "kind", "cpu") == "cuda" else 700) * 2**20


@dataclass(frozen=True)
class Estimate:
    """Bytes a job needs on its device, with a breakdown a user can read."""

    parts: dict[str, int] = field(default_factory=dict)  # keys from PARTS (and grads)
    note: str = ""

    @property
    def total(self) -> int:
        return int(sum(self.parts.values()))

    def describe(self) -> str:
        inner = ", ".join(f"{k} {v / GiB:.2f}" for k, v in self.parts.items() if v)
        return f"{self.total / GiB:.2f} GiB ({inner})"

    def to_dict(self) -> dict[str, Any]:
        return {"total": self.total, "parts": dict(self.parts), "note": self.note}


class Refused(Exception):
    """The gate's answer: why, and a change that fits when there is one."""

    def __init__(self, reason: str, estimate: Estimate | None = None, suggestion: dict | None = None):
        super().__init__(reason)
        self.reason = reason
        self.estimate = estimate
        self.suggestion = suggestion


def gate(
    params: Any,
    estimate_fn: Callable[[Any, Any], Estimate],
    device: Any,
    budget: int,
    shrink: Callable[[Any], Iterable[dict]] | None = None,
) -> Estimate:
    """Return the estimate when it fits `budget`; raise Refused with the breakdown and a fitting change otherwise."""
    est = estimate_fn(params, device)
    if est.total <= budget:
        return est
    where = "VRAM" if getattr(device, "kind", "cpu") == "cuda" else "RAM"
    reason = f"Refused: needs {est.describe()}; {where} budget {budget / GiB:.2f} GiB."
    suggestion = None
    for change in shrink(params) if shrink else ():
        try:
            candidate = replace(params, **change)
        except ValueError:
            continue  # a shrink step that leaves the valid range
        cest = estimate_fn(candidate, device)
        if cest.total <= budget:
            suggestion = change
            shown = ", ".join(f"{k}={v}" for k, v in change.items())
            reason += f" Fits with {shown} (est. {cest.total / GiB:.2f} GiB)."
            break
    else:
        reason += " Nothing smaller of this job fits; raise the budget in Settings or free memory."
    raise Refused(reason, est, suggestion)
