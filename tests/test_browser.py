"""A real browser clicks through the studio: Playwright for Python driving Debian's Chromium (its own browser download
does not work offline). Each tab's first try with the default choices, a live plot that draws lines, a reload
mid-job that re-attaches with the job's params in the form, lists that are there after a reload, Stop that
resolves, and the key controls at 400 px. Screenshots land in $STUDIO_SCREENSHOTS (default .artifacts/screenshots,
not committed).

The meter polls every second, so pages never go network-idle: waits are on elements. Hidden tabs keep their
elements in the page: every locator is filtered to what is visible."""
import os
import re
import shutil
import time
from pathlib import Path

import pytest
from conftest import ROOT, serve

from studio import JobStatus

CHROMIUM = os.environ.get("STUDIO_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(),
                                reason="chromium is not installed (python app.py test installs it with apt-get)")
SHOTS = Path(os.environ.get("STUDIO_SCREENSHOTS", ROOT / ".artifacts" / "screenshots"))


@pytest.fixture(scope="module")
def served(studio):
    url, demo = serve(studio)
    yield url
    demo.close()


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        yield b
        b.close()


@pytest.fixture
def page(browser, served):
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    pg = context.new_page()
    pg.set_default_timeout(60_000)
    pg.base = served
    yield pg
    context.close()


def open_tab(pg, tab: str):
    pg.goto(f"{pg.base}?tab={tab}")
    pg.wait_for_selector("button[role=tab]")
    return pg


