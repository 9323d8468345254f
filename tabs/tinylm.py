"""Tiny LM tab: train a small transformer from scratch with a live loss plot and samples; generate from it."""
import time
from pathlib import Path
from collections.abc import Iterator
from typing import Any

import gradio as gr

from studio import Job
from workers.tinylm.data import PYTHON_STDLIB
from workers.tinylm.train import PRESETS

from .common import (Follow, LivePlot, apply_fix, bind, eta, gib, offer_fix, progress_html, resume_run, stash_uploads,
                     user_of, watch)

# the Data radio's values (what the API takes and forms remember); labels come from data_choices()
DATA_CHOICES = ["Python code (standard library)", "TinyShakespeare", "Upload text file(s)", "Folder on this machine"]
BUILT_IN = {DATA_CHOICES[0]: PYTHON_STDLIB, DATA_CHOICES[1]: "tinyshakespeare"}  # choice -> the job's data param
# the Train and Generate buttons' inputs: names in build()'s dict, and their endpoints' parameters in this order
TRAIN_INPUTS = ("data_source", "files", "folder", "preset", "pos", "tokenizer", "max_steps", "target_val_loss",
                "batch_size", "block_size", "n_layer", "n_head", "n_embd", "lr")
GENERATE_INPUTS = ("checkpoint", "prompt", "max_new_tokens", "temperature", "top_k", "kv_cache")
TRAIN_OUTPUTS = ("status", "plot", "sample", "stats", "job_id")
GENERATE_OUTPUTS = ("output", "gen_stats")
SIZE_FIELDS = ("max_steps", "batch_size", "block_size", "n_layer", "n_head", "n_embd", "lr")  # 0: the preset's value
# params the gate's suggestion may change (workers.tinylm.train.shrink) -> (the input, its label)
FIX_INPUTS = {"batch_size": ("batch_size", "Batch"), "block_size": ("block_size", "Context"),
              "n_embd": ("n_embd", "Width")}


def _stats(job, events: list[dict]) -> str:
    metrics = [e for e in events if e["type"] == "metric"]
    lines = []
    if metrics:
        m = metrics[-1]
        lines.append(f"step **{m['step']}** · train loss **{m['train_loss']:.3f}** · val loss **{m['val_loss']:.3f}**"
                     f" · perplexity **{m['perplexity']:.2f}**")
        mfu = f" · MFU **{100 * m['mfu']:.1f}%**" if m.get("mfu") is not None else ""
        lines.append(f"**{m['tokens_per_s']:,.0f}** tokens/s · {m['gflops']:.1f} GFLOP/s{mfu} · "
                     f"lr {m['lr']:.2e} · {m['seconds']:.0f} s")
    est = gib(job.estimate_bytes)
    lines.append(f"memory estimate {est}" + (f" · measured peak {gib(job.peak_bytes)}" if job.peak_bytes else ""))
    if job.result and job.result.get("reached_target"):
        lines.append(f"reached the target val loss in **{job.result['seconds_to_target']:.1f} s**")
    return "  \n".join(lines)


def follow(studio, job: Job, owner: str | None) -> Iterator[tuple]:
    """Stream a training job into the tab (TRAIN_OUTPUTS): status, loss plot, latest sample, speed; used by Train
    and by a reloaded page."""
    seen, last, plot = -1, 0.0, LivePlot()
    for job, evs in watch(studio, job, every=0.25):
        if len(evs) == seen and not job.status.final and time.time() - last < 1.0:
            continue  # nothing new: the status line (ETA) still refreshes once a second
        seen, last = len(evs), time.time()
        samples = [e for e in evs if e["type"] == "sample"]
        sample = f"step {samples[-1]['step']}:\n{samples[-1]['text']}" if samples else ""
        yield progress_html(job, eta(job)), plot(evs), sample, _stats(job, evs), job.id


