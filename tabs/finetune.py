"""Fine-tune tab: QLoRA of a chat model on your own examples. Check the data first (shape, token lengths, what
max_seq_len cuts, the prompt/answer masking as the model sees it), train with the guide's recipe as the defaults and
a live loss plot, compare the base's and the tuned model's answers on dev prompts, then chat with it or merge it."""
from __future__ import annotations

import html
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gradio as gr

from studio import Job, JobStatus

from .common import (Follow, LivePlot, bind, cancel_and_follow, eta, finished_run, gib, progress_html, resume_run,
                     stash_uploads, user_of, watch)

# the training params the form sets, each an input of the same name (so a re-attached job fills them by name)
PARAMS = ("base", "method", "lora_r", "lora_alpha", "lora_dropout", "target_modules", "max_seq_len", "micro_batch",
          "grad_accum", "epochs", "max_steps", "lr", "scheduler", "warmup", "packing", "train_on_prompt",
          "gradient_checkpointing", "seed", "eval_every", "eval_prompts", "devices", "deepspeed")
# the Train button's inputs: the /finetune_train endpoint's parameters, in this order
TRAIN_INPUTS = ("data_files", "data_path", "eval_file", "eval_path", *PARAMS)
CHECK_INPUTS = ("data_files", "data_path", "eval_file", "eval_path", "base", "max_seq_len", "train_on_prompt",
                "seed")
TRAIN_OUTPUTS = ("status", "plot", "stats", "report", "evaluation", "run", "job_id")
MERGE_INPUTS = ("run", "gguf", "quant")
LOSSES = ("train_loss", "dev_loss")
PATH_INPUTS = ("data_path", "eval_path")  # server paths: the admin's only (a remote user uploads her data)


# ---- the data report -----------------------------------------------------------------------------------------------
def report_html(report: dict) -> str:
    """The data report as the tab shows it: counts, the token-length histogram, what is cut or dropped, the preview
    with the masked prompt grey and the trained answer highlighted."""
    from workers.finetune.data import SHAPE_NAMES, preview_html

    shapes = ", ".join(f"{SHAPE_NAMES.get(s, s)} {n}" for s, n in report["per_shape"].items())
    t = report["tokens"]
    warn = []
    if report["truncated"]:
        warn.append(f"<b>{report['truncated']}</b> longer than max_seq_len {report['max_seq_len']} (cut)")
    for key, words in (("duplicates", "duplicates"), ("empty_answers", "empty answers (dropped)"),
                       ("nothing_trained", "prompts that fill max_seq_len alone (dropped)")):
        if report.get(key):
            warn.append(f"<b>{report[key]}</b> {words}")
    peak = max((b["count"] for b in report["histogram"]), default=0) or 1
    bars = "".join(
        f"<tr><td style='text-align:right;padding-right:6px'>{html.escape(b['range'])}</td><td>"
        f"<div style='display:inline-block;height:10px;width:{160 * b['count'] / peak:.0f}px;background:"
        f"{'#e45756' if b['hi'] is None else '#4c78a8'}'></div> {b['count']}</td></tr>"
        for b in report["histogram"] if b["count"] or b["hi"] is not None)
    source = "your dev file" if report["dev_source"] == "file" else "a seeded split"
    dev = f"{report['dev']} dev examples from {source}, {report['train']} to train on"
    template = "" if report.get("chat_template") == "own" else \
        "<br>The base has no chat template: the plain '### Instruction / ### Response' format is used."
    return (f"<div class='ft-report'><b>{report['examples']} examples</b> in {', '.join(report['files'])}: {shapes}."
            f"<br>{dev}. Tokens per example: min {t['min']}, median {t['median']}, max {t['max']} · "
            f"{100 * report['trained_fraction']:.0f}% of tokens trained "
            f"({'prompt and answer' if report['train_on_prompt'] else 'answers only'})."
            + (f"<br>⚠ {' · '.join(warn)}" if warn else "") + template
            + f"<table style='margin:6px 0'>{bars}</table><b>As the model sees them</b> "
              "(<span style='color:#777'>grey: prompt, masked</span> · "
              "<span style='background:#d9f2d9;color:#0b3d0b'>green: answer, trained</span>)"
            + preview_html(report["preview"]) + "</div>")


