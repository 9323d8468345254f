"""Who may do what on a shared studio.

Two roles. The person at the machine (no auth: localhost) and the admin (the first user of the auth file, or
`--admin NAME`) may do everything: name any server path, trust a pickle, change settings, pause the queue, unload
models. Everyone else is a *remote user* (any other login under --listen or --share) and works only with what they
uploaded and what they own:
- a param that names a server path (each kind lists them in `PATHS`) must point inside the user's own upload
  folder or the run folder of a job they own; a bare name (a preset, `yolov8n.yaml`, `tinyshakespeare`) is not a
  path and is resolved by the kind as before;
- a job id given as a param (a checkpoint, weights to resume) must be one of their jobs;
- a collection (`collection` params) must be theirs, or new;
- `trust` (load a pickle the studio did not write) and any param a kind lists in `ADMIN_ONLY` are refused.
The core checks all of this at submit (`check`), so the UI, the API and scripts get the same answer.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]")


@dataclass(frozen=True)
class User:
    """A request's user: `name` None is the person at the machine (no auth)."""

    name: str | None = None
    admin: bool = True

    @property
    def remote(self) -> bool:
        return not self.admin


LOCAL = User()


class Forbidden(ValueError):
    """What a remote user may not do; the message says what they may do instead."""


def user_dir(users_dir: Path, name: str) -> Path:
    """A user's own folder of uploads (outside the folder Gradio serves: files leave it only through a handler)."""
    return Path(users_dir) / SAFE_NAME.sub("_", name)


def _inside(path: Path, roots: list[Path]) -> bool:
    real = Path(os.path.realpath(path))
    return any(real == r or r in real.parents for r in (Path(os.path.realpath(x)) for x in roots))


def looks_like_path(value: str) -> bool:
    """A value that names a file or folder rather than a preset or a job: it has a separator, starts with ~ or .,
    or names something that exists (relative to the working folder)."""
    v = value.strip()
    return bool(v) and ("/" in v or "\\" in v or v.startswith(("~", ".")) or Path(v).exists())


def check(studio, kind: str, module: Any, params: dict[str, Any], user: User) -> None:
    """Raise Forbidden when a remote user's params reach outside what they own; do nothing for the admin."""
    if not user.remote:
        return
    who = user.name
    if params.get("trust") in (True, "true", "True", "1", 1):
        raise Forbidden("Only the studio's admin may load a file the studio did not write (trust). Use a preset, "
                        "a .yaml architecture, or weights one of your own jobs wrote.")
    for name in getattr(module, "ADMIN_ONLY", ()):
        if params.get(name) not in (None, "", False):
            raise Forbidden(f"{name} is for the studio's admin only.")
    roots = [user_dir(studio.config.users_dir, who)]
    for name in getattr(module, "PATHS", ()):
        value = params.get(name)
        if not isinstance(value, str) or not value.strip():
            continue
        split = getattr(module, "path_items", None)  # a kind whose param lists several (paint's `loras`)
        items = split(name, value) if split else value.splitlines()
        for item in [v for v in items if v.strip()] or [value]:
            _check_value(studio, kind, name, item.strip(), who, roots)
    if params.get("collection"):
        _check_collection(studio, params["collection"], who)
    if params.get("conversation") not in (None, "", "new"):
        _check_conversation(studio, params["conversation"], who)


def _check_value(studio, kind: str, param: str, value: str, who: str, roots: list[Path]) -> None:
    job = _job(studio, value)
    if job is not None:
        if job.owner != who:
            raise Forbidden(f"{param}: job {value} is not one of yours.")
        return
    if not looks_like_path(value):
        return  # a name the kind resolves itself: a preset, a model yaml, a built-in corpus
    path = Path(value).expanduser()
    if _inside(path, roots):
        return
    runs = Path(os.path.realpath(studio.config.runs_dir))
    real = Path(os.path.realpath(path))
    if runs in real.parents:  # runs/<job id>/…: hers when the job is
        job = _job(studio, real.relative_to(runs).parts[0])
        if job is not None and job.owner == who:
            return
    raise Forbidden(f"{param}: {value} is not in your uploads or your jobs' folders. Upload the file (or pick one "
                    "of your jobs) instead of naming a path on the server.")


def _job(studio, value: str):
    if not re.fullmatch(r"[0-9a-f]{16}|\d{4}-\d{6}-[0-9a-f]{4}", value):
        return None
    try:
        return studio.store.get(value)
    except KeyError:
        return None


def _check_collection(studio, name: str, who: str) -> None:
    from workers.rag.index import load_manifest

    manifest = load_manifest(studio.config.data_dir, name)
    if manifest is None:
        return  # a new one: it will be theirs
    if manifest.get("owner") != who:
        raise Forbidden(f"collection {name!r} belongs to another user; pick one of yours, or ingest into a new name.")


def _check_conversation(studio, cid: str, who: str) -> None:
    from .conversations import Conversations

    try:
        owner = Conversations(studio.config.data_dir / "chat.db").get(cid)["owner"]
    except KeyError:
        raise Forbidden(f"no conversation {cid!r}") from None
    if owner != who:
        raise Forbidden(f"conversation {cid} is not one of yours.")