def follow_generate(studio, job: Job, owner: str | None) -> Iterator[tuple]:
    """Stream a generation into the tab (GENERATE_OUTPUTS): its status while it runs, then the text and speed."""
    for job, _ in watch(studio, job, every=0.1):
        if not job.status.final:
            yield "", progress_html(job)
    if job.status.value != "DONE":
        raise gr.Error(job.error or job.status.value)
    r = job.result
    yield r["text"], (f"**{r['tokens_per_s']:,.0f} tokens/s** · {r['tokens']} tokens in {r['seconds']:.2f} s · "
                      f"KV cache {'on' if r['kv_cache'] else 'off'} · model "
                      f"{'from the cache' if r['model_cached'] else 'loaded'} · job `{job.id}`")


def train_form(job: Job) -> dict:
    """The Train form as the job was started: its data source (the params name a path), and 0 for sizes it left to
    the preset."""
    data = str(job.params.get("data", ""))
    source = next((c for c, name in BUILT_IN.items() if name == data), None) or (
        DATA_CHOICES[2] if {"uploads", "users"} & set(Path(data).parts) else DATA_CHOICES[3])  # the studio's folders
    return {"data_source": source, "folder": data if source == DATA_CHOICES[3] else "",
            **{n: job.params.get(n) or 0 for n in SIZE_FIELDS}, "target_val_loss": job.params.get("target_val_loss", 0)}


KINDS = {"tinylm": Follow(follow, TRAIN_OUTPUTS, form=("preset", "pos", "tokenizer"), to_form=train_form),
         "tinylm_generate": Follow(follow_generate, GENERATE_OUTPUTS, form=GENERATE_INPUTS)}
# the forms whose last-used settings come back on page load (tabs.common.bind(..., remember=key))
FORMS = {"tinylm_train": tuple(n for n in TRAIN_INPUTS if n != "files"), "tinylm_generate": GENERATE_INPUTS}


def data_choices(studio, admin: bool = True) -> list[tuple[str, str]]:
    """The Data radio's (label, value) pairs: whether each corpus is on disk or needs a download; the folder of the
    server's only for the admin (a remote user trains on her uploads)."""
    shakespeare = studio.config.datasets_dir / "tinyshakespeare.txt"
    labels = ["Python code (31 standard-library modules, 1.1 MB, on disk)",
              "TinyShakespeare (" + ("on disk)" if shakespeare.exists() else "downloads 1.1 MB on first use)"),
              DATA_CHOICES[2], DATA_CHOICES[3]]
    return list(zip(labels, DATA_CHOICES))[:4 if admin else 3]


def _data_path(studio, source: str, uploaded, folder: str, owner: str | None) -> str:
    if source in BUILT_IN:
        return BUILT_IN[source]
    if source == DATA_CHOICES[3]:
        if not (folder or "").strip():
            raise gr.Error("Enter a folder path, or pick another data source.")
        return folder.strip()
    if not uploaded:
        raise gr.Error("Upload at least one text file, or pick another data source.")
    return stash_uploads(studio, uploaded, "tinylm", owner)


def start_train(studio, owner: str | None, v: dict[str, Any]) -> Iterator[tuple]:
    """The Train button, given its inputs by name (TRAIN_INPUTS): a tinylm job, streamed."""
    params = dict(data=_data_path(studio, v["data_source"], v["files"], v["folder"], owner), preset=v["preset"],
                  pos=v["pos"], tokenizer=v["tokenizer"], target_val_loss=v["target_val_loss"] or 0.0)
    params |= {name: v[name] for name in SIZE_FIELDS if v[name]}
    try:
        job = studio.submit("tinylm", params, owner=owner)
    except ValueError as e:
        raise gr.Error(str(e))
    yield from follow(studio, job, owner)  # a refusal shows in the status line; Apply offers its fitting change


NOTHING_TO_RESUME = ("Nothing to resume: no cancelled, interrupted or failed Tiny LM run left a checkpoint. "
                     "Train one (Cancel keeps a checkpoint).")


def start_resume(studio, owner: str | None, current: str) -> Iterator[tuple]:
    """The Resume button: continue the tab's run (or the newest one that stopped) from its checkpoint, as a new job
    through the studio's resume, and follow that job in the tab."""
    yield from follow(studio, resume_run(studio, owner, current, "tinylm", NOTHING_TO_RESUME), owner)