# ---- evaluation ------------------------------------------------------------------------------------------------------
EVAL_HEADERS = ["prompt", "reference", "base", "tuned", "ROUGE-L base", "ROUGE-L tuned"]


def rouge_l(candidate: str, reference: str) -> float:
    """ROUGE-L F1 over words (longest common subsequence), as the rouge-score package computes it without stemming."""
    a, b = candidate.lower().split(), reference.lower().split()
    if not a or not b:
        return 0.0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    lcs = prev[-1]
    if not lcs:
        return 0.0
    p, r = lcs / len(a), lcs / len(b)
    return 2 * p * r / (p + r)


def evaluation_rows(result: dict | None) -> list[list]:
    """The side-by-side table from a finetune job's result: each dev prompt with its reference, the base's and the
    tuned model's answers and their ROUGE-L (computed here when the job did not)."""
    rows = []
    for r in (result or {}).get("side_by_side") or (result or {}).get("samples") or []:
        ref = str(r.get("reference", ""))
        base, tuned = str(r.get("base", "")), str(r.get("tuned", ""))
        base = "" if r.get("base") is None else str(r["base"])  # None: a resumed full fine-tune kept no base answers
        rb = r["rouge_l_base"] if "rouge_l_base" in r else rouge_l(base, ref)
        rt = r["rouge_l_tuned"] if "rouge_l_tuned" in r else rouge_l(tuned, ref)
        rows.append([str(r.get("prompt", "")), ref, base, tuned, _round(rb), _round(rt)])
    return rows


def _round(v, digits: int = 3):
    return None if v is None else round(float(v), digits)


RUNS_HEADERS = ["job", "base", "method", "LoRA r", "data", "examples", "steps", "dev loss before → after",
                "ROUGE-L base → tuned"]


def _arrow(a, b) -> str:
    if a is None and b is None:
        return "—"
    return f"{'—' if a is None else f'{a:.3f}'} → {'—' if b is None else f'{b:.3f}'}"


def runs_table(studio, owner: str | None) -> list[list]:
    """The user's finished fine-tunes side by side, newest first: what each changed (base, method, rank, data,
    steps) and what it scored (dev loss before and after training, ROUGE-L of the base's and the tuned answers)."""
    rows = []
    for j in studio.jobs(limit=100, owner=owner, kind="finetune"):
        if j.status is not JobStatus.DONE or not j.result:
            continue
        r, p = j.result, j.params
        data = ", ".join(Path(x.strip()).name for x in str(p.get("data") or "").split(",") if x.strip())
        n = r.get("train_examples")
        rows.append([j.id, Path(str(p.get("base"))).name, p.get("method", "qlora"),
                     p.get("lora_r", 16) if p.get("method") != "full" else "—", data or "—",
                     f"{n} train · {r.get('dev_examples')} dev" if n is not None else "—", r.get("steps"),
                     _arrow(r.get("dev_loss_before", r.get("dev_loss_start")),
                            r.get("dev_loss_after", r.get("dev_loss"))),
                     _arrow(r.get("rouge_l_base"), r.get("rouge_l_tuned"))])
    return rows


