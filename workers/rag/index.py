"""RAG plumbing shared by ingest, chat and evaluation: embedders, the Chroma store, manifests, retrieval, reranking."""
from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from studio.presets import presets
from workers.chat.llm import hub_snapshot

COLLECTION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{1,61}[A-Za-z0-9]$")  # Chroma's naming rule


def check_collection_name(name: str) -> None:
    if not COLLECTION_RE.match(name or ""):
        raise ValueError(f"collection name {name!r} must be 3-63 letters, digits, '.', '_' or '-', starting and "
                         "ending with a letter or digit")


def rag_dir(data_dir: Path) -> Path:
    return Path(data_dir) / "rag"


def manifest_path(data_dir: Path, collection: str) -> Path:
    return rag_dir(data_dir) / "collections" / f"{collection}.json"


def load_manifest(data_dir: Path, collection: str) -> dict | None:
    p = manifest_path(data_dir, collection)
    return json.loads(p.read_text()) if p.exists() else None


def save_manifest(data_dir: Path, collection: str, manifest: dict) -> None:
    p = manifest_path(data_dir, collection)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(".tmp")
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, p)


def list_collections(data_dir: Path) -> list[dict]:
    """Manifests of every collection (readable from the UI process without Chroma)."""
    d = rag_dir(data_dir) / "collections"
    out = []
    for p in sorted(d.glob("*.json")) if d.exists() else []:
        m = json.loads(p.read_text())
        out.append({"name": p.stem, "owner": m.get("owner"), "embedder": m["embedder"], "root": m["root"],
                    "files": len(m["files"]),
                    "chunks": sum(f["chunks"] for f in m["files"].values())})
    return out


def resolve_model_dir(name: str, kind: str) -> str:
    """A sentence-transformers model: a local folder, a packaged preset, a cached or downloadable hub repo."""
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists() and not (path / "modules.json").exists():
            raise ValueError(f"{path} is not a sentence-transformers model folder (no config.json)")
        return str(path)
    table = presets()[kind]
    if name not in table:
        if "/" in name:  # a hub repo id
            return hub_snapshot(name)
        raise ValueError(f"{kind} {name!r} is neither a preset ({', '.join(table)}) nor a local model folder")
    p = table[name]
    if p.get("pypi"):
        try:
            mod = __import__(p["pypi"].replace("-", "_"))
            return str(mod.get_model_path())
        except ImportError:
            pass  # not installed: fall back to the hub copy
    return hub_snapshot(p["repo"])


def model_key(kind: str, name: str) -> str:
    """The worker-cache key of an embedder or reranker: the same in an estimate and in the run that loads it."""
    local = Path(name).expanduser()
    return f"{kind}:{local.resolve() if local.is_dir() else name}"


def encoder_params(cfg: dict) -> int:
    """Parameters of a BERT-style encoder from its config.json: embeddings plus, per layer, attention (4 h²),
    the feed-forward pair (2 h·ffn) and their biases and norms."""
    h, layers = cfg.get("hidden_size", 384), cfg.get("num_hidden_layers", 6)
    ffn = cfg.get("intermediate_size", 4 * h)
    emb = (cfg.get("vocab_size", 30522) + cfg.get("max_position_embeddings", 512) + cfg.get("type_vocab_size", 2)) * h
    return emb + layers * (4 * h * h + 2 * h * ffn + 9 * h + ffn) + h * h  # + the pooler / classifier head


def model_bytes(kind: str, name: str) -> int:
    """Bytes of an embedder or reranker's fp32 weights, from its preset or its folder's config.json (no download)."""
    local = Path(name).expanduser()
    if local.is_dir() and (local / "config.json").exists():
        return 4 * encoder_params(json.loads((local / "config.json").read_text()))
    entry = presets()[kind].get(name)
    if entry is None:  # a hub id not downloaded yet: the largest preset of its kind bounds it
        entry = max(presets()[kind].values(), key=lambda e: e.get("params_m", 0))
    return int(entry["params_m"] * 1e6 * (2 if entry.get("dtype") == "float16" else 4))


