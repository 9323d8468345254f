"""Vision chat tab, Fine-tune sub-tab (kinds vision_check and vision_finetune): your image-text pairs (upload the
pairs file with its images or a .zip of them; a file on this machine for the admin), Check data (the report: pairs,
missing and unreadable images and malformed lines with their line, token lengths with the image's tokens, the
masked/trained preview), Train with a live loss plot, Cancel / Resume, the gate's fitting change, the base's and the
tuned model's answers on dev images side by side, and Chat with it (the Chat sub-tab on the base + this adapter).
tabs.vision mounts it: build_train() inside its Fine-tune tab, wire_use() once both sub-tabs exist, and KINDS /
FORMS / fill merged into its own."""
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

from .common import (Follow, LivePlot, bind, eta, finished_run, gib, own_uploads, progress_html, user_of,
                     watch, wire_training)

# the training params the form sets; each is the input vf_<param> (names in build_train()'s dict)
PARAMS = ("base", "max_seq_len", "epochs", "max_steps", "lr", "lora_r", "lora_alpha", "lora_dropout",
          "target_modules", "train_projector", "micro_batch", "grad_accum", "eval_every", "eval_prompts", "seed")
INTS = {"max_seq_len", "max_steps", "lora_r", "lora_alpha", "micro_batch", "grad_accum", "eval_every", "eval_prompts",
        "seed"}
DATA_INPUTS = ("vf_files", "vf_eval_file", "vf_data_path", "vf_images_path", "vf_eval_path")
# the Train button's inputs: the /vision_ft_train endpoint's parameters, in this order
TRAIN_INPUTS = (*DATA_INPUTS, *(f"vf_{n}" for n in PARAMS))
CHECK_INPUTS = (*DATA_INPUTS, "vf_base", "vf_max_seq_len", "vf_seed")
TRAIN_OUTPUTS = ("vf_status", "vf_plot", "vf_stats", "vf_report", "vf_evaluation", "vf_run", "vf_job_id")
LOSSES = ("train_loss", "dev_loss")
# params the gate's suggestion may change (workers.vision.train.shrink) -> (the input, its label)
FIX_INPUTS = {"micro_batch": ("vf_micro_batch", "Micro-batch"), "grad_accum": ("vf_grad_accum", "Accumulation"),
              "max_seq_len": ("vf_max_seq_len", "Max tokens"), "lora_r": ("vf_lora_r", "LoRA rank"),
              "train_projector": ("vf_train_projector", "Train projector")}
EVAL_HEADERS = ["image", "question", "reference", "base", "tuned", "ROUGE-L base", "ROUGE-L tuned"]
NOTHING_TO_RESUME = ("Nothing to resume: no cancelled, interrupted or failed vision fine-tune left a checkpoint. "
                     "Train one (Cancel keeps a checkpoint).")
PAIR_SUFFIXES = (".jsonl", ".json")


# ---- what the tab shows --------------------------------------------------------------------------------------------
def evaluation_rows(result: dict | None) -> list[list]:
    """The side-by-side table from a vision_finetune result: each dev image, its question and reference, the base's
    and the tuned model's answers and their ROUGE-L."""
    rows = []
    for r in (result or {}).get("side_by_side") or []:
        rows.append([Path(str(r.get("image", ""))).name, r.get("prompt", ""), r.get("reference", ""),
                     r.get("base") or "", r.get("tuned", ""), r.get("rouge_l_base"), r.get("rouge_l_tuned")])
    return rows


def _stats(job: Job, evs: list[dict]) -> str:
    metrics = [e for e in evs if e["type"] == "metric"]
    train = [m for m in metrics if m.get("train_loss") is not None]
    dev = [m for m in metrics if m.get("dev_loss") is not None]
    lines = []
    if train:
        m = train[-1]
        lines.append(f"step **{m['step']}** · train loss **{m['train_loss']:.3f}** · "
                     f"**{m.get('tokens_per_s') or 0:,.0f}** tokens/s · peak {gib(m.get('peak_bytes'))}"
                     + (f" · ETA {time.strftime('%H:%M:%S', time.gmtime(m['eta_s']))}" if m.get("eta_s") else ""))
    if dev:
        lines.append(f"dev loss **{dev[-1]['dev_loss']:.3f}**"
                     + (f", from {dev[0]['dev_loss']:.3f} before training" if len(dev) > 1 else ""))
    for e in evs:
        if e["type"] == "oom":
            lines.append(f"⚠ {html.escape(e.get('message', 'out of memory'))}")
    lines.append(f"memory estimate {gib(job.estimate_bytes)}"
                 + (f" · measured peak {gib(job.peak_bytes)}" if job.peak_bytes else ""))
    r = job.result or {}
    if job.status is JobStatus.DONE and r:
        rouge = "" if r.get("rouge_l_tuned") is None else \
            f" · ROUGE-L on dev images: base {r.get('rouge_l_base') or 0:.3f} → tuned {r['rouge_l_tuned']:.3f}"
        lines.append(f"adapter saved: `{r.get('result')}`{rouge} · **Chat with it** below")
    return "  \n".join(lines)


