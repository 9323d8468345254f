"""Detect: dataset import from each format and its check, YOLO training from a yaml with live metrics, predict on
images and a video, ONNX export with a latency table, resume after cancel, the pickle guard, the tab."""
import json
import shutil
import zipfile
from pathlib import Path

import pytest
from detect_fixtures import (NAMES, broken_copy, make_shapes, make_video, to_coco, to_labelstudio, to_roboflow,
                             zip_folder)

from studio import JobStatus
from workers.detect import data as detect_data

pytest.importorskip("cv2", reason="OpenCV needs libgl1 and libglib2.0-0 (python app.py test installs them as root)")

TRAIN = {"model": "yolov8n.yaml", "imgsz": 96, "batch": 8, "workers": 0}


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return make_shapes(tmp_path_factory.mktemp("shapes") / "yolo")


@pytest.fixture(scope="module")
def trained(studio, shapes):
    job = studio.wait(studio.submit("detect_train", {"data": str(shapes), "epochs": 3, **TRAIN}).id, 600)
    assert job.status is JobStatus.DONE, job.error
    return job


@pytest.mark.parametrize("fmt", ["yolo", "yolo-zip", "roboflow", "labelstudio", "coco"])
def test_every_export_format_imports_to_the_same_dataset(shapes, tmp_path, fmt):
    src = {"yolo": lambda: shapes / "data.yaml",
           "yolo-zip": lambda: zip_folder(shapes, tmp_path / "yolo.zip"),
           "roboflow": lambda: zip_folder(to_roboflow(shapes, tmp_path / "rf"), tmp_path / "roboflow.zip"),
           "labelstudio": lambda: to_labelstudio(shapes, tmp_path / "ls"),
           "coco": lambda: to_coco(shapes, tmp_path / "coco")}[fmt]()
    data_yaml, report = detect_data.prepare(src, tmp_path / "out")
    boxes = sum(len(f.read_text().split("\n")) - 1 for f in (shapes / "labels").rglob("*.txt"))
    assert report["images"] == 40 and report["boxes"] == boxes and report["names"] == NAMES
    assert report["format"] == {"yolo-zip": "yolo"}.get(fmt, fmt)
    assert not any(report[k]["count"] for k in detect_data.FINDINGS), detect_data.summary(report)
    assert report["split"]["train"] + report["split"]["val"] == 40
    assert report["split"]["proposed"] == (fmt in ("labelstudio", "coco"))  # these exports carry no split
    train = (tmp_path / "out" / "train.txt").read_text().split()
    assert all(Path(p).exists() and detect_data.label_for(Path(p)).exists() for p in train)
    assert "names" in data_yaml.read_text()


def test_the_check_finds_each_problem(shapes, tmp_path):
    _, report = detect_data.prepare(broken_copy(shapes, tmp_path / "broken"), tmp_path / "out")
    assert report["images_without_labels"]["examples"] == ["images/train/img001.jpg"]
    assert report["labels_without_images"]["examples"] == ["labels/train/ghost.txt"]
    assert report["boxes_out_of_range"]["examples"] == ["labels/train/img002.txt:1"]
    assert report["class_ids_outside_names"]["examples"][0].startswith("labels/train/img003.txt:1 (class 7")
    assert report["duplicate_images"]["count"] == 1
    text = detect_data.summary(report)
    assert "duplicate images: **1**" in text and "class ids outside names: **1**" in text


def test_a_zip_that_escapes_its_folder_is_refused(studio, tmp_path):
    bad = tmp_path / "evil.zip"
    with zipfile.ZipFile(bad, "w") as z:
        z.writestr("data.yaml", "names: [a]\ntrain: images\nval: images\n")
        z.writestr("../../escaped.txt", "gotcha")
    job = studio.wait(studio.submit("detect_train", {"data": str(bad), "epochs": 1, **TRAIN}).id, 120)
    assert job.status is JobStatus.FAILED and "unsafe path '../../escaped.txt'" in job.error
    assert not (tmp_path.parent / "escaped.txt").exists()


