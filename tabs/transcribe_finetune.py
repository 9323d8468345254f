"""Transcribe tab, Fine-tune sub-tab (kinds asr_check and asr_finetune): your recordings with their transcripts (upload
audio with same-named .txt/.srt/.vtt, a CSV/TSV/JSONL manifest with its audio, or a .zip; add your reviewed transcribe
jobs; a folder on this machine for the admin), Check data (the report), Train with a live loss and dev WER plot,
Cancel / Resume, the gate's fitting change, the base's and the tuned model's dev transcripts side by side with WER and
word diffs, and Transcribe with it (the Transcribe sub-tab with this run's CTranslate2 model). tabs.transcribe mounts it:
build_train() inside its Fine-tune sub-tab, wire_use() once both sub-tabs exist, KINDS / FORMS / fill merged into its
own."""
from __future__ import annotations

import html
import secrets
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gradio as gr

from studio import Job, JobStatus

from .common import (Follow, LivePlot, bind, eta, finished_run, gib, own_uploads, owned_job, progress_html, user_of,
                     watch, wire_training)

# the training params the form sets; each is the input af_<param> (names in build_train()'s dict)
PARAMS = ("base", "language", "task", "method", "epochs", "max_steps", "lr", "micro_batch", "grad_accum", "lora_r",
          "lora_alpha", "spec_augment", "freeze_encoder", "gradient_checkpointing", "eval_every", "seed", "quantization")
INTS = {"max_steps", "micro_batch", "grad_accum", "lora_r", "lora_alpha", "eval_every", "seed"}
DATA_INPUTS = ("af_files", "af_eval_files", "af_jobs", "af_data_path", "af_eval_path")
# the Train button's inputs: the /asr_ft_train endpoint's parameters, in this order
TRAIN_INPUTS = (*DATA_INPUTS, *(f"af_{n}" for n in PARAMS))
CHECK_INPUTS = (*DATA_INPUTS, "af_language", "af_seed")
TRAIN_OUTPUTS = ("af_status", "af_plot", "af_stats", "af_report", "af_evaluation", "af_diffs", "af_run", "af_job_id")
SERIES = ("train_loss", "dev_loss", "dev_wer")
# params the gate's suggestion may change (workers.speech.finetune.shrink) -> (the input, its label)
FIX_INPUTS = {"micro_batch": ("af_micro_batch", "Micro-batch"), "grad_accum": ("af_grad_accum", "Accumulation"),
              "method": ("af_method", "Method"), "freeze_encoder": ("af_freeze_encoder", "Freeze encoder"),
              "base": ("af_base", "Base"), "gradient_checkpointing": ("af_gradient_checkpointing", "Checkpointing")}
EVAL_HEADERS = ["clip", "reference", "base", "tuned", "word errors base", "word errors tuned"]
NOTHING_TO_RESUME = ("Nothing to resume: no cancelled, interrupted or failed Whisper fine-tune left a checkpoint. "
                     "Train one (Cancel keeps a checkpoint).")
MANIFESTS = (".csv", ".tsv", ".jsonl")


# ---- what the tab shows --------------------------------------------------------------------------------------------
def evaluation_rows(result: dict | None, studio=None, job: Job | None = None) -> list[list]:
    """Each dev clip: its reference, the base's and the tuned model's text, and their word errors."""
    import json

    if job is None or studio is None or not (studio.run_dir(job.id) / "evaluation.json").exists():
        return []
    rows = json.loads((studio.run_dir(job.id) / "evaluation.json").read_text())["clips"]
    return [[r["where"], r["reference"], r.get("base") or "", r.get("tuned") or "", r.get("base_word_errors"),
             r.get("tuned_word_errors")] for r in rows]


