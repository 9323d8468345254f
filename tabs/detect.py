"""Detect tab: YOLO predict (images → annotated gallery and a box table; video → annotated video), train on your
labelled set (dataset check, live losses and mAP, sample predictions, resume), export to ONNX/TensorRT with a
latency table."""
import html
from collections.abc import Iterator
from typing import Any

import gradio as gr

from pathlib import Path

from studio import Job, JobStatus
from studio.presets import DOWNLOAD, availability, label
from workers.detect.yolo import presets

from .common import (Follow, LivePlot, admin_only, apply_fix, bind, eta, offer_fix, own_uploads, resume_run,
                     progress_html, save_form, stash_uploads, user_of, watch)

BASE_MODELS = ["yolov8n.yaml", "yolov8s.yaml", "yolo11n.yaml", "yolo11s.yaml"]
# the Train button's inputs: each comes from build()'s t_<name> component, and they are the /detect_train
# endpoint's parameters in this order
TRAIN_INPUTS = ("files", "path", "model", "epochs", "imgsz", "batch", "mosaic", "fliplr", "flipud", "hsv_h", "hsv_s",
                "hsv_v", "amp", "patience", "seed", "trust")
TRAIN_OUTPUTS = ("t_status", "t_report", "t_loss", "t_map", "t_sample", "t_plots", "t_files_out", "t_job")
# params the gate's suggestion may change (workers.detect.train.shrink) -> (the input, its label)
FIX_INPUTS = {"batch": ("t_batch", "Batch"), "imgsz": ("t_imgsz", "Image size")}


def trained_models(studio, owner=None) -> list[tuple[str, str]]:
    """best.pt of finished detect_train jobs, newest first."""
    out = []
    for j in studio.jobs(limit=100, owner=owner, kind="detect_train"):
        best = studio.run_dir(j.id) / "best.pt"
        if best.exists():
            m = (j.result or {}).get("best_map50")
            out.append((f"{j.id} · {j.status.value}" + (f" · mAP50 {m:.3f}" if m is not None else ""), str(best)))
    return out


def fill(studio, owner: str | None) -> dict:
    """The user's trained models on page load, first in the Predict list; what is on disk is marked and chosen."""
    predict = model_choices(studio, owner)
    base = base_choices(studio, owner)
    return {"p_model": gr.update(choices=predict, value=predict[0][1] if predict else None),
            "t_model": gr.update(choices=base, value=base[0][1]),
            **admin_only(studio, owner, "p_trust", "t_trust", "e_trust", "t_path")}


def preset_choices(studio, on_disk: bool) -> list[tuple[str, str]]:
    """(label, name) of the presets that are on disk (or not): a label says when one needs a download."""
    data_dir = studio.config.data_dir
    return [(label("yolo", n, data_dir), n) for n in presets()
            if (availability("yolo", n, data_dir) != DOWNLOAD) == on_disk]


def yaml_choices() -> list[tuple[str, str]]:
    return [(f"{n} · architecture, random weights (no download)", n) for n in BASE_MODELS]


def model_choices(studio, owner=None, yaml: bool = False) -> list[tuple[str, str]]:
    """Models to predict with or export, those that work now first: the user's trained weights, presets on disk,
    then (for export) the architectures, then presets that need a download."""
    return (trained_models(studio, owner) + preset_choices(studio, True) + (yaml_choices() if yaml else [])
            + preset_choices(studio, False))


def base_choices(studio, owner=None) -> list[tuple[str, str]]:
    """Base models to train from: a preset on disk first (pretrained weights fine-tune best), else an architecture
    with random weights, which needs nothing downloaded; presets to download and the user's own weights after."""
    return (preset_choices(studio, True) + yaml_choices() + preset_choices(studio, False)
            + [(f"{lbl} · your trained weights", path) for lbl, path in trained_models(studio, owner)])


def random_weights_note(model: str, found: int) -> str:
    """Said next to a prediction made with a model built from a yaml: its weights are random."""
    if not str(model).endswith((".yaml", ".yml")):
        return ""
    what = "found nothing" if not found else f"found {found} boxes that mean nothing"
    return (f"<br><b>random weights: train it first.</b> {html.escape(Path(model).name)} is an architecture with "
            f"random weights, so it {what}. Train it in Train (or pick a preset or your trained best.pt).")


def _submit(studio, kind: str, params: dict, owner: str | None) -> Job:
    try:
        return studio.submit(kind, params, owner=owner)
    except ValueError as e:
        raise gr.Error(str(e))


