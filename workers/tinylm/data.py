"""Tiny LM data: Python code from the standard library (on every machine), TinyShakespeare (downloaded on first use),
a user's text file or folder of code, and the two tokenizers."""
from __future__ import annotations

import hashlib
import json
import os
import urllib.request
from pathlib import Path
from typing import Callable

TINYSHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
TINYSHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
TEXT_SUFFIXES = {
    ".txt", ".md", ".rst", ".py", ".js", ".ts", ".tsx", ".jsx", ".c", ".h", ".cc", ".cpp", ".hpp", ".rs", ".go",
    ".java", ".kt", ".rb", ".sh", ".lua", ".html", ".css", ".json", ".yaml", ".yml", ".toml", ".tex", ".csv", ".sql",
}
MAX_FILE_BYTES = 50 * 2**20  # a single file larger than this is not a tiny LM corpus
# The default corpus, on disk wherever Python runs: 31 well-written pure-Python modules of the standard library,
# about 1.06 MB (TinyShakespeare is 1.1 MB), so the presets' schedules and the first click work offline.
PYTHON_STDLIB = "python-stdlib"
STDLIB_MODULES = (
    "abc", "argparse", "bisect", "calendar", "contextlib", "copy", "csv", "dataclasses", "difflib", "enum",
    "fractions", "functools", "glob", "heapq", "json/__init__", "json/decoder", "json/encoder", "operator", "pathlib",
    "pprint", "queue", "random", "shlex", "shutil", "statistics", "string", "tempfile", "textwrap", "threading",
    "tokenize", "typing",
)


def stdlib_files() -> list[Path]:
    """The default corpus's files, in order: those of STDLIB_MODULES this Python has (a stripped-down install may
    lack some; it must keep a few)."""
    import sysconfig

    root = Path(sysconfig.get_paths()["stdlib"])
    files = [root / f"{m}.py" for m in STDLIB_MODULES if (root / f"{m}.py").is_file()]
    if len(files) < 5:
        raise ValueError(f"this Python's standard library sources are missing from {root} (a stripped-down "
                         "install?): choose TinyShakespeare, a text file or a folder of your own")
    return files


def ensure_tinyshakespeare(datasets_dir: Path, progress: Callable[[int, int | None, str], None]) -> Path:
    """The corpus in the data folder, downloaded once with progress and checked against its sha256."""
    path = Path(datasets_dir) / "tinyshakespeare.txt"
    if path.exists() and hashlib.sha256(path.read_bytes()).hexdigest() == TINYSHAKESPEARE_SHA256:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    part = path.with_suffix(".part")
    try:
        with urllib.request.urlopen(TINYSHAKESPEARE_URL, timeout=20) as r, open(part, "wb") as f:
            total = int(r.headers.get("Content-Length") or 0) or None
            done = 0
            while chunk := r.read(1 << 16):
                f.write(chunk)
                done += len(chunk)
                progress(done, total, "downloading TinyShakespeare")
    except OSError as e:
        part.unlink(missing_ok=True)
        raise RuntimeError(
            f"Could not download TinyShakespeare ({e}). If this machine is offline, save input.txt from "
            f"{TINYSHAKESPEARE_URL} as {path}, or set data to a text file or folder of your own."
        ) from None
    digest = hashlib.sha256(part.read_bytes()).hexdigest()
    if digest != TINYSHAKESPEARE_SHA256:
        part.unlink(missing_ok=True)
        raise RuntimeError(f"TinyShakespeare download is corrupt (sha256 {digest[:12]}…); try again.")
    os.replace(part, path)
    return path


def _decode(path: Path, data: bytes) -> str:
    if b"\x00" in data:  # NUL never appears in text files
        raise ValueError(f"{path.name} is a binary file, not text: choose a text file or a folder of code")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path.name} is not UTF-8 text (undecodable byte at offset {e.start}): "
                         "save it as UTF-8 or choose another file") from None


