"""Job kind `rag_ingest`: read notes and code (files, folders, zips), chunk, embed, and keep them in Chroma.

Re-ingesting only processes files whose content changed, and removes the chunks of files that are gone.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from studio.gate import Estimate


PACKAGES = ("chromadb", "sentence-transformers", "pypdf", "bm25s", "PyStemmer")  # versions for the run card
PATHS = ("path", "embedder")  # params that name a server path (studio.access)


@dataclass(frozen=True)
class Params:
    collection: str  # a name: 3-63 letters, digits, '.', '_' or '-'
    path: str  # a file, a folder, or a .zip of notes and code
    embedder: str = "all-MiniLM-L6-v2"  # a preset (this one is packaged, on disk), or a local sentence-transformers
    # folder
    chunk_chars: int = 1200  # longest chunk; Markdown sections and code units are split to fit
    overlap_chars: int = 150  # text repeated between neighbouring chunks of one section

    def __post_init__(self):
        from workers.rag.index import check_collection_name

        check_collection_name(self.collection)
        if not 200 <= self.chunk_chars <= 20_000:
            raise ValueError(f"chunk_chars must be between 200 and 20000; got {self.chunk_chars}")
        if not 0 <= self.overlap_chars < self.chunk_chars // 2:
            raise ValueError("overlap_chars must be at least 0 and under half of chunk_chars")


def validate(p: Params, config) -> None:
    from workers.rag.chunk import MAX_FILE_BYTES, check_zip, too_big, unsupported
    from workers.rag.index import load_manifest, rag_dir

    path = Path(p.path).expanduser()
    if not path.exists():
        raise ValueError(f"path not found: {path}")
    if path.suffix.lower() == ".zip":  # its declared sizes: a zip bomb is refused before it runs
        check_zip(path, rag_dir(config.data_dir) / "sources" / p.collection / path.stem)
    elif path.is_file() and path.stat().st_size > MAX_FILE_BYTES:  # the same cap as a file in a folder
        raise ValueError(too_big(path, path.stat().st_size))
    elif path.is_file() and (why := unsupported(path.name)):  # one image or recording: refused before it queues
        raise ValueError(f"{path.name} is {why}. Collections take Markdown, text, code, PDF and HTML files (or a "
                         ".zip of them)")
    elif path.is_file() and path.stat().st_size == 0:
        raise ValueError(f"{path.name} is empty: there is no text to ingest")
    m = load_manifest(config.data_dir, p.collection)
    if m and m["embedder"] != p.embedder:
        raise ValueError(f"collection {p.collection!r} was built with embedder {m['embedder']!r}; ingest with that "
                         "embedder, or into a new collection")


# RAM per byte of the file in hand: its bytes, the decoded text, its lines (about 50 bytes of object each) and its
# chunks; measured 4.5x for Markdown with 60-character lines, 17x for 5-character lines
READ_BYTES_PER_BYTE = 20


def estimate(p: Params, device) -> Estimate:
    """The embedder (kept in the worker's cache) and one batch of 32 chunks through it, plus the chunks in hand and,
    on the CPU, the largest file read whole (its size from a stat: a 3 GB file used to be estimated like a note)."""
    from workers.rag.chunk import largest_input
    from workers.rag.index import encode_workspace, model_bytes, model_key

    workspace = 64 * 2**20
    if getattr(device, "kind", "cpu") != "cuda":  # the text is in host RAM, which the gate counts only on the CPU
        workspace += READ_BYTES_PER_BYTE * largest_input(Path(p.path).expanduser())
    return Estimate(parts={"activations": encode_workspace(p.embedder), "workspace": workspace},
                    models={model_key("embedder", p.embedder): model_bytes("embedder", p.embedder)})


def run(p: Params, ctx) -> dict:
    from workers.rag.index import load_manifest

    new = load_manifest(ctx.data_dir, p.collection) is None
    try:
        return _ingest(p, ctx)
    except Exception:
        if new:  # a collection this job began: a failed ingest leaves none of it (extracted zip, chunks, manifest)
            _drop(ctx.data_dir, p.collection)
        raise


def _drop(data_dir: Path, collection: str) -> None:
    import shutil

    from workers.rag import keyword
    from workers.rag.index import chroma, manifest_path, rag_dir

    for folder in ("sources", "keyword"):
        shutil.rmtree(rag_dir(data_dir) / folder / collection, ignore_errors=True)
        try:
            (rag_dir(data_dir) / folder).rmdir()  # only when no other collection has files there
        except OSError:
            pass
    keyword.drop(data_dir, collection)
    manifest_path(data_dir, collection).unlink(missing_ok=True)
    try:
        chroma(data_dir).delete_collection(collection)
    except Exception:  # noqa: BLE001 (never created; chromadb's error type differs between versions)
        pass


def nothing_to_ingest(src: Path, collection: str, skipped: list[dict], new: bool) -> ValueError:
    """The error for an ingest that would leave the collection holding nothing: every file and why, what to do."""
    shown = "; ".join(f"{s['file']}: {s['reason']}" for s in skipped[:8])
    more = f"; and {len(skipped) - 8} more" if len(skipped) > 8 else ""
    kept = ("no collection was created" if new
            else f"collection {collection!r} was left as it was (an ingest never empties one)")
    return ValueError(f"nothing to ingest from {src.name}: " + (f"{shown}{more}. " if skipped else
                      "it holds no files. ") + "Add Markdown, text, code, PDF or HTML files (or a .zip of them); "
                      + kept)


def _ingest(p: Params, ctx) -> dict:
    from workers.rag import keyword
    from workers.rag.chunk import chunk_file, file_hash, list_files, safe_extract
    from workers.rag.index import (Embedder, build_keyword_index, get_collection, load_embedder, load_manifest,
                                   rag_dir, save_manifest)

    t0 = time.perf_counter()
    src = Path(p.path).expanduser().resolve()
    if src.is_file() and src.suffix.lower() == ".zip":
        root = safe_extract(src, rag_dir(ctx.data_dir) / "sources" / p.collection / src.stem)
    else:
        root = src
    manifest = load_manifest(ctx.data_dir, p.collection)
    new = manifest is None
    manifest = manifest or {"embedder": p.embedder, "files": {}, "owner": ctx.owner}
    skipped: list[dict] = []
    try:
        files = list_files(root, skipped)  # the rest (images, audio, other types, over the cap) go to `skipped`
    except ValueError as e:  # a single file of a type not read, or over the cap
        skipped.append({"file": root.name, "reason": str(e)})
        files = []
    for s in skipped:
        ctx.log(f"skipped {s['file']}: {s['reason']}")
    if not files:  # checked before the collection is touched: nothing is created, nothing removed
        raise nothing_to_ingest(src, p.collection, skipped, new)
    manifest["root"] = str(root)
    manifest["chunking"] = {"chunk_chars": p.chunk_chars, "overlap_chars": p.overlap_chars}
    base = root if root.is_dir() else root.parent
    emb = Embedder(load_embedder(ctx, p.embedder))
    coll = get_collection(ctx.data_dir, p.collection, create=True)

    seen = set()
    counts = {"added": 0, "updated": 0, "unchanged": 0, "removed": 0, "chunks_written": 0}
    pending: list = []  # (id, chunk) across files, embedded and added in batches: small notes are the norm
    tokens: dict[str, dict] = {}  # the keyword index's entries of the files (re)chunked now

    def flush():
        if pending:
            coll.upsert(ids=[i for i, _ in pending], embeddings=emb.embed([c.text for _, c in pending]),
                        documents=[c.text for _, c in pending],
                        metadatas=[{"source": c.source, "start": c.start, "end": c.end, "unit": c.unit,
                                    "heading": c.heading[:200]} for _, c in pending])
            pending.clear()

    for i, f in enumerate(files):
        rel = str(f.relative_to(base))
        seen.add(rel)
        ctx.progress(i, len(files), f"{rel}")
        sha = file_hash(f)
        old = manifest["files"].get(rel)
        if old and old["sha"] == sha:
            counts["unchanged"] += 1
            continue
        try:
            chunks = chunk_file(f, rel, p.chunk_chars, p.overlap_chars)
        except ValueError as e:  # binary, not UTF-8, a corrupt PDF: reported, the rest goes on
            skipped.append({"file": rel, "reason": str(e)})
            ctx.log(f"skipped {rel}: {e}")
            continue
        if not chunks:  # an empty file (or only whitespace): nothing to search, the rest goes on
            skipped.append({"file": rel, "reason": "it is empty: no text to search"})
            ctx.log(f"skipped {rel}: it is empty")
            continue
        if old:
            coll.delete(where={"source": rel})
        ids = [f"{rel}#{n}:{sha[:12]}" for n in range(len(chunks))]
        pending += list(zip(ids, chunks))
        tokens[rel] = {"sha": sha, "ids": ids, "tokens": [keyword.document(c.source, c.heading, c.text)
                                                          for c in chunks]}
        if len(pending) >= 64:
            flush()
        manifest["files"][rel] = {"sha": sha, "chunks": len(chunks)}
        counts["updated" if old else "added"] += 1
        counts["chunks_written"] += len(chunks)
    flush()
    gone = [r for r in manifest["files"] if r not in seen]  # files deleted since the last ingest
    if len(gone) == len(manifest["files"]):  # nothing read now, nothing kept: the collection would hold nothing
        raise nothing_to_ingest(src, p.collection, skipped, new)
    for rel in gone:
        coll.delete(where={"source": rel})
        del manifest["files"][rel]
        counts["removed"] += 1
    ctx.progress(len(files), len(files), "keyword index")
    kept = set(manifest["files"]) - set(tokens)
    stored = keyword.load_tokens(ctx.data_dir, p.collection)
    if any(stored.get(rel, {}).get("sha") != manifest["files"][rel]["sha"] for rel in kept):
        build_keyword_index(ctx.data_dir, p.collection, coll, manifest)  # made before keyword search: from Chroma
    else:
        keyword.update(ctx.data_dir, p.collection, tokens, keep=kept)
    save_manifest(ctx.data_dir, p.collection, manifest)
    ctx.progress(len(files), len(files), "done")
    seconds = time.perf_counter() - t0
    processed = counts["added"] + counts["updated"]
    return {**counts, "files": len(manifest["files"]), "chunks": coll.count(), "skipped": skipped,
            "seconds": seconds, "docs_per_s": processed / seconds if seconds else None, "collection": p.collection,
            "root": str(root)}