# ---- following a training job -------------------------------------------------------------------------------------
def _stats(job: Job, evs: list[dict]) -> str:
    metrics = [e for e in evs if e["type"] == "metric"]
    train = [m for m in metrics if m.get("train_loss") is not None]
    dev = [m for m in metrics if m.get("dev_loss") is not None]
    lines = []
    if train:
        m = train[-1]
        lr = f" · lr {m['lr']:.2e}" if m.get("lr") is not None else ""
        lines.append(f"step **{m['step']}** · train loss **{m['train_loss']:.3f}**{lr} · "
                     f"**{m.get('tokens_per_s') or 0:,.0f}** tokens/s · peak {gib(m.get('peak_bytes'))}"
                     + (f" · ETA {time.strftime('%H:%M:%S', time.gmtime(m['eta_s']))}" if m.get("eta_s") else ""))
    if dev:
        first, last = dev[0], dev[-1]
        lines.append(f"dev loss **{last['dev_loss']:.3f}** (perplexity {last.get('perplexity') or 0:.2f})"
                     + (f", from {first['dev_loss']:.3f} before training" if len(dev) > 1 else ""))
    for e in evs:
        if e["type"] == "oom":
            lines.append(f"⚠ {html.escape(e.get('message', 'out of memory'))}")
    lines.append(f"memory estimate {gib(job.estimate_bytes)}"
                 + (f" · measured peak {gib(job.peak_bytes)}" if job.peak_bytes else ""))
    if job.status is JobStatus.DONE and job.result:
        lines.append(f"adapter saved: `{job.result.get('result')}` · **Chat with it** or **Merge** below")
    return "  \n".join(lines)


def follow(studio, job: Job, owner: str | None) -> Iterator[tuple]:
    """Stream a finetune job into the tab (TRAIN_OUTPUTS): status, loss plot, speed and memory, the data report, the
    evaluation once it is done; Train, Resume and a reloaded page use it."""
    seen, last, plot, report = -1, 0.0, LivePlot(LOSSES), None
    for job, evs in watch(studio, job, every=0.5):
        if len(evs) == seen and not job.status.final and time.time() - last < 1.0:
            continue
        seen, last = len(evs), time.time()
        if report is None:
            found = next((e["report"] for e in evs if e["type"] == "data_report"), None)
            report = report_html(found) if found else None
        done = job.status is JobStatus.DONE  # the finished run becomes the one Chat with it and Merge use
        yield (progress_html(job, eta(job)), plot(evs), _stats(job, evs), report if report else gr.skip(),
               evaluation_rows(job.result) if job.status.final else gr.skip(),
               gr.update(choices=run_choices(studio, owner), value=job.id) if done else gr.skip(), job.id)


def train_form(job: Job) -> dict:
    """The data inputs as the job named them: a path of the server's goes back in its box (an upload does not)."""
    out = {}
    for param, box in (("data", "data_path"), ("eval_data", "eval_path")):
        value = str(job.params.get(param) or "")
        if value and not {"uploads", "users"} & set(Path(value.split(",")[0]).parts):
            out[box] = value
    return out


KINDS = {"finetune": Follow(follow, TRAIN_OUTPUTS, form=PARAMS, to_form=train_form)}
# the Train form's last-used settings come back on page load (uploads are not kept)
FORMS = {"finetune_train": tuple(n for n in TRAIN_INPUTS if n not in ("data_files", "eval_file"))}


# ---- handlers ------------------------------------------------------------------------------------------------------
def _data(studio, owner: str | None, v: dict, files: str, path: str, what: str, required: bool) -> str:
    """An upload (kept in the user's own folder with auth), else the admin's server path."""
    if v.get(files):
        return stash_uploads(studio, v[files] if isinstance(v[files], list) else [v[files]], "finetune", owner)
    typed = (v.get(path) or "").strip()
    if typed:
        if not studio.user(owner).admin:
            raise gr.Error(f"Upload the {what}: only the studio's admin may name a file on the server.")
        return typed
    if required:
        raise gr.Error("Upload your examples (JSONL, JSON, CSV or Parquet) first.")
    return ""



def train_params(studio, owner: str | None, v: dict) -> dict:
    params = {n: v[n] for n in PARAMS if v.get(n) not in (None, "")}
    for n in ("lora_r", "lora_alpha", "max_seq_len", "micro_batch", "grad_accum", "max_steps", "seed", "eval_every",
              "eval_prompts"):
        if n in params:
            params[n] = int(params[n])
    params["data"] = _data(studio, owner, v, "data_files", "data_path", "data", True)
    params["eval_data"] = _data(studio, owner, v, "eval_file", "eval_path", "dev file", False)
    return params


