"""Paint tab, Train LoRA sub-tab (kind paint_lora): your images (upload images + .txt captions, or a zip; a folder on
this machine for the admin), the image-set report, a live loss plot and fixed-seed samples, Cancel / Resume, the
gate's fitting change, the kohya-layout .safetensors to download, and Use in Paint (Generate with the LoRA loaded).
tabs.paint mounts it: build_train() inside its Train LoRA tab, wire_use() once both sub-tabs exist, and KINDS /
FORMS merged into its own."""
from __future__ import annotations

import secrets
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gradio as gr

from studio import Job
from studio.presets import label, presets

from .common import (Follow, LivePlot, apply_fix, bind, eta, gib, offer_fix, own_uploads, owned_job, progress_html,
                     resume_run, user_of, watch)

# the Train button's inputs: names in build_train()'s dict (t_ + the job's param) and the endpoint's parameters
PARAMS = ("base", "instance_prompt", "class_prompt", "prior_preservation", "num_class_images", "name", "rank", "alpha",
          "lr", "steps", "batch_size", "resolution", "bucketing", "train_text_encoder", "gradient_checkpointing",
          "mixed_precision", "optimizer", "sample_every", "sample_prompts", "seed")
TRAIN_INPUTS = ("t_files", "t_folder", *(f"t_{n}" for n in PARAMS))
TRAIN_OUTPUTS = ("t_status", "t_plot", "t_samples", "t_report", "t_result", "t_file", "t_job_id")
INTS = {"num_class_images", "rank", "steps", "batch_size", "resolution", "sample_every", "seed"}
# params the gate's suggestion may change (workers.paint.lora_train.shrink) -> (the input, its label)
FIX_INPUTS = {"mixed_precision": ("t_mixed_precision", "Precision"),
              "gradient_checkpointing": ("t_gradient_checkpointing", "Gradient checkpointing"),
              "batch_size": ("t_batch_size", "Batch"), "optimizer": ("t_optimizer", "Optimizer"),
              "train_text_encoder": ("t_train_text_encoder", "Train text encoder"),
              "resolution": ("t_resolution", "Resolution")}
NOTHING_TO_RESUME = ("Nothing to resume: no cancelled, interrupted or failed LoRA run left a checkpoint. Train one "
                     "(Cancel keeps a checkpoint).")


def report_md(report: dict | None) -> str:
    """The image-set report as the user reads it before training starts."""
    if not report:
        return ""
    s = report.get("sizes") or {}
    lines = [f"**{report['images']} images** ({report['repeats']} with repeats) · sizes {s.get('min')} – "
             f"{s.get('max')} · {s.get('portrait', 0)} portrait, {s.get('landscape', 0)} landscape, "
             f"{s.get('square', 0)} square",
             "buckets: " + ", ".join(f"`{k}` ×{v}" for k, v in report["buckets"].items()),
             f"captions: {report['caption_source']}"]
    for key, what in (("missing_captions", "no .txt caption"), ("empty_captions", "empty caption"),
                      ("captions_without_images", "caption without an image"), ("too_small", "too small"),
                      ("not_images", "not an image")):
        if report.get(key):
            lines.append(f"{len(report[key])} {what}: " + ", ".join(f"`{x}`" for x in report[key][:5])
                         + (" …" if len(report[key]) > 5 else ""))
    if report.get("duplicates"):
        lines.append(f"{len(report['duplicates'])} duplicate(s) skipped: "
                     + ", ".join(f"`{b}` = `{a}`" for a, b in report["duplicates"][:5]))
    skipped = [x for x in report.get("skipped", []) if x["reason"].startswith("unreadable")]
    for x in skipped[:5]:
        lines.append(f"skipped `{x['file']}`: {x['reason']}")
    return "  \n".join(lines)


