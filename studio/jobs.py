"""Job lifecycle: the status enum and the job record the store returns."""
from __future__ import annotations

import enum
import json
from dataclasses import dataclass, field
from typing import Any


class JobStatus(str, enum.Enum):
    QUEUED = "QUEUED"
    RUNNING = "RUNNING"
    DONE = "DONE"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"
    INTERRUPTED = "INTERRUPTED"  # the worker died under it or the app stopped uncleanly
    REFUSED = "REFUSED"  # the gate said no at submit; never queued

    @property
    def final(self) -> bool:
        return self not in (JobStatus.QUEUED, JobStatus.RUNNING)


FINAL_STATUSES = tuple(s for s in JobStatus if s.final)


@dataclass
class Job:
    """One row of the job store."""

    id: str
    seq: int
    kind: str
    params: dict[str, Any]
    status: JobStatus
    created: float
    started: float | None = None
    finished: float | None = None
    estimate: dict[str, Any] | None = None  # Estimate.to_dict()
    peak_bytes: int | None = None  # measured peak while it ran
    error: str | None = None  # one line a user can act on
    traceback: str | None = None
    result: dict[str, Any] | None = None
    wait_reason: str | None = None  # why a queued job is not running yet
    progress: float | None = None  # 0..1 of the running job
    message: str | None = None  # last progress message
    owner: str | None = None  # user name when the studio runs with auth
    resume_of: str | None = None  # the job whose checkpoint this one continues
    budget_bytes: int | None = None  # the budget the gate applied
    resolved: dict[str, Any] | None = None  # params as `fit` resolved them (GPU layers, batch), when they differ
    device_pin: int | None = None  # the device the user asked for (`device=1`); None: wherever it fits best
    device: int | None = None  # the device it was gated on when queued, then the one it runs / ran on
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_row(cls, row) -> "Job":
        def js(v):
            return json.loads(v) if v else None

        return cls(
            id=row["id"],
            seq=row["seq"],
            kind=row["kind"],
            params=js(row["params"]) or {},
            status=JobStatus(row["status"]),
            created=row["created"],
            started=row["started"],
            finished=row["finished"],
            estimate=js(row["estimate"]),
            peak_bytes=row["peak_bytes"],
            error=row["error"],
            traceback=row["traceback"],
            result=js(row["result"]),
            wait_reason=row["wait_reason"],
            progress=row["progress"],
            message=row["message"],
            owner=row["owner"],
            resume_of=row["resume_of"],
            budget_bytes=row["budget_bytes"],
            resolved=js(row["resolved"]),
            device_pin=row["device_pin"],
            device=row["device"],
        )

    @property
    def estimate_bytes(self) -> int | None:
        return self.estimate["total"] if self.estimate else None
