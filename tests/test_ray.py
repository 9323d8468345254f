"""Device jobs on Ray in local mode (ray.init(num_cpus=2)): a real Studio with ray_address="local" runs a Tiny LM job
and a transcription as Ray tasks; reports stream back, artifacts land in the run folder (directly, and shipped
through the object store when forced), cancel reaches the task, and a lost task makes the job INTERRUPTED and
resumable while the lane gets a new worker."""
import json
import os
import re
import shutil
import time
from dataclasses import replace

import pytest
from conftest import TINY, wait_for

ray = pytest.importorskip("ray", reason="Ray is optional: pip install -r requirements-ray.txt")

from studio import Config, JobStatus, Studio  # noqa: E402
from studio.raylane import RayCpu, RayWorker, ray_devices  # noqa: E402

FOX = ("The quick brown fox jumps over the lazy dog. Please call Stella and ask her to bring these things from the "
       "store.")


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def rs(local_ray, tmp_path_factory):
    """A Studio whose device lane runs on Ray; a long cancel grace, so a CANCELLED job was stopped by its own
    cancel point, not by killing the task."""
    cfg = replace(Config.load(tmp_path_factory.mktemp("ray-data")), ray_address="local", cancel_grace_s=30.0)
    s = Studio(cfg).start()
    wait_for(lambda: s.worker_info.ready, 180, "the Ray lane to be ready")
    yield s
    s.shutdown()


def lane(s):
    return s.device_lanes()[0] if hasattr(s, "device_lanes") else s.lanes["device"]


def follow_running(s, job_id, timeout=180):
    """Wait for the job's end, noting what was seen while it was still RUNNING: progress in the store, and the
    event types in its run folder."""
    seen_progress, seen_events = [], set()
    t0 = time.time()
    while time.time() - t0 < timeout:
        job = s.job(job_id)
        if job.status.final:
            return job, seen_progress, seen_events
        if job.status is JobStatus.RUNNING:
            if job.progress is not None:
                seen_progress.append(job.progress)
            seen_events |= {e["type"] for e in s.events(job_id)[0]}
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} did not end in {timeout} s")


def event_while_running(s, job_id, pred, timeout=120):
    """Wait for an event that `pred` accepts; fail at once, with the job's error, if the job ends first."""
    t0 = time.time()
    while not any(pred(e) for e in s.events(job_id)[0]):
        job = s.job(job_id)
        assert not job.status.final, f"job {job_id} ended {job.status.value} first: {job.error}"
        assert time.time() - t0 < timeout, f"job {job_id} wrote no such event in {timeout} s"
        time.sleep(0.05)


def test_tinylm_runs_as_a_ray_task_and_its_artifacts_land_in_the_run_folder(rs, corpus):
    assert isinstance(lane(rs).worker, RayWorker) and rs.worker_info.device_name.endswith("(Ray)")
    job = rs.submit("tinylm", {"data": str(corpus), "max_steps": 60, "lr": 3e-3, **TINY})
    done, progress, events = follow_running(rs, job.id)
    assert done.status is JobStatus.DONE, done.error
    assert any(0 < p < 1 for p in progress), progress  # progress reached the store while the task ran
    assert {"started", "progress", "metric"} <= events  # and events reached the run folder
    run = rs.run_dir(job.id)
    card = json.loads((run / "run.json").read_text())
    assert card["ray"]["node_id"] == ray.get_runtime_context().get_node_id() and not card["ray"]["shipped"]
    assert card["ray"]["pid"] != os.getpid() and (run / "checkpoint" / "tokenizer.json").exists()
    arts = [e["path"] for e in rs.events(job.id)[0] if e["type"] == "artifact"]
    assert arts and all((run / a).exists() for a in arts)
    assert done.result["steps"] == 60 and done.peak_bytes > 0
    assert [e["type"] for e in rs.events(job.id)[0]].count("end") == 1


@pytest.mark.skipif(not (shutil.which("espeak-ng") and shutil.which("sox")), reason="espeak-ng and sox make the speech")
def test_a_transcription_runs_as_a_ray_task(rs, tmp_path):
    from asr_fixtures import speak

    clip = speak(tmp_path / "fox.wav", FOX)
    job = rs.wait(rs.submit("transcribe", {"audio": str(clip), "model": "tiny.en-packaged", "threads": 2}).id, 180)
    assert job.status is JobStatus.DONE, job.error
    import jiwer

    words = [" ".join(re.findall(r"[a-z']+", t.lower())) for t in (FOX, job.result["text"])]
    assert jiwer.wer(*words) <= 0.35, job.result["text"]  # the espeak voice is hard for tiny.en: a few words slip
    run = rs.run_dir(job.id)
    assert re.match(r"1\n\d\d:\d\d:\d\d,\d{3} --> ", (run / "transcript.srt").read_text())
    data = json.loads((run / "transcript.json").read_text())
    segs = [e for e in rs.events(job.id)[0] if e["type"] == "segment"]
    assert data["segments"] and len(segs) == len(data["segments"])


