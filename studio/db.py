"""One way to open the studio's SQLite files: a connection per use, WAL, safe across threads and processes."""
from __future__ import annotations

import sqlite3
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def init(path: Path, schema: str) -> Path:
    """Create the file's folder and tables (idempotent); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with connect(path) as c:
        c.executescript(schema)
    return path


@contextmanager
def connect(path: Path, timeout: float = 30.0) -> Iterator[sqlite3.Connection]:
    """A connection; `timeout` is how long a write waits for another writer before it fails."""
    # A connection per call is cheap, and needs no sharing between threads or the CLI and server processes.
    conn = sqlite3.connect(path, timeout=timeout, isolation_level=None)
    conn.row_factory = sqlite3.Row
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("PRAGMA foreign_keys=ON")
    try:
        yield conn
    finally:
        conn.close()
