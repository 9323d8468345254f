"""The core: store, gate, queue order, cancel, worker death, restart recovery."""
import json
import os
import signal
import time

import pytest
from conftest import TINY, FakeNvml, wait_for

from studio import Config, GiB, JobStatus, Studio, events, registry
from studio.store import Store


def test_store_transitions_once(tmp_path):
    store = Store(tmp_path / "s.db")
    job = store.add("selftest", {"mib": 1}, JobStatus.QUEUED)
    assert store.get(job.id).status is JobStatus.QUEUED
    assert store.transition(job.id, (JobStatus.QUEUED,), JobStatus.RUNNING)
    assert store.transition(job.id, (JobStatus.RUNNING,), JobStatus.DONE, result={"ok": 1})
    # a second final transition is refused: one outcome per job
    assert not store.transition(job.id, (JobStatus.RUNNING,), JobStatus.FAILED)
    j = store.get(job.id)
    assert j.status is JobStatus.DONE and j.result == {"ok": 1}
    assert Store(tmp_path / "s.db").get(job.id).status is JobStatus.DONE  # durable across opens


def test_duplicate_kind_is_an_error():
    with pytest.raises(ValueError, match="duplicate worker kind"):
        registry.register("tinylm", "workers.tinylm.train")


def test_gate_refuses_with_breakdown_and_a_change_that_fits(tmp_path):
    studio = Studio(Config.load(tmp_path / "d"), device=FakeNvml())
    job = studio.submit("tinylm", {"preset": "gpu-baby", "batch_size": 4096})
    assert job.status is JobStatus.REFUSED
    assert "Refused: needs" in job.error and "activations" in job.error and "budget 11.00 GiB" in job.error
    assert "Fits with batch_size=" in job.error
    # the suggestion really fits: submitting it is accepted
    suggested = int(job.error.split("Fits with batch_size=")[1].split()[0].rstrip(","))
    ok = studio.submit("tinylm", {"preset": "gpu-baby", "batch_size": suggested})
    assert ok.status is JobStatus.QUEUED and ok.estimate_bytes <= 11 * GiB
    # the refusal is in history with its one final event
    evs, _ = studio.events(job.id)
    assert [e["type"] for e in evs] == ["end"] and evs[0]["status"] == "REFUSED"


def test_gate_cpu_preset_fits_and_bad_params_queue_nothing(tmp_path):
    studio = Studio(Config.load(tmp_path / "d"), device=FakeNvml())
    est = studio.submit("tinylm", {}).estimate
    assert 0.5 * GiB < est["total"] < 1.5 * GiB and est["context"] > 0
    for bad, msg in [({"max_steps": 0}, "max_steps must be between"), ({"n_embd": 100, "n_head": 3}, "multiple"),
                     ({"pos": "sinusoid"}, "pos must be one of"), ({"nope": 1}, "unknown parameter"),
                     ({"batch_size": "many"}, "whole number")]:
        with pytest.raises(ValueError, match=msg):
            studio.submit("tinylm", bad)
    with pytest.raises(ValueError, match="unknown job kind"):
        studio.submit("sculpt", {})
    assert len(studio.jobs()) == 1


def test_waits_for_free_memory_then_runs(tmp_path):
    dev = FakeNvml(free=int(0.2 * GiB))
    studio = Studio(Config.load(tmp_path / "d"), device=dev).start()
    try:
        job = studio.submit("selftest", {"mib": 512})  # its working memory is over what is free
        wait_for(lambda: studio.job(job.id).wait_reason, 60, "a wait reason")
        j = studio.job(job.id)
        assert j.status is JobStatus.QUEUED and "Waiting for memory" in j.wait_reason
        assert "Waiting for memory" in studio.meter()["waiting"]
        dev.free = 8 * GiB  # the other program exits
        assert studio.wait(job.id, 60).status is JobStatus.DONE
    finally:
        studio.shutdown()


def test_queue_runs_in_submission_order(studio):
    studio.pause()
    jobs = [studio.submit("selftest", {"mib": 1}) for _ in range(4)]
    time.sleep(0.5)
    assert all(studio.job(j.id).status is JobStatus.QUEUED for j in jobs)
    studio.resume_queue()
    done = [studio.wait(j.id, 60) for j in jobs]
    assert all(j.status is JobStatus.DONE for j in done)
    starts = [j.started for j in done]
    assert starts == sorted(starts)


def test_cancel_queued_and_running_then_resume(studio, corpus):
    studio.pause()
    queued = studio.submit("selftest", {"mib": 1})
    assert studio.cancel(queued.id).status is JobStatus.CANCELLED
    studio.resume_queue()
    job = studio.submit("tinylm", {"data": str(corpus), "max_steps": 100000, "checkpoint_every": 100000, **TINY})
    wait_for(lambda: (studio.job(job.id).progress or 0) > 0, 120, "training progress")
    studio.cancel(job.id)
    j = studio.wait(job.id, 60)
    assert j.status is JobStatus.CANCELLED and "Resume continues" in j.error
    ends = [e for e in studio.events(job.id)[0] if e["type"] == "end"]
    assert len(ends) == 1 and ends[0]["status"] == "CANCELLED"
    step = json.loads((studio.run_dir(job.id) / "checkpoint" / "state.json").read_text())["step"]
    assert step > 0  # cancel wrote a checkpoint
    resumed = studio.resume(job.id)
    wait_for(lambda: any("resuming job" in (e.get("message") or "") for e in studio.events(resumed.id)[0]), 120,
             "the resume log line")
    assert f"from step {step}" in [e["message"] for e in studio.events(resumed.id)[0] if e["type"] == "log"][0]
    studio.cancel(resumed.id)
    assert studio.wait(resumed.id, 60).status is JobStatus.CANCELLED