def test_cancel_reaches_the_task_which_checkpoints_and_stops(rs, corpus):
    job = rs.submit("tinylm", {"data": str(corpus), "max_steps": 100_000, "eval_every": 100_000, **TINY})
    event_while_running(rs, job.id, lambda e: e["type"] == "progress")
    rs.cancel(job.id)
    done = rs.wait(job.id, 30)
    assert done.status is JobStatus.CANCELLED and done.error.startswith("Cancelled by the user."), done.error
    state = json.loads((rs.run_dir(job.id) / "checkpoint" / "state.json").read_text())
    assert 0 < state["step"] < 100_000
    # the task really stopped: its CPU is back with Ray, and the run folder no longer grows
    wait_for(lambda: ray.available_resources().get("CPU", 0) == 2, 20, "the task's CPU to come back")
    size = (rs.run_dir(job.id) / "events.jsonl").stat().st_size
    time.sleep(0.5)
    assert (rs.run_dir(job.id) / "events.jsonl").stat().st_size == size
    assert lane(rs).worker.proc.is_alive()  # the same worker takes the next job


def test_a_run_folder_the_node_cannot_see_is_shipped_back_and_resume_ships_its_checkpoint(rs, corpus):
    lane(rs).worker.ship = True  # as on a node without the data folder: a temporary folder there, tar bytes back
    try:
        shipped_then_resumed(rs, corpus)
    finally:
        lane(rs).worker.ship = None


def shipped_then_resumed(rs, corpus):
    job = rs.submit("tinylm", {"data": str(corpus), "max_steps": 100_000, "eval_every": 20, **TINY})
    event_while_running(rs, job.id, lambda e: e["type"] == "metric")  # streamed from the node's folder as it runs
    assert rs.job(job.id).status is JobStatus.RUNNING
    rs.cancel(job.id)
    assert rs.wait(job.id, 30).status is JobStatus.CANCELLED
    run = rs.run_dir(job.id)
    step = json.loads((run / "checkpoint" / "state.json").read_text())["step"]
    card = json.loads((run / "run.json").read_text())
    assert card["ray"]["shipped"] and step > 0
    resumed = rs.resume(job.id)  # the checkpoint goes to the node with the job
    event_while_running(rs, resumed.id, lambda e: e["type"] == "metric")
    rs.cancel(resumed.id)
    done = rs.wait(resumed.id, 30)
    assert done.status is JobStatus.CANCELLED, done.error
    metrics = [e["step"] for e in rs.events(resumed.id)[0] if e["type"] == "metric"]
    assert metrics and min(metrics) > step, (step, metrics)  # continued from the shipped checkpoint
    assert json.loads((rs.run_dir(resumed.id) / "run.json").read_text())["ray"]["shipped"]
    for f in ("events.jsonl", "run.json"):  # nothing names the node's temporary folder
        assert "studio-ray-" not in (rs.run_dir(resumed.id) / f).read_text()


def test_a_killed_or_crashed_task_interrupts_its_job_and_the_lane_gets_a_new_worker(rs, corpus):
    import psutil

    for how in ("kill", "crash"):
        old = lane(rs).worker
        job = rs.submit("tinylm", {"data": str(corpus), "max_steps": 100_000, "eval_every": 100_000,
                                   "checkpoint_every": 20, **TINY})
        event_while_running(rs, job.id, lambda e: e["type"] == "progress" and e["done"] > 20)  # a checkpoint
        if how == "kill":
            old.kill()  # the core's own way to stop a worker: ray.cancel(force=True)
        else:  # the task's process dies under it, as when a node's OOM killer takes it
            procs = [p for p in psutil.Process().children(recursive=True)  # this test's Ray: started here
                     if "ray::_run_task" in " ".join(p.cmdline())]
            assert len(procs) == 1, procs
            procs[0].kill()
        done = rs.wait(job.id, 30)
        assert done.status is JobStatus.INTERRUPTED, (how, done.status, done.error)
        assert "Resume continues from it" in done.error
        wait_for(lambda: lane(rs).worker is not old and rs.worker_info.ready, 120, "a new Ray worker")
        assert lane(rs).worker.generation > old.generation and not old.proc.is_alive()
    again = rs.wait(rs.submit("selftest", {"mib": 1}).id, 60)
    assert again.status is JobStatus.DONE and again.result["checksum_ok"]


def test_ray_devices_of_a_cluster_without_gpus(local_ray):
    (dev,) = ray_devices("local")
    assert isinstance(dev, RayCpu) and dev.total == int(ray.cluster_resources()["memory"])
    r = dev.read()
    assert r.kind == "cpu" and 0 < r.free <= r.total == dev.total and r.used == r.total - r.free
