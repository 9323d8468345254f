"""A real browser: headless Chromium renders the served app; the meter and the Tiny LM tab are on the page."""
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from conftest import TINY, free_port

import app

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--virtual-time-budget=20000",
         "--window-size=1280,1000"]


def chromium(*args) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory() as profile:
        return subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", *args], capture_output=True,
                              timeout=120)


@pytest.mark.skipif(not CHROMIUM, reason="chromium is not installed (python app.py test installs it with apt-get)")
def test_screenshot_shows_meter_and_tinylm_tab(studio, corpus, tmp_path):
    demo = app.build_ui(studio)
    port = free_port()
    app.launch(demo, studio, server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    url = f"http://127.0.0.1:{port}/?tab=tinylm"  # a deep link to the Tiny LM tab
    job = studio.submit("tinylm", {"data": str(corpus), "max_steps": 100000, **TINY})
    try:
        t0 = time.time()
        while not (studio.job(job.id).progress or 0) and time.time() - t0 < 120:
            time.sleep(0.1)
        dom = chromium("--dump-dom", url).stdout.decode()
        for needle in ("studio-meter", "RAM", "No GPU in use", "Chat (RAG)", "Tiny LM", "Train", "Generate", "Jobs",
                       "Models", "Settings", "running <b>tinylm</b>"):
            assert needle in dom, needle
        # a freshly loaded page re-attaches to the running job: its status streams into the Tiny LM tab
        assert f"job <code>{job.id}</code> — <b>RUNNING</b>" in dom
        shot = Path(os.environ.get("STUDIO_SCREENSHOT", tmp_path / "studio.png"))
        chromium(f"--screenshot={shot}", url)
        data = shot.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 30_000  # a rendered page, not a blank one
    finally:
        studio.cancel(job.id)
        studio.wait(job.id, 60)
        demo.close()