def encode_workspace(name: str, batch: int = 32, seq: int = 512) -> int:
    """Activations of one encoding batch (attention scores dominate at full length), fp32."""
    local = Path(name).expanduser()
    cfg = json.loads((local / "config.json").read_text()) if (local / "config.json").exists() else {}
    h, heads = cfg.get("hidden_size", 1024), cfg.get("num_attention_heads", 16)
    return batch * seq * (8 * h + 2 * heads * seq) * 4


def load_embedder(ctx, name: str):
    """A SentenceTransformer from the worker's model cache."""

    def load():
        from sentence_transformers import SentenceTransformer

        m = SentenceTransformer(resolve_model_dir(name, "embedder"), device=ctx.device)
        return m, sum(p.numel() * p.element_size() for p in m.parameters())

    return ctx.cached(model_key("embedder", name), load)[0]


def load_reranker(ctx, name: str):
    def load():
        from sentence_transformers import CrossEncoder

        m = CrossEncoder(resolve_model_dir(name, "reranker"), device=ctx.device)
        return m, sum(p.numel() * p.element_size() for p in m.model.parameters())

    return ctx.cached(model_key("reranker", name), load)[0]


class Embedder:
    """Our SentenceTransformer's normalized embeddings. Chroma always gets them precomputed, so its default
    embedding function (which downloads a model) never runs."""

    def __init__(self, model):
        self.model = model

    def embed(self, texts: list[str]):
        return self.model.encode(texts, normalize_embeddings=True, convert_to_numpy=True, batch_size=32)


def chroma(data_dir: Path):
    import chromadb
    from chromadb.config import Settings

    path = rag_dir(data_dir) / "chroma"
    path.mkdir(parents=True, exist_ok=True)
    return chromadb.PersistentClient(path=str(path), settings=Settings(anonymized_telemetry=False))


def get_collection(data_dir: Path, name: str, create: bool = False):
    client = chroma(data_dir)
    if create:
        return client.get_or_create_collection(name, metadata={"hnsw:space": "cosine"}, embedding_function=None)
    try:
        return client.get_collection(name, embedding_function=None)
    except Exception:  # chromadb raises NotFoundError / ValueError depending on version
        raise ValueError(f"collection {name!r} does not exist; ingest some files into it first") from None


@dataclass
class Hit:
    source: str
    start: int
    end: int
    unit: str
    heading: str
    text: str
    score: float  # the reranker's score when reranked; else the retrieval score
    retrieval_score: float  # cosine similarity (dense), or the reciprocal-rank-fusion score (hybrid)

    @property
    def where(self) -> str:
        return f"{self.source} p. {self.start}" if self.unit == "page" else f"{self.source}:{self.start}-{self.end}"

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "where": self.where}


RETRIEVAL = ("dense", "hybrid")  # embeddings alone; or BM25 keywords fused with them (a reranker may follow either)
MODES = ("dense", "hybrid", "hybrid+rerank")  # what rag_eval compares side by side


def check_retrieval(mode: str) -> None:
    if mode not in RETRIEVAL:
        raise ValueError(f"retrieval must be one of {', '.join(RETRIEVAL)} (a reranker, when set, re-scores either); "
                         f"got {mode!r}")


def build_keyword_index(data_dir: Path, collection: str, coll, manifest: dict) -> None:
    """Build the keyword index of a collection ingested before it had one, from the chunks Chroma holds."""
    from workers.rag import keyword

    got = coll.get(include=["documents", "metadatas"])
    files: dict[str, dict] = {}
    for i, doc, m in zip(got["ids"], got["documents"], got["metadatas"]):
        f = files.setdefault(m["source"], {"sha": manifest["files"].get(m["source"], {}).get("sha"), "ids": [],
                                           "tokens": []})
        f["ids"].append(i)
        f["tokens"].append(keyword.document(m["source"], m.get("heading", ""), doc))
    keyword.update(data_dir, collection, files, keep=set())


