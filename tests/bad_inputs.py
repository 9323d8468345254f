"""Bad inputs, made in code and small on disk: empty and truncated files, text under a binary format's name, sparse
files over a size cap, text that is not UTF-8, malformed JSONL, hostile zips (a path out of the folder, a link, a
bomb, a zip in a zip), dangling links, broken GGUF headers and Tiny LM checkpoints. tests/test_bad_inputs.py runs them
through the CLI, gradio_client and the Studio."""
from __future__ import annotations

import io
import json
import random
import shutil
import struct
import wave
import zipfile
from pathlib import Path

TEXT = "This is plain text, not the format the file's name says.\n"
LATIN1 = "Caf\u00e9 M\u00fcller, na\u00efve fa\u00e7ade: \u00bfqu\u00e9 tal?\n" * 20  # encoded as latin-1 below


def empty(path: Path) -> Path:
    path.write_bytes(b"")
    return path


def text_as(path: Path, text: str = TEXT) -> Path:
    """Plain text under the name of another format (.wav, .png, .gguf, .zip, .pt, …)."""
    path.write_text(text)
    return path


def latin1(path: Path) -> Path:
    """Text in latin-1, which is not valid UTF-8 (é is one byte, 0xE9)."""
    path.write_bytes(LATIN1.encode("latin-1"))
    return path


def random_bytes(path: Path, n: int = 4096, seed: int = 0) -> Path:
    path.write_bytes(random.Random(seed).randbytes(n))
    return path


def sparse(path: Path, size: int) -> Path:
    """A file of `size` zero bytes that takes no disk (a hole)."""
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def truncated(path: Path, data: bytes, keep: int | float = 0.5) -> Path:
    """The first part of a valid file: `keep` bytes, or that fraction of them."""
    n = keep if isinstance(keep, int) else int(len(data) * keep)
    path.write_bytes(data[:n])
    return path


def dangling_link(path: Path) -> Path:
    """A symbolic link whose target does not exist."""
    path.symlink_to(path.parent / f"gone-{path.name}")
    return path


# ---- valid small files to spoil -------------------------------------------------------------------------------------
def wav_bytes(seconds: float = 1.0, rate: int = 16000) -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(b"\0\0" * int(rate * seconds))
    return buf.getvalue()


def png_bytes(size: int = 64, seed: int = 0) -> bytes:
    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    noise = np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)  # barely compressible
    Image.fromarray(noise).save(buf, "PNG")
    return buf.getvalue()


