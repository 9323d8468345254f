"""Keyword search (BM25, through bm25s) beside each Chroma collection, and its fusion with the dense results.

Dense retrieval finds what a question means; it misses what a question names exactly: an identifier
(`start_backup_server`, `RetryPolicy`), a file (`index.py`) or a rare term, which the embedder sees only as
word pieces. BM25 over tokens that keep such names whole finds them, and reciprocal rank fusion (RRF, as open-webui
and kotaemon do) merges the two rankings without having to calibrate a cosine against a BM25 score.

On disk, beside the collection (rag/keyword/<collection>/):
- tokens.json: each ingested file's chunk ids and their tokens, updated per file by every ingest (a changed file is
  re-tokenized, a deleted one dropped, the rest kept as they are);
- index-<n>/: the bm25s index over all of them, rebuilt from tokens.json after each ingest (BM25's IDF is global, so
  any change moves every score), and current.json naming the index in use and its chunk ids in order.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from functools import lru_cache
from pathlib import Path

RRF_K = 60  # the constant of reciprocal rank fusion (Cormack et al. 2009; open-webui and kotaemon use it too)

# a word, an identifier or a dotted / dashed name (index.py, os.path.join, bge-small-en): kept whole, then split
WORD = re.compile(r"[A-Za-z0-9_]+(?:[.\-][A-Za-z0-9_]+)*")
# the parts of an identifier: snake_case at "_", dotted at ".", CamelCase at each capital (HTTPServer: http, server)
PART = re.compile(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+|[0-9]+")


# the words of a question that say nothing about its subject; bm25s' English list (Lucene's) is articles and
# prepositions only, and in a code corpus "what" or "does" is rare enough to outweigh the words that matter
QUESTION_WORDS = ("what", "which", "who", "whom", "whose", "where", "when", "why", "how", "do", "does", "did", "done",
                  "can", "could", "should", "would", "i", "me", "my", "we", "our", "you", "your")


@lru_cache(maxsize=1)
def _stopwords() -> frozenset[str]:
    from bm25s.stopwords import STOPWORDS_EN

    return frozenset(STOPWORDS_EN) | frozenset(QUESTION_WORDS)


@lru_cache(maxsize=1)
def _stemmer():
    import Stemmer

    return Stemmer.Stemmer("english")


def tokenize(text: str) -> list[str]:
    """Lowercase tokens for BM25: every word stemmed (retries, retry: retri), and every compound name whole as well
    as in parts, so `start_backup_server`, `RetryPolicy` and `index.py` match exactly and by their words."""
    return _tokens(text)[0]


def _tokens(text: str) -> tuple[list[str], list[str]]:
    """(tokenize's tokens, the compound names among them)."""
    stop, stem = _stopwords(), _stemmer()
    out: list[str] = []
    names: list[str] = []
    for m in WORD.finditer(text):
        whole = m.group().lower()
        parts = [p.lower() for p in PART.findall(m.group())]
        if parts != [whole]:  # a compound name: whole, as a token of its own (kept unstemmed), and in parts
            out.append(whole)
            names.append(whole)
        out += [p for p in parts if p not in stop]
    named = set(names)
    words = [t for t in out if t not in named]
    stems = dict(zip(words, stem.stemWords(words)))
    return [stems.get(t, t) for t in out], names


def document(source: str, heading: str, text: str) -> list[str]:
    """A chunk's tokens: its file's path and heading too, so a question naming the file finds its chunks."""
    return tokenize(f"{source}\n{heading}\n{text}")


def keyword_dir(data_dir: Path, collection: str) -> Path:
    from workers.rag.index import rag_dir

    return rag_dir(data_dir) / "keyword" / collection


def _write_json(path: Path, value) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(value))
    os.replace(tmp, path)  # a reader sees the old file or the new one, never half of one


