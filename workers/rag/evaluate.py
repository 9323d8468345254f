"""Job kind `rag_eval`: measure retrieval (hit@k, recall@k, MRR) and, with a model, answers (ROUGE-L, BLEU, judge).

Retrieval is measured three ways in one run, side by side: dense (embeddings alone), hybrid (BM25 keywords fused
with them) and hybrid+rerank (the fused candidates re-scored by the cross-encoder, when one is chosen). Answers, when
a model is set, are generated from the last of these.

The eval set is JSONL with `question`, `answer` (the expected answer) and `source` (the expected file, relative to
the ingested folder; a list of files is accepted too). Results are kept per run so changes in chunking, embedder
or reranker can be compared side by side.
"""
from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, replace
from pathlib import Path

from studio.gate import Estimate

JUDGE_PROMPT = ("Rate how well the answer matches the expected answer, from 1 (wrong or unsupported) to 5 (correct "
                "and complete). Reply with JSON {{\"score\": N}}.\n\nQuestion: {q}\nExpected: {a}\nAnswer: {r}")


# versions for the run card
PACKAGES = ("chromadb", "sentence-transformers", "bm25s", "PyStemmer", "llama-cpp-python", "rouge-score", "sacrebleu")
PATHS = ("evalset", "model", "reranker")  # params that name a server path (studio.access)


@dataclass(frozen=True)
class Params:
    collection: str  # the collection to evaluate
    evalset: str  # a JSONL file: {"question", "answer", "source"} per line
    k: int = 4  # retrieval depth for hit@k and recall@k
    reranker: str = ""  # a cross-encoder preset or local folder: adds hybrid+rerank; empty: dense and hybrid only
    model: str = ""  # an LLM preset or .gguf to answer each question (ROUGE-L, BLEU); empty: retrieval only
    judge: bool = False  # also ask the model to score each answer 1-5 (an LLM-judge rubric)
    max_tokens: int = 200  # longest answer per question, in tokens
    n_ctx: int = 4096  # the answering model's context window
    n_gpu_layers: int = -1  # -1: as many as fit the budget
    threads: int = 0  # CPU threads; 0: all cores
    embedder: str = ""  # the collection's embedder; empty: the one it was built with

    def __post_init__(self):
        for name, lo, hi in [("k", 1, 50), ("max_tokens", 1, 32768), ("n_ctx", 256, 131072),
                             ("n_gpu_layers", -1, 1000), ("threads", 0, 1024)]:  # as for chat: llama.cpp takes them
            v = getattr(self, name)
            if not lo <= v <= hi:
                raise ValueError(f"{name} must be between {lo} and {hi}; got {v}")
        if self.judge and not self.model:
            raise ValueError("judge needs a model")


MAX_EVALSET_BYTES = 20 * 2**20  # questions and short answers: far more than any eval set, read whole at submit


def load_evalset(path: Path) -> list[dict]:
    if not path.is_file():
        raise ValueError(f"eval set not found: {path}")
    size = path.stat().st_size
    if size > MAX_EVALSET_BYTES:
        raise ValueError(f"{path.name} is {size / 2**20:.0f} MiB; an eval set may be at most "
                         f"{MAX_EVALSET_BYTES // 2**20} MiB")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path.name} is not UTF-8 text (undecodable byte at offset {e.start}): save it as UTF-8 "
                         "JSONL") from None
    rows = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path.name} line {n} is not JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise ValueError(f"{path.name} line {n} is a JSON {type(row).__name__}, not an object with question, "
                             "answer and source")
        missing = [k for k in ("question", "source") if not row.get(k)]
        if missing:
            raise ValueError(f"{path.name} line {n} lacks {', '.join(missing)}")
        sources = row["source"] if isinstance(row["source"], list) else [row["source"]]
        if not isinstance(row["question"], str) or not isinstance(row.get("answer") or "", str):
            raise ValueError(f"{path.name} line {n}: question and answer must be strings")
        if not all(isinstance(s, str) and s for s in sources):
            raise ValueError(f"{path.name} line {n}: source must be a file path (or a list of them)")
        row["sources"] = sources
        rows.append(row)
    if not rows:
        raise ValueError(f"{path.name} has no questions")
    return rows


def validate(p: Params, config) -> Params:
    from workers.rag.index import load_manifest

    load_evalset(Path(p.evalset).expanduser())
    manifest = load_manifest(config.data_dir, p.collection)
    if manifest is None:
        raise ValueError(f"collection {p.collection!r} does not exist; ingest some files into it first")
    if p.model:
        from workers.chat.llm import resolve

        resolve(p.model, config.data_dir)
    return replace(p, embedder=manifest["embedder"])


def _answerer(p: Params):
    """The chat params the answering (and judging) model loads with: the Chat kind's loader and cache key."""
    from workers.chat.chat import Params as ChatParams

    return ChatParams(prompt="-", model=p.model, n_ctx=p.n_ctx, n_gpu_layers=p.n_gpu_layers, threads=p.threads,
                      collection=p.collection, embedder=p.embedder, reranker=p.reranker)


def fit(p: Params, device, budget: int) -> Params:
    from workers.chat import chat

    if not p.model or p.n_gpu_layers != -1:
        return p
    return replace(p, n_gpu_layers=chat.fit(_answerer(p), device, budget).n_gpu_layers)