def _dataset_path(studio, files, path, owner: str | None) -> str:
    chosen = stash_uploads(studio, [files], "dataset", owner) if files else (path or "").strip()
    if not chosen:
        raise gr.Error("Upload a dataset zip or give a folder / data.yaml path.")
    return chosen


def follow_train(studio, job: Job, owner: str | None) -> Iterator[tuple]:
    """Stream a training job into the Train tab (TRAIN_OUTPUTS): the dataset report, losses, mAP and the latest
    sample prediction as epochs end; plots and weights once it is over. Train, Resume and a reloaded page use it."""
    last = None
    losses, maps = LivePlot(("train_box_loss", "train_cls_loss", "train_dfl_loss")), LivePlot(("map50", "map50_95"))
    for job, evs in watch(studio, job, every=0.5):
        key = (len(evs), job.status)
        if key == last and not job.status.final:
            continue  # nothing new to draw
        last = key
        run_dir = studio.run_dir(job.id)
        report = next((e["summary"] for e in evs if e["type"] == "dataset"), gr.update())
        samples = [e for e in evs if e["type"] == "sample"]
        sample = str(run_dir / samples[-1]["path"]) if samples else None
        plots = [(str(p), p.stem) for p in sorted((run_dir / "train").glob("*.png"))] if job.status.final else []
        files = [str(run_dir / f) for f in ("best.pt", "last.pt") if (run_dir / f).exists()]
        files += [str(p) for p in (run_dir / "train").glob("results.csv")]
        yield (progress_html(job, eta(job)), report, losses(evs), maps(evs), sample, plots or None, files or None,
               job.id)


def train_form(job: Job) -> dict:
    """The Train form as the job was started (its own params, by the inputs' t_ names); an uploaded zip cannot go
    back into the file box, so the path box stays empty for it."""
    v = job.params or {}
    data = str(v.get("data", ""))
    uploaded = {"uploads", "users"} & set(Path(data).parts)  # the studio's own folders
    return {"t_path": "" if uploaded else data,
            **{f"t_{n}": v[n] for n in TRAIN_INPUTS if n not in ("files", "path", "trust") and n in v}}


KINDS = {"detect_train": Follow(follow_train, TRAIN_OUTPUTS, to_form=train_form)}  # predict, export: short
# the Train form's last-used settings come back on page load; not the upload, nor the trust tick (a file to trust
# is chosen each time)
FORMS = {"detect_train": tuple(f"t_{n}" for n in TRAIN_INPUTS if n not in ("files", "trust"))}


def start_train(studio, owner: str | None, v: dict[str, Any]) -> Iterator[tuple]:
    """The Train button, given its inputs by name (TRAIN_INPUTS): a detect_train job, streamed."""
    # kept under the inputs' t_ names, which FORMS and the page's re-attach use (the endpoint's names lack the t_)
    form = FORMS["detect_train"]
    job = _submit(studio, "detect_train", dict(
        data=_dataset_path(studio, v["files"], v["path"], owner), model=v["model"], epochs=int(v["epochs"]),
        imgsz=int(v["imgsz"]), batch=int(v["batch"]), mosaic=v["mosaic"], fliplr=v["fliplr"], flipud=v["flipud"],
        hsv_h=v["hsv_h"], hsv_s=v["hsv_s"], hsv_v=v["hsv_v"], amp=v["amp"], patience=int(v["patience"]),
        seed=int(v["seed"]), trust=v["trust"]), owner)
    save_form(studio, owner, "detect_train", {f"t_{n}": v[n] for n in TRAIN_INPUTS if f"t_{n}" in form})  # valid
    yield from follow_train(studio, job, owner)


