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