def diffs_html(result: dict | None) -> str:
    """The most-improved and worst-improved dev clips as word diffs against the reference."""
    from workers.speech.asr_data import diff_html

    r = result or {}
    if r.get("wer_tuned") is None:
        return ""
    out = [f"<p><b>dev WER {r['wer_base']:.3f} → {r['wer_tuned']:.3f}</b>, CER {r['cer_base']:.3f} → "
           f"{r['cer_tuned']:.3f} ({html.escape(r.get('normalizer') or '')})</p>"]
    for title, key in (("Most improved", "most_improved"), ("Worst improved", "worst_improved")):
        out.append(f"<p><b>{title}</b></p>")
        for c in r.get(key) or []:
            out.append(f"<p><code>{html.escape(c['where'])}</code> base: {diff_html(c['base_diff'])}<br>"
                       f"tuned: {diff_html(c['tuned_diff'])}</p>")
    return "<div class='diff'>" + "".join(out) + "</div>"


def _stats(job: Job, evs: list[dict]) -> str:
    metrics = [e for e in evs if e["type"] == "metric"]
    train = [m for m in metrics if m.get("train_loss") is not None]
    wers = [m for m in metrics if m.get("dev_wer") is not None]
    lines = []
    if train:
        m = train[-1]
        lines.append(f"step **{m['step']}** · train loss **{m['train_loss']:.3f}** · peak {gib(m.get('peak_bytes'))}"
                     + (f" · ETA {time.strftime('%H:%M:%S', time.gmtime(m['eta_s']))}" if m.get("eta_s") else ""))
    if wers:
        lines.append(f"dev WER **{wers[-1]['dev_wer']:.3f}**"
                     + (f", from {wers[0]['dev_wer']:.3f} before training" if len(wers) > 1 else ""))
    for e in evs:
        if e["type"] == "oom":
            lines.append(f"⚠ {html.escape(e.get('message', 'out of memory'))}")
    lines.append(f"memory estimate {gib(job.estimate_bytes)}"
                 + (f" · measured peak {gib(job.peak_bytes)}" if job.peak_bytes else ""))
    r = job.result or {}
    if job.status is JobStatus.DONE and r:
        lines.append(f"CTranslate2 model saved: `{r.get('ct2')}` · **Transcribe with it** below")
    return "  \n".join(lines)


def follow(studio, job: Job, owner: str | None) -> Iterator[tuple]:
    """Stream an asr_finetune job into the sub-tab (TRAIN_OUTPUTS): status, loss and dev WER plot, the data report,
    the side-by-side table and word diffs once it is done; Train, Resume and a reloaded page use it."""
    from workers.speech.asr_data import report_html

    seen, last, plot, report = -1, 0.0, LivePlot(SERIES), None
    for job, evs in watch(studio, job, every=0.5):
        if len(evs) == seen and not job.status.final and time.time() - last < 1.0:
            continue
        seen, last = len(evs), time.time()
        if report is None:
            found = next((e["report"] for e in evs if e["type"] == "data_report"), None)
            report = report_html(found) if found else None
        done = job.status is JobStatus.DONE
        yield (progress_html(job, eta(job)), plot(evs), _stats(job, evs), report if report else gr.skip(),
               evaluation_rows(job.result, studio, job) if job.status.final else gr.skip(),
               diffs_html(job.result) if job.status.final else gr.skip(),
               gr.update(choices=run_choices(studio, owner), value=job.id) if done else gr.skip(), job.id)


def to_form(job: Job) -> dict:
    """A job's params in the form: its settings, and a data path of the server's (an upload is not put back)."""
    out = {f"af_{n}": job.params[n] for n in PARAMS if n in job.params}
    for param, box in (("data", "af_data_path"), ("eval_data", "af_eval_path")):
        value = str(job.params.get(param) or "")
        if value and not {"uploads", "users"} & set(Path(value).parts):
            out[box] = value
    return out


KINDS = {"asr_finetune": Follow(follow, TRAIN_OUTPUTS, to_form=to_form)}
# the Train form's last-used settings come back on page load (uploads and picked jobs are not kept)
FORMS = {"asr_finetune": tuple(n for n in TRAIN_INPUTS if n not in ("af_files", "af_eval_files", "af_jobs"))}


# ---- handlers ------------------------------------------------------------------------------------------------------
def _files(value) -> list:
    return [] if not value else value if isinstance(value, list) else [value]