def check_path(data: str) -> None:
    """Cheap checks at submit time: the path exists and its start looks like text."""
    if data == PYTHON_STDLIB:
        stdlib_files()
        return
    if data == "tinyshakespeare":
        return
    path = Path(data).expanduser()
    if not path.exists():
        raise ValueError(f"data path not found: {path}")
    if path.is_file():
        if path.stat().st_size == 0:
            raise ValueError(f"{path.name} is empty: a tiny LM needs some text to learn from")
        if path.stat().st_size > MAX_FILE_BYTES:
            raise ValueError(f"{path.name} is {path.stat().st_size / 2**20:.0f} MiB; the limit is "
                             f"{MAX_FILE_BYTES // 2**20} MiB")
        with open(path, "rb") as f:
            head = f.read(65536)
        _decode(path, head[: len(head) - 4] if len(head) == 65536 else head)  # don't split a UTF-8 char


def load_text(data: str, datasets_dir: Path, progress) -> tuple[str, str]:
    """(text, description) for `data`: "python-stdlib", "tinyshakespeare", a text file, or a folder of text/code
    files."""
    if data == PYTHON_STDLIB:
        files = stdlib_files()
        text = "\n\n".join(f.read_text(encoding="utf-8") for f in files)
        return text, f"Python standard library ({len(files)} modules)"
    if data == "tinyshakespeare":
        path = ensure_tinyshakespeare(datasets_dir, progress)
        return path.read_text(encoding="utf-8"), "TinyShakespeare"
    path = Path(data).expanduser()
    check_path(data)
    if path.is_file():
        text = _decode(path, path.read_bytes())
        if not text.strip():
            raise ValueError(f"{path.name} holds only whitespace: a tiny LM needs some text to learn from")
        return text, path.name
    parts, skipped = [], 0
    for f in sorted(path.rglob("*")):
        if any(s.startswith(".") for s in f.relative_to(path).parts) or not f.is_file():
            continue
        if f.suffix.lower() not in TEXT_SUFFIXES or f.stat().st_size > MAX_FILE_BYTES:
            skipped += 1
            continue
        try:
            parts.append(_decode(f, f.read_bytes()))
        except ValueError:
            skipped += 1
    text = "\n\n".join(p for p in parts if p.strip())
    if not text:
        raise ValueError(f"no text files found in {path} (looked for {', '.join(sorted(TEXT_SUFFIXES)[:8])}, …)")
    return text, f"{path.name}/ ({len(parts)} files, {skipped} skipped)"


class CharTokenizer:
    kind = "char"

    def __init__(self, chars: list[str]):
        self.chars = chars
        self.stoi = {c: i for i, c in enumerate(chars)}

    @classmethod
    def train(cls, text: str) -> "CharTokenizer":
        return cls(sorted(set(text)))

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> list[int]:
        unknown = sorted({c for c in text if c not in self.stoi})
        if unknown:
            shown = "".join(unknown[:10])
            raise ValueError(f"the text has characters the model never saw in training: {shown!r}")
        return [self.stoi[c] for c in text]

    def decode(self, ids) -> str:
        return "".join(self.chars[i] for i in ids)

    def to_json(self) -> dict:
        return {"type": "char", "chars": self.chars}


class BpeTokenizer:
    """Byte-level BPE (GPT-2 style) trained on the corpus with the `tokenizers` library."""

    kind = "bpe"

    def __init__(self, tok):
        self.tok = tok

    @classmethod
    def train(cls, text: str, vocab_size: int) -> "BpeTokenizer":
        from tokenizers import ByteLevelBPETokenizer

        tok = ByteLevelBPETokenizer()
        tok.train_from_iterator([text[i : i + (1 << 20)] for i in range(0, len(text), 1 << 20)], vocab_size=vocab_size,
                                min_frequency=2, show_progress=False)
        return cls(tok)

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text).ids

    def decode(self, ids) -> str:
        return self.tok.decode(list(ids))

    def to_json(self) -> dict:
        return {"type": "bpe", "tokenizer": self.tok.to_str()}


def tokenizer_from_json(d: dict):
    if d["type"] == "char":
        return CharTokenizer(d["chars"])
    from tokenizers import Tokenizer

    return BpeTokenizer(Tokenizer.from_str(d["tokenizer"]))


def save_tokenizer(tok, path: Path) -> None:
    Path(path).write_text(json.dumps(tok.to_json()))


def load_tokenizer(path: Path):
    return tokenizer_from_json(json.loads(Path(path).read_text()))
