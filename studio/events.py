"""Per-job event log: `runs/<id>/events.jsonl`, appended by the worker and the scheduler, tailed by readers."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any


def append(run_dir: Path, type: str, **data: Any) -> dict:
    event = {"t": time.time(), "type": type, **data}
    line = json.dumps(event, default=str) + "\n"
    # One write on an O_APPEND descriptor: lines from the worker and the scheduler never interleave.
    path = Path(run_dir) / "events.jsonl"
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    except FileNotFoundError:  # the run folder was removed (by hand, or a clean-up): make it again
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)
    return event


def read(run_dir: Path, offset: int = 0) -> tuple[list[dict], int]:
    """Events written since byte `offset`, and the offset to read from next time."""
    path = Path(run_dir) / "events.jsonl"
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read()
    except FileNotFoundError:
        return [], offset
    end = data.rfind(b"\n") + 1  # leave a half-written last line for the next read
    events = [json.loads(line) for line in data[:end].splitlines() if line.strip()]
    return events, offset + end
