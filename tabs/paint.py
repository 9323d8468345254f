"""Paint tab: Stable Diffusion 1.5 / SDXL images (Generate: text to image, img2img, inpainting, LoRAs, a live preview,
a gallery of past images with their settings; a dropped PNG restores its settings) and, in Train LoRA, style LoRAs
(built by build_train below)."""
from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import gradio as gr

from studio import Job
from studio.presets import label, presets
from workers.paint.pipeline import MEMORY, SAMPLERS

from . import paint_lora
from .common import Follow, apply_fix, bind, gib, offer_fix, progress_html, user_of, watch

# the Generate button's inputs: names in build()'s dict and the endpoint's parameters, in this order
GENERATE_INPUTS = ("model", "prompt", "negative_prompt", "width", "height", "steps", "cfg", "sampler", "seed", "batch",
                   "loras", "init_image", "strength", "mask", "memory")
GENERATE_OUTPUTS = ("status", "preview", "images", "info", "job_id")
# what a dropped PNG's settings fill (pngmeta.parse_parameters's names)
# params the gate's suggestion may change (workers.paint.generate.shrink) -> (the input, its label)
FIX_INPUTS = {"batch": ("batch", "Batch"), "memory": ("memory", "Memory"), "width": ("width", "Width"),
              "height": ("height", "Height")}
RESTORED = ("prompt", "negative_prompt", "width", "height", "steps", "cfg", "sampler", "seed", "loras", "strength")


def _info(job: Job, events: list[dict]) -> str:
    lines = []
    flags = next((e["flags"] for e in reversed(events) if e["type"] == "flags"), None)
    if flags:
        lines.append("memory flags: " + " · ".join(f"**{f}**" for f in flags))
    est = gib(job.estimate_bytes)
    lines.append(f"memory estimate {est}" + (f" · measured peak {gib(job.peak_bytes)}" if job.peak_bytes else ""))
    r = job.result or {}
    if r:
        lines.append(f"seed **{r['seed']}**" + (f" (batch: {r['seeds'][0]}–{r['seeds'][-1]})" if len(r["seeds"]) > 1
                                                else "") + f" · {r['mode']} · {r['width']}x{r['height']} · "
                     f"**{r['steps_per_s']:.2f} steps/s** · model {'from the cache' if r['model_cached'] else 'loaded'}")
        lines.append("```\n" + r["parameters"][0] + "\n```")
    return "  \n".join(lines)


def follow(studio, job: Job, owner: str | None) -> Iterator[tuple]:
    """Stream a paint job into the tab (GENERATE_OUTPUTS): status, the latest preview, then the images."""
    seen, last = -1, 0.0
    for job, evs in watch(studio, job, every=0.2):
        if len(evs) == seen and not job.status.final and time.time() - last < 1.0:
            continue
        seen, last = len(evs), time.time()
        run = studio.run_dir(job.id)
        previews = [e for e in evs if e["type"] == "preview"]
        preview = str(run / previews[-1]["path"]) if previews else None
        images = [str(run / p) for p in (job.result or {}).get("images", [])]
        yield progress_html(job), preview, images, _info(job, evs), job.id
    if job.status.value == "DONE" and job.result:
        yield progress_html(job), str(run / job.result["images"][0]), images, _info(job, evs), job.id


def start_generate(studio, owner: str | None, v: dict[str, Any]) -> Iterator[tuple]:
    """The Generate button, given its inputs by name (GENERATE_INPUTS): a paint job, streamed."""
    params = {n: v[n] for n in GENERATE_INPUTS if v[n] not in (None, "")}
    params["seed"] = int(v["seed"]) if v["seed"] not in (None, "") else -1
    for name in ("width", "height", "steps", "batch"):
        if name in params:
            params[name] = int(params[name])
    if not params.get("mask"):
        params.pop("mask", None)
    try:
        job = studio.submit("paint", params, owner=owner)
    except ValueError as e:
        raise gr.Error(str(e))
    yield from follow(studio, job, owner)


def history(studio, owner: str | None, limit: int = 60) -> list[tuple[str, str]]:
    """(image path, caption) of the user's past images, newest first: the caption is the prompt and seed."""
    out = []
    for j in studio.jobs(limit=limit, owner=owner, kind="paint"):
        r = j.result or {}
        for path, seed in zip(r.get("images", []), r.get("seeds", [])):
            f = studio.run_dir(j.id) / path
            if f.exists():
                out.append((str(f), f"{str(j.params.get('prompt', ''))[:60]} · seed {seed}"))
    return out


