"""Small helpers the tabs share: formatting, reading a job's events into plot rows, the request's user."""
from __future__ import annotations

import html
import time
from typing import Any


def stash_uploads(studio, files, prefix: str) -> str:
    """Uploaded files as one path: the file itself, or a new folder of them in the studio's uploads."""
    import shutil
    from pathlib import Path

    paths = [Path(f if isinstance(f, str) else f.name) for f in files or []]
    if len(paths) == 1:
        return str(paths[0])
    dest = studio.config.uploads_dir / f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}"
    dest.mkdir(parents=True, exist_ok=True)
    for p in paths:
        shutil.copy(p, dest / p.name)
    return str(dest)


def owned_job(studio, job_id: str, owner: str | None):
    """The job, when it exists and (with auth) belongs to `owner`; otherwise a gr.Error that says why."""
    import gradio as gr

    job_id = (job_id or "").strip()
    if not job_id:
        raise gr.Error("Pick or enter a job first.")
    try:
        job = studio.job(job_id)
    except KeyError:
        raise gr.Error(f"No job {job_id}.") from None
    if owner is not None and job.owner != owner:
        raise gr.Error(f"Job {job_id} belongs to another user.")
    return job


def watch(studio, job, every: float = 0.2):
    """Yield a job's row until it is final (the last one yielded is final): for handlers that stream status."""
    while not (job := studio.job(job.id)).status.final:
        yield job
        time.sleep(every)
    yield job


def gib(b: float | None) -> str:
    return "—" if b is None else f"{b / 2**30:.2f} GiB"


def user_of(request: Any, auth: bool) -> str | None:
    """The logged-in user when the studio runs with auth (jobs are then scoped to their owner)."""
    return getattr(request, "username", None) if auth and request is not None else None


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else \
        f"{seconds // 60}:{seconds % 60:02d}"


def progress_html(job, eta_s: float | None = None) -> str:
    """A job's status line with a progress bar, the wait reason or the error."""
    frac = job.progress or 0.0
    head = f"<b>{html.escape(job.kind)}</b> job <code>{job.id}</code> — <b>{job.status.value}</b>"
    parts = [head]
    if job.status.value == "RUNNING":
        eta = f" · ETA {duration(eta_s)}" if eta_s else ""
        parts.append(f"<div class='job-progress'><div style='width:{100 * frac:.1f}%'></div></div>"
                     f"{100 * frac:.0f}% · {html.escape(job.message or '')}{eta}")
    if job.wait_reason and job.status.value == "QUEUED":
        parts.append(html.escape(job.wait_reason))
    if job.error:
        parts.append(f"<span style='color:#b91c1c'>{html.escape(job.error)}</span>")
    return "<br>".join(parts)


def eta(job) -> float | None:
    if job.status.value != "RUNNING" or not job.started or not job.progress or job.progress <= 0:
        return None
    elapsed = time.time() - job.started
    return elapsed * (1 - job.progress) / job.progress


def loss_frame(events: list[dict], keys: tuple[str, ...] = ("train_loss", "val_loss")):
    """Long-format (step, loss, series) rows of a job's metric events, for a gr.LinePlot."""
    import pandas as pd

    rows = [{"step": e["step"], "loss": e[k], "series": k}
            for e in events if e["type"] == "metric" for k in keys if e.get(k) is not None]
    # explicit dtypes: an empty frame must still read as numbers, or the plot draws its axes as categories
    return pd.DataFrame(rows, columns=["step", "loss", "series"]).astype({"step": "int64", "loss": "float64"})
