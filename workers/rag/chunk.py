"""Reading and chunking notes and code for RAG: Markdown by headings, code by top-level definitions, with overlap.

Every chunk keeps where it came from (file, first and last line, or PDF page) so answers can cite it.
"""
from __future__ import annotations

import hashlib
import re
import shutil
import tempfile
import zipfile
import zlib
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

MARKDOWN = {".md", ".markdown", ".rst", ".txt", ".text", ""}
CODE = {".py", ".js", ".ts", ".tsx", ".jsx", ".java", ".kt", ".go", ".rs", ".c", ".h", ".cc", ".cpp", ".hpp",
        ".cs", ".rb", ".php", ".swift", ".scala", ".sh", ".lua", ".sql", ".r", ".jl", ".m"}
OTHER_TEXT = {".json", ".yaml", ".yml", ".toml", ".ini", ".cfg", ".csv", ".tex", ".css"}
HTML = {".html", ".htm"}
PDF = {".pdf"}
SUPPORTED = MARKDOWN | CODE | OTHER_TEXT | HTML | PDF
# what the other files are, for the reason a skipped one is given (with what to do about it)
IMAGE = {".png", ".jpg", ".jpeg", ".gif", ".bmp", ".webp", ".tif", ".tiff", ".svg", ".ico", ".heic"}
AUDIO_VIDEO = {".wav", ".mp3", ".m4a", ".flac", ".ogg", ".opus", ".aac", ".wma", ".mp4", ".mkv", ".mov", ".avi",
               ".webm"}
OFFICE = {".docx", ".doc", ".odt", ".rtf", ".pptx", ".ppt", ".odp", ".xlsx", ".xls", ".ods", ".epub", ".pages"}
ARCHIVE = {".zip", ".tar", ".gz", ".tgz", ".bz2", ".xz", ".7z", ".rar"}
MAX_FILE_BYTES = 20 * 2**20
MAX_ARCHIVE_BYTES = 500 * 2**20  # uncompressed total of a zip
MAX_ARCHIVE_FILES = 20_000

# a line that starts a top-level unit of code in the common languages
CODE_START = re.compile(r"^(?:@\w|async\s+def\s|def\s|class\s|function\s|export\s|func\s|fn\s|pub\s+fn\s|impl\s|"
                        r"struct\s|interface\s|public\s|private\s|protected\s|static\s|const\s+\w+\s*=\s*\()")


@dataclass
class Chunk:
    source: str  # path relative to the ingested root
    start: int  # first line (1-based), or the PDF page
    end: int  # last line, or the PDF page
    text: str
    heading: str = ""  # Markdown heading path or code unit, for display
    unit: str = "line"  # "line" or "page"

    @property
    def where(self) -> str:
        if self.unit == "page":
            return f"{self.source} p. {self.start}"
        return f"{self.source}:{self.start}-{self.end}"


class _HTMLText(HTMLParser):
    def __init__(self):
        super().__init__()
        self.parts: list[str] = []
        self._skip = 0

    def handle_starttag(self, tag, attrs):
        if tag in ("script", "style"):
            self._skip += 1
        elif tag in ("p", "br", "div", "li", "h1", "h2", "h3", "h4", "tr", "pre"):
            self.parts.append("\n")

    def handle_endtag(self, tag):
        if tag in ("script", "style") and self._skip:
            self._skip -= 1

    def handle_data(self, data):
        if not self._skip:
            self.parts.append(data)


def read_text(path: Path) -> str:
    data = path.read_bytes()
    if b"\x00" in data:
        raise ValueError(f"{path.name} is binary, not text")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path.name} is not UTF-8 text (undecodable byte at offset {e.start})") from None
    if path.suffix.lower() in HTML:
        p = _HTMLText()
        p.feed(text)
        text = re.sub(r"\n\s*\n+", "\n\n", "".join(p.parts))
    return text