def follow(studio, job: Job, owner: str | None) -> Iterator[tuple]:
    """Stream a vision_finetune job into the sub-tab (TRAIN_OUTPUTS): status, loss plot, speed and memory, the data
    report, the base-vs-tuned table once it is done; Train, Resume and a reloaded page use it."""
    from workers.vision.data import report_html

    seen, last, plot, report = -1, 0.0, LivePlot(LOSSES), None
    for job, evs in watch(studio, job, every=0.5):
        if len(evs) == seen and not job.status.final and time.time() - last < 1.0:
            continue
        seen, last = len(evs), time.time()
        if report is None:
            found = next((e["report"] for e in evs if e["type"] == "data_report"), None)
            report = report_html(found) if found else None
        done = job.status is JobStatus.DONE
        yield (progress_html(job, eta(job)), plot(evs), _stats(job, evs), report if report else gr.skip(),
               evaluation_rows(job.result) if job.status.final else gr.skip(),
               gr.update(choices=run_choices(studio, owner), value=job.id) if done else gr.skip(), job.id)


def to_form(job: Job) -> dict:
    """A job's params in the form: its settings, and a data path of the server's (an upload is not put back)."""
    out = {f"vf_{n}": job.params[n] for n in PARAMS if n in job.params}
    for param, box in (("data", "vf_data_path"), ("images", "vf_images_path"), ("eval_data", "vf_eval_path")):
        value = str(job.params.get(param) or "")
        if value and not {"uploads", "users"} & set(Path(value).parts):
            out[box] = value
    return out


KINDS = {"vision_finetune": Follow(follow, TRAIN_OUTPUTS, to_form=to_form)}
# the Train form's last-used settings come back on page load (uploads are not kept)
FORMS = {"vision_finetune": tuple(n for n in TRAIN_INPUTS if n not in ("vf_files", "vf_eval_file"))}


# ---- handlers ------------------------------------------------------------------------------------------------------
def _files(value) -> list:
    return [] if not value else value if isinstance(value, list) else [value]


def data_params(studio, owner: str | None, v: dict[str, Any]) -> dict:
    """data, images and eval_data from the form: the uploads (the pairs file, its images or a .zip of them, the dev
    file) put in one folder of their own, so the pairs' relative image paths find them; else the admin's paths."""
    files, dev = _files(v.get("vf_files")), _files(v.get("vf_eval_file"))
    if files:
        names = [Path(f if isinstance(f, str) else f.name).name for f in files]
        pairs = [n for n in names if n.lower().endswith(PAIR_SUFFIXES)]
        if len(pairs) != 1:
            raise gr.Error("Upload one pairs file (a .jsonl of image, question, answer or LLaVA's .json) with its "
                           f"images or a .zip of them; got {len(pairs)} such files.")
        dev_name = Path(dev[0] if isinstance(dev[0], str) else dev[0].name).name if dev else ""
        if dev_name and dev_name in names:
            raise gr.Error(f"The dev file has the same name as an uploaded file ({dev_name}); rename one of them.")
        paths = [Path(p) for p in own_uploads(studio, files + dev, owner)]
        if owner is None:  # Gradio keeps each upload in a folder of its own: gather them
            dest = studio.config.uploads_dir / f"vision-ft-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(4)}"
            dest.mkdir(parents=True)
            for p in paths:
                shutil.copy(p, dest / p.name)
            paths = [dest / p.name for p in paths]
        folder = paths[0].parent
        return {"data": str(folder / pairs[0]), "images": "", "eval_data": str(folder / dev_name) if dev_name else ""}
    typed = {k: (v.get(box) or "").strip() for k, box in (("data", "vf_data_path"), ("images", "vf_images_path"),
                                                          ("eval_data", "vf_eval_path"))}
    if dev:
        raise gr.Error("Upload the pairs file with the dev file (or name both on this machine).")
    if not typed["data"]:
        raise gr.Error("Upload your pairs file (JSONL or LLaVA JSON) with its images or a .zip of them first.")
    if not studio.user(owner).admin:
        raise gr.Error("Upload the pairs and images: only the studio's admin may name files on the server.")
    return typed


def train_params(studio, owner: str | None, v: dict[str, Any]) -> dict:
    params = {n: v[f"vf_{n}"] for n in PARAMS if v.get(f"vf_{n}") not in (None, "")}
    params |= {n: int(params[n]) for n in INTS if n in params}
    return params | data_params(studio, owner, v)