def test_training_reports_every_epoch_and_writes_best_weights(studio, trained):
    run_dir = studio.run_dir(trained.id)
    evs = studio.events(trained.id)[0]
    metrics = [e for e in evs if e["type"] == "metric"]
    assert [m["step"] for m in metrics] == [1, 2, 3]
    assert {"train_box_loss", "train_cls_loss", "map50", "map50_95"} <= metrics[0].keys()
    assert [e for e in evs if e["type"] == "dataset"][0]["report"]["images"] == 40
    assert any(e["type"] == "sample" for e in evs) and list(run_dir.glob("sample_epoch*.jpg"))
    assert (run_dir / "best.pt").exists() and (run_dir / "train" / "results.csv").exists()
    assert list((run_dir / "train").glob("*PR_curve.png")) and (run_dir / "train" / "confusion_matrix.png").exists()
    hashes = json.loads((run_dir / "weights.json").read_text())
    from workers.detect.yolo import sha256

    assert hashes["best.pt"] == sha256(run_dir / "best.pt")
    assert trained.result["epochs"] == 3 and trained.result["map50"] is not None


def test_predict_images_and_a_video(studio, trained, tmp_path):
    from ultralytics.utils import ASSETS

    best = str(studio.run_dir(trained.id) / "best.pt")
    job = studio.wait(studio.submit("detect_predict", {"model": best, "source": f"{ASSETS / 'bus.jpg'}\n"
                                                       f"{ASSETS / 'zidane.jpg'}", "imgsz": 96, "conf": 0.01}).id, 300)
    assert job.status is JobStatus.DONE, job.error
    run_dir = studio.run_dir(job.id)
    assert job.result["images"] == 2 and len(list((run_dir / "pred").glob("*.jpg"))) == 2
    assert (run_dir / "detections.csv").read_text().startswith("image,class,class_id,confidence,x1,y1,x2,y2")
    assert [e["image"] for e in studio.events(job.id)[0] if e["type"] == "detections"] == ["bus.jpg", "zidane.jpg"]
    video = make_video(tmp_path / "clip.mp4")
    job = studio.wait(studio.submit("detect_predict", {"model": best, "source": str(video), "imgsz": 96}).id, 300)
    assert job.status is JobStatus.DONE, job.error
    import cv2

    cap = cv2.VideoCapture(str(studio.run_dir(job.id) / job.result["video"]))
    frames = 0
    while cap.read()[0]:
        frames += 1
    assert frames == job.result["frames"] == 12
    with pytest.raises(ValueError, match="not one this model detects"):
        studio.wait(studio.submit("detect_predict", {"model": best, "source": str(video), "classes": "cat"}).id)
        raise ValueError(studio.jobs(kind="detect_predict")[0].error)


def test_onnx_export_and_latency_table(studio, trained):
    best = str(studio.run_dir(trained.id) / "best.pt")
    job = studio.wait(studio.submit("detect_export", {"model": best, "imgsz": 96, "runs": 5, "warmup": 2}).id, 300)
    assert job.status is JobStatus.DONE, job.error
    run_dir = studio.run_dir(job.id)
    assert (run_dir / "best.onnx").stat().st_size > 1e6
    assert not (studio.run_dir(trained.id) / "best.onnx").exists()  # nothing left beside the training's weights
    rows = {r["backend"]: r for r in job.result["latency"]}
    assert rows["PyTorch"]["ms_per_image"] > 0 and rows["ONNX Runtime"]["fps"] > 0
    assert rows["TensorRT"]["ms_per_image"] is None and "NVIDIA GPU" in rows["TensorRT"]["note"]
    job = studio.wait(studio.submit("detect_export", {"model": best, "format": "engine", "imgsz": 96}).id, 120)
    assert job.status is JobStatus.FAILED and "cannot build a TensorRT engine" in job.error


def test_only_weights_the_studio_wrote_load_without_trust(studio, trained, tmp_path):
    from ultralytics.utils import ASSETS

    stranger = tmp_path / "downloaded.pt"
    shutil.copy(studio.run_dir(trained.id) / "best.pt", stranger)
    params = {"model": str(stranger), "source": str(ASSETS / "bus.jpg"), "imgsz": 96}
    with pytest.raises(ValueError, match="not written by this studio"):
        studio.submit("detect_predict", params)
    assert studio.wait(studio.submit("detect_predict", {**params, "trust": True}).id, 120).status is JobStatus.DONE
    tampered = studio.run_dir(trained.id) / "last.pt"
    with open(tampered, "ab") as f:
        f.write(b"\0")
    with pytest.raises(ValueError, match="not written by this studio"):
        studio.submit("detect_predict", {**params, "model": str(tampered)})
    with pytest.raises(ValueError, match="neither a preset"):
        studio.submit("detect_predict", {**params, "model": "yolov99z"})