def _gather(studio, owner: str | None, files: list, tag: str) -> str:
    """Uploads as one data source: a lone manifest or zip as it is; audio with transcripts (or a manifest with its
    audio) in one folder of their own, so names and relative paths find each other."""
    paths = [Path(p) for p in own_uploads(studio, files, owner)]
    if owner is None:  # Gradio keeps each upload in a folder of its own: gather them
        dest = studio.config.uploads_dir / f"{tag}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(4)}"
        dest.mkdir(parents=True)
        for p in paths:
            shutil.copy(p, dest / p.name)
        paths = [dest / p.name for p in paths]
    manifests = [p for p in paths if p.suffix.lower() in MANIFESTS]
    if len(manifests) > 1:
        raise gr.Error(f"Upload one manifest at a time; got {', '.join(p.name for p in manifests)}.")
    if manifests:
        return str(manifests[0])
    if len(paths) == 1 and paths[0].suffix.lower() == ".zip":
        return str(paths[0])
    return str(paths[0].parent)


def data_params(studio, owner: str | None, v: dict[str, Any]) -> dict:
    """data and eval_data from the form: the uploads (and the picked transcribe jobs), else the admin's paths."""
    files, dev, jobs = _files(v.get("af_files")), _files(v.get("af_eval_files")), list(v.get("af_jobs") or [])
    for j in jobs:
        job = owned_job(studio, j, owner)
        if job.kind != "transcribe":
            raise gr.Error(f"{j} is a {job.kind} job, not a transcript")
    typed = {k: (v.get(box) or "").strip() for k, box in (("data", "af_data_path"), ("eval_data", "af_eval_path"))}
    if (typed["data"] or typed["eval_data"]) and not studio.user(owner).admin:
        raise gr.Error("Upload the recordings: only the studio's admin may name files on the server.")
    sources = ([_gather(studio, owner, files, "asr-ft")] if files else []) + ([typed["data"]] if typed["data"] else [])
    sources += jobs
    if not sources:
        raise gr.Error("Upload your audio with same-named .txt/.srt/.vtt transcripts (or a manifest, or a .zip), or "
                       "pick reviewed transcripts, first.")
    eval_data = _gather(studio, owner, dev, "asr-dev") if dev else typed["eval_data"]
    return {"data": ",".join(sources), "eval_data": eval_data}


def train_params(studio, owner: str | None, v: dict[str, Any]) -> dict:
    params = {n: v[f"af_{n}"] for n in PARAMS if v.get(f"af_{n}") not in (None, "")}
    params |= {n: int(params[n]) for n in INTS if n in params}
    params["language"] = (v.get("af_language") or "").strip()
    return params | data_params(studio, owner, v)


def start_train(studio, owner: str | None, v: dict[str, Any]) -> Iterator[tuple]:
    """The Train button, given its inputs by name (TRAIN_INPUTS): an asr_finetune job, streamed."""
    try:
        job = studio.submit("asr_finetune", train_params(studio, owner, v), owner=owner)
    except ValueError as e:
        raise gr.Error(str(e)) from None
    yield from follow(studio, job, owner)  # a refusal shows in the status line; Apply offers its fitting change


def start_check(studio, owner: str | None, v: dict[str, Any]) -> Iterator[str]:
    """Check data: an asr_check job (no model, in the io lane); its report when it is done."""
    from workers.speech.asr_data import report_html

    from .finetune import _until_done

    params = {"language": (v.get("af_language") or "").strip(), "seed": int(v["af_seed"]),
              **data_params(studio, owner, v)}
    job = yield from _until_done(studio, "asr_check", params, owner)
    if job is not None:
        yield report_html(job.result["report"])


def finished(studio, owner: str | None, current: str) -> Job:
    """The picked run when it finished, else the user's newest finished Whisper fine-tune."""
    return finished_run(studio, owner, current, "asr_finetune",
                        "No finished Whisper fine-tune yet: train one (or wait for this one to finish).")