def build(studio, auth: bool = False) -> dict:
    gr.Markdown("Find objects with Ultralytics YOLO: predict on images or video, train on your own labelled set "
                "(YOLO, Roboflow, Label Studio or COCO exports), export to ONNX or TensorRT and compare latency. "
                ".pt files are pickles: the studio loads only weights it wrote, hash-pinned presets, or files you "
                "say you trust.")
    with gr.Tabs():
        with gr.Tab("Predict"):
            with gr.Row():
                with gr.Column(scale=2):
                    p_files = gr.File(label="Images or one video", file_count="multiple")
                    choices = model_choices(studio, "")  # presets; the user's trained models come on page load
                    p_model = gr.Dropdown(choices, label="Model", allow_custom_value=True,
                                          value=choices[0][1] if choices else None,
                                          info="A preset that needs a download is fetched on first use (internet). "
                                               "Offline: train a model in Train; it appears here.")
                    p_trust = gr.Checkbox(False, label="I trust this file (a .pt the studio did not write)")
                    with gr.Row():
                        p_conf = gr.Slider(0.01, 0.99, 0.25, step=0.01, label="Confidence")
                        p_iou = gr.Slider(0.05, 0.95, 0.7, step=0.05, label="IoU (NMS)")
                    with gr.Row():
                        p_imgsz = gr.Number(640, precision=0, label="Image size")
                        p_classes = gr.Textbox(label="Only these classes (names or ids)", placeholder="person, car")
                    with gr.Row():
                        p_go = gr.Button("Detect", variant="primary")
                        p_cancel = gr.Button("Cancel", variant="stop")
                with gr.Column(scale=3):
                    p_status = gr.HTML()
                    p_gallery = gr.Gallery(label="Annotated", columns=3, height=360)
                    p_video = gr.Video(label="Annotated video")
                    p_table = gr.Dataframe(headers=["image", "class", "confidence", "x1", "y1", "x2", "y2"],
                                           label="Boxes", interactive=False)
            with gr.Accordion("Webcam (live)", open=False):
                gr.Markdown("Frames go to the worker that owns the GPU, with the model and thresholds above; the "
                            "stream job stops 10 s after the last frame.")
                with gr.Row():
                    cam = gr.Image(sources=["webcam"], streaming=True, type="numpy", label="Webcam")
                    cam_out = gr.Image(label="Live detections", type="filepath")
                cam_status = gr.Markdown()
        with gr.Tab("Train"):
            with gr.Row():
                with gr.Column(scale=2):
                    t_files = gr.File(label="Dataset: a zip (YOLO, Roboflow YOLOv8, Label Studio YOLO, COCO)",
                                      file_count="single")
                    t_path = gr.Textbox(label="…or a folder / data.yaml on this machine")
                    t_check = gr.Button("Check dataset")
                    t_report = gr.Markdown()
                    base = base_choices(studio, "")
                    t_model = gr.Dropdown(base, value=base[0][1], allow_custom_value=True,
                                          label="Base model (a .yaml trains from scratch: random weights)")
                    with gr.Row():
                        t_epochs = gr.Number(50, precision=0, label="Epochs")
                        t_imgsz = gr.Number(640, precision=0, label="Image size")
                        t_batch = gr.Number(16, precision=0, label="Batch (-1: what fits)")
                    with gr.Accordion("Augmentation and training", open=False):
                        with gr.Row():
                            t_mosaic = gr.Slider(0, 1, 1.0, step=0.05, label="Mosaic")
                            t_fliplr = gr.Slider(0, 1, 0.5, step=0.05, label="Flip left-right")
                            t_flipud = gr.Slider(0, 1, 0.0, step=0.05, label="Flip up-down")
                        with gr.Row():
                            t_hsv_h = gr.Slider(0, 0.1, 0.015, step=0.005, label="Hue")
                            t_hsv_s = gr.Slider(0, 1, 0.7, step=0.05, label="Saturation")
                            t_hsv_v = gr.Slider(0, 1, 0.4, step=0.05, label="Brightness")
                        with gr.Row():
                            t_amp = gr.Checkbox(True, label="Mixed precision (AMP)")
                            t_patience = gr.Number(20, precision=0, label="Early-stop patience (0: off)")
                            t_seed = gr.Number(0, precision=0, label="Seed")
                        t_trust = gr.Checkbox(False, label="I trust this base .pt file")
                    with gr.Row():
                        t_go = gr.Button("Train", variant="primary")
                        t_cancel = gr.Button("Cancel", variant="stop")
                        t_resume = gr.Button("Resume")
                    t_fix = gr.Button("Apply", visible=False, size="sm")  # a refusal's change that fits, into the form
                with gr.Column(scale=3):
                    t_status = gr.HTML()
                    with gr.Row():
                        t_loss = gr.LinePlot(x="step", y="loss", color="series", title="Training losses",
                                             height=240)
                        t_map = gr.LinePlot(x="step", y="loss", color="series", title="mAP (validation)",
                                            height=240, y_title="mAP")
                    t_sample = gr.Image(label="Sample prediction on a validation image", height=240)
                    t_plots = gr.Gallery(label="Confusion matrix, PR curve, results", columns=3, height=260)
                    t_files_out = gr.File(label="Weights and results", file_count="multiple", interactive=False)
        with gr.Tab("Export"):
            with gr.Row():
                with gr.Column(scale=2):
                    e_model = gr.Dropdown(model_choices(studio, yaml=True), label="Model", allow_custom_value=True)
                    e_trust = gr.Checkbox(False, label="I trust this file")
                    e_format = gr.Radio(["onnx", "engine"], value="onnx",
                                        label="Format (engine: TensorRT, needs an NVIDIA GPU and tensorrt)")
                    with gr.Row():
                        e_imgsz = gr.Number(640, precision=0, label="Image size")
                        e_batch = gr.Number(1, precision=0, label="Batch")
                        e_half = gr.Checkbox(False, label="FP16 (GPU)")
                    e_go = gr.Button("Export and time", variant="primary")
                with gr.Column(scale=3):
                    e_status = gr.HTML()
                    e_table = gr.Dataframe(headers=["backend", "ms / image", "inference ms", "FPS", "note"],
                                           label="Latency (median, warm-up excluded)", interactive=False)
                    e_files = gr.File(label="Exported", file_count="multiple", interactive=False)
    p_job, t_job, t_fix_change = gr.State(""), gr.State(""), gr.State({})
    ui = dict(p_files=p_files, p_model=p_model, p_trust=p_trust, p_go=p_go, p_status=p_status,
              p_gallery=p_gallery, p_video=p_video, p_table=p_table, t_files=t_files, t_path=t_path,
              t_check=t_check, t_report=t_report, t_model=t_model, t_epochs=t_epochs, t_imgsz=t_imgsz,
              t_batch=t_batch, t_mosaic=t_mosaic, t_fliplr=t_fliplr, t_flipud=t_flipud, t_hsv_h=t_hsv_h,
              t_hsv_s=t_hsv_s, t_hsv_v=t_hsv_v, t_amp=t_amp, t_patience=t_patience, t_seed=t_seed, t_trust=t_trust,
              t_go=t_go, t_cancel=t_cancel, t_resume=t_resume, t_fix=t_fix, t_fix_change=t_fix_change,
              t_status=t_status, t_loss=t_loss, t_map=t_map,
              t_sample=t_sample, t_plots=t_plots, t_files_out=t_files_out, t_job=t_job, e_model=e_model,
              e_format=e_format, e_trust=e_trust, e_go=e_go, e_table=e_table, e_files=e_files)

    def owner(request):
        return user_of(request, auth)

    def submit(kind, params, request):
        return _submit(studio, kind, params, owner(request))

    # ---- predict ---------------------------------------------------------------------------------------------
    def on_predict(files, model, trust, conf, iou, imgsz, classes, request: gr.Request):
        paths = own_uploads(studio, files, owner(request))
        if not paths:
            raise gr.Error("Upload images or a video first.")
        if not model:
            raise gr.Error("Pick a model: train one, or download a preset in the Models tab.")
        job = submit("detect_predict", dict(model=model, source="\n".join(paths), trust=trust, conf=conf, iou=iou,
                                            imgsz=int(imgsz), classes=classes or ""), request)
        for job, evs in watch(studio, job):
            run_dir = studio.run_dir(job.id)
            dets = [e for e in evs if e["type"] == "detections"]
            gallery = [(str(run_dir / e["annotated"]), e["image"]) for e in dets]
            rows = [[e["image"], b["class"], b["confidence"], b["x1"], b["y1"], b["x2"], b["y2"]]
                    for e in dets for b in e["boxes"]]
            video = next((str(run_dir / a["path"]) for a in evs if a["type"] == "artifact"
                          and a["path"].startswith("annotated.")), None)
            note = random_weights_note(model, len(rows)) if job.status is JobStatus.DONE else ""
            yield progress_html(job, eta(job)) + note, gallery or None, video, rows, job.id

    p_go.click(on_predict, [p_files, p_model, p_trust, p_conf, p_iou, p_imgsz, p_classes],
               [p_status, p_gallery, p_video, p_table, p_job], api_name="detect_predict", show_progress="hidden")
    def cancel(job_id, what_is_kept):
        if not job_id:
            return "Nothing to cancel."
        studio.cancel(job_id)
        return f"Cancelling: {what_is_kept}"

    p_cancel.click(lambda j: cancel(j, "the frames done so far are kept."), p_job, p_status)

    cam_job = gr.State("")

    def on_frame(frame, model, trust, conf, iou, imgsz, classes, job_id, request: gr.Request):
        """Hand one webcam frame to the stream job (started on the first frame) and show its latest result."""
        import uuid

        from PIL import Image

        from workers.detect.stream import folder

        if frame is None:
            return gr.skip(), gr.skip(), job_id
        job = studio.job(job_id) if job_id else None
        if job is None or job.status.final:
            session = f"cam-{uuid.uuid4().hex[:12]}"
            job = submit("detect_stream", dict(model=model, session=session, trust=trust, conf=conf, iou=iou,
                                               imgsz=int(imgsz), classes=classes or ""), request)
        d = folder(studio.config.data_dir, job.params["session"])
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(frame).save(d / "in.tmp.jpg", "JPEG", quality=90)
        (d / "in.tmp.jpg").replace(d / "in.jpg")
        out = d / "out.jpg"
        return (str(out) if out.exists() else None), f"`{job.id}` · {job.message or job.status.value}", job.id

    cam.stream(on_frame, [cam, p_model, p_trust, p_conf, p_iou, p_imgsz, p_classes, cam_job],
               [cam_out, cam_status, cam_job], stream_every=0.2, api_name="detect_webcam")

    # ---- train -----------------------------------------------------------------------------------------------
    def on_check(files, path, request: gr.Request):
        """A `detect_check` job in the io lane: it runs beside a training job and cleans up its import."""
        job = submit("detect_check", dict(data=_dataset_path(studio, files, path, owner(request))), request)
        job = studio.wait(job.id, timeout=1800)
        if job.status.value != "DONE":
            raise gr.Error(job.error or f"the dataset check ended {job.status.value}")
        return job.result["summary"]

    t_check.click(on_check, [t_files, t_path], t_report, api_name="detect_check")
    def on_fix_offer(job_id, request: gr.Request):
        return offer_fix(studio, job_id, owner(request), FIX_INPUTS)

    t_go.click(bind(start_train, studio, auth), None, [ui[n] for n in TRAIN_OUTPUTS],
               inputs_kwargs={n: ui[f"t_{n}"] for n in TRAIN_INPUTS}, api_name="detect_train", show_progress="hidden"
               ).then(on_fix_offer, t_job, [t_fix, t_fix_change], api_name="detect_fix_offer", show_progress="hidden")
    t_cancel.click(lambda j: cancel(j, "last.pt is kept; Resume continues from it."), t_job, t_status)

    def on_resume(job_id, request: gr.Request):
        who = owner(request)
        job = resume_run(studio, who, job_id, "detect_train", "Nothing to resume: no cancelled, interrupted or failed "
                         "Detect training left a last.pt. Train one (Cancel keeps last.pt).")
        yield from follow_train(studio, job, who)

    t_resume.click(on_resume, t_job, [ui[n] for n in TRAIN_OUTPUTS], api_name="detect_resume",
                   show_progress="hidden"
                   ).then(on_fix_offer, t_job, [t_fix, t_fix_change], api_name="detect_resume_fix_offer",
                          show_progress="hidden")
    fix_names = tuple(name for name, _ in FIX_INPUTS.values())
    t_fix.click(lambda change: apply_fix(change, fix_names, "Train"), t_fix_change,
                [*(ui[n] for n in fix_names), t_fix], api_name="detect_apply_fix", show_progress="hidden")

    # ---- export ----------------------------------------------------------------------------------------------
    def on_export(model, trust, fmt, imgsz, batch, half, request: gr.Request):
        if not model:
            raise gr.Error("Pick a model to export.")
        job = submit("detect_export", dict(model=model, trust=trust, format=fmt, imgsz=int(imgsz), batch=int(batch),
                                           half=half), request)
        for job, _ in watch(studio, job):
            rows = [[r["backend"], r["ms_per_image"], r["inference_ms"], r["fps"], r.get("note", "")]
                    for r in (job.result or {}).get("latency", [])]
            run_dir = studio.run_dir(job.id)
            files = [str(p) for p in sorted(run_dir.glob("*.onnx")) + sorted(run_dir.glob("*.engine"))]
            yield progress_html(job, eta(job)), rows, files or None

    e_go.click(on_export, [e_model, e_trust, e_format, e_imgsz, e_batch, e_half], [e_status, e_table, e_files],
               api_name="detect_export", show_progress="hidden")

    def refresh_predict(request: gr.Request):  # models trained since the page loaded
        return gr.update(choices=model_choices(studio, owner(request)))

    def refresh_export(request: gr.Request):
        return gr.update(choices=model_choices(studio, owner(request), yaml=True))

    p_model.focus(refresh_predict, None, p_model)
    e_model.focus(refresh_export, None, e_model)
    return ui