def test_resume_after_cancel_continues_from_last_epoch(studio, shapes):
    from conftest import wait_for_event

    job = studio.submit("detect_train", {"data": str(shapes), "epochs": 4, **TRAIN})
    wait_for_event(studio, job.id, "metric", timeout=300)
    studio.cancel(job.id)
    job = studio.wait(job.id, 120)
    assert job.status is JobStatus.CANCELLED
    state = json.loads((studio.run_dir(job.id) / "checkpoint" / "state.json").read_text())
    assert 1 <= state["epoch"] < 4
    new = studio.wait(studio.resume(job.id).id, 600)
    assert new.status is JobStatus.DONE, new.error
    steps = [e["step"] for e in studio.events(new.id)[0] if e["type"] == "metric"]
    assert steps and steps[0] == state["epoch"] + 1 and steps[-1] == 4
    assert (studio.run_dir(new.id) / "best.pt").exists()


def test_detect_tab_through_gradio_client(studio, trained, shapes, tmp_path):
    from conftest import free_port
    from gradio_client import Client, handle_file
    from ultralytics.utils import ASSETS

    import app

    demo = app.build_ui(studio)
    port = free_port()
    app.launch(demo, studio, server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        zipped = zip_folder(to_labelstudio(shapes, tmp_path / "ls"), tmp_path / "ls.zip")
        report = client.predict(handle_file(str(zipped)), "", api_name="/detect_check")
        assert "**labelstudio** dataset: 40 images" in report and "no problems found" in report
        best = str(studio.run_dir(trained.id) / "best.pt")
        status, gallery, video, table = client.predict(
            [handle_file(str(ASSETS / "bus.jpg"))], best, False, 0.01, 0.7, 96, "", api_name="/detect_predict")
        assert "DONE" in status and len(gallery) == 1 and table["headers"][0] == "image"
        status, table, files = client.predict(best, False, "onnx", 96, 1, False, api_name="/detect_export")
        assert "DONE" in status and [r[0] for r in table["data"]] == ["PyTorch", "ONNX Runtime", "TensorRT"]
        assert files[0].endswith("best.onnx")
        out = client.predict(None, str(shapes), "yolov8n.yaml", 2, 96, 8, 1.0, 0.5, 0.0, 0.015, 0.7, 0.4, True, 20,
                             0, False, api_name="/detect_train")  # with dataloader worker processes (default 2)
        status, report, losses, maps, sample, plots, files = out
        assert "DONE" in status and "40 images" in report and sample
        assert {r[2] for r in losses["data"]} == {"train_box_loss", "train_cls_loss", "train_dfl_loss"}
        assert any("confusion_matrix" in p["caption"] for p in plots) and any(f.endswith("best.pt") for f in files)
        with pytest.raises(Exception, match="not written by this studio"):
            stranger = tmp_path / "x.pt"
            shutil.copy(best, stranger)
            client.predict([handle_file(str(ASSETS / "bus.jpg"))], str(stranger), False, 0.25, 0.7, 96, "",
                           api_name="/detect_predict")
    finally:
        demo.close()


def test_a_preset_offline_says_what_to_do(studio):
    job = studio.wait(studio.submit("model_download", {"preset": "yolov8n"}).id, 120)
    assert job.status is JobStatus.FAILED and "yolov8n is not downloaded and this machine is offline" in job.error


def test_webcam_stream_job_answers_each_frame(studio, trained):
    import time

    from ultralytics.utils import ASSETS

    from workers.detect.stream import folder

    best = str(studio.run_dir(trained.id) / "best.pt")
    job = studio.submit("detect_stream", {"model": best, "session": "cam-test", "imgsz": 96, "idle_s": 2})
    d = folder(studio.config.data_dir, "cam-test")
    d.mkdir(parents=True, exist_ok=True)
    for i in range(3):
        shutil.copy(ASSETS / ("bus.jpg" if i % 2 == 0 else "zidane.jpg"), d / "in.tmp.jpg")
        (d / "in.tmp.jpg").replace(d / "in.jpg")
        t0 = time.time()
        while not (d / "out.jpg").exists() or (d / "out.jpg").stat().st_mtime < (d / "in.jpg").stat().st_mtime:
            assert time.time() - t0 < 60, "no answer to the frame"
            time.sleep(0.05)
    done = studio.wait(job.id, 60)  # stops on its own 2 s after the last frame
    assert done.status is JobStatus.DONE and done.result["frames"] >= 3


def test_the_gate_sizes_yolo_training_for_a_12_gb_card(shapes):
    from conftest import FakeNvml

    from studio.gate import Refused, gate
    from studio.params import build
    from workers.detect import train as detect_train

    gpu, budget = FakeNvml().read(), 11 * 2**30
    big = build(detect_train.Params, {"data": str(shapes), "model": "yolov8s.yaml", "batch": 256, "imgsz": 1280})
    with pytest.raises(Refused) as refused:
        gate(big, detect_train.estimate, gpu, budget, detect_train.shrink)
    fix = refused.value.suggestion
    assert fix and detect_train.estimate(build(detect_train.Params, {**vars(big), **fix}), gpu).total <= budget
    auto = detect_train.fit(build(detect_train.Params, {"data": str(shapes), "model": "yolov8n.yaml", "batch": -1}),
                            gpu, budget)
    assert auto.batch in (16, 32, 64) and detect_train.estimate(auto, gpu).total <= budget
    s = detect_train.estimate(build(detect_train.Params, {"data": str(shapes), "model": "yolov8s.yaml"}), gpu)
    n = detect_train.estimate(build(detect_train.Params, {"data": str(shapes), "model": "yolov8n.yaml"}), gpu)
    assert s.total > n.total and "AMP" in s.note


def test_webcam_frames_through_the_tab_handler(studio, trained):
    """The webcam's stream event (gradio_client cannot send streaming input): its handler, as Gradio calls it."""
    import time

    import numpy as np
    from PIL import Image
    from ultralytics.utils import ASSETS

    import app

    demo = app.build_ui(studio)
    handler = next(f.fn for f in demo.fns.values() if f.api_name == "detect_webcam")
    best = str(studio.run_dir(trained.id) / "best.pt")
    frame = np.asarray(Image.open(ASSETS / "bus.jpg").convert("RGB"))
    out, status, job_id = handler(frame, best, False, 0.25, 0.7, 96, "", "", None)
    assert job_id and studio.job(job_id).kind == "detect_stream"
    t0 = time.time()
    while out is None:
        assert time.time() - t0 < 60, "the stream job answered no frame"
        time.sleep(0.2)
        out, status, same = handler(frame, best, False, 0.25, 0.7, 96, "", job_id, None)
        assert same == job_id  # one job for the whole stream
    assert Image.open(out).size == Image.open(ASSETS / "bus.jpg").size
    studio.cancel(job_id)
    assert studio.wait(job_id, 60).status.final


def test_a_failed_preset_download_says_what_to_do_offline(tmp_path, monkeypatch):
    """Ultralytics' raw "ConnectionError: ❌ Download failure" becomes what to do: the file to fetch, where it goes,
    or train from an architecture, which needs no download."""
    import ultralytics.utils.downloads  # noqa: F401  (imported while offline, before the env changes below)

    from workers.detect import yolo

    monkeypatch.setenv("YOLO_CONFIG_DIR", str(tmp_path / "cfg"))
    monkeypatch.delenv("YOLO_OFFLINE", raising=False)  # an online machine whose download fails
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)

    def fail(path, progress=None):
        raise ConnectionError("❌  Download failure for https://github.com/ultralytics/assets/releases/download/"
                              "v8.4.0/yolov8n.pt. Retry limit reached.")

    monkeypatch.setattr(yolo, "_download", fail)
    with pytest.raises(RuntimeError) as err:
        yolo.load("yolov8n", tmp_path, trust=False)
    msg = str(err.value)
    target = tmp_path / "models" / "yolo" / "yolov8n.pt"
    assert msg.startswith("yolov8n could not be downloaded (Download failure for") and "❌" not in msg
    assert f"download {yolo.preset_url('yolov8n.pt')} on a machine with internet and save it as {target}" in msg
    assert "Detect → Train from an architecture such as yolov8n.yaml" in msg
    assert yolo.preset_url("yolov8n.pt").startswith("https://github.com/ultralytics/assets/releases/download/v")