def start_train(studio, owner: str | None, v: dict[str, Any]) -> Iterator[tuple]:
    """The Train button, given its inputs by name (TRAIN_INPUTS): a finetune job, streamed."""
    try:
        job = studio.submit("finetune", train_params(studio, owner, v), owner=owner)
    except ValueError as e:
        raise gr.Error(str(e)) from None
    yield from follow(studio, job, owner)


def _until_done(studio, kind: str, params: dict, owner: str | None):
    """Submit a short job and stream its status line until it ends; returns the job when it is DONE, else None (its
    final status line was the last thing yielded). Used with `job = yield from _until_done(...)`."""
    try:
        job = studio.submit(kind, params, owner=owner)
    except ValueError as e:
        raise gr.Error(str(e)) from None
    for job, _ in watch(studio, job, every=0.2):
        if not job.status.final:
            yield progress_html(job)
    if job.status is not JobStatus.DONE:
        yield progress_html(job)
        return None
    return job


def start_check(studio, owner: str | None, v: dict[str, Any]) -> Iterator[str]:
    """Check data: a finetune_check job (the base's tokenizer only, off the GPU); its report when it is done."""
    params = {"base": v["base"], "max_seq_len": int(v["max_seq_len"]), "train_on_prompt": bool(v["train_on_prompt"]),
              "seed": int(v["seed"]), "data": _data(studio, owner, v, "data_files", "data_path", "data", True),
              "eval_data": _data(studio, owner, v, "eval_file", "eval_path", "dev file", False)}
    job = yield from _until_done(studio, "finetune_check", params, owner)
    if job is not None:
        yield report_html(job.result["report"])


def start_resume(studio, owner: str | None, current: str) -> Iterator[tuple]:
    """Resume: continue the tab's run (or the newest one that stopped) from its last checkpoint, as a new job."""
    yield from follow(studio, resume_run(studio, owner, current, "finetune", "Nothing to resume: no cancelled, "
                                         "interrupted or failed fine-tune left a checkpoint."), owner)


def finished(studio, owner: str | None, current: str) -> Job:
    """The tab's job when it finished, else the user's newest finished fine-tune."""
    return finished_run(studio, owner, current, "finetune",
                        "No finished fine-tune yet: train one (or wait for this one to finish).")


def start_extend(studio, owner: str | None, run: str, more_epochs: float) -> Iterator[tuple]:
    """Train more: a finished run continues from its last checkpoint for `more_epochs` more passes over the same data
    (the same params, a new job), its loss curve and base answers carried on."""
    job = finished(studio, owner, run)
    if not more_epochs or more_epochs <= 0:
        raise gr.Error("Give how many more epochs to train (e.g. 1).")
    done = float((job.result or {}).get("epochs") or job.params.get("epochs") or 0)
    params = {**job.params, "resume_from": job.id, "max_steps": 0, "epochs": round(done + float(more_epochs), 4)}
    try:
        new = studio.submit("finetune", params, owner=owner)
    except ValueError as e:
        raise gr.Error(str(e))
    yield from follow(studio, new, owner)


def chat_target(studio, job: Job) -> dict:
    """What Chat with it puts in the Chat tab: the base and the job as its adapter (a full fine-tune: its own model
    folder), in 4-bit on a GPU (the HF backend; on the CPU plain)."""
    cuda = studio.device.read().kind == "cuda"
    model_dir = studio.run_dir(job.id) / "model"
    if (model_dir / "config.json").exists():
        return {"model": str(model_dir), "adapter": "", "load_in_4bit": cuda}
    return {"model": job.params["base"], "adapter": job.id, "load_in_4bit": cuda}