def restore(path: str | None) -> dict:
    """A PNG's A1111 settings as form values (RESTORED names); a clear gr.Error when it carries none."""
    from workers.paint.pngmeta import parse_parameters, read_png_parameters

    if not path:
        return {}
    try:
        found = parse_parameters(read_png_parameters(path))
    except ValueError as e:
        raise gr.Error(str(e)) from None
    return {n: found[n] for n in RESTORED if n in found}


def model_choices(studio) -> list[tuple[str, str]]:
    return [(label("sd", n, studio.config.data_dir), n) for n in presets()["sd"]]


def lora_choices(studio, owner: str | None) -> list[tuple[str, str]]:
    """The user's finished paint_lora jobs, to add to the LoRAs box."""
    return [(f"{j.id} · {j.params.get('instance_prompt') or j.params.get('images', '')}"[:80], j.id)
            for j in studio.jobs(limit=50, owner=owner, kind="paint_lora") if j.status.value == "DONE"]


def fill(studio, owner: str | None) -> dict:
    """The user's past images and trained LoRAs, on page load (and Train LoRA's own lists)."""
    return {"history": history(studio, owner), "lora_pick": gr.update(choices=lora_choices(studio, owner))} | \
        paint_lora.fill(studio, owner)


def to_form(job: Job) -> dict:
    return {"seed": job.params.get("seed", -1)}


KINDS = {"paint": Follow(follow, GENERATE_OUTPUTS, form=tuple(n for n in GENERATE_INPUTS
                                                             if n not in ("init_image", "mask")), to_form=to_form),
         **paint_lora.KINDS}
# the forms whose last-used settings come back on page load (tabs.common.bind(..., remember=key))
FORMS = {"paint_generate": tuple(n for n in GENERATE_INPUTS if n not in ("init_image", "mask")), **paint_lora.FORMS}