def start_generate(studio, owner: str | None, v: dict[str, Any]) -> Iterator[tuple]:
    """The Generate button, given its inputs by name (GENERATE_INPUTS): a tinylm_generate job, streamed."""
    if not v["checkpoint"]:
        raise gr.Error("Pick a trained model first (train one above, then press ↻).")
    try:
        job = studio.submit("tinylm_generate", {name: v[name] for name in GENERATE_INPUTS}, owner=owner)
    except ValueError as e:
        raise gr.Error(str(e))
    yield from follow_generate(studio, job, owner)


def fill(studio, owner: str | None) -> dict:
    """The user's trained models, on page load."""
    admin = studio.user(owner).admin  # a remote user trains on her uploads, not on a folder of the server's
    return {"checkpoint": gr.update(choices=checkpoint_choices(studio, owner)),
            "data_source": gr.update(choices=data_choices(studio, admin))}


def checkpoint_choices(studio, owner: str | None = None) -> list[tuple[str, str]]:
    out = []
    for j in studio.jobs(limit=100, owner=owner, kind="tinylm"):
        if (studio.run_dir(j.id) / "checkpoint" / "state.json").exists():
            loss = (j.result or {}).get("val_loss")
            label = f"{j.id} · {j.params.get('preset')} · {j.params.get('pos')} · {j.status.value}"
            out.append((label + (f" · val {loss:.3f}" if loss else ""), j.id))
    return out


