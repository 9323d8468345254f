"""Memory estimates and the gate that refuses what would not fit the budget.

An estimate has three parts: the job's own working memory (`parts`), the models it takes from the worker's cache
(`models`, a cache key -> bytes each), and the process's runtime context (the CUDA context), which the gate adds
once. The scheduler uses the split: a model already cached is not loaded again, so it is never evicted to make
room for itself, and the worker holds its context whether a job runs or not.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterable

from .config import GiB

PARTS = ("weights", "optimizer", "grads", "activations", "kv_cache", "workspace", "libraries")


def runtime_context_bytes(device) -> int:
    """Memory a job's process holds before any tensor: the CUDA context (~620 MiB of NVML-used memory), or on
    the CPU the device worker's resident set once it has imported torch (815 MiB measured with torch 2.14)."""
    return (620 if getattr(device, "kind", "cpu") == "cuda" else 900) * 2**20


def short_key(key: str) -> str:
    """A cache key as a user reads it: `gguf:/x/y/model.gguf:4096:-1` -> `model.gguf`, `whisper:small:int8` ->
    `small`."""
    pieces = key.split(":")
    for piece in pieces:
        if "/" in piece:
            return piece.rstrip("/").rsplit("/", 1)[-1]
    return pieces[1] if len(pieces) > 1 else key


@dataclass(frozen=True)
class Estimate:
    """Bytes a job needs on its device, with a breakdown a user can read."""

    parts: dict[str, int] = field(default_factory=dict)  # the job's working memory, keys from PARTS
    models: dict[str, int] = field(default_factory=dict)  # cache key -> bytes of each model it loads through the cache
    note: str = ""
    context: int = 0  # the runtime (CUDA) context; the gate sets it, kinds leave it 0

    @property
    def working(self) -> int:
        return int(sum(self.parts.values()))

    @property
    def total(self) -> int:
        return self.working + int(sum(self.models.values())) + self.context

    def describe(self) -> str:
        inner = [f"{k} {v / GiB:.2f}" for k, v in self.parts.items() if v]
        inner += [f"model {short_key(k)} {v / GiB:.2f}" for k, v in self.models.items() if v]
        if self.context:
            inner.append(f"context {self.context / GiB:.2f}")
        note = f"; {self.note}" if self.note else ""
        return f"{self.total / GiB:.2f} GiB ({', '.join(inner)}{note})"

    def to_dict(self) -> dict[str, Any]:
        return {"total": self.total, "parts": dict(self.parts), "models": dict(self.models), "context": self.context,
                "note": self.note}

    @classmethod
    def from_dict(cls, d: dict | None) -> "Estimate":
        d = d or {}
        return cls(parts=dict(d.get("parts") or {}), models=dict(d.get("models") or {}), note=d.get("note", ""),
                   context=int(d.get("context") or 0))


class Refused(Exception):
    """The gate's answer: why, and a change that fits when there is one."""

    def __init__(self, reason: str, estimate: Estimate | None = None, suggestion: dict | None = None):
        super().__init__(reason)
        self.reason = reason
        self.estimate = estimate
        self.suggestion = suggestion


def full_estimate(params: Any, estimate_fn: Callable[[Any, Any], Estimate], device: Any, uses_device: bool = True
                  ) -> Estimate:
    """The kind's estimate with the runtime context added once (none for kinds that stay off the device)."""
    est = estimate_fn(params, device)
    return replace(est, context=runtime_context_bytes(device) if uses_device else 0)


def gate(
    params: Any,
    estimate_fn: Callable[[Any, Any], Estimate],
    device: Any,
    budget: int,
    shrink: Callable[[Any], Iterable[dict]] | None = None,
    uses_device: bool = True,
) -> Estimate:
    """Return the estimate when it fits `budget`; raise Refused with the breakdown and a fitting change otherwise."""
    est = full_estimate(params, estimate_fn, device, uses_device)
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
        cest = full_estimate(candidate, estimate_fn, device, uses_device)
        if cest.total <= budget:
            suggestion = change
            shown = ", ".join(f"{k}={v}" for k, v in change.items())
            reason += f" Fits with {shown} (est. {cest.total / GiB:.2f} GiB)."
            break
    else:
        reason += " Nothing smaller of this job fits; raise the budget in Settings or free memory."
    raise Refused(reason, est, suggestion)