def read_pdf_pages(path: Path) -> list[str]:
    from pypdf import PdfReader
    from pypdf.errors import PdfReadError

    try:
        reader = PdfReader(str(path))
        return [page.extract_text() or "" for page in reader.pages]
    except (PdfReadError, ValueError, KeyError, OSError) as e:
        raise ValueError(f"{path.name} is not a readable PDF ({e})") from None


def _windows(lines: list[str], first_line: int, size: int, overlap: int, heading: str, source: str) -> list[Chunk]:
    """Pack lines into chunks of at most `size` characters, repeating about `overlap` characters between them."""
    out, i = [], 0
    while i < len(lines):
        j, n = i, 0
        while j < len(lines) and (n + len(lines[j]) + 1 <= size or j == i):
            n += len(lines[j]) + 1
            j += 1
        text = "\n".join(lines[i:j]).strip()
        if text:
            out.append(Chunk(source, first_line + i, first_line + j - 1, text, heading))
        if j >= len(lines):
            break
        back, k = 0, j  # step back over `overlap` characters of whole lines
        while k - 1 > i and back + len(lines[k - 1]) + 1 <= overlap:
            k -= 1
            back += len(lines[k]) + 1
        i = k
    return out


def _sections(lines: list[str], is_start) -> list[tuple[int, str]]:
    """(first line index, title) of each section; the text before the first start is its own section."""
    starts = [(0, "")]
    in_fence = False
    for i, line in enumerate(lines):
        if line.lstrip().startswith("```"):
            in_fence = not in_fence
        if not in_fence and i > 0 and is_start(line):
            starts.append((i, line.strip()))
        elif i == 0 and is_start(line):
            starts[0] = (0, line.strip())
    return starts


def chunk_text(text: str, source: str, size: int = 1200, overlap: int = 150) -> list[Chunk]:
    """Split by structure first (Markdown headings, top-level code units), then into windows with overlap."""
    lines = text.splitlines()
    suffix = Path(source).suffix.lower()
    if suffix in CODE:
        starts = _sections(lines, lambda ln: bool(CODE_START.match(ln)))
    elif suffix in MARKDOWN:
        starts = _sections(lines, lambda ln: bool(re.match(r"^#{1,6}\s", ln)))
    else:
        starts = [(0, "")]
    chunks: list[Chunk] = []
    trail: list[str] = []  # the Markdown heading path
    for n, (start, title) in enumerate(starts):
        stop = starts[n + 1][0] if n + 1 < len(starts) else len(lines)
        heading = title
        if suffix in MARKDOWN and title.startswith("#"):
            level = len(title) - len(title.lstrip("#"))
            trail = trail[: level - 1] + [title.lstrip("# ").strip()]
            heading = " > ".join(trail)
        chunks += _windows(lines[start:stop], start + 1, size, overlap, heading, source)
    return _merge_small(chunks, size)


def _merge_small(chunks: list[Chunk], size: int) -> list[Chunk]:
    """Join neighbouring tiny sections (a run of short functions) so chunks are not a line each."""
    out: list[Chunk] = []
    for c in chunks:
        prev = out[-1] if out else None
        if prev and prev.source == c.source and len(prev.text) + len(c.text) + 1 <= size // 2 and c.start > prev.end:
            out[-1] = Chunk(prev.source, prev.start, c.end, prev.text + "\n" + c.text, prev.heading or c.heading)
        else:
            out.append(c)
    return out


def chunk_file(path: Path, source: str, size: int = 1200, overlap: int = 150) -> list[Chunk]:
    if path.suffix.lower() in PDF:
        chunks = []
        for page_no, page in enumerate(read_pdf_pages(path), start=1):
            for c in _windows(page.splitlines(), 1, size, overlap, f"page {page_no}", source):
                chunks.append(Chunk(source, page_no, page_no, c.text, c.heading, unit="page"))
        return chunks
    return chunk_text(read_text(path), source, size, overlap)


def file_hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def too_big(path: Path, size: int) -> str:
    return (f"{path.name} is {size / 2**20:.0f} MiB; one file may be at most {MAX_FILE_BYTES // 2**20} MiB (it is read "
            "whole): split it, or ingest the folder of its parts")


