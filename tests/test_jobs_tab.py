"""The Jobs tab as a user meets it, through gradio_client against a served studio: a detail pane that shows the live
state of a running job and how it ended after Cancel, events as a readable log, the job's own memory peak (not the
worker's), final jobs without in-progress notes, and refusals that come back as one message instead of an error.
One browser check at 400 px: a compact header and the table's key columns in view."""
import re
import shutil
from pathlib import Path

import psutil
import pytest
from conftest import TINY, serve, wait_for

from studio import JobStatus
from tabs import header, jobs

MiB = 2**20
TIME_TYPE = re.compile(r"^\d\d:\d\d:\d\d \w+")


@pytest.fixture(scope="module")
def served(studio):
    url, demo = serve(studio)
    yield url
    demo.close()


@pytest.fixture(scope="module")
def client(served):
    from gradio_client import Client

    return Client(served, verbose=False)


def long_run(studio, corpus):
    """A Tiny LM run far longer than any test waits for, writing checkpoints so it can be resumed."""
    job = studio.submit("tinylm", {"data": str(corpus), "max_steps": 100_000, "checkpoint_every": 50, **TINY})
    wait_for(lambda: (studio.job(job.id).progress or 0) > 0 and studio.job(job.id).message, 120, "the run to step")
    return job


def step_of(summary: str) -> int:
    return int(re.search(r"step (\d+)/100000", summary).group(1))


def test_detail_pane_is_live_and_shows_how_a_cancelled_job_ended(studio, client, corpus):
    job = long_run(studio, corpus)
    try:
        notice, summary, log, plot, files = client.predict(jid=job.id, api_name="/job_show")
        assert notice == "" and "RUNNING" in summary and job.id in summary
        first = step_of(summary)
        wait_for(lambda: studio.job(job.id).message and step_of(studio.job(job.id).message) > first + 5, 60,
                 "more steps")
        again = client.predict(jid=job.id, api_name="/job_show")[1]
        assert "RUNNING" in again and step_of(again) > first  # read now, not what the pane drew first
        notice, summary, log, plot, files, table = client.predict(jid=job.id, api_name="/job_cancel")
    finally:
        studio.cancel(job.id)
    # the pane shows how it ended, not RUNNING at some percent
    assert notice == "" and "CANCELLED" in summary and "RUNNING" not in summary
    assert "Resume continues from it" in summary
    assert studio.job(job.id).status is JobStatus.CANCELLED
    row = next(r for r in table["data"] if r[0] == job.id)
    assert row[2] == "CANCELLED" and row[3] == ""  # no progress left over on a cancelled row
    # the log ends with the job's end event, said in words
    assert log.splitlines()[-1].split(None, 2)[1:] == ["end", "CANCELLED: " + studio.job(job.id).error.splitlines()[0]]


def test_events_are_a_readable_log_and_the_summary_renders(studio, client, corpus):
    job = studio.wait(studio.submit("tinylm", {"data": str(corpus), "max_steps": 40, **TINY}).id, 300)
    assert job.status is JobStatus.DONE, job.error
    notice, summary, log, plot, files = client.predict(jid=job.id, api_name="/job_show")
    lines = log.splitlines()
    assert all(TIME_TYPE.match(line) for line in lines), lines
    assert "{'" not in log and '{"' not in log and "': " not in log  # no dict dumps
    types = [line.split()[1] for line in lines]
    assert types[0] == "queued" and "started" in types
    metric = next(line for line in lines if line.split()[1] == "metric")
    assert re.search(r"step 20 · train_loss \d\.\d+ · val_loss \d\.\d+", metric), metric
    assert re.search(r"end +DONE · steps 40 · val_loss \d\.\d+", lines[-1]), lines[-1]
    # the summary is HTML: no Markdown left raw
    assert "**" not in summary and "`" not in summary and "<b>estimate</b>" in summary
    assert "{'" not in summary and "steps" in summary  # the result as `key  value` lines


def test_event_lines_for_kinds_with_nested_fields():
    """Every kind's events read as text: nested reports, results and suggestions as `k=v`, a chat's tokens as one
    line."""
    evs = [{"t": 0, "type": "dataset", "report": {"images": 40, "classes": ["cat", "dog"]}, "summary": "40 images"},
           {"t": 1, "type": "token", "text": "Hel"}, {"t": 1, "type": "token", "text": "lo"},
           {"t": 2, "type": "tool_call", "name": "search", "arguments": '{"q": "x"}'},
           {"t": 3, "type": "end", "status": "REFUSED", "error": "Refused: needs 13 GiB\nmore",
            "suggestion": {"batch_size": 1}},
           {"t": 4, "type": "segment", "start": 0.0, "end": 1.25, "text": "hello  there\n"}]
    lines = jobs.log_lines(evs)
    assert len(lines) == 5 and all(TIME_TYPE.match(line) for line in lines)
    assert "report images=40, classes=cat, dog · summary 40 images" in lines[0]
    assert "«Hello» (2 pieces)" in lines[1]
    assert lines[3].endswith("REFUSED: Refused: needs 13 GiB · fits with batch_size=1")
    assert lines[4].endswith("start 0 · end 1.25 · text hello there")
    assert "{'" not in "\n".join(lines)
    long = [{"t": i, "type": "log", "message": f"line {i}"} for i in range(1000)]
    shown = jobs.log_lines(long, limit=100)
    assert len(shown) == 101 and shown[0].endswith("line 0") and shown[-1].endswith("line 999")