def _result_md(job: Job, events: list[dict]) -> str:
    metrics = [e for e in events if e["type"] == "metric" and "loss" in e]
    lines = []
    if metrics:
        m = metrics[-1]
        lines.append(f"step **{m['step']}** · loss **{m['loss']:.4f}** · {m['s_per_step']:.2f} s/step · lr "
                     f"{m['lr']:.1e}")
    lines.append(f"memory estimate {gib(job.estimate_bytes)}"
                 + (f" · measured peak {gib(job.peak_bytes)}" if job.peak_bytes else ""))
    r = job.result or {}
    if r:
        lines.append(f"**{r['file']}** · rank {r['rank']}, alpha {r['alpha']} · {r['modules']} modules (kohya "
                     f"layout: A1111, Forge and ComfyUI load it) · {r['steps']} steps in {r['seconds']:.0f} s")
    return "  \n".join(lines)


def follow(studio, job: Job, owner: str | None) -> Iterator[tuple]:
    """Stream a paint_lora job into the sub-tab (TRAIN_OUTPUTS)."""
    seen, last, plot = -1, 0.0, LivePlot(keys=("loss",))
    for job, evs in watch(studio, job, every=0.25):
        if len(evs) == seen and not job.status.final and time.time() - last < 1.0:
            continue
        seen, last = len(evs), time.time()
        run = studio.run_dir(job.id)
        samples = [(str(run / p), f"step {e['step']} · {prompt[:50]}") for e in evs if e["type"] == "sample"
                   for p, prompt in zip(e["paths"], e["prompts"])]
        report = next((e["report"] for e in evs if e["type"] == "image_report"), None)
        file = str(run / job.result["file"]) if job.result and job.result.get("file") else None
        yield progress_html(job, eta(job)), plot(evs), samples[::-1], report_md(report), _result_md(job, evs), \
            file, job.id


def _images_path(studio, files, folder: str, owner: str | None) -> str:
    """The uploaded zip, or a folder of the uploaded images and captions (a single image too), or the admin's
    folder."""
    if files:
        paths = [Path(p) for p in own_uploads(studio, files, owner)]
        if len(paths) == 1 and paths[0].suffix.lower() == ".zip":
            return str(paths[0])
        if owner is not None:
            return str(paths[0].parent)  # own_uploads put them in a folder of their own
        dest = studio.config.uploads_dir / f"paint-lora-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(4)}"
        dest.mkdir(parents=True)
        for p in paths:
            shutil.copy(p, dest / p.name)
        return str(dest)
    if (folder or "").strip():
        return folder.strip()
    raise gr.Error("Upload your images (and their .txt captions), or a zip of them; the admin may name a folder.")


def start_train(studio, owner: str | None, v: dict[str, Any]) -> Iterator[tuple]:
    """The Train button, given its inputs by name (TRAIN_INPUTS): a paint_lora job, streamed."""
    params = {n: v[f"t_{n}"] for n in PARAMS if v[f"t_{n}"] not in (None, "")}
    params |= {n: int(params[n]) for n in INTS if n in params}
    params["images"] = _images_path(studio, v["t_files"], v["t_folder"], owner)
    try:
        job = studio.submit("paint_lora", params, owner=owner)
    except ValueError as e:
        raise gr.Error(str(e))
    yield from follow(studio, job, owner)  # a refusal shows in the status line; Apply offers its fitting change


CHECK_INPUTS = ("t_files", "t_folder", "t_instance_prompt", "t_resolution", "t_bucketing")


def check_images(studio, owner: str | None, v: dict[str, Any]) -> str:
    """The Check images button: the image-set report before any training (PIL only, in this process), with the same
    access answer a job would get for that path."""
    from studio import access
    from workers.paint import images, lora_train

    path = _images_path(studio, v["t_files"], v["t_folder"], owner)
    try:
        access.check(studio, "paint_lora", lora_train, {"images": path}, studio.user(owner))
        found = images.read_set(path, v["t_instance_prompt"] or "", int(v["t_resolution"] or 512),
                                bool(v["t_bucketing"]), studio.config.data_dir / "paint" / "datasets")
    except ValueError as e:
        raise gr.Error(str(e)) from None
    return report_md(found.report)


def base_choices(studio) -> list[tuple[str, str]]:
    return [(label("sd", n, studio.config.data_dir), n) for n, p in presets()["sd"].items() if p.get("arch") == "sd15"]