def shot(pg, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    pg.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


def visible(pg, selector: str):
    return pg.locator(selector).filter(visible=True)


def button(pg, name: str):
    return pg.get_by_role("button", name=name, exact=True).filter(visible=True).first


def field(pg, label: str):
    return pg.get_by_label(label, exact=True).filter(visible=True).first


def upload(pg, path: Path) -> None:
    """Give a file to the first visible upload zone, as a user does: click it, pick the file."""
    with pg.expect_file_chooser() as chooser:
        visible(pg, "button").filter(has_text="Click to Upload").first.click()
    chooser.value.set_files(str(path))


def slider(pg, label: str):
    """A gr.Slider's number box."""
    return pg.get_by_label(f"number input for {label}", exact=True).filter(visible=True).first


def wait_text(pg, pattern: str, timeout: float = 120) -> str:
    """Wait until the visible page's text matches `pattern` (a regex); return the match."""
    t0 = time.time()
    while True:
        text = pg.locator("body").inner_text()
        if m := re.search(pattern, text):
            return m.group(0)
        if time.time() - t0 > timeout:
            shot(pg, "failed-wait")
            raise AssertionError(f"{pattern!r} did not appear; the page says:\n{text[-3000:]}")
        time.sleep(0.3)


def stroked_lines(pg) -> int:
    """Lines the visible plots have drawn: stroked SVG paths of vega's line marks with at least one segment (a
    single point is a path too, but no line)."""
    return pg.evaluate("""() => [...document.querySelectorAll('.mark-line path')]
        .filter(p => p.getBoundingClientRect().width > 0 && /[LC]/.test(p.getAttribute('d') || '')
                     && getComputedStyle(p).stroke !== 'none').length""")


def live_job(studio, kind: str, before: set[str], timeout: float = 60):
    t0 = time.time()
    while not (new := [j for j in studio.jobs(kind=kind) if j.id not in before]):
        assert time.time() - t0 < timeout, f"no {kind} job was submitted"
        time.sleep(0.2)
    return new[0]


def test_tinylm_first_try_draws_its_plot_and_a_reload_reattaches_with_its_params(page, studio, corpus):
    pg = open_tab(page, "tinylm")
    shot(pg, "tinylm-first-load")
    field(pg, "Folder on this machine").check()
    field(pg, "Folder of text or code on this machine").fill(str(corpus.parent))
    field(pg, "alibi").check()
    field(pg, "Max steps (0 = preset)").fill("100000")
    visible(pg, ".label-wrap").filter(has_text="Model size (0 = preset)").first.click()
    for label, value in (("Batch", 8), ("Context", 32), ("Layers", 2), ("Heads", 2), ("Width", 32)):
        field(pg, label).fill(str(value))  # a model that reaches its first eval (step 100) in seconds
    before = {j.id for j in studio.jobs(kind="tinylm")}
    button(pg, "Train").click()
    job = live_job(studio, "tinylm", before)
    wait_text(pg, rf"{job.id}\s*—\s*RUNNING")
    t0 = time.time()
    while stroked_lines(pg) == 0:  # the first eval's points draw a line while the job still runs
        assert time.time() - t0 < 120, "the loss plot drew no line"
        time.sleep(0.5)
    assert not studio.job(job.id).status.final
    shot(pg, "tinylm-live-plot")

    pg.reload()  # a reload mid-job: the tab follows the job again, with its own params in the form
    pg.wait_for_selector("button[role=tab]")
    wait_text(pg, rf"{job.id}\s*—\s*RUNNING")
    assert field(pg, "alibi").is_checked() and not field(pg, "rope").is_checked()
    assert field(pg, "Max steps (0 = preset)").input_value() == "100000"
    assert field(pg, "Folder of text or code on this machine").input_value() == str(corpus.parent)
    t0 = time.time()
    while stroked_lines(pg) == 0:
        assert time.time() - t0 < 60, "after a reload the loss plot drew no line"
        time.sleep(0.5)
    shot(pg, "tinylm-reattached")

    button(pg, "Cancel").click()  # Stop resolves: the status ends CANCELLED, not "stopping" for good
    wait_text(pg, rf"{job.id}\s*—\s*CANCELLED", timeout=60)
    assert studio.wait(job.id, 30).status is JobStatus.CANCELLED

    button(pg, "↻").click()  # Generate from the run just stopped: its checkpoint is offered
    checkpoint = field(pg, "Trained model (a job, or a run folder path)")
    t0 = time.time()
    while True:
        checkpoint.click()
        if visible(pg, "ul.option-list li").filter(has_text=job.id).count():
            break
        assert time.time() - t0 < 60, "the stopped run's checkpoint is not offered for Generate"
        pg.keyboard.press("Escape")
        time.sleep(0.5)
    visible(pg, "ul.option-list li").filter(has_text=job.id).first.click()
    field(pg, "Prompt").fill("The ")
    slider(pg, "Length (tokens)").fill("40")  # (the form holds the last settings used, here or by another test)
    slider(pg, "Length (tokens)").press("Tab")
    button(pg, "Generate").click()
    wait_text(pg, r"tokens/s · \d+ tokens", timeout=120)
    assert len(field(pg, "Output").input_value()) > 20
    shot(pg, "tinylm-generated")

    # Resume from the Jobs tab: the Tiny LM tab follows the new job without a reload
    visible(pg, "button[role=tab]").filter(has_text=re.compile(r"^\s*Jobs\s*$")).first.click()
    field(pg, "Job id").fill(job.id)
    button(pg, "Resume from checkpoint").click()
    t0 = time.time()
    while not (resumed := [j for j in studio.jobs(kind="tinylm") if j.resume_of == job.id]):
        assert time.time() - t0 < 60, "Resume in the Jobs tab started no job"
        time.sleep(0.2)
    visible(pg, "button[role=tab]").filter(has_text="Tiny LM").first.click()
    wait_text(pg, rf"{resumed[0].id}\s*—\s*(QUEUED|RUNNING)", timeout=60)
    studio.cancel(resumed[0].id)
    wait_text(pg, rf"{resumed[0].id}\s*—\s*CANCELLED", timeout=60)

    page2 = pg.context.new_page()  # a new page: the form is the last one used
    page2.base = pg.base
    open_tab(page2, "tinylm")
    t0 = time.time()
    while not field(page2, "alibi").is_checked():
        assert time.time() - t0 < 30, "the last-used settings did not come back"
        time.sleep(0.3)
    assert field(page2, "Max steps (0 = preset)").input_value() == "100000"


def test_chat_over_an_ingested_folder_then_reload_stop_and_export(page, studio, tmp_path):
    from rag_fixtures import GARDEN, SERVER

    notes = tmp_path / "browser-notes"
    notes.mkdir()
    (notes / "garden.md").write_text(GARDEN)
    (notes / "backup.py").write_text(SERVER)
    pg = open_tab(page, "chat")
    visible(pg, "button[role=tab]").filter(has_text="Collections").first.click()
    field(pg, "Collection").fill("browser-notes")
    field(pg, "…or a folder on this machine").fill(str(notes))
    button(pg, "Ingest").click()  # the default embedder is the packaged one: no download
    wait_text(pg, r"rag_ingest job \S+ — DONE", timeout=180)
    shot(pg, "chat-ingested")

    visible(pg, "button[role=tab]").filter(has_text=re.compile(r"^\s*Chat\s*$")).last.click()
    collection = field(pg, "Answer over collection")
    collection.click()  # its choices refresh on focus
    visible(pg, "ul.option-list li").filter(has_text="browser-notes").first.click()
    visible(pg, "textarea[placeholder^='Ask about your notes']").first.fill("Which port does the backup server use?")
    button(pg, "Send").click()  # the default model: the packaged gemma GGUF
    wait_text(pg, r"tok/s", timeout=240)
    assert "backup.py" in pg.locator("body").inner_text()  # the retrieved source is shown
    shot(pg, "chat-answered")

    pg.reload()  # the conversation is listed after a reload, and the model chosen stays
    pg.wait_for_selector("button[role=tab]")
    conv = field(pg, "Conversation")
    t0 = time.time()
    while True:
        conv.click()
        options = visible(pg, "ul.option-list li").all_inner_texts()
        if any("backup server" in o for o in options):
            break
        if time.time() - t0 > 90:  # the page's load events fill it (slow only on a loaded machine)
            shot(pg, "chat-reload-failed")
            from studio.conversations import Conversations

            stored = [c["title"] for c in Conversations(studio.config.data_dir / "chat.db").list()]
            raise AssertionError(f"the conversation is not listed after a reload: {options}, "
                                 f"the box holds {conv.input_value()!r}; stored: {stored}")
        pg.keyboard.press("Escape")
        time.sleep(0.5)
    visible(pg, "ul.option-list li").filter(has_text="backup server").first.click()
    with pg.expect_download(timeout=30_000) as download:  # Export downloads at once
        button(pg, "Export .md").click()
    assert download.value.suggested_filename.endswith(".md")
    assert "backup server" in Path(download.value.path()).read_text()

    # Stop resolves: a long answer is stopped and the status says so, with what was kept
    visible(pg, ".label-wrap").filter(has_text="Settings").first.click()  # the accordion, not the Settings tab
    slider(pg, "Max tokens").fill("4096")
    slider(pg, "Max tokens").press("Tab")  # a slider's box takes its value when it loses focus
    visible(pg, "textarea[placeholder^='Ask about your notes']").first.fill("Write a very long story about servers.")
    before = {j.id for j in studio.jobs(kind="chat")}
    button(pg, "Send").click()
    job = live_job(studio, "chat", before)
    t0 = time.time()
    while not any(e["type"] == "token" for e in studio.events(job.id)[0]):  # it is answering
        assert time.time() - t0 < 240 and not studio.job(job.id).status.final, studio.job(job.id).error
        time.sleep(0.2)
    button(pg, "Stop").click()
    wait_text(pg, r"stopped after \d+ tokens|finished before Stop|stopped before the answer began", timeout=60)
    shot(pg, "chat-stopped")


def test_key_controls_fit_a_phone(browser, served):
    context = browser.new_context(viewport={"width": 400, "height": 900})
    pg = context.new_page()
    pg.base = served
    try:
        open_tab(pg, "chat")
        model = field(pg, "Model (a preset, a .gguf file or a transformers folder)").bounding_box()
        send = button(pg, "Send").bounding_box()
        assert model["y"] < send["y"] and model["x"] + model["width"] <= 400  # the model is picked before Send
        header = pg.locator("#studio-meter").bounding_box()
        assert header["height"] < 200
        shot(pg, "chat-400px")
        open_tab(pg, "tinylm")
        for name in ("Train", "Cancel", "Resume"):
            box = button(pg, name).bounding_box()
            assert box and box["x"] + box["width"] <= 400, name
        shot(pg, "tinylm-400px")
    finally:
        context.close()


@pytest.mark.skipif(not (shutil.which("espeak-ng") and shutil.which("sox")),
                    reason="espeak-ng and sox make the test speech (python app.py test installs them)")
def test_transcribe_a_spoken_clip_with_the_default_model(page, studio, tmp_path):
    import subprocess

    raw, clip = tmp_path / "raw.wav", tmp_path / "hello.wav"
    subprocess.run(["espeak-ng", "-v", "en-us", "-s", "150", "-w", str(raw),
                    "The quick brown fox jumps over the lazy dog."], check=True)
    subprocess.run(["sox", str(raw), "-r", "16000", "-c", "1", str(clip)], check=True)
    pg = open_tab(page, "transcribe")
    upload(pg, clip)
    wait_text(pg, r"hello\.wav")
    before = {j.id for j in studio.jobs(kind="transcribe")}
    button(pg, "Transcribe").click()  # the default model: the packaged tiny.en, no download
    job = live_job(studio, "transcribe", before)
    wait_text(pg, rf"{job.id}\s*—\s*DONE", timeout=240)
    transcript = field(pg, "Transcript").input_value().lower()
    assert "quick" in transcript and "lazy dog" in transcript, transcript
    shot(pg, "transcribe-done")
    wait_text(pg, r"hello\s*\.srt", timeout=30)  # outputs named after the source


def test_detect_train_predict_and_export_from_scratch(page, studio, tmp_path):
    from detect_fixtures import make_shapes

    data = make_shapes(tmp_path / "shapes", n=30, size=96)
    pg = open_tab(page, "detect")
    visible(pg, "button[role=tab]").filter(has_text=re.compile(r"^\s*Train\s*$")).first.click()
    field(pg, "…or a folder / data.yaml on this machine").fill(str(data / "data.yaml"))
    field(pg, "Epochs").fill("3")
    field(pg, "Image size").fill("64")
    field(pg, "Batch (-1: what fits)").fill("8")
    before = {j.id for j in studio.jobs(kind="detect_train")}
    button(pg, "Train").click()  # the default base: yolov8n.yaml (random weights, no download)
    job = live_job(studio, "detect_train", before)
    wait_text(pg, rf"{job.id}\s*—\s*DONE", timeout=400)
    t0 = time.time()
    while stroked_lines(pg) < 2:  # losses and mAP drawn as lines over the three epochs
        assert time.time() - t0 < 30, "the Detect training plots drew no lines"
        time.sleep(0.5)
    shot(pg, "detect-trained")

    visible(pg, "button[role=tab]").filter(has_text=re.compile(r"^\s*Predict\s*$")).first.click()
    model = field(pg, "Model")
    model.click()
    visible(pg, "ul.option-list li").filter(has_text=job.id).first.click()  # the model just trained is offered
    upload(pg, next((data / "images" / "val").glob("*.jpg")))
    button(pg, "Detect").click()
    wait_text(pg, r"detect_predict job \S+ — DONE", timeout=180)
    shot(pg, "detect-predicted")

    visible(pg, "button[role=tab]").filter(has_text=re.compile(r"^\s*Export\s*$")).first.click()
    model = field(pg, "Model")
    model.click()
    visible(pg, "ul.option-list li").filter(has_text=job.id).first.click()
    field(pg, "Image size").fill("64")
    button(pg, "Export and time").click()
    wait_text(pg, r"detect_export job \S+ — DONE", timeout=300)
    assert "onnx" in pg.locator("body").inner_text().lower()
    shot(pg, "detect-exported")


def test_vision_chat_about_an_uploaded_image(page, studio, tmp_path):
    from vision_fixtures import QUESTION, make_tiny_llava, write_images

    tiny = make_tiny_llava(tmp_path / "tiny-llava")
    red = write_images(tmp_path / "images", size=(96, 72))["red"]
    pg = open_tab(page, "vision")
    model = field(pg, "Model (a preset, a .gguf with its mmproj beside it, or a LLaVA folder)")
    model.fill(str(tiny))  # a folder on this machine: the dropdown takes a custom value
    model.press("Enter")
    upload(pg, red)
    visible(pg, "textarea[placeholder^='Ask about the image']").first.fill(QUESTION)
    before = {j.id for j in studio.jobs(kind="vision_chat")}
    button(pg, "Send").click()
    job = live_job(studio, "vision_chat", before)
    wait_text(pg, r"tok/s|tokens · hf", timeout=180)
    assert studio.job(job.id).status.value == "DONE" and studio.job(job.id).params["model"] == str(tiny)
    # the image is in the conversation and beside it
    t0 = time.time()
    while visible(pg, ".message img, [data-testid='bot'] img, [data-testid='user'] img").count() < 1:
        assert time.time() - t0 < 30, "the uploaded image is not shown in the conversation"
        time.sleep(0.3)
    shot(pg, "vision-answered")