def start_merge(studio, owner: str | None, v: dict[str, Any]) -> Iterator[str]:
    job = finished(studio, owner, v["run"])
    merge = yield from _until_done(studio, "finetune_merge", {"adapter": job.id, "gguf": bool(v["gguf"]),
                                                              "quant": v["quant"]}, owner)
    if merge is None:
        return
    r = merge.result
    out = (f"Merged into `{r['merged']}` ({r['bytes'] / 2**30:.2f} GiB, {r['dtype']}): a transformers folder that "
           "loads with from_pretrained, and that the Chat tab takes as its model.")
    if r.get("gguf"):
        out += (f"\n\n**GGUF {r['gguf']['quant']}**: {r['gguf']['why']}\n\n```sh\n" + "\n".join(r["gguf"]["commands"])
                + f"\n```\n(also in `{r['gguf']['script']}`)")
    yield out


def fill(studio, owner: str | None) -> dict:
    """Base models marked on disk or needing a download; the user's runs side by side and the newest one's base-vs-
    tuned answers; server paths only for the admin."""
    admin = studio.user(owner).admin
    newest = next((j for j in studio.jobs(limit=100, owner=owner, kind="finetune") if j.status is JobStatus.DONE),
                  None)
    return {"base": gr.update(choices=base_choices(studio)), "run": gr.update(choices=run_choices(studio, owner)),
            "runs": runs_table(studio, owner), "evaluation": evaluation_rows(newest.result if newest else None),
            "data_path": gr.update(visible=admin), "eval_path": gr.update(visible=admin)}


def show_run(studio, owner: str | None, run: str) -> tuple[list, list]:
    """A run picked (or just finished): its base-vs-tuned answers, and every run side by side."""
    job = None
    if (run or "").strip():
        try:
            job = finished(studio, owner, run)
        except gr.Error:
            job = None
    return evaluation_rows(job.result if job else None), runs_table(studio, owner)


def run_choices(studio, owner: str | None) -> list[tuple[str, str]]:
    """The user's finished fine-tunes, newest first: what Chat with it and Merge can use."""
    out = []
    for j in studio.jobs(limit=100, owner=owner, kind="finetune"):
        if j.status is JobStatus.DONE:
            dev = (j.result or {}).get("dev_loss")
            out.append((f"{j.id} · {Path(str(j.params.get('base'))).name} · {j.params.get('method')}"
                        + (f" · dev loss {dev:.3f}" if dev is not None else ""), j.id))
    return out


def base_choices(studio) -> list[tuple[str, str]]:
    from studio.presets import choices, presets

    return choices("finetune", studio.config.data_dir) if "finetune" in presets() else []


def _default_base(studio) -> str:
    from studio.presets import default, presets

    if "finetune" not in presets():
        return ""
    return default("finetune", studio.config.data_dir) or next(iter(presets()["finetune"]))


