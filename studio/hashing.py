"""The sha256 of a file, read in blocks: what the studio records for files it wrote and checks before it loads them
again (Detect's weights, fine-tune checkpoints)."""
import hashlib
from pathlib import Path


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