def start_train(studio, owner: str | None, v: dict[str, Any]) -> Iterator[tuple]:
    """The Train button, given its inputs by name (TRAIN_INPUTS): a vision_finetune job, streamed."""
    try:
        job = studio.submit("vision_finetune", train_params(studio, owner, v), owner=owner)
    except ValueError as e:
        raise gr.Error(str(e)) from None
    yield from follow(studio, job, owner)  # a refusal shows in the status line; Apply offers its fitting change


def start_check(studio, owner: str | None, v: dict[str, Any]) -> Iterator[str]:
    """Check data: a vision_check job (the base's processor only, in the io lane); its report when it is done."""
    from workers.vision.data import report_html

    from .finetune import _until_done

    params = {"base": v["vf_base"], "max_seq_len": int(v["vf_max_seq_len"]), "seed": int(v["vf_seed"]),
              **data_params(studio, owner, v)}
    job = yield from _until_done(studio, "vision_check", params, owner)
    if job is not None:
        yield report_html(job.result["report"])


def finished(studio, owner: str | None, current: str) -> Job:
    """The picked run when it finished, else the user's newest finished vision fine-tune."""
    return finished_run(studio, owner, current, "vision_finetune",
                        "No finished vision fine-tune yet: train one (or wait for this one to finish).")


def run_choices(studio, owner: str | None) -> list[tuple[str, str]]:
    """The user's finished vision fine-tunes, newest first: what the table shows and Chat with it uses."""
    out = []
    for j in studio.jobs(limit=100, owner=owner, kind="vision_finetune"):
        if j.status is JobStatus.DONE:
            r = j.result or {}
            rouge = f" · ROUGE-L {r['rouge_l_tuned']:.2f}" if r.get("rouge_l_tuned") is not None else ""
            out.append((f"{j.id} · {Path(str(j.params.get('base'))).name} · {r.get('steps')} steps{rouge}", j.id))
    return out


def base_choices(studio) -> list[tuple[str, str]]:
    """The transformers (hf) vision presets: the ones a LoRA trains on."""
    from studio.presets import label, presets

    return [(label("vlm", n, studio.config.data_dir), n) for n, p in presets().get("vlm", {}).items()
            if p.get("backend") == "hf"]


def fill(studio, owner: str | None) -> dict:
    """The user's finished runs and the newest one's base-vs-tuned answers; server paths only for the admin."""
    admin = studio.user(owner).admin
    newest = next((j for j in studio.jobs(limit=100, owner=owner, kind="vision_finetune")
                   if j.status is JobStatus.DONE), None)
    return {"vf_base": gr.update(choices=base_choices(studio)),
            "vf_run": gr.update(choices=run_choices(studio, owner)),
            "vf_evaluation": evaluation_rows(newest.result if newest else None),
            **{n: gr.update(visible=admin) for n in ("vf_data_path", "vf_images_path", "vf_eval_path")}}