def lora_runs(studio, owner: str | None) -> list[tuple[str, str]]:
    return [(f"{j.id} · {j.status.value} · {j.params.get('name') or j.params.get('instance_prompt') or ''}"[:80],
             j.id) for j in studio.jobs(limit=50, owner=owner, kind="paint_lora")]


def to_form(job: Job) -> dict:
    return {f"t_{n}": job.params[n] for n in PARAMS if n in job.params}


KINDS = {"paint_lora": Follow(follow, TRAIN_OUTPUTS, to_form=to_form)}
FORMS = {"paint_lora": tuple(n for n in TRAIN_INPUTS if n != "t_files")}


def build_train(studio, auth: bool = False) -> dict:
    gr.Markdown("Train an SD 1.5 LoRA on 20–150 of your images (captions from `.txt` files beside them, or one "
                "instance prompt; kohya's `N_concept` repeat folders work). The result is a `.safetensors` in kohya's "
                "layout that A1111, Forge and ComfyUI load.")
    with gr.Row():
        with gr.Column(scale=2):
            with gr.Row():
                base = gr.Dropdown(base_choices(studio), value="sd15", allow_custom_value=True,
                                   label="Base (SD 1.5 preset or a diffusers folder)", scale=3)
                name = gr.Textbox("", label="Name (NAME.safetensors)", scale=2)
            files = gr.File(label="Images + .txt captions, or a .zip", file_count="multiple", height=120)
            folder = gr.Textbox("", label="…or a folder on this machine (admin)", visible=not auth)
            instance_prompt = gr.Textbox("", label="Instance prompt (for images without a caption)",
                                         placeholder="a photo of sks mug")
            with gr.Row():
                prior = gr.Checkbox(False, label="Prior preservation")
                class_prompt = gr.Textbox("", label="Class prompt", placeholder="a photo of a mug", scale=2)
                num_class = gr.Number(100, label="Class images", precision=0, minimum=1)
            with gr.Row():
                rank = gr.Slider(1, 64, 8, step=1, label="Rank")
                alpha = gr.Number(8, label="Alpha")
                lr = gr.Number(1e-4, label="Learning rate")
            with gr.Row():
                steps = gr.Number(1000, label="Steps", precision=0, minimum=1)
                resolution = gr.Number(512, label="Resolution (× 64)", precision=0, minimum=64, maximum=2048, step=64)
                batch = gr.Number(1, label="Batch", precision=0, minimum=1)
                seed = gr.Number(42, label="Seed", precision=0, minimum=0)
            with gr.Accordion("Memory and samples", open=False):
                with gr.Row():
                    bucketing = gr.Checkbox(True, label="Aspect-ratio buckets")
                    te = gr.Checkbox(False, label="Train text encoder")
                    ckpt = gr.Checkbox(True, label="Gradient checkpointing")
                with gr.Row():
                    precision = gr.Radio(["fp16", "bf16", "no"], value="fp16", label="Precision")
                    optimizer = gr.Radio(["adamw", "adamw8bit"], value="adamw", label="Optimizer")
                with gr.Row():
                    sample_every = gr.Number(100, label="Sample every (steps, 0 = off)", precision=0, minimum=0)
                    sample_prompts = gr.Textbox("", label="Sample prompts (one a line; empty: the first caption)",
                                                lines=2, scale=2)
            with gr.Row():
                train = gr.Button("Train LoRA", variant="primary")
                cancel = gr.Button("Cancel", variant="stop")
                resume = gr.Button("Resume")
                use = gr.Button("Use in Paint")
                check = gr.Button("Check images")
            fix = gr.Button("Apply", visible=False, size="sm")
        with gr.Column(scale=3):
            status = gr.HTML("No LoRA training yet.")
            report = gr.Markdown()
            plot = gr.LinePlot(x="step", y="loss", color="series", title="Loss", height=220)
            samples = gr.Gallery(label="Samples (fixed seed)", columns=4, height=220)
            result = gr.Markdown()
            file = gr.File(label="LoRA (.safetensors)", interactive=False)
            runs = gr.Dropdown([], label="Your LoRA runs", allow_custom_value=False)
    job_id, fix_change = gr.State(""), gr.State({})
    ui = dict(t_base=base, t_name=name, t_files=files, t_folder=folder, t_instance_prompt=instance_prompt,
              t_prior_preservation=prior, t_class_prompt=class_prompt, t_num_class_images=num_class, t_rank=rank,
              t_alpha=alpha, t_lr=lr, t_steps=steps, t_resolution=resolution, t_batch_size=batch, t_seed=seed,
              t_bucketing=bucketing, t_train_text_encoder=te, t_gradient_checkpointing=ckpt,
              t_mixed_precision=precision, t_optimizer=optimizer, t_sample_every=sample_every,
              t_sample_prompts=sample_prompts, t_train=train, t_check=check, t_cancel=cancel, t_resume=resume, t_use=use, t_fix=fix,
              t_fix_change=fix_change, t_status=status, t_report=report, t_plot=plot, t_samples=samples,
              t_result=result, t_file=file, t_runs=runs, t_job_id=job_id)

    def on_fix_offer(current, request: gr.Request):
        return offer_fix(studio, current, user_of(request, auth), FIX_INPUTS)

    outputs = [ui[n] for n in TRAIN_OUTPUTS]
    train.click(bind(start_train, studio, auth, remember="paint_lora"), None, outputs,
                inputs_kwargs={n: ui[n] for n in TRAIN_INPUTS}, api_name="paint_lora_train", show_progress="hidden"
                ).then(on_fix_offer, job_id, [fix, fix_change], api_name="paint_lora_fix_offer",
                       show_progress="hidden")

    def on_check(request: gr.Request, **values):
        return check_images(studio, user_of(request, auth), values)

    check.click(on_check, None, report, inputs_kwargs={n: ui[n] for n in CHECK_INPUTS}, api_name="paint_lora_check",
                show_progress="hidden")

    def on_resume(current, request: gr.Request):
        owner = user_of(request, auth)
        yield from follow(studio, resume_run(studio, owner, current, "paint_lora", NOTHING_TO_RESUME), owner)

    resume.click(on_resume, job_id, outputs, api_name="paint_lora_resume", show_progress="hidden")
    fix_names = tuple(n for n, _ in FIX_INPUTS.values())
    fix.click(lambda change: apply_fix(change, fix_names, "Train LoRA"), fix_change,
              [*(ui[n] for n in fix_names), fix], api_name="paint_lora_apply_fix", show_progress="hidden")

    def on_cancel(current):
        if not current:
            return "No job to cancel."
        job = studio.cancel(current)
        return progress_html(job) + ("<br>Cancel requested: it stops at the next step and keeps a checkpoint; "
                                     "Resume continues from it." if not job.status.final else "")

    cancel.click(on_cancel, job_id, status, api_name="paint_lora_cancel")

    def on_pick(picked, request: gr.Request):
        owner = user_of(request, auth)
        yield from follow(studio, owned_job(studio, picked, owner), owner)

    runs.select(on_pick, runs, outputs, api_name="paint_lora_pick", show_progress="hidden")
    return ui


def fill(studio, owner: str | None) -> dict:
    """The user's LoRA runs, on page load; the server folder box only for the admin."""
    return {"t_runs": gr.update(choices=lora_runs(studio, owner)),
            "t_folder": gr.update(visible=studio.user(owner).admin)}


def wire_use(studio, ui: dict, tabs, auth: bool = False) -> None:
    """Use in Paint: the finished LoRA into Generate's LoRAs box, and the Generate sub-tab shown."""

    def on_use(current, loras, request: gr.Request):
        job = owned_job(studio, current, user_of(request, auth))
        if job.status.value != "DONE":
            raise gr.Error(f"job {job.id} is {job.status.value}: a LoRA is ready when its training is DONE")
        entry = f"{job.id}:1"
        kept = [x.strip() for x in (loras or "").split(",") if x.strip() and not x.strip().startswith(job.id)]
        return gr.Tabs(selected="paint_generate"), ", ".join([*kept, entry])

    ui["t_use"].click(on_use, [ui["t_job_id"], ui["loras"]], [tabs, ui["loras"]], api_name="paint_lora_use",
                      show_progress="hidden")