def test_peak_is_the_jobs_own_not_the_workers(studio):
    """A selftest allocates 64 MiB: its peak is about that, not the worker's resident ~1 GiB (torch, the runtime)."""
    job = studio.wait(studio.submit("selftest", {"mib": 64}).id, 120)
    assert job.status is JobStatus.DONE, job.error
    worker_rss = psutil.Process(studio.lanes["device"].info.pid).memory_info().rss
    assert 32 * MiB <= job.peak_bytes <= 256 * MiB, job.peak_bytes / MiB
    assert job.peak_bytes < worker_rss / 3, (job.peak_bytes / MiB, worker_rss / MiB)
    # peak/est compares it with the estimate less the runtime context, which the worker holds anyway
    own = jobs.own_estimate(job)
    assert own == job.estimate_bytes - job.estimate["context"] and own >= 64 * MiB
    assert 0.5 <= float(jobs.ratio(job)) <= 2.0
    assert jobs.peak_text(job).endswith("MiB")  # 64 MiB, not "0.06 GiB"


def test_a_finished_job_keeps_no_in_progress_note(studio, corpus):
    job = studio.wait(studio.submit("tinylm", {"data": str(corpus), "max_steps": 20, **TINY}).id, 300)
    assert job.status is JobStatus.DONE and job.message is None  # the last one was "step 20/20 · loss …"
    assert any(e["type"] == "progress" and e["message"] for e in studio.events(job.id)[0])
    row = next(r for r in jobs.table(studio) if r[0] == job.id)
    assert row[-1] == "" and row[3] == "100%"


def test_refusals_are_one_message_not_an_error(studio, client, corpus):
    before = len(studio.jobs(limit=10_000))
    done = studio.wait(studio.submit("selftest", {"mib": 1}).id, 60)
    out = client.predict(jid=done.id, api_name="/job_resume")  # no exception: a message, the pane untouched
    assert out[0].startswith("⚠️") and "only interrupted, cancelled or failed jobs resume" in out[0]
    assert all(isinstance(o, dict) and o.get("__type__") == "update" for o in out[1:])
    studio.pause("test: cancel a selftest before it starts")
    try:
        cancelled = studio.cancel(studio.submit("selftest", {"mib": 1}).id)
    finally:
        studio.resume_queue()
    assert cancelled.status is JobStatus.CANCELLED
    assert "no checkpoints to resume from; use Retry" in client.predict(jid=cancelled.id, api_name="/job_resume")[0]
    assert client.predict(jid="nope", api_name="/job_show")[0] == "⚠️ No job nope."
    assert client.predict(jid="", api_name="/job_cancel")[0] == "⚠️ Pick or enter a job first."
    assert len(studio.jobs(limit=10_000)) == before + 2  # the two selftests; no refusal queued anything

    # a resumable job: Resume starts a new job and the pane follows it
    job = long_run(studio, corpus)
    wait_for(lambda: studio.checkpoint_of(job.id) is not None, 120, "a checkpoint")
    studio.cancel(job.id)
    studio.wait(job.id, 60)
    notice, new_id, summary, *_ = client.predict(jid=job.id, api_name="/job_resume")
    try:
        assert new_id != job.id and f"as job `{new_id}`" in notice
        assert new_id in summary and f"resumes job <code>{job.id}</code>" in summary
        assert studio.job(new_id).resume_of == job.id
    finally:
        studio.cancel(new_id)
        studio.wait(new_id, 60)
    # over budget: the gate refuses the resumed job; one message names why, and the pane shows the refused job
    budget = studio.config.budget_gb
    studio.update_config(budget_gb=0.2)
    try:
        notice, refused_id, summary, *_ = client.predict(jid=new_id, api_name="/job_resume")
    finally:
        studio.update_config(budget_gb=budget)
    assert notice.startswith("⚠️ Refused: needs") and studio.job(refused_id).status is JobStatus.REFUSED
    assert "REFUSED" in summary


def test_meter_sizes_small_cached_models_and_i18n_key_is_filled(served):
    """A Tiny LM's cached model is 0.1 MiB: the meter says so instead of "0.00 GiB"; and the page's strings fill the
    status key Gradio's English lacks (it announced "common.complete")."""
    import json
    import urllib.request

    assert header.size_text(100_000) == "<1 MiB" and header.size_text(300 * MiB) == "300 MiB"
    assert header.size_text(3 * 2**30) == "3.00 GiB"
    config = json.loads(urllib.request.urlopen(f"{served}config", timeout=10).read())
    assert "Complete" in json.dumps(config.get("i18n_translations") or config)


CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="chromium is not installed")
def test_narrow_screen_header_is_compact_and_key_columns_show(studio, served):
    from playwright.sync_api import sync_playwright

    studio.wait(studio.submit("selftest", {"mib": 1}).id, 60)
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        try:
            pg = b.new_page(viewport={"width": 400, "height": 900})
            pg.goto(f"{served}?tab=jobs")
            pg.wait_for_selector("button[role=tab]")
            pg.wait_for_selector("#jobs-table .virtual-row .body-cell")
            top = pg.locator("#studio-title").bounding_box()["y"]
            meter = pg.locator("#studio-meter").bounding_box()
            assert meter["y"] + meter["height"] - top < 160  # it took ~280 px before

            def fully_shown(selector: str) -> list[str]:
                out = []
                for cell in pg.locator(selector).all():
                    box = cell.bounding_box()
                    if box and box["x"] >= 0 and box["x"] + box["width"] <= 400:
                        out.append(cell.inner_text().strip())
                return out

            assert fully_shown("#jobs-table thead th")[:4] == ["id", "kind", "status", "progress"]
            assert len(fully_shown("#jobs-table .virtual-row:first-child .body-cell")) >= 4
        finally:
            b.close()
