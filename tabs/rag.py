"""Collections (ingest notes and code into Chroma) and Evaluate (retrieval and answer metrics, compared by run)."""
from collections.abc import Iterator
from pathlib import Path

import gradio as gr

from studio import Job
from studio.presets import presets

from .common import Follow, admin_only, progress_html, stash_uploads, user_of, visible_collections, watch

EVAL_COLUMNS = ["job", "collection", "embedder", "chunking", "k", "reranker", "model", "hit@k", "recall@k", "MRR",
                "ROUGE-L", "BLEU", "judge", "questions"]


def collections_table(studio, owner: str | None = None) -> list[list]:
    return [[c["name"], c["files"], c["chunks"], c["embedder"], c["root"]] for c in visible_collections(studio, owner)]


def fill(studio, owner: str | None) -> dict:
    """The user's collections and evaluations, on page load."""
    return {"table": collections_table(studio, owner), "ev_table": eval_table(studio, owner),
            "ev_collection": gr.update(choices=[c["name"] for c in visible_collections(studio, owner)]),
            **admin_only(studio, owner, "folder")}


def eval_table(studio, owner=None) -> list[list]:
    """Every finished evaluation side by side, newest first."""
    rows = []
    for j in studio.jobs(limit=100, owner=owner, kind="rag_eval"):
        if j.status.value != "DONE":
            continue
        r = j.result
        k = r["k"]

        def f(v):
            return None if v is None else round(v, 3)

        chunking = r.get("chunking") or {}
        chunks = f"{chunking['chunk_chars']}/{chunking['overlap_chars']}" if chunking else "—"
        rows.append([j.id, r["collection"], Path(r.get("embedder") or "—").name, chunks, k, r["reranker"] or "—",
                     r["model"] or "—", f(r[f"hit@{k}"]),
                     f(r[f"recall@{k}"]), f(r["mrr"]), f(r["rougeL"]), f(r["bleu"]), f(r["judge"]), r["questions"]])
    return rows


def follow_ingest(studio, job: Job, owner: str | None) -> Iterator[tuple]:
    """Stream an ingest into Collections (ingest_status, table): progress, then what changed and the new table."""
    for job, _ in watch(studio, job):
        if not job.status.final:
            yield progress_html(job), gr.skip()
    msg = progress_html(job)
    if job.status.value == "DONE":
        r = job.result
        msg += (f"<br>{r['added']} added, {r['updated']} updated, {r['unchanged']} unchanged, {r['removed']} "
                f"removed · {r['chunks']} chunks · {r['docs_per_s'] or 0:.1f} files/s")
        for s in r["skipped"]:
            msg += f"<br>skipped <code>{s['file']}</code>: {s['reason']}"
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
                    "Re-ingesting the same folder only processes changed files and drops deleted ones.")
        with gr.Row():
            with gr.Column():
                name = gr.Textbox(label="Collection", placeholder="my-notes")
                files = gr.File(label="Files or a .zip", file_count="multiple")
                folder = gr.Textbox(label="…or a folder on this machine", placeholder="/home/me/notes")
                embedder = gr.Dropdown(list(presets()["embedder"]), value="bge-small-en-v1.5",
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
                    "per line. Retrieval metrics need no LLM; with a model, answers are scored with ROUGE-L and "
                    "BLEU (and optionally an LLM judge).")
        with gr.Row():
            with gr.Column():
                ev_collection = gr.Dropdown([],
                                            label="Collection", allow_custom_value=True)
                evalset = gr.File(label="Eval set (.jsonl)", file_count="single")
                with gr.Row():
                    ev_k = gr.Slider(1, 20, 4, step=1, label="k")
                    ev_reranker = gr.Dropdown(["", *presets()["reranker"]], value="", label="Reranker",
                                              allow_custom_value=True)
                ev_model = gr.Dropdown(["", *presets()["llm"]], value="", label="Model (empty: retrieval only)",
                                       allow_custom_value=True)
                ev_judge = gr.Checkbox(False, label="LLM judge")
                run_eval = gr.Button("Evaluate", variant="primary")
            with gr.Column():
                ev_status = gr.HTML()
                ev_table = gr.Dataframe([], headers=EVAL_COLUMNS, interactive=False,
                                        label="Runs side by side")

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