def test_kill_9_worker_interrupts_job_queue_goes_on_and_job_resumes(studio, corpus):
    params = {"data": str(corpus), "max_steps": 400, "checkpoint_every": 20, **TINY}
    job = studio.submit("tinylm", params)
    state = studio.run_dir(job.id) / "checkpoint" / "state.json"
    wait_for(state.exists, 120, "a checkpoint")
    pid = studio.worker_info.pid
    os.kill(pid, signal.SIGKILL)
    j = studio.wait(job.id, 60)
    assert j.status is JobStatus.INTERRUPTED and "SIGKILL" in j.error
    # the worker restarted and the queue goes on
    nxt = studio.wait(studio.submit("selftest", {"mib": 1}).id, 120)
    assert nxt.status is JobStatus.DONE and studio.worker_info.pid != pid
    # resume continues from the checkpoint, to the end
    saved_step = json.loads(state.read_text())["step"]
    resumed = studio.wait(studio.resume(job.id).id, 300)
    assert resumed.status is JobStatus.DONE, resumed.error
    assert resumed.resume_of == job.id and resumed.result["steps"] == 400
    logs = [e["message"] for e in studio.events(resumed.id)[0] if e["type"] == "log"]
    assert f"resuming job {job.id} from step {saved_step}" in logs[0] and saved_step >= 20


def test_job_that_ignores_cancel_is_killed_after_grace(studio):
    if "test_sleeper" not in registry.WORKERS:
        registry.register("test_sleeper", "helpers_worker")
    job = studio.submit("test_sleeper", {"seconds": 120})
    wait_for(lambda: (studio.run_dir(job.id) / "started").exists(), 60, "the sleeper to start")
    t0 = time.time()
    studio.cancel(job.id)
    j = studio.wait(job.id, 60)
    assert j.status is JobStatus.CANCELLED and "did not stop in time" in j.error
    assert time.time() - t0 < 30
    assert studio.wait(studio.submit("selftest", {"mib": 1}).id, 120).status is JobStatus.DONE


def test_failed_job_carries_its_error_and_the_loop_goes_on(studio, tmp_path):
    # text at the start (passes the quick submit check), binary further in: fails in the worker
    bad = tmp_path / "half.txt"
    bad.write_bytes(b"hello world\n" * 6000 + b"\x00\x01\x02" * 100)
    job = studio.wait(studio.submit("tinylm", {"data": str(bad), **TINY, "max_steps": 5}).id, 120)
    assert job.status is JobStatus.FAILED and "binary" in job.error and job.traceback
    assert studio.wait(studio.submit("selftest", {"mib": 1}).id, 60).status is JobStatus.DONE


def test_restart_after_unclean_stop(tmp_path):
    """A RUNNING job left by a crashed studio becomes INTERRUPTED; the queue starts paused; history is kept."""
    cfg = Config.load(tmp_path / "d")
    cfg.ensure_dirs()
    store = Store(cfg.db_path)
    done = store.add("selftest", {"mib": 1}, JobStatus.QUEUED)
    store.transition(done.id, (JobStatus.QUEUED,), JobStatus.DONE)
    running = store.add("selftest", {"mib": 1}, JobStatus.QUEUED)
    store.transition(running.id, (JobStatus.QUEUED,), JobStatus.RUNNING)
    waiting = store.add("selftest", {"mib": 1}, JobStatus.QUEUED)
    (cfg.runs_dir / running.id).mkdir(parents=True)
    store.set_meta("clean_shutdown", "0")  # as a killed studio leaves it

    studio = Studio(cfg).start()
    try:
        assert studio.job(running.id).status is JobStatus.INTERRUPTED
        assert studio.job(done.id).status is JobStatus.DONE
        assert studio.store.paused and "unclean stop" in studio.meter()["pause_reason"]
        time.sleep(1.0)
        assert studio.job(waiting.id).status is JobStatus.QUEUED  # not run while paused
        studio.resume_queue()
        assert studio.wait(waiting.id, 120).status is JobStatus.DONE
        evs, _ = events.read(cfg.runs_dir / running.id)
        assert [e["status"] for e in evs if e["type"] == "end"] == ["INTERRUPTED"]
    finally:
        studio.shutdown()
    again = Studio(cfg).start()  # a clean stop leaves the queue running
    try:
        assert not again.store.paused
    finally:
        again.shutdown()


def test_model_cache_is_lru_and_unloads_idle_models():
    from studio.context import ModelCache

    freed = []
    cache = ModelCache(on_evict=lambda: freed.append(1))
    loads = []

    def loader(name, size):
        return lambda: (loads.append(name) or name, size)

    assert cache.get("a", loader("a", 100)) == ("a", False)
    cache.get("b", loader("b", 200))
    assert cache.get("a", loader("a", 100)) == ("a", True)  # a hit: not loaded again, now most recent
    assert loads == ["a", "b"] and cache.bytes == 300
    assert cache.evict(150) == 200 and cache.keys() == ["a"]  # least recently used goes first
    time.sleep(0.05)
    assert cache.evict_idle(0.01) == 100 and cache.bytes == 0 and len(freed) == 2