def unsupported(name: str) -> str | None:
    """Why a file of this name is not ingested (what it is, and what to do instead); None when it is read."""
    suffix = Path(name).suffix.lower()
    if suffix in SUPPORTED:
        return None
    if suffix in IMAGE:
        return "an image; Collections read text only: put what it shows in a note"
    if suffix in AUDIO_VIDEO:
        return "audio or video; transcribe it in the Transcribe tab and ingest the transcript"
    if suffix in OFFICE:
        return f"a {suffix} document; save it as PDF, Markdown or text and ingest that"
    if suffix in ARCHIVE:
        return ("an archive inside the upload; ingest a .zip on its own" if suffix == ".zip"
                else f"a {suffix} archive; only .zip is unpacked: unpack it, or zip it")
    return (f"{suffix} files are not read; Collections take Markdown, text, code, PDF and HTML (rename a text file "
            "to .txt to include it)")


def list_files(root: Path, skipped: list[dict] | None = None) -> list[Path]:
    """Supported files under `root` (a file or a folder), skipping hidden files and folders (.git, …); every other
    file not read (an image, audio, a type not supported, one over the per-file cap) goes to `skipped` with the
    reason. A single file over the cap or of a type not read is refused."""
    if root.is_file():
        if root.stat().st_size > MAX_FILE_BYTES:
            raise ValueError(too_big(root, root.stat().st_size))
        if why := unsupported(root.name):
            raise ValueError(f"{root.name} is {why}")
        return [root]
    files = []
    for f in sorted(root.rglob("*")):
        rel = f.relative_to(root).parts
        if any(p.startswith(".") or p in IGNORED_DIRS for p in rel[:-1]):
            continue
        if not f.is_file() or f.name.startswith("."):
            continue
        why = unsupported(f.name)
        if why is None and f.stat().st_size > MAX_FILE_BYTES:
            why = too_big(f, f.stat().st_size)
        if why is None:
            files.append(f)
        elif skipped is not None:
            skipped.append({"file": str(f.relative_to(root)), "reason": why})
    return files


IGNORED_DIRS = ("node_modules", "__pycache__", ".venv", "venv")


def largest_input(path: Path, scan: int = 5000) -> int:
    """Bytes of the largest file an ingest of `path` reads whole (at most MAX_FILE_BYTES), found cheaply for the
    estimate: a file's size, a zip's largest declared entry, the largest of a folder's first `scan` entries (a bigger
    folder counts as holding a file at the cap)."""
    import os

    path = Path(path)
    try:
        if path.is_file() and path.suffix.lower() == ".zip":
            with zipfile.ZipFile(path) as zf:  # reads the central directory only
                sizes = [i.file_size for i in zf.infolist() if i.file_size <= MAX_FILE_BYTES]
            return max(sizes, default=0)
        if path.is_file():
            return min(path.stat().st_size, MAX_FILE_BYTES)
        largest, seen = 0, 0
        for folder, dirs, names in os.walk(path):
            dirs[:] = [d for d in dirs if not d.startswith(".") and d not in IGNORED_DIRS]
            for name in names:
                seen += 1
                if seen > scan:
                    return MAX_FILE_BYTES
                if Path(name).suffix.lower() in SUPPORTED and not name.startswith("."):
                    size = os.stat(os.path.join(folder, name)).st_size
                    if size <= MAX_FILE_BYTES:
                        largest = max(largest, size)
        return largest
    except (OSError, zipfile.BadZipFile):  # unreadable: validate and run say why
        return 0


