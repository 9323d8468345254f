"""Chat conversations, kept in SQLite beside the job store: reopen, rename, delete, export as Markdown."""
from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from typing import Any

from .db import connect, init

SCHEMA = """
CREATE TABLE IF NOT EXISTS conversations (
    id TEXT PRIMARY KEY, title TEXT NOT NULL, created REAL NOT NULL, updated REAL NOT NULL,
    owner TEXT, settings TEXT
);
CREATE TABLE IF NOT EXISTS messages (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, conversation TEXT NOT NULL, role TEXT NOT NULL, content TEXT NOT NULL,
    created REAL NOT NULL, meta TEXT,
    FOREIGN KEY (conversation) REFERENCES conversations(id) ON DELETE CASCADE
);
CREATE INDEX IF NOT EXISTS messages_conv ON messages(conversation, seq);
"""


class Conversations:
    def __init__(self, path: Path):
        self.path = init(path, SCHEMA)

    def _conn(self):
        return connect(self.path)

    def create(self, title: str = "New chat", owner: str | None = None, settings: dict | None = None) -> str:
        cid = uuid.uuid4().hex[:10]
        now = time.time()
        with self._conn() as c:
            c.execute("INSERT INTO conversations VALUES (?,?,?,?,?,?)",
                      (cid, title, now, now, owner, json.dumps(settings or {})))
        return cid

    def list(self, owner: str | None = None) -> list[dict[str, Any]]:
        sql, args = "SELECT * FROM conversations", []
        if owner is not None:
            sql, args = sql + " WHERE owner=?", [owner]
        with self._conn() as c:
            return [dict(r) for r in c.execute(sql + " ORDER BY updated DESC", args)]

    def get(self, cid: str) -> dict[str, Any]:
        with self._conn() as c:
            row = c.execute("SELECT * FROM conversations WHERE id=?", (cid,)).fetchone()
            if row is None:
                raise KeyError(f"no conversation {cid!r}")
            msgs = [{"role": m["role"], "content": m["content"], "meta": json.loads(m["meta"] or "{}")}
                    for m in c.execute("SELECT * FROM messages WHERE conversation=? ORDER BY seq", (cid,))]
        return {**dict(row), "messages": msgs}

    def add(self, cid: str, role: str, content: str, meta: dict | None = None) -> None:
        now = time.time()
        with self._conn() as c:
            c.execute("INSERT INTO messages (conversation, role, content, created, meta) VALUES (?,?,?,?,?)",
                      (cid, role, content, now, json.dumps(meta or {})))
            c.execute("UPDATE conversations SET updated=? WHERE id=?", (now, cid))

    def truncate(self, cid: str, keep: int) -> None:
        """Keep only the first `keep` messages (Regenerate, Continue and Edit replace the last exchange)."""
        with self._conn() as c:
            seqs = [r["seq"] for r in c.execute("SELECT seq FROM messages WHERE conversation=? ORDER BY seq", (cid,))]
            c.executemany("DELETE FROM messages WHERE seq=?", [(q,) for q in seqs[keep:]])
            c.execute("UPDATE conversations SET updated=? WHERE id=?", (time.time(), cid))

    def rename(self, cid: str, title: str) -> None:
        if not title.strip():
            raise ValueError("a conversation needs a title")
        with self._conn() as c:
            c.execute("UPDATE conversations SET title=? WHERE id=?", (title.strip(), cid))

    def delete(self, cid: str) -> None:
        with self._conn() as c:
            c.execute("DELETE FROM conversations WHERE id=?", (cid,))

    def to_markdown(self, cid: str) -> str:
        conv = self.get(cid)
        out = [f"# {conv['title']}", ""]
        for m in conv["messages"]:
            out += [f"**{m['role']}**:", "", m["content"], ""]
            for i, s in enumerate(m["meta"].get("sources") or [], start=1):
                out.append(f"- [{i}] {s['where']}")
            if m["meta"].get("sources"):
                out.append("")
        return "\n".join(out)