def test_detect_defaults_are_on_disk_and_the_lists_say_what_needs_a_download(tmp_path):
    """With nothing downloaded, Train starts from an architecture (random weights, no download) and Predict's preset
    says it needs one; a preset on disk becomes both defaults."""
    from studio import Config, Studio
    from tabs import detect

    studio = Studio(Config.load(tmp_path / "data"))  # not started: the lists only read the disk and the store
    page = detect.fill(studio, None)
    assert page["t_model"]["value"] == "yolov8n.yaml"
    assert dict((v, k) for k, v in page["t_model"]["choices"])["yolov8n.yaml"].endswith("random weights (no download)")
    assert page["p_model"]["value"] == "yolov8n"
    assert dict((v, k) for k, v in page["p_model"]["choices"])["yolov8n"] == "yolov8n · needs download (0.006 GB)"
    weights = tmp_path / "data" / "models" / "yolo"
    weights.mkdir(parents=True)
    (weights / "yolo11n.pt").write_bytes(b"weights")
    page = detect.fill(studio, None)
    assert page["t_model"]["value"] == page["p_model"]["value"] == "yolo11n"
    assert page["t_model"]["choices"][0] == ("yolo11n · on disk", "yolo11n")


def test_predict_offline_and_with_random_weights_says_so_in_the_tab(studio, tmp_path):
    """Through the tab (/detect_predict): the default preset, not downloaded on an offline machine, fails with what to
    do; a model built from a .yaml finds nothing, and the tab says its weights are random."""
    from conftest import serve
    from gradio_client import Client, handle_file
    from ultralytics.utils import ASSETS

    from workers.detect.yolo import preset_url

    url, demo = serve(studio, show_error=True)
    try:
        client = Client(url, verbose=False)
        bus = handle_file(str(ASSETS / "bus.jpg"))
        status, *_ = client.predict([bus], "yolov8n", False, 0.25, 0.7, 96, "", api_name="/detect_predict")
        assert "FAILED" in status and "not downloaded and this machine is offline" in status
        assert preset_url("yolov8n.pt") in status and "models/yolo/yolov8n.pt" in status
        assert "Detect → Train" in status and "❌" not in status
        status, gallery, _, table = client.predict([bus], "yolov8n.yaml", False, 0.25, 0.7, 96, "",
                                                   api_name="/detect_predict")
        assert "DONE" in status and not table["data"]
        assert "random weights: train it first" in status and "found nothing" in status
    finally:
        demo.close()