def run_choices(studio, owner: str | None) -> list[tuple[str, str]]:
    """The user's finished Whisper fine-tunes, newest first, with the WER they gained."""
    out = []
    for j in studio.jobs(limit=100, owner=owner, kind="asr_finetune"):
        if j.status is JobStatus.DONE:
            r = j.result or {}
            wer = (f" · WER {r['wer_base']:.2f} → {r['wer_tuned']:.2f}" if r.get("wer_tuned") is not None else "")
            out.append((f"{j.id} · {Path(str(j.params.get('base'))).name} · {r.get('steps')} steps{wer}", j.id))
    return out


def base_choices() -> list[str]:
    from workers.speech.asr_estimate import table

    return list(table())


def fill(studio, owner: str | None) -> dict:
    """The user's finished runs and transcripts, the newest run's table; server paths only for the admin."""
    from .transcribe import transcripts

    admin = studio.user(owner).admin
    newest = next((j for j in studio.jobs(limit=100, owner=owner, kind="asr_finetune")
                   if j.status is JobStatus.DONE), None)
    return {"af_run": gr.update(choices=run_choices(studio, owner)),
            "af_jobs": gr.update(choices=transcripts(studio, owner)),
            "af_evaluation": evaluation_rows(newest.result if newest else None, studio, newest),
            "af_diffs": diffs_html(newest.result if newest else None),
            **{n: gr.update(visible=admin) for n in ("af_data_path", "af_eval_path")}}