def build_generate(studio, auth: bool = False) -> dict:
    with gr.Row():
        with gr.Column(scale=2):
            model = gr.Dropdown(model_choices(studio), value="sd15", allow_custom_value=True,
                                label="Model (a preset, a diffusers folder or a .safetensors checkpoint)")
            prompt = gr.Textbox("a watercolor painting of a lighthouse at dawn", label="Prompt", lines=3)
            negative_prompt = gr.Textbox("", label="Negative prompt", lines=2)
            with gr.Row():
                width = gr.Number(0, label="Width (0 = native)", precision=0, minimum=0, step=64)
                height = gr.Number(0, label="Height (0 = native)", precision=0, minimum=0, step=64)
                batch = gr.Number(1, label="Batch", precision=0, minimum=1, maximum=16)
            with gr.Row():
                steps = gr.Slider(1, 150, 25, step=1, label="Steps")
                cfg = gr.Slider(0, 20, 7.0, step=0.5, label="CFG scale")
            with gr.Row():
                sampler = gr.Dropdown(list(SAMPLERS), value="Euler a", label="Sampler")
                seed = gr.Number(-1, label="Seed (-1 = random)", precision=0, minimum=-1)
                memory = gr.Radio(list(MEMORY), value="auto", label="Memory",
                                  info="auto: the gate picks fp16, VAE tiling, text encoders off the GPU; offload: "
                                       "model CPU offload too")
            with gr.Row():
                loras = gr.Textbox("", label="LoRAs (path or paint_lora job : weight, comma-separated)", scale=4)
                lora_pick = gr.Dropdown([], label="Add a trained LoRA", scale=2)
            with gr.Accordion("img2img / inpainting", open=False):
                with gr.Row():
                    init_image = gr.Image(type="filepath", label="Init image", sources=["upload", "clipboard"])
                    mask = gr.Image(type="filepath", label="Mask (white = repaint)", sources=["upload", "clipboard"],
                                    image_mode="L")
                strength = gr.Slider(0.05, 1.0, 0.75, step=0.05, label="Denoising strength")
            with gr.Row():
                generate = gr.Button("Generate", variant="primary")
                cancel = gr.Button("Cancel", variant="stop")
            fix = gr.Button("Apply", visible=False, size="sm")  # a refusal's change that fits, into the form
            png = gr.File(label="Drop a PNG to restore its settings", file_types=[".png", ".jpg", ".jpeg", ".webp"],
                          type="filepath", height=80)
        with gr.Column(scale=3):
            status = gr.HTML("No image yet.")
            preview = gr.Image(label="Preview", type="filepath", interactive=False, height=320)
            images = gr.Gallery(label="Images", columns=4, height=260)
            info = gr.Markdown()
            history_gallery = gr.Gallery(label="Past images (select one to see its settings)", columns=6, height=220)
            history_info = gr.Textbox(label="Settings of the selected image", lines=4, interactive=False)
    job_id, fix_change = gr.State(""), gr.State({})
    ui = dict(model=model, prompt=prompt, negative_prompt=negative_prompt, width=width, height=height, batch=batch,
              steps=steps, cfg=cfg, sampler=sampler, seed=seed, memory=memory, loras=loras, lora_pick=lora_pick,
              init_image=init_image, mask=mask, strength=strength, generate=generate, cancel=cancel, png=png,
              status=status, preview=preview, images=images, info=info, history=history_gallery,
              history_info=history_info, job_id=job_id, fix=fix, fix_change=fix_change)

    def on_fix_offer(current, request: gr.Request):
        return offer_fix(studio, current, user_of(request, auth), FIX_INPUTS)

    generate.click(bind(start_generate, studio, auth, remember="paint_generate"), None,
                   [ui[n] for n in GENERATE_OUTPUTS], inputs_kwargs={n: ui[n] for n in GENERATE_INPUTS},
                   api_name="paint_generate", show_progress="hidden"
                   ).then(on_fix_offer, job_id, [fix, fix_change], api_name="paint_fix_offer", show_progress="hidden")
    fix_names = tuple(name for name, _ in FIX_INPUTS.values())
    fix.click(lambda change: apply_fix(change, fix_names, "Generate"), fix_change, [*(ui[n] for n in fix_names), fix],
              api_name="paint_apply_fix", show_progress="hidden")

    def on_cancel(current):
        if not current:
            return "No job to cancel."
        return progress_html(studio.cancel(current))

    cancel.click(on_cancel, job_id, status, api_name="paint_cancel")

    def on_restore(path):
        values = restore(path)
        return tuple(values[n] if n in values else gr.skip() for n in RESTORED)

    png.upload(on_restore, png, [ui[n] for n in RESTORED], api_name="paint_restore", show_progress="hidden")

    def on_history(request: gr.Request):
        return history(studio, user_of(request, auth))

    images.change(on_history, None, history_gallery, api_name="paint_history", show_progress="hidden")

    def on_select(evt: gr.SelectData, request: gr.Request):
        from workers.paint.pngmeta import read_png_parameters

        items = history(studio, user_of(request, auth))  # the user's own images, never a path from the client
        if not 0 <= evt.index < len(items):
            return ""
        try:
            return read_png_parameters(items[evt.index][0])
        except ValueError as e:
            return str(e)

    history_gallery.select(on_select, None, history_info, api_name="paint_history_select", show_progress="hidden")

    def on_pick(current, picked):
        if not picked:
            return gr.skip()
        return f"{current.strip()}, {picked}:1" if (current or "").strip() else f"{picked}:1"

    lora_pick.select(on_pick, [loras, lora_pick], loras, api_name="paint_add_lora", show_progress="hidden")
    return ui


def build_train(studio, auth: bool = False) -> dict:
    """The Train LoRA sub-tab (kind paint_lora, tabs.paint_lora): its named components, all t_…"""
    return paint_lora.build_train(studio, auth)


def build(studio, auth: bool = False) -> dict:
    gr.Markdown("Stable Diffusion 1.5 and SDXL: generate images (text to image, img2img, inpainting, your LoRAs) and "
                "train a style LoRA on your own images; the LoRA files work in A1111, Forge and ComfyUI.")
    with gr.Tabs() as tabs:
        with gr.Tab("Generate", id="paint_generate"):
            ui = build_generate(studio, auth)
        with gr.Tab("Train LoRA", id="paint_train"):
            ui |= build_train(studio, auth)
    paint_lora.wire_use(studio, ui, tabs, auth)  # Use in Paint: the trained LoRA into Generate
    return ui