def estimate(p: Params, device) -> Estimate:
    """The collection's embedder and the reranker (cached), one encoding batch, and the answering model when set."""
    from workers.chat import chat
    from workers.rag.index import encode_workspace, model_bytes, model_key

    models = {model_key("embedder", p.embedder): model_bytes("embedder", p.embedder)}
    if p.reranker:
        models[model_key("reranker", p.reranker)] = model_bytes("reranker", p.reranker)
    parts = {"activations": encode_workspace(p.reranker or p.embedder), "workspace": 64 * 2**20}
    if p.model:
        models.update(chat.estimate(_answerer(p), device).models)
    return Estimate(parts=parts, models=models)


def _norm(path: str) -> str:
    return str(Path(path)).lstrip("./")


def run(p: Params, ctx) -> dict:
    from rouge_score import rouge_scorer
    from sacrebleu.metrics import BLEU

    from workers.rag.index import MODES, load_manifest, retrieve_modes

    rows = load_evalset(Path(p.evalset).expanduser())
    manifest = load_manifest(ctx.data_dir, p.collection)
    modes = MODES if p.reranker else tuple(m for m in MODES if not m.endswith("rerank"))
    answer_mode = modes[-1]  # the best the settings allow: what a chat with them would retrieve
    llm = None
    if p.model:
        from workers.chat.chat import load_llm

        llm = load_llm(ctx, _answerer(p))[0]  # GGUFChat or HFChat
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    bleu = BLEU(effective_order=True)
    per, t0 = [], time.perf_counter()
    for i, row in enumerate(rows):
        ctx.progress(i, len(rows), row["question"][:60])
        by_mode = retrieve_modes(ctx, p.collection, row["question"], k=p.k, reranker=p.reranker,
                                 embedder=p.embedder, modes=modes)
        want = {_norm(s) for s in row["sources"]}
        item = {"question": row["question"], "expected_sources": sorted(want), "mode": answer_mode,
                "retrieved": [h.where for h in by_mode[answer_mode]], "modes": {}}
        for mode, hits in by_mode.items():
            got = [_norm(h.source) for h in hits]
            rank = next((r for r, s in enumerate(got, start=1) if s in want), None)
            item["modes"][mode] = {"rank": rank, "hit": rank is not None, "recall": len(want & set(got)) / len(want),
                                   "rr": 1 / rank if rank else 0.0, "retrieved": [h.where for h in hits]}
        item.update({k: item["modes"][answer_mode][k] for k in ("hit", "recall", "rr")})
        hits = by_mode[answer_mode]
        if llm is not None:
            from workers.chat.chat import RAG_INSTRUCTIONS

            blocks = "\n\n".join(f"[{n}] {h.where}\n{h.text}" for n, h in enumerate(hits, start=1))
            prompt = f"{RAG_INSTRUCTIONS}\n\nSources:\n{blocks}\n\nQuestion: {row['question']}"
            answer = "".join(llm.stream([{"role": "user", "content": prompt}], max_tokens=p.max_tokens,
                                        temperature=0.0, top_p=1.0, seed=1))
            expected = row.get("answer", "")
            item["answer"] = answer
            item["rougeL"] = scorer.score(expected, answer)["rougeL"].fmeasure if expected else None
            item["bleu"] = bleu.sentence_score(answer, [expected]).score if expected else None
            if p.judge:
                from workers.chat.llm import json_schema_grammar

                g = json_schema_grammar({"type": "object", "properties": {"score": {"type": "integer", "enum": [1, 2, 3, 4, 5]}},
                                         "required": ["score"]})
                verdict = "".join(llm.stream([{"role": "user", "content": JUDGE_PROMPT.format(
                    q=row["question"], a=expected, r=answer)}], max_tokens=20, temperature=0.0, top_p=1.0,
                    grammar=g if llm.backend == "gguf" else None, seed=1))
                m = re.search(r"\d", verdict)
                item["judge"] = int(m.group()) if m else None
        per.append(item)
        ctx.metric(i + 1, **{f"rr_{m.replace('+', '_')}": item["modes"][m]["rr"] for m in modes},
                   hit=float(item["hit"]), rr=item["rr"])

    def mean(values):
        values = [v for v in values if v is not None]
        return sum(values) / len(values) if values else None

    by = {m: {f"hit@{p.k}": mean(x["modes"][m]["hit"] for x in per),
              f"recall@{p.k}": mean(x["modes"][m]["recall"] for x in per),
              "mrr": mean(x["modes"][m]["rr"] for x in per)} for m in modes}
    summary = {**by[answer_mode], "modes": by, "mode": answer_mode,
               "rougeL": mean(x.get("rougeL") for x in per), "bleu": mean(x.get("bleu") for x in per),
               "judge": mean(x.get("judge") for x in per), "questions": len(per),
               "seconds": time.perf_counter() - t0, "collection": p.collection, "reranker": p.reranker or None,
               "model": p.model or None, "k": p.k, "embedder": manifest["embedder"],
               "chunking": manifest.get("chunking")}
    summary["hit"] = summary[f"hit@{p.k}"]
    (ctx.run_dir / "results.jsonl").write_text("\n".join(json.dumps(x) for x in per) + "\n")
    (ctx.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    ctx.artifact(ctx.run_dir / "results.jsonl", "per-question results")
    ctx.artifact(ctx.run_dir / "summary.json", "summary")
    ctx.progress(len(rows), len(rows), "done")
    return summary