def test_a_reloaded_page_reattaches_to_training_with_its_own_params(studio, shapes):
    """/detect_attach, what a reloaded page runs while the header shows the training job: the tab streams that job
    and its Train form holds the job's own params, not the defaults; once nothing runs, the last-used settings."""
    import time

    from conftest import serve
    from gradio_client import Client

    from tabs.detect import FORMS, TRAIN_OUTPUTS

    form_names = FORMS["detect_train"]
    shown = len([n for n in TRAIN_OUTPUTS if n != "t_job"])  # a State is no API output

    def form(out) -> dict:
        return {n: o.get("value") if isinstance(o, dict) else o for n, o in zip(form_names, out[shown:])}

    settings = dict(path=str(shapes), model="yolov8s.yaml", epochs=7, imgsz=64, batch=4, mosaic=0.5, fliplr=0.25,
                    flipud=0.1, hsv_h=0.01, hsv_s=0.5, hsv_v=0.3, amp=False, patience=5, seed=3)
    url, demo = serve(studio, show_error=True)
    forms = studio.config.data_dir / "forms.json"
    before = {j.id for j in studio.jobs(kind="detect_train")}
    studio.pause("attach test: the training stays queued")
    new = []
    try:
        Client(url, verbose=False).submit(files=None, **settings, trust=False, api_name="/detect_train")
        t0 = time.time()
        while not (new := [j for j in studio.jobs(kind="detect_train") if j.id not in before]):
            assert time.time() - t0 < 60, "the Train button submitted no job"
            time.sleep(0.1)
        job = new[0]
        saved = forms.read_text()
        assert json.loads(saved)["detect_train"]["t_epochs"] == 7  # remembered by the inputs' names …
        forms.unlink()  # … but here only the job's own params may fill the form
        reloaded = Client(url, verbose=False).submit(api_name="/detect_attach")
        t0 = time.time()
        while not (seen := [o for o in reloaded.outputs() if job.id in str(o)]):
            assert time.time() - t0 < 60, "the fresh page did not re-attach to the queued training"
            time.sleep(0.1)
        assert f"<code>{job.id}</code> — <b>QUEUED</b>" in seen[0][0]
        values = next(form(o) for o in reloaded.outputs() if form(o).get("t_epochs") is not None)
        assert values == {f"t_{k}": v for k, v in settings.items()}, values
    finally:
        for j in new:
            studio.cancel(j.id)
        studio.resume_queue()
    try:
        reloaded.result(timeout=60)  # the stream ends with the job
        forms.write_text(saved)
        values = form(Client(url, verbose=False).predict(api_name="/detect_attach"))  # nothing runs: last-used
        assert values == {f"t_{k}": v for k, v in settings.items()}, values
    finally:
        forms.unlink(missing_ok=True)
        demo.close()