def zip_bytes(files: dict[str, str | bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in files.items():
            z.writestr(name, data)
    return buf.getvalue()


def pdf_bytes() -> bytes:
    from rag_fixtures import make_pdf

    import tempfile

    with tempfile.TemporaryDirectory() as d:
        return make_pdf(Path(d) / "x.pdf", ["A page of notes.", "Another line of them."]).read_bytes()


# ---- hostile zips ---------------------------------------------------------------------------------------------------
def zip_slip(path: Path) -> Path:
    """An entry that climbs out of the extraction folder."""
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("notes/ok.md", "# fine\n")
        z.writestr("../../evil.md", "# escaped\n")
    return path


def zip_symlink(path: Path, target: str = "/etc/passwd") -> Path:
    """An entry that is a symbolic link (unix mode 0o120777), pointing outside."""
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("notes/ok.md", "# fine\n")
        info = zipfile.ZipInfo("notes/passwd.md")
        info.external_attr = 0o120777 << 16
        z.writestr(info, target)
    return path


def zip_bomb(path: Path, mib: int = 256) -> Path:
    """`mib` MiB of zeros deflated to a few hundred KB: over the ratio limit."""
    block = bytes(2**20)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z, z.open("zeros.md", "w") as f:
        for _ in range(mib):
            f.write(block)
    return path


def zip_nested(path: Path, inner: dict[str, str] | None = None) -> Path:
    """A zip whose only entry is another zip (of notes, or of a dataset): nothing usable at the top."""
    inner = inner or {"notes/a.md": "# A\nsome text\n", "data.yaml": "names: [a]\ntrain: images\nval: images\n"}
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("inner.zip", zip_bytes(inner))
    return path


def zip_declaring(path: Path, total: int, per: int = 0xFFFFFFF0) -> Path:
    """A small zip whose central directory declares `total` bytes or more of content (sizes rewritten)."""
    n = total // per + 1
    with zipfile.ZipFile(path, "w") as z:
        for i in range(n):
            z.writestr(f"part{i}.md", "x")
    declare_sizes(path, per)
    return path


def declare_sizes(path: Path, size: int) -> None:
    """Set every entry's uncompressed size in the zip's central directory to `size` (below the ZIP64 marker)."""
    data = bytearray(path.read_bytes())
    at = data.find(b"PK\x01\x02")
    while at != -1:
        struct.pack_into("<I", data, at + 24, size)  # the central directory header's uncompressed size
        at = data.find(b"PK\x01\x02", at + 4)
    path.write_bytes(bytes(data))


# ---- JSONL --------------------------------------------------------------------------------------------------------
GOOD_ROW = {"question": "How many hours of sun do tomatoes need?", "answer": "Six.", "source": "garden.md"}


def jsonl(path: Path, lines: list) -> Path:
    """Lines as given: a str is written as is, anything else as JSON."""
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return path


def jsonl_bad_line(path: Path) -> Path:
    return jsonl(path, [GOOD_ROW, '{"question": "unfinished", "source": ', GOOD_ROW])


def jsonl_missing_keys(path: Path) -> Path:
    return jsonl(path, [GOOD_ROW, {"question": "Where is the backup script?"}])


def jsonl_wrong_types(path: Path) -> Path:
    return jsonl(path, [GOOD_ROW, {"question": 42, "answer": ["six"], "source": {"file": "garden.md"}}])


def jsonl_not_objects(path: Path) -> Path:
    return jsonl(path, [GOOD_ROW, [1, 2, 3], "17"])


# ---- GGUF ---------------------------------------------------------------------------------------------------------
def _gguf_string(s: str | bytes) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    return struct.pack("<Q", len(b)) + b


def gguf_header(n_kv: int | None = None, version: int = 3, kv: dict[str, str] | None = None) -> bytes:
    """A GGUF header: magic, version, tensor count 0, and string key/values (type 8)."""
    kv = kv if kv is not None else {"general.architecture": "llama", "general.name": "bad-input"}
    body = b"".join(_gguf_string(k) + struct.pack("<I", 8) + _gguf_string(v) for k, v in kv.items())
    return b"GGUF" + struct.pack("<IQQ", version, 0, len(kv) if n_kv is None else n_kv) + body


def gguf_absurd_string(path: Path) -> Path:
    """A header whose first key claims to be 2**60 bytes long."""
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", 2**60) + b"general.architecture")
    return path


def gguf_cut(path: Path) -> Path:
    """A header that promises 5 key/values and ends inside the second one."""
    data = gguf_header(n_kv=5)
    path.write_bytes(data[:-7])
    return path


# ---- Tiny LM checkpoints ------------------------------------------------------------------------------------------
def spoil_checkpoint(src: Path, dst: Path, how: str) -> Path:
    """A copy of a Tiny LM run folder (src: its checkpoint folder's parent) spoiled one way; returns the run folder."""
    shutil.copytree(src, dst)
    ckpt = dst / "checkpoint"
    state = json.loads((ckpt / "state.json").read_text())
    model = ckpt / state["model_file"]
    if how == "state-not-json":
        (ckpt / "state.json").write_text('{"step": 5, "config": ')
    elif how == "state-missing-keys":
        (ckpt / "state.json").write_text(json.dumps({"step": 5}))
    elif how == "state-wrong-types":
        (ckpt / "state.json").write_text(json.dumps({**state, "config": "tiny", "n_params": "many"}))
    elif how == "weights-truncated":
        truncated(model, model.read_bytes(), 0.5)
    elif how == "weights-text":
        text_as(model)
    elif how == "no-tokenizer":
        (ckpt / "tokenizer.json").unlink()
    else:
        raise ValueError(how)
    return dst
