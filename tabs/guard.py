"""A request guard in front of Gradio: files go in only as uploads, and come out only from Gradio's cache.

- Gradio's file route serves any file under `allowed_paths` by its path. The studio lets handlers return files from
  run folders (Gradio copies each into its cache under a random name first), so the run folders are allowed; the
  guard refuses the route for anything outside the cache, so no one reads a run's events or card by its path.
- Gradio accepts a FileData whose `path` is any server path (`{"path": "/etc/shadow", "meta": {"_type":
"gradio.FileData"}}`) and copies that file into its upload folder, from where the handler, and the file route,
hand it back. No one needs that, the admin included (the admin names server paths in text fields), so every JSON
  request that carries a FileData pointing outside the upload folder is refused before Gradio reads it.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any
from urllib.parse import unquote

MAX_BODY = 64 * 2**20  # a JSON call bigger than this is not one the UI makes


def outside(value: Any, upload_dir: str) -> str | None:  # noqa: C901 (a walk over any JSON shape)
    """The first FileData path in `value` that lies outside `upload_dir` (URLs are Gradio's to fetch), or None."""
    if isinstance(value, dict):
        meta = value.get("meta")
        path = value.get("path")
        if isinstance(meta, dict) and meta.get("_type") == "gradio.FileData" and isinstance(path, str):
            if not path.startswith(("http://", "https://", "data:")):
                real = os.path.realpath(path)
                if not (real == upload_dir or real.startswith(upload_dir + os.sep)):
                    return path
        items = value.values()
    elif isinstance(value, list):
        items = value
    else:
        return None
    for item in items:
        found = outside(item, upload_dir)
        if found:
            return found
    return None


class UploadsOnly:
    """ASGI middleware: refuse JSON calls that name a server file as an upload (400, with the reason)."""

    def __init__(self, app, upload_dir: str | Path):
        self.app = app
        self.upload_dir = os.path.realpath(upload_dir)

    def _inside(self, path: str) -> bool:
        real = os.path.realpath(path)
        return real == self.upload_dir or real.startswith(self.upload_dir + os.sep)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        route = unquote(scope.get("path", ""))
        if "/file=" in route:  # /gradio_api/file=<path>: Gradio's cache only
            if not self._inside(route.split("/file=", 1)[1]):
                return await _refuse(send, 403, "not a file this studio hands out")
            return await self.app(scope, receive, send)
        if scope.get("method") != "POST":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        if b"json" not in headers.get(b"content-type", b""):
            return await self.app(scope, receive, send)  # uploads themselves are multipart: Gradio stores them
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return await self.app(scope, receive, send)
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
            if size > MAX_BODY:
                return await _refuse(send, 413, "request too large")
        body = b"".join(chunks)
        try:
            bad = outside(json.loads(body or b"null"), self.upload_dir)
        except ValueError:
            bad = None  # not JSON after all: Gradio answers it
        if bad:
            return await _refuse(send, 400, f"{bad} was not uploaded: files reach the studio only as uploads")
        sent = False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)


async def _refuse(send, status: int, detail: str) -> None:
    payload = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]})
    await send({"type": "http.response.body", "body": payload})