def _candidates(ctx, collection: str, query: str, n: int, embedder: str, keywords: bool):
    """The top `n` chunks by embedding and (with `keywords`) by BM25: ({id: (text, metadata)}, dense [(id, cosine)],
    keyword [(id, bm25)], named [ids of keyword's chunks that hold a name the query gives exactly])."""
    from workers.rag import keyword

    manifest = load_manifest(ctx.data_dir, collection)
    if manifest is None:
        raise ValueError(f"collection {collection!r} does not exist; ingest some files into it first")
    if not manifest["files"]:
        raise ValueError(f"collection {collection!r} is empty; ingest some files into it first")
    emb = Embedder(load_embedder(ctx, embedder or manifest["embedder"]))
    coll = get_collection(ctx.data_dir, collection)
    res = coll.query(query_embeddings=emb.embed([query]), n_results=min(n, coll.count()),
                     include=["documents", "metadatas", "distances"])
    chunks = {i: (doc, m) for i, doc, m in zip(res["ids"][0], res["documents"][0], res["metadatas"][0])}
    dense = [(i, 1 - d) for i, d in zip(res["ids"][0], res["distances"][0])]
    found: list[tuple[str, float]] = []
    named: list[str] = []
    if keywords:
        if not keyword.exists(ctx.data_dir, collection):
            build_keyword_index(ctx.data_dir, collection, coll, manifest)
        found, named = keyword.search(ctx.data_dir, collection, query, n)
        missing = [i for i, _ in found if i not in chunks]
        if missing:
            got = coll.get(ids=missing, include=["documents", "metadatas"])
            chunks.update({i: (doc, m) for i, doc, m in zip(got["ids"], got["documents"], got["metadatas"])})
        found = [(i, s) for i, s in found if i in chunks]  # an id Chroma lacks (never expected) is left out
        named = [i for i in named if i in chunks]
    return chunks, dense, found, named


def _hit(chunk: tuple[str, dict], score: float) -> Hit:
    doc, m = chunk
    return Hit(m["source"], m["start"], m["end"], m.get("unit", "line"), m.get("heading", ""), doc, score, score)


def _rerank(ctx, reranker: str, query: str, hits: list[Hit]) -> list[Hit]:
    if hits:
        scores = load_reranker(ctx, reranker).predict([(query, h.text) for h in hits])
        hits = [replace(h, score=float(s)) for h, s in zip(hits, scores)]
        hits.sort(key=lambda h: h.score, reverse=True)
    return hits


def retrieve_modes(ctx, collection: str, query: str, k: int = 4, reranker: str = "", embedder: str = "",
                   fetch_k: int = 20, modes: tuple[str, ...] = MODES) -> dict[str, list[Hit]]:
    """The top-k chunks for `query` by each of `modes` (of MODES), from one embedding of the query and one BM25
    search: dense (embedding order), hybrid (BM25 and embedding ranks fused by RRF), hybrid+rerank (the fused top
    `fetch_k` re-scored by the cross-encoder `reranker`), dense+rerank (the same over the embedding order)."""
    from workers.rag.keyword import rrf

    n = max(k, fetch_k)
    keywords = any(m.startswith("hybrid") for m in modes)
    chunks, dense, found, named = _candidates(ctx, collection, query, n, embedder, keywords)
    first = {"dense": [_hit(chunks[i], s) for i, s in dense]}
    if keywords:  # a name given exactly is the strongest evidence there is: its chunks form a third ranking
        fused = rrf([i for i, _ in dense], [i for i, _ in found], named)
        first["hybrid"] = [_hit(chunks[i], s) for i, s in fused[:n]]
    out = {}
    for mode in modes:
        stage, _, rerank = mode.partition("+")
        if rerank and not reranker:
            raise ValueError(f"{mode} needs a reranker")
        out[mode] = _rerank(ctx, reranker, query, first[stage][:n])[:k] if rerank else first[stage][:k]
    return out


def retrieve(ctx, collection: str, query: str, k: int = 4, reranker: str = "", embedder: str = "",
             fetch_k: int = 20, retrieval: str = "hybrid") -> list[Hit]:
    """Top-k chunks for `query`: by embedding ("dense"), or by embedding and BM25 fused ("hybrid"); with a reranker,
    the first stage's top `fetch_k` are re-scored by a cross-encoder."""
    check_retrieval(retrieval)
    mode = f"{retrieval}+rerank" if reranker else retrieval
    return retrieve_modes(ctx, collection, query, k, reranker, embedder, fetch_k, modes=(mode,))[mode]