def load_tokens(data_dir: Path, collection: str) -> dict[str, dict]:
    """{file: {"sha", "ids", "tokens"}} of the collection's keyword index; empty when it has none yet."""
    p = keyword_dir(data_dir, collection) / "tokens.json"
    return json.loads(p.read_text())["files"] if p.exists() else {}


def update(data_dir: Path, collection: str, changed: dict[str, dict], keep: set[str]) -> int:
    """Store the tokens of `changed` files ({file: {"sha", "ids", "tokens"}}), drop every file not in `keep` or
    `changed`, rebuild the BM25 index and switch to it. Returns the number of chunks indexed."""
    import bm25s

    d = keyword_dir(data_dir, collection)
    d.mkdir(parents=True, exist_ok=True)
    files = {rel: v for rel, v in load_tokens(data_dir, collection).items() if rel in keep}
    files.update(changed)
    _write_json(d / "tokens.json", {"files": files})
    ids = [i for rel in sorted(files) for i in files[rel]["ids"]]
    corpus = [t for rel in sorted(files) for t in files[rel]["tokens"]]
    old = _current(d)
    n = int(old["index"].rsplit("-", 1)[1]) + 1 if old else 1
    new = d / f"index-{n}"
    shutil.rmtree(new, ignore_errors=True)
    if corpus:
        bm = bm25s.BM25()
        bm.index(corpus, show_progress=False)
        bm.save(str(new), show_progress=False)
    else:
        new.mkdir()
    _write_json(d / "current.json", {"index": new.name, "ids": ids})
    for stale in d.glob("index-*"):  # a search that loaded the old one keeps its arrays in memory
        if stale.name != new.name:
            shutil.rmtree(stale, ignore_errors=True)
    return len(ids)


def drop(data_dir: Path, collection: str) -> None:
    shutil.rmtree(keyword_dir(data_dir, collection), ignore_errors=True)


def _current(d: Path) -> dict | None:
    p = d / "current.json"
    return json.loads(p.read_text()) if p.exists() else None


@lru_cache(maxsize=4)
def _load(index_dir: str):
    """A saved index; cached by its folder, which a rebuild never reuses, so a cached one is never stale."""
    import bm25s

    return bm25s.BM25.load(index_dir, show_progress=False)


def exists(data_dir: Path, collection: str) -> bool:
    return _current(keyword_dir(data_dir, collection)) is not None


def search(data_dir: Path, collection: str, query: str, n: int) -> tuple[list[tuple[str, float]], list[str]]:
    """The top `n` chunk ids by BM25 with their scores (chunks sharing no token with the query are left out), and
    those of them that hold a compound name the query gives exactly (an identifier, a file name), in that order."""
    d = keyword_dir(data_dir, collection)
    cur = _current(d)
    if cur is None or not cur["ids"]:
        return [], []
    tokens, names = _tokens(query)
    bm = _load(str(d / cur["index"]))
    if not any(t in bm.vocab_dict for t in tokens):
        return [], []
    docs, scores = bm.retrieve([tokens], k=min(n, len(cur["ids"])), show_progress=False)
    found = [(int(i), float(s)) for i, s in zip(docs[0], scores[0]) if s > 0]
    known = [t for t in names if t in bm.vocab_dict]
    holds = bm.get_scores(known) if known else None  # > 0 where a chunk holds one of the names
    return ([(cur["ids"][i], s) for i, s in found],
            [cur["ids"][i] for i, _ in found if holds is not None and holds[i] > 0])


def rrf(*rankings: list[str], k: int = RRF_K) -> list[tuple[str, float]]:
    """Reciprocal rank fusion: each id scores the sum of 1 / (k + rank) over the rankings that hold it."""
    fused: dict[str, float] = {}
    for ranking in rankings:
        for rank, i in enumerate(ranking, start=1):
            fused[i] = fused.get(i, 0.0) + 1.0 / (k + rank)
    return sorted(fused.items(), key=lambda kv: kv[1], reverse=True)
