"""The first-run panel: what this machine can do, and the downloads that suit its card, until the user closes it."""
import html

import gradio as gr

from studio.presets import DOWNLOAD, availability, presets

from .common import save_form, saved_forms, user_of

KEY = "first_run"  # in the user's saved forms: {"closed": true} once closed
GB = 1e9


def recommend(device_kind: str, budget_bytes: int) -> dict[str, str]:
    """One preset per table for this card: the largest whose VRAM estimate fits the job budget with room for the
    CUDA context; on the CPU the small ones, since everything there runs on a few cores."""
    budget_gb = budget_bytes / GB
    tables = presets()
    if device_kind != "cuda":
        return {"llm": "qwen2.5-0.5b-instruct-q4km", "embedder": "bge-small-en-v1.5", "whisper": "base",
                "yolo": "yolov8n"}

    def largest(table: str, room: float) -> str | None:
        fits = [(p.get("vram_gb", p["size_gb"]), n) for n, p in tables[table].items()
                if not p.get("pypi") and p.get("backend", "gguf") == "gguf" and p.get("vram_gb", p["size_gb"]) <= room]
        return max(fits)[1] if fits else None

    picks = {"llm": largest("llm", budget_gb - 0.7), "embedder": "bge-small-en-v1.5",
             "reranker": "bge-reranker-base" if budget_gb >= 6 else None,
             "whisper": largest("whisper", budget_gb - 0.7), "yolo": "yolov8s" if budget_gb >= 6 else "yolov8n",
             "vlm": largest("vlm", budget_gb - 0.7)}  # Vision chat's fast path: a GGUF with its projector
    return {t: n for t, n in picks.items() if n}


def capabilities(meter: dict) -> str:
    d = meter["device"]
    if d["kind"] == "cuda":
        head = (f"**{html.escape(d['name'])}** with {d['total'] / 2**30:.1f} GiB; jobs get a budget of "
                f"{meter['budget'] / 2**30:.1f} GiB, and the meter above refuses what would not fit.")
    else:
        head = (f"**No GPU in use** ({html.escape(d['note'])}): every tab still works on the CPU, slowly but truly, "
                f"gated against {meter['budget'] / 2**30:.1f} GiB of RAM.")
    ready = ("Ready now, offline: **Chat** with the packaged gemma-3-270m (a tiny model: good for trying things, not "
             "for answers), **Collections** with all-MiniLM-L6-v2, **Transcribe** with tiny.en (English), **Tiny LM** "
             "on a corpus on disk, **Detect** training a YOLO from scratch on your labelled set.")
    return f"{head}\n\n{ready}\n\nFor real use, download the models that suit this machine (they resume if cut):"


def choices(studio, picks: dict[str, str]) -> list[tuple[str, str]]:
    out = []
    for table, name in picks.items():
        p = presets()[table][name]
        state = availability(table, name, studio.config.data_dir)
        mark = f"{p['size_gb']} GB download" if state == DOWNLOAD else "on disk"
        out.append((f"{table}: {name} ({mark})", name))
    return out


def build(studio, auth: bool = False) -> dict:
    with gr.Group(visible=False, elem_id="first-run") as panel:
        gr.Markdown("### Welcome to Studio")
        about = gr.Markdown()
        picks = gr.CheckboxGroup([], label="Recommended downloads for this machine")
        with gr.Row():
            download = gr.Button("Download selected", variant="primary", size="sm")
            close = gr.Button("Close this panel", size="sm")
        status = gr.Markdown()
    return dict(panel=panel, about=about, picks=picks, download=download, close=close, status=status)


def wire(demo, studio, ui: dict, auth: bool) -> None:
    """Show the panel on load until this user closes it; Download queues model_download jobs (the io lane)."""

    def on_load(request: gr.Request):
        owner = user_of(request, auth)
        if saved_forms(studio, owner).get(KEY, {}).get("closed"):
            return gr.update(visible=False), gr.skip(), gr.skip()
        meter = studio.meter(owner=owner)
        offered = choices(studio, recommend(meter["device"]["kind"], meter["budget"]))
        missing = [v for label, v in offered if "download" in label]
        return gr.update(visible=True), capabilities(meter), gr.update(choices=offered, value=missing)

    demo.load(on_load, None, [ui["panel"], ui["about"], ui["picks"]], api_name="first_run", show_progress="hidden")

    def on_download(names, request: gr.Request):
        owner = user_of(request, auth)
        if not names:
            return "Tick at least one model."
        lines = []
        for name in names:
            try:
                job = studio.submit("model_download", {"preset": name}, owner=owner)
            except ValueError as e:
                lines.append(f"- {html.escape(name)}: ❌ {html.escape(str(e))}")
                continue
            lines.append(f"- {html.escape(name)}: job `{job.id}` {job.status.value}" +
                         (f" — {html.escape(job.error)}" if job.error else ""))
        return "Queued (follow them in Jobs or Models; offline they fail with what to fetch):\n" + "\n".join(lines)

    ui["download"].click(on_download, ui["picks"], ui["status"], api_name="first_run_download")

    def on_close(request: gr.Request):
        save_form(studio, user_of(request, auth), KEY, {"closed": True})
        return gr.update(visible=False)

    ui["close"].click(on_close, None, ui["panel"], api_name="first_run_close")
