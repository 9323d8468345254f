"""The durable job store: SQLite in WAL mode, one row per job, safe to share between processes."""
from __future__ import annotations

import json
import secrets
import sqlite3
import time
from pathlib import Path
from typing import Any

from .db import connect, init
from .jobs import Job, JobStatus

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT UNIQUE NOT NULL,
    kind TEXT NOT NULL,
    params TEXT NOT NULL,
    status TEXT NOT NULL,
    created REAL NOT NULL,
    started REAL,
    finished REAL,
    estimate TEXT,
    peak_bytes INTEGER,
    error TEXT,
    traceback TEXT,
    result TEXT,
    wait_reason TEXT,
    progress REAL,
    message TEXT,
    owner TEXT,
    resume_of TEXT,
    budget_bytes INTEGER,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    resolved TEXT,
    device_pin INTEGER,
    device INTEGER
);
CREATE INDEX IF NOT EXISTS jobs_status ON jobs(status, seq);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


class Store:
    """Jobs and a few flags (queue paused, clean shutdown) in `<data_dir>/studio.db`."""

    timeout_s = 30.0  # how long a write waits for another process's write before it fails

    def __init__(self, path: Path):
        self.path = init(path, SCHEMA)
        with self._conn() as c:  # a store made by an older version gains the columns added since
            cols = {r[1] for r in c.execute("PRAGMA table_info(jobs)")}
            for name, sql_type in (("resolved", "TEXT"), ("device_pin", "INTEGER"), ("device", "INTEGER")):
                if name in cols:
                    continue
                try:
                    c.execute(f"ALTER TABLE jobs ADD COLUMN {name} {sql_type}")
                except sqlite3.OperationalError as e:  # another process added it first
                    if "duplicate column" not in str(e):
                        raise

    def _conn(self):
        return connect(self.path, self.timeout_s)

    # ---- jobs -------------------------------------------------------------
    def add(
        self,
        kind: str,
        params: dict[str, Any],
        status: JobStatus,
        *,
        estimate: dict | None = None,
        error: str | None = None,
        owner: str | None = None,
        resume_of: str | None = None,
        budget_bytes: int | None = None,
        resolved: dict[str, Any] | None = None,
        device_pin: int | None = None,
        device: int | None = None,
    ) -> Job:
        """A new job row. `params` are what was asked; `resolved` what `fit` made of them (None: the same)."""
        job_id = secrets.token_hex(8)  # 64 random bits: unguessable, and no collisions however fast jobs come
        now = time.time()
        with self._conn() as c:
            c.execute(
                "INSERT INTO jobs (id, kind, params, status, created, estimate, error, owner, resume_of,"
                " budget_bytes, finished, resolved, device_pin, device) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (
                    job_id,
                    kind,
                    json.dumps(params),
                    status.value,
                    now,
                    json.dumps(estimate) if estimate else None,
                    error,
                    owner,
                    resume_of,
                    budget_bytes,
                    now if status.final else None,
                    json.dumps(resolved) if resolved is not None and resolved != params else None,
                    device_pin,
                    device,
                ),
            )
        return self.get(job_id)

    def get(self, job_id: str) -> Job:
        with self._conn() as c:
            row = c.execute("SELECT * FROM jobs WHERE id=?", (job_id,)).fetchone()
        if row is None:
            raise KeyError(f"no job with id {job_id!r}")
        return Job.from_row(row)

    def list(self, limit: int = 200, owner: str | None = None, kind: str | None = None) -> list[Job]:
        sql, args = "SELECT * FROM jobs WHERE 1=1", []
        if owner is not None:
            sql += " AND owner=?"
            args.append(owner)
        if kind is not None:
            sql += " AND kind=?"
            args.append(kind)
        sql += " ORDER BY seq DESC LIMIT ?"
        args.append(limit)
        with self._conn() as c:
            return [Job.from_row(r) for r in c.execute(sql, args)]

    def queued(self) -> list[Job]:
        """Queued jobs in submission order."""
        with self._conn() as c:
            rows = c.execute("SELECT * FROM jobs WHERE status=? ORDER BY seq", (JobStatus.QUEUED.value,))
            return [Job.from_row(r) for r in rows]

    def with_status(self, status: JobStatus) -> list[Job]:
        with self._conn() as c:
            return [Job.from_row(r) for r in c.execute("SELECT * FROM jobs WHERE status=? ORDER BY seq", (status.value,))]

    def update(self, job_id: str, **fields: Any) -> None:
        if not fields:
            return
        cols, args = [], []
        for k, v in fields.items():
            if isinstance(v, JobStatus):
                v = v.value
            elif isinstance(v, (dict, list)):
                v = json.dumps(v)
            cols.append(f"{k}=?")
            args.append(v)
        args.append(job_id)
        with self._conn() as c:
            c.execute(f"UPDATE jobs SET {', '.join(cols)} WHERE id=?", args)

    def transition(self, job_id: str, frm: tuple[JobStatus, ...], to: JobStatus, **fields: Any) -> bool:
        """Move a job to `to` only if it is in one of `frm`; returns whether it moved (one final state per job)."""
        sets = ["status=?"] + [f"{k}=?" for k in fields]
        args: list[Any] = [to.value]
        for v in fields.values():
            args.append(json.dumps(v) if isinstance(v, (dict, list)) else v)
        marks = ",".join("?" * len(frm))
        args += [job_id, *[s.value for s in frm]]
        with self._conn() as c:
            cur = c.execute(f"UPDATE jobs SET {', '.join(sets)} WHERE id=? AND status IN ({marks})", args)
            return cur.rowcount == 1

    def start(self, job_id: str, **fields: Any) -> bool:
        """QUEUED -> RUNNING unless a cancel was requested: a cancel recorded first always wins."""
        sets = ["status=?", "wait_reason=NULL"] + [f"{k}=?" for k in fields]
        args = [JobStatus.RUNNING.value, *fields.values(), job_id, JobStatus.QUEUED.value]
        with self._conn() as c:
            cur = c.execute(f"UPDATE jobs SET {', '.join(sets)} WHERE id=? AND status=? AND cancel_requested=0", args)
            return cur.rowcount == 1

    def request_cancel(self, job_id: str) -> None:
        with self._conn() as c:
            c.execute("UPDATE jobs SET cancel_requested=1 WHERE id=?", (job_id,))

    def cancel_requested(self, job_id: str) -> bool:
        with self._conn() as c:
            row = c.execute("SELECT cancel_requested FROM jobs WHERE id=?", (job_id,)).fetchone()
        return bool(row and row[0])

    # ---- flags ------------------------------------------------------------
    def get_meta(self, key: str, default: str | None = None) -> str | None:
        with self._conn() as c:
            row = c.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return row[0] if row else default

    def set_meta(self, key: str, value: str) -> None:
        with self._conn() as c:
            c.execute("INSERT INTO meta(key, value) VALUES(?,?) ON CONFLICT(key) DO UPDATE SET value=excluded.value",
                      (key, value))

    @property
    def paused(self) -> bool:
        return self.get_meta("queue_paused", "0") == "1"

    def set_paused(self, paused: bool, reason: str = "") -> None:
        self.set_meta("queue_paused", "1" if paused else "0")
        self.set_meta("pause_reason", reason if paused else "")