def build(studio, auth: bool = False) -> dict:
    gr.Markdown("Train a 1–10 M parameter transformer from scratch, watch its loss fall and its samples improve, "
                "then generate from it. Runs on the GPU when there is one, else on the CPU.")
    with gr.Row():
        with gr.Column(scale=2):
            data_source = gr.Radio(data_choices(studio), value=DATA_CHOICES[0], label="Data")
            files = gr.File(label="Text or code files", file_count="multiple", visible=False)
            folder = gr.Textbox(label="Folder of text or code on this machine", placeholder="/home/me/project",
                                visible=False)
            with gr.Row():
                preset = gr.Dropdown(list(PRESETS), value="cpu-quick", label="Preset",
                                     info="cpu-quick: 0.8 M params, context 64 · gpu-baby: 10.7 M, context 256")
                pos = gr.Radio(["rope", "alibi", "learned"], value="rope", label="Positions")
                tokenizer = gr.Radio(["char", "bpe"], value="char", label="Tokenizer")
            with gr.Row():
                max_steps = gr.Number(0, label="Max steps (0 = preset)", precision=0, minimum=0)
                target_val_loss = gr.Number(0, label="Stop at val loss (0 = off)", minimum=0)
            with gr.Accordion("Model size (0 = preset)", open=False):
                with gr.Row():
                    batch_size = gr.Number(0, label="Batch", precision=0, minimum=0)
                    block_size = gr.Number(0, label="Context", precision=0, minimum=0)
                    n_layer = gr.Number(0, label="Layers", precision=0, minimum=0)
                    n_head = gr.Number(0, label="Heads", precision=0, minimum=0)
                    n_embd = gr.Number(0, label="Width", precision=0, minimum=0)
                    lr = gr.Number(0, label="Learning rate", minimum=0)
            with gr.Row():
                train = gr.Button("Train", variant="primary")
                cancel = gr.Button("Cancel", variant="stop")
                resume = gr.Button("Resume")
            fix = gr.Button("Apply", visible=False, size="sm")  # a refusal's change that fits, into the form
        with gr.Column(scale=3):
            status = gr.HTML("No training job yet.")
            # no empty first value: the plot would keep that empty legend
            plot = gr.LinePlot(x="step", y="loss", color="series", title="Loss", height=260)
            stats = gr.Markdown()
            sample = gr.Textbox(label="Sample as training goes", lines=6, interactive=False)
    job_id, fix_change = gr.State(""), gr.State({})

    gr.Markdown("### Generate")
    with gr.Row():
        with gr.Column(scale=2):
            with gr.Row():
                checkpoint = gr.Dropdown([], label="Trained model (a job, or a run folder path)",
                                         scale=4, allow_custom_value=True)
                refresh = gr.Button("↻", scale=1, min_width=40)
            prompt = gr.Textbox("def ", label="Prompt", lines=2)
            with gr.Row():
                max_new_tokens = gr.Slider(1, 2000, 256, step=1, label="Length (tokens)")
                temperature = gr.Slider(0, 2, 0.8, step=0.05, label="Temperature (0 = greedy)")
                top_k = gr.Slider(0, 200, 40, step=1, label="Top-k (0 = off)")
            kv_cache = gr.Checkbox(True, label="KV cache")
            gen = gr.Button("Generate", variant="primary")
        with gr.Column(scale=3):
            output = gr.Textbox(label="Output", lines=10, interactive=False)
            gen_stats = gr.Markdown()

    ui = dict(data_source=data_source, files=files, folder=folder, preset=preset, pos=pos, tokenizer=tokenizer,
              max_steps=max_steps, target_val_loss=target_val_loss, batch_size=batch_size, block_size=block_size,
              n_layer=n_layer, n_head=n_head, n_embd=n_embd, lr=lr, train=train, cancel=cancel, resume=resume,
              fix=fix, fix_change=fix_change, status=status,
              plot=plot, stats=stats, sample=sample, job_id=job_id, checkpoint=checkpoint, refresh=refresh,
              prompt=prompt, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
              kv_cache=kv_cache, generate=gen, output=output, gen_stats=gen_stats)

    def on_source(choice):
        return gr.update(visible=choice == DATA_CHOICES[2]), gr.update(visible=choice == DATA_CHOICES[3])

    data_source.change(on_source, data_source, [files, folder], api_name="tinylm_data_source", show_progress="hidden")
    def on_fix_offer(current, request: gr.Request):
        return offer_fix(studio, current, user_of(request, auth), FIX_INPUTS)

    train.click(bind(start_train, studio, auth, remember="tinylm_train"), None, [ui[n] for n in TRAIN_OUTPUTS],
                inputs_kwargs={n: ui[n] for n in TRAIN_INPUTS}, api_name="tinylm_train", show_progress="hidden"
                ).then(on_fix_offer, job_id, [fix, fix_change], api_name="tinylm_fix_offer", show_progress="hidden")

    def on_resume(current, request: gr.Request):
        yield from start_resume(studio, user_of(request, auth), current)

    resume.click(on_resume, job_id, [ui[n] for n in TRAIN_OUTPUTS], api_name="tinylm_resume", show_progress="hidden"
                 ).then(on_fix_offer, job_id, [fix, fix_change], api_name="tinylm_resume_fix_offer",
                        show_progress="hidden")
    fix_names = tuple(name for name, _ in FIX_INPUTS.values())
    fix.click(lambda change: apply_fix(change, fix_names, "Train"), fix_change, [*(ui[n] for n in fix_names), fix],
              api_name="tinylm_apply_fix", show_progress="hidden")

    def on_cancel(current):
        if not current:
            return "No job to cancel."
        job = studio.cancel(current)
        return progress_html(job) + ("<br>Cancel requested: it stops at the next step and keeps a checkpoint; "
                                     "Resume continues from it."
                                     if not job.status.final else "")

    cancel.click(on_cancel, job_id, status, api_name="tinylm_cancel")

    def on_refresh(request: gr.Request):
        return gr.update(choices=checkpoint_choices(studio, user_of(request, auth)))

    refresh.click(on_refresh, None, checkpoint, api_name="tinylm_checkpoints")
    gen.click(bind(start_generate, studio, auth, remember="tinylm_generate"), None, [ui[n] for n in GENERATE_OUTPUTS],
              inputs_kwargs={n: ui[n] for n in GENERATE_INPUTS}, api_name="tinylm_generate", show_progress="hidden")
    return ui