# ---- layout ----------------------------------------------------------------------------------------------------------
def build_train(studio, auth: bool = False) -> dict:
    """The Fine-tune sub-tab: its named components, all af_…"""
    gr.Markdown("Teach Whisper your accent, your voices and your domain's words: your recordings with their "
                "transcripts in, the WER it gains on a dev set out, and a faster-whisper model the Transcribe sub-tab "
                "uses (VAD, word timestamps and speakers as before). Reviewed transcripts from this tab count too: "
                "transcribe, correct, fine-tune, transcribe better.")
    with gr.Row():
        with gr.Column(scale=2):
            base = gr.Dropdown(base_choices(), value="whisper-small", allow_custom_value=True,
                               label="Base (a preset, or a transformers Whisper folder on this machine)")
            files = gr.File(label="Audio with same-named .txt/.srt/.vtt, a CSV/TSV/JSONL manifest (audio, text, "
                                  "start, end) with its audio, or a .zip", file_count="multiple", height=120)
            jobs = gr.Dropdown([], multiselect=True, label="…and reviewed transcripts (your transcribe jobs, with "
                                                           "the corrections you saved)")
            eval_files = gr.File(label="Dev set (optional; else 10% of the clips, seeded)", file_count="multiple",
                                 height=80)
            with gr.Row():
                data_path = gr.Textbox(label="…or data on this machine (folder, manifest, .zip)", visible=not auth)
                eval_path = gr.Textbox(label="…a dev set on this machine", visible=not auth)
            with gr.Row():
                language = gr.Textbox("en", label="Language (ISO code)", max_lines=1)
                task = gr.Radio(["transcribe", "translate"], value="transcribe", label="Task")
                method = gr.Radio(["full", "lora"], value="full", label="Method (lora for medium on 12 GB)")
            with gr.Row():
                epochs = gr.Number(3, label="Epochs", minimum=0.01)
                max_steps = gr.Number(0, label="Max steps (0: the epochs)", precision=0, minimum=0)
                lr = gr.Number(1e-5, label="Learning rate (1e-5 full, 1e-3 LoRA)", minimum=0)
            with gr.Accordion("Batch, LoRA and evaluation", open=False):
                with gr.Row():
                    micro_batch = gr.Number(8, label="Micro-batch", precision=0, minimum=1)
                    grad_accum = gr.Number(2, label="Gradient accumulation", precision=0, minimum=1)
                    lora_r = gr.Number(32, label="LoRA rank", precision=0, minimum=1)
                    lora_alpha = gr.Number(64, label="LoRA alpha", precision=0, minimum=1)
                with gr.Row():
                    spec_augment = gr.Checkbox(False, label="SpecAugment")
                    freeze_encoder = gr.Checkbox(False, label="Freeze the encoder")
                    gradient_checkpointing = gr.Checkbox(True, label="Gradient checkpointing")
                    eval_every = gr.Number(100, label="Dev WER every (steps)", precision=0, minimum=0)
                    seed = gr.Number(42, label="Seed", precision=0, minimum=0)
                    quantization = gr.Dropdown(["float16", "int8", "int8_float16", "float32"], value="float16",
                                               label="CTranslate2 weights")
            with gr.Row():
                check = gr.Button("Check data")
                train = gr.Button("Train", variant="primary")
                cancel = gr.Button("Cancel", variant="stop")
                resume = gr.Button("Resume")
            fix = gr.Button("Apply", visible=False, size="sm")
        with gr.Column(scale=3):
            status = gr.HTML("No Whisper fine-tune yet.")
            plot = gr.LinePlot(x="step", y="loss", color="series", title="Loss and dev WER", height=240)
            stats = gr.Markdown()
            report = gr.HTML(label="Data report")
    gr.Markdown("### The base and the tuned model on the dev set")
    diffs = gr.HTML()
    evaluation = gr.Dataframe(headers=EVAL_HEADERS, interactive=False, wrap=True, label="Base vs tuned")
    with gr.Row():
        run = gr.Dropdown([], label="Fine-tuned run (empty: the newest)", allow_custom_value=True, scale=3)
        use = gr.Button("Transcribe with it", variant="primary")
    job_id, fix_change = gr.State(""), gr.State({})
    ui = dict(af_base=base, af_files=files, af_jobs=jobs, af_eval_files=eval_files, af_data_path=data_path,
              af_eval_path=eval_path, af_language=language, af_task=task, af_method=method, af_epochs=epochs,
              af_max_steps=max_steps, af_lr=lr, af_micro_batch=micro_batch, af_grad_accum=grad_accum,
              af_lora_r=lora_r, af_lora_alpha=lora_alpha, af_spec_augment=spec_augment,
              af_freeze_encoder=freeze_encoder, af_gradient_checkpointing=gradient_checkpointing,
              af_eval_every=eval_every, af_seed=seed, af_quantization=quantization, af_check=check, af_train=train,
              af_cancel=cancel, af_resume=resume, af_fix=fix, af_fix_change=fix_change, af_status=status,
              af_plot=plot, af_stats=stats, af_report=report, af_evaluation=evaluation, af_diffs=diffs, af_run=run,
              af_use=use, af_job_id=job_id)

    check.click(bind(start_check, studio, auth), None, report, inputs_kwargs={n: ui[n] for n in CHECK_INPUTS},
                api_name="asr_ft_check", show_progress="hidden")
    wire_training(studio, auth, ui, prefix="af_", kind="asr_finetune", api="asr_ft", form="asr_finetune",
                  start=start_train, follow=follow, inputs=TRAIN_INPUTS, outputs=TRAIN_OUTPUTS, fix_inputs=FIX_INPUTS,
                  nothing_to_resume=NOTHING_TO_RESUME)

    def on_run(picked, request: gr.Request):
        owner = user_of(request, auth)
        try:
            job = finished(studio, owner, picked) if (picked or "").strip() else None
        except gr.Error:
            job = None
        return evaluation_rows(job.result if job else None, studio, job), diffs_html(job.result if job else None)

    run.change(on_run, run, [evaluation, diffs], api_name="asr_ft_runs", show_progress="hidden")
    return ui


def wire_use(studio, ui: dict, tabs, auth: bool = False) -> None:
    """Transcribe with it: the Transcribe sub-tab (id transcribe_sub) with the run's job id as its model (the
    transcribe kind reads the run's ct2/ folder)."""

    def on_use(picked, request: gr.Request):
        job = finished(studio, user_of(request, auth), picked)
        gr.Info(f"Transcribe: the model fine-tuned by {job.id}")
        return gr.Tabs(selected="transcribe_sub"), job.id

    ui["af_use"].click(on_use, ui["af_run"], [tabs, ui["model"]], api_name="asr_ft_use", show_progress="hidden")