def safe_extract(archive: Path, dest: Path, max_bytes: int = MAX_ARCHIVE_BYTES, max_files: int = MAX_ARCHIVE_FILES
                 ) -> Path:
    """Extract a zip without letting any entry escape `dest` (no `..`, no absolute paths, no links), with limits from
    the machine: everything is checked before a byte is written (entry count, total size, free disk, each entry's
    compression ratio), and a failure part-way (a lying header, a full disk) leaves nothing behind. The entries land
    in a new folder beside `dest` that replaces it only once all of them are out."""
    dest = dest.resolve()
    try:
        zf = zipfile.ZipFile(archive)
    except zipfile.BadZipFile:
        raise ValueError(f"{archive.name} is not a valid zip archive") from None
    with zf:
        infos = zf.infolist()
        check_archive(archive.name, infos, dest, max_bytes, max_files)
        for info in infos:
            target = (dest / info.filename).resolve()
            if not target.is_relative_to(dest) or info.filename.startswith("/"):
                raise ValueError(f"{archive.name} holds an unsafe path {info.filename!r} (outside the archive "
                                 "folder); nothing was extracted")
            if (info.external_attr >> 16) & 0o170000 == 0o120000:
                raise ValueError(f"{archive.name} holds a symbolic link {info.filename!r}; nothing was extracted")
        dest.parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".partial", dir=dest.parent))
        try:
            zf.extractall(work)  # each entry stops at its declared size (zipfile) and is CRC-checked
            if dest.exists():
                shutil.rmtree(dest)  # the previous extraction of this archive: the new one replaces it whole
            work.rename(dest)
        except (OSError, zipfile.BadZipFile, EOFError, zlib.error,
                NotImplementedError, RuntimeError) as e:  # these two: an unknown compression method, a password
            raise ValueError(f"{archive.name} could not be extracted ({e}); nothing was kept") from None
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return dest


MAX_RATIO = 200  # uncompressed / compressed size of one entry; text and images stay far below it, zip bombs above
RATIO_FROM = 2**20  # entries smaller than this may compress better (a file of spaces) without being a bomb


def free_margin(free: int) -> int:
    """Disk space an extraction must leave free: 1 GiB, or a tenth of what is free when that is more."""
    return max(2**30, free // 10)


def check_zip(source: Path, dest: Path, max_bytes: int = MAX_ARCHIVE_BYTES, max_files: int = MAX_ARCHIVE_FILES
              ) -> None:
    """A zip's declared sizes against the limits and the free disk at `dest`, at submit: a zip bomb is refused before
    a job is queued. Not a zip: nothing to check."""
    source = Path(source).expanduser()
    if not (source.is_file() and source.suffix.lower() == ".zip"):
        return
    try:
        with zipfile.ZipFile(source) as zf:
            infos = zf.infolist()
    except zipfile.BadZipFile:
        raise ValueError(f"{source.name} is not a valid zip archive") from None
    check_archive(source.name, infos, dest, max_bytes, max_files)


def check_archive(name: str, infos: list[zipfile.ZipInfo], dest: Path, max_bytes: int, max_files: int) -> None:
    """The limits a zip must meet before anything is extracted, from its declared sizes; raises ValueError."""
    if len(infos) > max_files:
        raise ValueError(f"{name} has {len(infos)} entries; the limit is {max_files}")
    total = sum(i.file_size for i in infos)
    if total > max_bytes:
        raise ValueError(f"{name} unpacks to {total / 2**20:.0f} MiB, more than the limit of {max_bytes // 2**20} MiB")
    free = shutil.disk_usage(_existing(dest)).free
    if total > free - free_margin(free):
        raise ValueError(f"{name} unpacks to {total / 2**30:.2f} GiB but the disk holding {dest.parent} has "
                         f"{free / 2**30:.2f} GiB free (and keeps {free_margin(free) / 2**30:.2f} GiB spare); "
                         "free some space or use a smaller archive. Nothing was extracted")
    for i in infos:
        if i.file_size > RATIO_FROM and i.file_size > MAX_RATIO * max(i.compress_size, 1):
            raise ValueError(f"{name}: {i.filename!r} expands {i.file_size / max(i.compress_size, 1):.0f} times "
                             f"({i.compress_size} bytes to {i.file_size / 2**20:.0f} MiB; the limit is {MAX_RATIO} "
                             "times), like a zip bomb. Nothing was extracted")


def _existing(path: Path) -> Path:
    """`path` or its nearest parent that exists (where free space can be measured)."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path