# ---- layout ----------------------------------------------------------------------------------------------------------
def build_train(studio, auth: bool = False) -> dict:
    """The Fine-tune sub-tab: its named components, all vf_…"""
    gr.Markdown("Teach a LLaVA-style model your own image–text pairs with QLoRA (the language model in 4-bit, LoRA on "
                "its layers, the projector trained, the vision tower frozen): check the data, train, compare its "
                "answers on dev images with the base's, then chat with it.")
    with gr.Row():
        with gr.Column(scale=2):
            base = gr.Dropdown(base_choices(studio), value="llava-1.5-7b-hf", allow_custom_value=True,
                               label="Base (the llava-hf preset, or a transformers LLaVA folder on this machine)")
            files = gr.File(label="Pairs file (.jsonl of image, question, answer, or LLaVA's .json) with its images "
                                  "or a .zip of them", file_count="multiple", height=120)
            eval_file = gr.File(label="Dev pairs (optional; else 5% of your pairs, seeded)",
                                file_types=[".jsonl", ".json"])
            with gr.Row():
                data_path = gr.Textbox(label="…or a pairs file on this machine", visible=not auth)
                images_path = gr.Textbox(label="…its images (folder or .zip; empty: beside it)", visible=not auth)
                eval_path = gr.Textbox(label="…a dev file on this machine", visible=not auth)
            with gr.Row():
                max_seq_len = gr.Number(1024, label="Max tokens per pair (image included)", precision=0, minimum=16)
                epochs = gr.Number(2, label="Epochs", minimum=0.01)
                max_steps = gr.Number(0, label="Max steps (0: the epochs)", precision=0, minimum=0)
                lr = gr.Number(2e-4, label="Learning rate", minimum=0)
            with gr.Accordion("LoRA and batch", open=False):
                with gr.Row():
                    lora_r = gr.Number(16, label="LoRA rank", precision=0, minimum=1)
                    lora_alpha = gr.Number(32, label="LoRA alpha", precision=0, minimum=1)
                    lora_dropout = gr.Number(0.05, label="LoRA dropout", minimum=0)
                    train_projector = gr.Checkbox(True, label="Train the projector")
                target_modules = gr.Textbox("all-linear", label="LoRA layers of the language model (all-linear, or "
                                                                "q_proj,v_proj,…)")
                with gr.Row():
                    micro_batch = gr.Number(1, label="Micro-batch", precision=0, minimum=1)
                    grad_accum = gr.Number(16, label="Gradient accumulation", precision=0, minimum=1)
                    eval_every = gr.Number(50, label="Dev loss every (steps)", precision=0, minimum=0)
                    eval_prompts = gr.Number(5, label="Dev images answered (base vs tuned)", precision=0, minimum=0,
                                             maximum=100)
                    seed = gr.Number(42, label="Seed", precision=0, minimum=0)
            with gr.Row():
                check = gr.Button("Check data")
                train = gr.Button("Train", variant="primary")
                cancel = gr.Button("Cancel", variant="stop")
                resume = gr.Button("Resume")
            fix = gr.Button("Apply", visible=False, size="sm")
        with gr.Column(scale=3):
            status = gr.HTML("No vision fine-tune yet.")
            plot = gr.LinePlot(x="step", y="loss", color="series", title="Loss (train, dev)", height=240)
            stats = gr.Markdown()
            report = gr.HTML(label="Data report")
    gr.Markdown("### The base and the tuned model on dev images")
    evaluation = gr.Dataframe(headers=EVAL_HEADERS, interactive=False, wrap=True, label="Base vs tuned")
    with gr.Row():
        run = gr.Dropdown([], label="Fine-tuned run (empty: the newest)", allow_custom_value=True, scale=3)
        chat = gr.Button("Chat with it", variant="primary")
    job_id, fix_change = gr.State(""), gr.State({})
    ui = dict(vf_base=base, vf_files=files, vf_eval_file=eval_file, vf_data_path=data_path,
              vf_images_path=images_path, vf_eval_path=eval_path, vf_max_seq_len=max_seq_len, vf_epochs=epochs,
              vf_max_steps=max_steps, vf_lr=lr, vf_lora_r=lora_r, vf_lora_alpha=lora_alpha,
              vf_lora_dropout=lora_dropout, vf_train_projector=train_projector, vf_target_modules=target_modules,
              vf_micro_batch=micro_batch, vf_grad_accum=grad_accum, vf_eval_every=eval_every,
              vf_eval_prompts=eval_prompts, vf_seed=seed, vf_check=check, vf_train=train, vf_cancel=cancel,
              vf_resume=resume, vf_fix=fix, vf_fix_change=fix_change, vf_status=status, vf_plot=plot,
              vf_stats=stats, vf_report=report, vf_evaluation=evaluation, vf_run=run, vf_chat=chat,
              vf_job_id=job_id)

    check.click(bind(start_check, studio, auth), None, report, inputs_kwargs={n: ui[n] for n in CHECK_INPUTS},
                api_name="vision_ft_check", show_progress="hidden")
    wire_training(studio, auth, ui, prefix="vf_", kind="vision_finetune", api="vision_ft", form="vision_finetune",
                  start=start_train, follow=follow, inputs=TRAIN_INPUTS, outputs=TRAIN_OUTPUTS, fix_inputs=FIX_INPUTS,
                  nothing_to_resume=NOTHING_TO_RESUME)

    def on_run(picked, request: gr.Request):
        owner = user_of(request, auth)
        try:
            job = finished(studio, owner, picked) if (picked or "").strip() else None
        except gr.Error:
            job = None
        return evaluation_rows(job.result if job else None)

    run.change(on_run, run, evaluation, api_name="vision_ft_runs", show_progress="hidden")
    return ui


def wire_use(studio, ui: dict, tabs, auth: bool = False) -> None:
    """Chat with it: the Chat sub-tab (id vision_chat_sub) on the run's base with its adapter (ui["model"],
    ui["adapter"] are the Chat sub-tab's)."""

    def on_chat(picked, request: gr.Request):
        job = finished(studio, user_of(request, auth), picked)
        gr.Info(f"Vision chat: {Path(str(job.params['base'])).name} + adapter {job.id}")
        return gr.Tabs(selected="vision_chat_sub"), job.params["base"], job.id

    ui["vf_chat"].click(on_chat, ui["vf_run"], [tabs, ui["model"], ui["adapter"]], api_name="vision_ft_chat",
                        show_progress="hidden")