# ---- layout ----------------------------------------------------------------------------------------------------------
def build(studio, auth: bool = False) -> dict:
    gr.Markdown("Teach a 7–8B chat model your own examples with QLoRA in under 8 GiB: check the data, train (the "
                "guide's recipe is the default), compare its answers with the base's, then chat with it or merge it.")
    with gr.Row():
        with gr.Column(scale=2):
            base = gr.Dropdown(base_choices(studio), value=_default_base(studio), allow_custom_value=True,
                               label="Base model (a preset, or a transformers folder on this machine)")
            data_files = gr.File(label="Your examples: JSONL, JSON, CSV or Parquet (Alpaca, messages, "
                                       "prompt/completion or text)", file_count="multiple",
                                 file_types=[".jsonl", ".json", ".csv", ".parquet"])
            eval_file = gr.File(label="Dev set (optional; else 5% of your examples, seeded)",
                                file_types=[".jsonl", ".json", ".csv", ".parquet"])
            with gr.Row():
                data_path = gr.Textbox(label="…or a data file on this machine", placeholder="/home/me/faq.jsonl")
                eval_path = gr.Textbox(label="…or a dev file on this machine")
            check = gr.Button("Check data")
            with gr.Row():
                method = gr.Radio(["qlora", "lora", "full"], value="qlora", label="Method",
                                  info="qlora: 4-bit base + LoRA (fits 12 GB) · full: small models only")
                max_seq_len = gr.Number(2048, label="Max tokens per example", precision=0, minimum=16)
            with gr.Row():
                epochs = gr.Number(2, label="Epochs", minimum=0.01)
                max_steps = gr.Number(0, label="Max steps (0: the epochs)", precision=0, minimum=0)
                lr = gr.Number(2e-4, label="Learning rate", minimum=0)
            with gr.Accordion("LoRA and batch", open=False):
                with gr.Row():
                    lora_r = gr.Number(16, label="LoRA rank", precision=0, minimum=1)
                    lora_alpha = gr.Number(32, label="LoRA alpha", precision=0, minimum=1)
                    lora_dropout = gr.Number(0.05, label="LoRA dropout", minimum=0)
                target_modules = gr.Textbox("all-linear", label="LoRA layers (all-linear, or q_proj,v_proj,…)")
                with gr.Row():
                    micro_batch = gr.Number(1, label="Micro-batch", precision=0, minimum=1)
                    grad_accum = gr.Number(16, label="Gradient accumulation", precision=0, minimum=1)
                    eval_every = gr.Number(50, label="Dev loss every (steps)", precision=0, minimum=0)
                    eval_prompts = gr.Number(5, label="Dev prompts answered (base vs tuned)", precision=0,
                                             minimum=0, maximum=100)
                with gr.Row():
                    scheduler = gr.Dropdown(["cosine", "linear", "constant", "constant_with_warmup"], value="cosine",
                                            label="Schedule")
                    warmup = gr.Number(0.03, label="Warm-up (fraction, or steps ≥ 1)", minimum=0)
                    seed = gr.Number(42, label="Seed", precision=0, minimum=0)
                with gr.Row():
                    packing = gr.Checkbox(False, label="Pack short examples")
                    train_on_prompt = gr.Checkbox(False, label="Train on the prompt too")
                    gradient_checkpointing = gr.Checkbox(True, label="Gradient checkpointing")
            with gr.Accordion("Several GPUs", open=False):
                with gr.Row():
                    devices = gr.Textbox("", label="Devices (empty: one card; 0,1 or all: DDP over those GPUs; "
                                         "without CUDA a number of CPU processes)")
                    deepspeed = gr.Dropdown(["", "zero2", "zero3"], value="", label="DeepSpeed ZeRO (needs "
                                            "pip install deepspeed)")
            with gr.Row():
                train = gr.Button("Train", variant="primary")
                cancel = gr.Button("Cancel", variant="stop")
                resume = gr.Button("Resume")
        with gr.Column(scale=3):
            status = gr.HTML("No fine-tune yet.")
            # no empty first value: the plot would keep that empty legend (tabs.common.LivePlot)
            plot = gr.LinePlot(x="step", y="loss", color="series", title="Loss (train, dev)", height=260)
            stats = gr.Markdown()
            report = gr.HTML(label="Data report")
    gr.Markdown("### Evaluation: the base and the tuned model on dev prompts")
    evaluation = gr.Dataframe(headers=EVAL_HEADERS, interactive=False, wrap=True, label="Base vs tuned")
    runs = gr.Dataframe([], headers=RUNS_HEADERS, interactive=False, wrap=True, label="Runs side by side")
    with gr.Row():
        run = gr.Dropdown([], label="Fine-tuned run (empty: the newest)", allow_custom_value=True, scale=2)
        chat_with_it = gr.Button("Chat with it", variant="primary")
        more_epochs = gr.Number(1, label="More epochs", minimum=0.1, step=0.5, min_width=90)
        extend = gr.Button("Train more")
        merge = gr.Button("Merge")
        gguf = gr.Checkbox(False, label="…and export GGUF")
        quant = gr.Dropdown(["Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0", "F16", "BF16"], value="Q4_K_M", label="GGUF type")
    merge_status = gr.Markdown()
    job_id = gr.State("")

    ui = dict(base=base, data_files=data_files, eval_file=eval_file, data_path=data_path, eval_path=eval_path,
              check=check, method=method, max_seq_len=max_seq_len, epochs=epochs, max_steps=max_steps, lr=lr,
              lora_r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, target_modules=target_modules,
              micro_batch=micro_batch, grad_accum=grad_accum, eval_every=eval_every, eval_prompts=eval_prompts,
              scheduler=scheduler,
              warmup=warmup, seed=seed, packing=packing, train_on_prompt=train_on_prompt,
              gradient_checkpointing=gradient_checkpointing, devices=devices, deepspeed=deepspeed, train=train,
              cancel=cancel, resume=resume, status=status, plot=plot, stats=stats, report=report,
              evaluation=evaluation, runs=runs,
              run=run, chat_with_it=chat_with_it, more_epochs=more_epochs, extend=extend, merge=merge, gguf=gguf,
              quant=quant, merge_status=merge_status,
              job_id=job_id)

    check.click(bind(start_check, studio, auth), None, report, inputs_kwargs={n: ui[n] for n in CHECK_INPUTS},
                api_name="finetune_check", show_progress="hidden")
    train.click(bind(start_train, studio, auth, remember="finetune_train"), None, [ui[n] for n in TRAIN_OUTPUTS],
                inputs_kwargs={n: ui[n] for n in TRAIN_INPUTS}, api_name="finetune_train", show_progress="hidden")

    def on_resume(current, request: gr.Request):
        yield from start_resume(studio, user_of(request, auth), current)

    resume.click(on_resume, job_id, [ui[n] for n in TRAIN_OUTPUTS], api_name="finetune_resume",
                 show_progress="hidden")

    def on_extend(run, more, request: gr.Request):
        yield from start_extend(studio, user_of(request, auth), run, more)

    extend.click(on_extend, [run, more_epochs], [ui[n] for n in TRAIN_OUTPUTS], api_name="finetune_extend",
                 show_progress="hidden")

    def on_cancel(current, request: gr.Request):
        yield from cancel_and_follow(studio, current, user_of(request, auth))

    cancel.click(on_cancel, job_id, status, api_name="finetune_cancel")

    def on_run(run, request: gr.Request):
        return show_run(studio, user_of(request, auth), run)

    # a run picked, or one that just finished (Train and Resume set it): its answers, and the runs table refreshed
    run.change(on_run, run, [evaluation, runs], api_name="finetune_runs", show_progress="hidden")
    merge.click(bind(start_merge, studio, auth), None, merge_status,
                inputs_kwargs={n: ui[n] for n in MERGE_INPUTS}, api_name="finetune_merge", show_progress="hidden")
    return ui


def link(demo, tabs, ui: dict, studio, auth: bool) -> None:
    """Chat with it: the Chat tab opens on the base + this fine-tune's adapter (app.build_ui calls this once every tab
    is built, since it reaches into the Chat tab)."""
    chat = ui.get("chat")
    if chat is None or "adapter" not in chat:
        return

    def on_chat(run, request: gr.Request):
        target = chat_target(studio, finished(studio, user_of(request, auth), run))
        gr.Info(f"Chat: {Path(target['model']).name}" + (f" + adapter {target['adapter']}" if target["adapter"]
                                                          else ""))
        return (gr.Tabs(selected="chat"), target["model"], target["adapter"],
                target["load_in_4bit"])

    ft = ui["finetune"]
    ft["chat_with_it"].click(on_chat, ft["run"], [tabs, chat["model"], chat["adapter"], chat["load_in_4bit"]],
                             api_name="finetune_chat_with_it", show_progress="hidden")
