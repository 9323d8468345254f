"""The scheduler's second pass: it keeps the models a job needs, cannot freeze, loses no cancel, and says what it
is doing. Real scheduler and workers; only the NVML readings are faked, where a test needs a 12 GB card."""
import json
import sqlite3
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import TINY, FakeNvml, left_running, wait_for

from studio import Config, GiB, JobStatus, Studio, registry
from studio.store import Store

GEMMA = {"model": "gemma-3-270m-packaged", "threads": 2, "n_ctx": 1024, "seed": 3, "max_tokens": 4}


def register_test_kinds():
    for kind, module in (("test_steps", "helpers_steps"), ("test_sleeper", "helpers_worker")):
        if kind not in registry.WORKERS:
            registry.register(kind, module)


@pytest.fixture
def gpu12(tmp_path):
    """A studio whose gate and scheduler read a 12 GiB card (the worker itself runs on the CPU)."""
    register_test_kinds()
    dev = FakeNvml(total=12 * GiB, free=8 * GiB)
    s = Studio(Config.load(tmp_path / "d"), device=dev).start()
    wait_for(lambda: s.worker_info.ready, 120, "the worker")
    yield s, dev
    s.shutdown()


def test_12gb_chat_keeps_its_model_across_turns_and_another_job_evicts_it_only_when_it_needs_room(gpu12):
    studio, dev = gpu12
    first = studio.wait(studio.submit("chat", {**GEMMA, "prompt": "Hello"}).id, 300)
    assert first.status is JobStatus.DONE, first.error
    assert first.result["model_cached"] is False
    key, = studio.lanes["device"].cache  # the model stays in the worker's cache, measured on load
    assert studio.lanes["device"].cache[key] > 0
    est = first.estimate
    assert list(est["models"]) == [key] and est["context"] > 0  # the job named its model; the gate added one context
    # Now the cached model holds the card: less is free than the job's whole estimate, more than it lacks.
    dev.free = est["parts"]["workspace"] + 200 * 2**20
    assert dev.free < est["total"]
    for turn in (2, 3):
        job = studio.wait(studio.submit("chat", {**GEMMA, "prompt": f"Turn {turn}"}).id, 300)
        assert job.status is JobStatus.DONE, job.error
        assert job.result["model_cached"] is True, f"turn {turn} reloaded its model"
        assert job.wait_reason is None
    # a different job that fits beside the model leaves it cached ...
    small = studio.wait(studio.submit("test_steps", {"steps": 1, "mib": 64}).id, 60)
    assert small.status is JobStatus.DONE and list(studio.lanes["device"].cache) == [key]
    # ... one that needs the room gets it: the idle model is evicted, nothing waits for "other programs"
    held = studio.lanes["device"].cache[key]
    big = studio.wait(studio.submit("test_steps", {"steps": 1, "mib": (dev.free + held // 2) >> 20}).id, 60)
    assert big.status is JobStatus.DONE and big.wait_reason is None
    wait_for(lambda: not studio.lanes["device"].cache, 10, "the eviction to be reported")


def test_waiting_is_said_once_and_jobs_behind_say_what_they_wait_for(gpu12):
    studio, dev = gpu12
    dev.free = 100 * 2**20
    job = studio.submit("test_steps", {"steps": 1, "mib": 2048})
    behind = studio.submit("test_steps", {"steps": 1})
    seen = set()
    stop = threading.Event()

    def wobble():  # other programs' memory moves a little all the time
        i = 0
        while not stop.is_set():
            dev.free = (100 + (i % 7) * 9) * 2**20
            i += 1
            time.sleep(0.05)

    t = threading.Thread(target=wobble)
    t.start()
    try:
        t0 = time.time()
        while time.time() - t0 < 4:
            r = studio.job(job.id).wait_reason
            if r:
                seen.add(r)
            time.sleep(0.05)
    finally:
        stop.set()
        t.join()
    assert len(seen) == 1, seen
    reason = seen.pop()
    assert reason.startswith("Waiting for memory: needs 2.0 GiB") and "Cancel drops it" in reason
    assert studio.job(behind.id).wait_reason == f"Queued behind job {job.id} (test_steps)."
    dev.free = 8 * GiB
    assert studio.wait(job.id, 60).status is JobStatus.DONE
    assert studio.wait(behind.id, 60).status is JobStatus.DONE


def test_unknown_kind_in_the_queue_fails_and_the_next_job_runs(studio):
    studio.pause()
    ghost = studio.store.add("paint_v0", {"prompt": "x"}, JobStatus.QUEUED)  # queued by a version that had it
    nxt = studio.submit("selftest", {"mib": 1})
    studio.resume_queue()
    g = studio.wait(ghost.id, 30)
    assert g.status is JobStatus.FAILED and "no job kind 'paint_v0'" in g.error
    assert studio.wait(nxt.id, 60).status is JobStatus.DONE


def test_no_cancel_is_lost_to_a_dispatch_in_flight(tmp_path):
    """Hundreds of submit/cancel pairs, each cancel racing the scheduler's dispatch: every job ends CANCELLED. A
    job's first cancel point comes 0.5 s after it starts, so one the scheduler took just before the cancel still
    sees it there; a cancel lost to the race would let the job run to DONE."""
    register_test_kinds()
    s = Studio(Config.load(tmp_path / "d")).start()
    try:
        wait_for(lambda: s.worker_info.ready, 120, "the worker")
        ids = []
        for _ in range(300):
            job = s.submit("test_steps", {"steps": 2, "seconds": 0.5})
            s.cancel(job.id)
            ids.append(job.id)
        for job_id in ids:
            j = s.wait(job_id, 120)
            assert j.status is JobStatus.CANCELLED, (job_id, j.status, j.error)
            ends = [e for e in s.events(job_id)[0] if e["type"] == "end"]
            assert len(ends) == 1
        assert len(set(ids)) == 300  # ids never collide
    finally:
        s.shutdown()


def test_ids_are_unguessable_and_unique(tmp_path):
    store = Store(tmp_path / "s.db")
    ids = [store.add("selftest", {}, JobStatus.QUEUED).id for _ in range(3000)]
    assert len(set(ids)) == 3000 and all(len(i) == 16 for i in ids)
    assert len({i[:6] for i in ids}) > 2900  # no shared time prefix to guess from


def test_starts_when_an_interrupted_jobs_run_folder_is_gone(tmp_path):
    cfg, job_id = left_running(tmp_path / "d")  # its run folder was never made, or removed
    s = Studio(cfg).start()
    try:
        assert s.job(job_id).status is JobStatus.INTERRUPTED
        assert [e["status"] for e in s.events(job_id)[0] if e["type"] == "end"] == ["INTERRUPTED"]
    finally:
        s.shutdown()


def test_a_worker_that_cannot_start_is_shown_stopped_and_resume_starts_it_again(tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "torch.py").write_text("raise ImportError('torch is broken in this test')\n")
    sys.path.insert(0, str(broken))  # spawned workers inherit this path: each start dies importing torch
    s = Studio(Config.load(tmp_path / "d"))
    try:
        s.start()
        wait_for(lambda: s.worker_info.stopped, 120, "the worker to be given up on")
        m = s.meter()
        assert "device worker stopped" in m["trouble"] and m["paused"]
        job = s.submit("selftest", {"mib": 1})
        time.sleep(0.5)
        assert s.job(job.id).status is JobStatus.QUEUED
    finally:
        sys.path.remove(str(broken))
    try:
        s.resume_queue()  # the installation is fixed: Resume queue starts the worker again
        assert s.wait(job.id, 120).status is JobStatus.DONE
        assert s.meter()["trouble"] is None
    finally:
        s.shutdown()


def test_a_final_write_that_fails_frees_the_slot_and_nothing_is_lost(studio):
    register_test_kinds()
    first = studio.submit("test_steps", {"steps": 30, "seconds": 0.05})
    second = studio.submit("selftest", {"mib": 1})
    wait_for(lambda: studio.job(first.id).status is JobStatus.RUNNING, 60, "the first job to start")
    studio.store.timeout_s = 0.2
    lock = sqlite3.connect(studio.config.db_path, timeout=5, isolation_level=None)
    try:
        lock.execute("BEGIN EXCLUSIVE")  # no write gets through now, as on a full disk
        wait_for(lambda: studio.job(first.id).status is JobStatus.DONE, 60, "the outcome (held in memory)")
        assert "could not be recorded" in studio.meter()["trouble"]
        assert studio.lanes["device"].running is None  # the slot is free
    finally:
        lock.execute("ROLLBACK")
        lock.close()
        studio.store.timeout_s = 30.0
    assert studio.wait(second.id, 60).status is JobStatus.DONE
    row = studio.store.get(first.id)
    assert row.status is JobStatus.DONE and row.result == {"steps": 30}
    assert [e["status"] for e in studio.events(first.id)[0] if e["type"] == "end"] == ["DONE"]
    assert studio.meter()["trouble"] is None


def test_a_run_folder_that_becomes_unwritable_fails_the_job_and_the_queue_goes_on(studio):
    register_test_kinds()
    job = studio.submit("test_steps", {"steps": 200, "seconds": 0.05})
    wait_for(lambda: (studio.job(job.id).progress or 0) > 0, 60, "progress")
    run_dir = studio.run_dir(job.id)
    import shutil

    shutil.rmtree(run_dir)
    run_dir.write_text("not a folder any more")  # every write into it fails from now on
    j = studio.wait(job.id, 60)
    assert j.status is JobStatus.FAILED and "Not a directory" in j.error
    assert studio.wait(studio.submit("selftest", {"mib": 1}).id, 60).status is JobStatus.DONE
    run_dir.unlink()


def test_cancel_during_evaluation_checkpoints_in_time(studio, corpus):
    job = studio.submit("tinylm", {"data": str(corpus), **TINY, "max_steps": 1000, "eval_every": 5,
                                   "eval_iters": 10000, "checkpoint_every": 100000})
    wait_for(lambda: (studio.job(job.id).progress or 0) >= 0.005, 120, "step 5, where evaluation starts")
    pid = studio.worker_info.pid
    time.sleep(0.5)  # well inside a 10000-batch evaluation
    t0 = time.time()
    studio.cancel(job.id)
    j = studio.wait(job.id, 60)
    assert j.status is JobStatus.CANCELLED and "did not stop in time" not in j.error
    assert time.time() - t0 < studio.config.cancel_grace_s and studio.worker_info.pid == pid
    step = json.loads((studio.run_dir(job.id) / "checkpoint" / "state.json").read_text())["step"]
    assert step % 5 == 0 and f"last checkpoint (step {step}) is kept" in j.error  # saved where evaluation was cut


def test_resume_of_a_resumed_job_without_its_own_checkpoint_uses_its_parents(studio, corpus):
    params = {"data": str(corpus), **TINY, "max_steps": 100000, "checkpoint_every": 100000}
    job = studio.submit("tinylm", params)
    wait_for(lambda: (studio.job(job.id).progress or 0) > 0, 120, "training progress")
    studio.cancel(job.id)
    assert studio.wait(job.id, 60).status is JobStatus.CANCELLED
    step = json.loads((studio.run_dir(job.id) / "checkpoint" / "state.json").read_text())["step"]
    # the resumed job is cancelled before it starts: it saves nothing of its own
    studio.pause()
    child = studio.resume(job.id)
    studio.cancel(child.id)
    studio.resume_queue()
    c = studio.wait(child.id, 30)
    assert not (studio.run_dir(child.id) / "checkpoint").exists()
    assert f"job {job.id}'s, last checkpoint (step {step}) is kept" in c.error
    grandchild = studio.resume(child.id)
    assert grandchild.params["resume_from"] == job.id and grandchild.resume_of == child.id
    wait_for(lambda: any(f"from step {step}" in (e.get("message") or "")
                         for e in studio.events(grandchild.id)[0]), 120, "the resume log line")
    studio.cancel(grandchild.id)
    assert studio.wait(grandchild.id, 60).status is JobStatus.CANCELLED


def test_a_dataset_check_runs_while_training_holds_the_device(studio, corpus, tmp_path):
    from detect_fixtures import make_shapes

    data = make_shapes(tmp_path / "shapes", n=12)
    train = studio.submit("tinylm", {"data": str(corpus), **TINY, "max_steps": 100000, "checkpoint_every": 100000})
    wait_for(lambda: studio.job(train.id).status is JobStatus.RUNNING, 120, "training to start")
    check = studio.wait(studio.submit("detect_check", {"data": str(data / "data.yaml")}).id, 120)
    assert check.status is JobStatus.DONE, check.error
    # a download (offline here: it fails, plainly) does not wait behind the training either
    fetch = studio.wait(studio.submit("model_download", {"repo": "studio-tests/none", "file": "x.gguf"}).id, 120)
    assert fetch.status is JobStatus.FAILED and "hub cannot be reached" in fetch.error
    assert studio.job(train.id).status is JobStatus.RUNNING  # neither waited behind it
    assert "images" in check.result["summary"] and not (studio.run_dir(check.id) / "import").exists()
    studio.cancel(train.id)
    assert studio.wait(train.id, 60).status is JobStatus.CANCELLED


def test_retry_keeps_auto_where_fit_chose_a_value(tmp_path):
    from studio.gate import full_estimate
    from studio.params import build
    from workers.chat import chat

    s = Studio(Config.load(tmp_path / "d"), device=FakeNvml())

    def total(layers):
        return full_estimate(build(chat.Params, {**GEMMA, "prompt": "hi", "n_gpu_layers": layers}), chat.estimate,
                             s.device.read()).total

    tight = (total(0) + total(18)) // 2  # room for about half of gemma's layers beside the context
    job = s.submit("chat", {**GEMMA, "prompt": "hi"}, budget_bytes=tight)
    assert job.status is JobStatus.QUEUED, job.error
    assert job.params["n_gpu_layers"] == -1 and 0 < job.resolved["n_gpu_layers"] < 18
    again = s.retry(job.id)
    assert again.params["n_gpu_layers"] == -1  # "auto" stays auto: fit decides again for the new budget


def test_jobs_list_without_a_server_says_the_studio_is_not_running(tmp_path):
    import subprocess

    cfg, _ = left_running(tmp_path / "d")
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, str(root / "app.py"), "jobs", "list", "--data-dir", str(cfg.data_dir)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "studio: not running" in out.stdout and "queue: running" not in out.stdout
    assert "stopped while it ran: INTERRUPTED on next start" in out.stdout


def test_an_unusable_data_folder_is_one_line_not_a_traceback(tmp_path):
    import subprocess

    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    root = Path(__file__).resolve().parents[1]
    for argv in (["jobs", "list"], ["run", "selftest"]):
        out = subprocess.run([sys.executable, str(root / "app.py"), *argv, "--data-dir", str(not_a_dir / "data")],
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
        assert out.stderr.startswith("error: the data folder") and len(out.stderr.strip().splitlines()) == 1


def test_shutdown_during_evaluation_gives_the_job_time_to_checkpoint(tmp_path, corpus):
    s = Studio(Config.load(tmp_path / "d")).start()
    job = s.submit("tinylm", {"data": str(corpus), **TINY, "max_steps": 1000, "eval_every": 5, "eval_iters": 10000,
                              "checkpoint_every": 100000})
    wait_for(lambda: (s.job(job.id).progress or 0) >= 0.005, 120, "step 5, where evaluation starts")
    time.sleep(0.5)
    t0 = time.time()
    s.shutdown()  # as on Ctrl-C or SIGTERM to `python app.py`
    assert time.time() - t0 < s.config.cancel_grace_s + 6
    again = Studio(Config.load(tmp_path / "d"))
    j = again.job(job.id)
    assert j.status is JobStatus.INTERRUPTED and "shut down" in j.error and "Resume continues" in j.error
    assert (again.run_dir(job.id) / "checkpoint" / "state.json").exists()


def test_a_cpu_job_that_could_never_have_the_ram_is_refused_not_left_waiting(tmp_path):
    import psutil

    from studio.gate import runtime_context_bytes

    register_test_kinds()
    from dataclasses import replace

    s = Studio(replace(Config.load(tmp_path / "d"), reserve_gb=0.0))  # the CPU; this process is the studio's UI
    total, held = psutil.virtual_memory().total, psutil.Process().memory_info().rss
    budget = s.config.budget_bytes(total)  # all of RAM, as configured
    need = (total - held + budget) // 2  # under the configured budget, over what could ever be free
    job = s.submit("test_steps", {"mib": (need - runtime_context_bytes(s.device.read())) >> 20})
    assert job.status is JobStatus.REFUSED and "the studio's UI and io processes hold" in job.error


def test_ctrl_c_to_the_whole_group_lets_the_running_job_checkpoint(tmp_path, corpus):
    """A terminal's Ctrl-C reaches the studio and its workers at once: the workers ignore it and the studio stops
    them after the job has checkpointed."""
    import os
    import signal
    import subprocess
    import urllib.request

    from conftest import free_port

    port, data = free_port(), tmp_path / "d"
    root = Path(__file__).resolve().parents[1]
    server = subprocess.Popen([sys.executable, str(root / "app.py"), "--port", str(port), "--data-dir", str(data)],
                              start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: _up(f"http://127.0.0.1:{port}/"), 120, "the server")
        client = Studio(Config.load(data))  # another process: a client of the server's queue
        job = client.submit("tinylm", {"data": str(corpus), **TINY, "max_steps": 100000,
                                       "checkpoint_every": 100000})
        wait_for(lambda: (client.job(job.id).progress or 0) > 0, 120, "training progress")
        os.killpg(server.pid, signal.SIGINT)
        server.wait(60)
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)
    j = Studio(Config.load(data)).job(job.id)
    assert j.status is JobStatus.INTERRUPTED and "Resume continues" in j.error, j.error
    assert (data / "runs" / job.id / "checkpoint" / "state.json").exists()


def _up(url: str) -> bool:
    import urllib.request

    try:
        return urllib.request.urlopen(url, timeout=2).status == 200
    except OSError:
        return False
