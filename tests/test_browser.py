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


def wait_text(pg, pattern: str, timeout: float = 120) -> str:
    """Wait until the visible page's text matches `pattern` (a regex); return the match."""
    t0 = time.time()
    while True:
        text = pg.locator("body").inner_text()
        if m := re.search(pattern, text):
            return m.group(0)
        assert time.time() - t0 < timeout, f"{pattern!r} did not appear; the page says:\n{text[-3000:]}"
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
    pg.get_by_text("Model size (0 = preset)").filter(visible=True).first.click()
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

    page2 = pg.context.new_page()  # a new page: the form is the last one used
    open_tab(page2, "tinylm")
    t0 = time.time()
    while not field(page2, "alibi").is_checked():
        assert time.time() - t0 < 30, "the last-used settings did not come back"
        time.sleep(0.3)
    assert field(page2, "Max steps (0 = preset)").input_value() == "100000"


def test_jobs_and_header_fit_a_phone(browser, served, studio):
    context = browser.new_context(viewport={"width": 400, "height": 800})
    pg = context.new_page()
    pg.base = served
    try:
        open_tab(pg, "jobs")
        wait_text(pg, r"tinylm")
        header = pg.locator("#studio-meter").bounding_box()
        assert header["height"] < 200, header
        for column in ("id", "kind", "status"):
            cell = visible(pg, "th").filter(has_text=re.compile(rf"^\s*{column}\s*$")).first
            box = cell.bounding_box()
            assert box and box["x"] + box["width"] <= 400, (column, box)
        shot(pg, "jobs-400px")
    finally:
        context.close()
