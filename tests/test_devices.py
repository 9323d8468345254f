"""One worker per device: two fake GPUs (only their NVML readings are faked; each has a real CPU worker process
underneath), so two jobs run side by side, a job goes to the card with room, a pinned job waits for its card, and a
worker's death interrupts only its own job."""
import os
import signal
import time
from dataclasses import replace

import pytest
from conftest import FakeNvml, wait_for

from studio import Config, GiB, JobStatus, Studio, registry
from tabs.header import meter_html


def register_test_kinds():
    for kind, module in (("test_steps", "helpers_steps"), ("test_sleeper", "helpers_worker"),
                         ("test_multi", "helpers_multi"), ("test_fit", "helpers_fit")):
        if kind not in registry.WORKERS:
            registry.register(kind, module)


@pytest.fixture(scope="module")
def two_gpus(tmp_path_factory):
    register_test_kinds()
    devs = [FakeNvml(total=12 * GiB, free=11 * GiB), FakeNvml(total=12 * GiB, free=11 * GiB)]
    cfg = replace(Config.load(tmp_path_factory.mktemp("two-gpus")), cancel_grace_s=3.0)
    s = Studio(cfg, devices=devs).start()
    wait_for(lambda: all(lane.info.ready for lane in s.device_lanes()), 120, "both device workers")
    yield s, devs
    s.shutdown()


@pytest.fixture
def gpus(two_gpus):
    """The module's studio, its cards reset to idle and empty after each test."""
    s, devs = two_gpus
    yield s, devs
    for d in devs:
        d.free = 11 * GiB
    for j in s.store.queued() + s.store.with_status(JobStatus.RUNNING):
        s.cancel(j.id)
    wait_for(lambda: not any(lane.running or lane.held_by for lane in s.lanes.values()), 30, "the cards to be free")


def steps(n=20, seconds=0.1, mib=1):
    return {"steps": n, "seconds": seconds, "mib": mib}


def test_each_device_has_its_own_worker_and_meter_row(gpus):
    s, _ = gpus
    lanes = s.device_lanes()
    assert [lane.index for lane in lanes] == [0, 1] and [lane.name for lane in lanes] == ["device", "device:1"]
    assert len({lane.info.pid for lane in lanes}) == 2  # two processes
    m = s.meter()
    assert [row["index"] for row in m["devices"]] == [0, 1] and all(row["ready"] for row in m["devices"])
    page = meter_html(m)
    assert page.count("class='meter-row'") == 3  # a row per card, then the queue
    assert "GPU 0 (Fake RTX 4070 Ti)" in page and "GPU 1 (Fake RTX 4070 Ti)" in page


def test_two_jobs_run_at_the_same_time_on_different_devices(gpus):
    s, _ = gpus
    t0 = time.time()
    a, b = s.submit("test_steps", steps()), s.submit("test_steps", steps())
    wait_for(lambda: all(s.job(j.id).status is JobStatus.RUNNING for j in (a, b)), 30, "both jobs running at once")
    a, b = s.wait(a.id, 60), s.wait(b.id, 60)
    assert a.status is b.status is JobStatus.DONE
    assert {a.device, b.device} == {0, 1}
    assert time.time() - t0 < 2 * 2.0  # side by side, not one after the other (each takes >= 2 s)
    started = [e for e in s.events(a.id)[0] if e["type"] == "started"]
    assert started and started[0]["worker_pid"] in {lane.info.pid for lane in s.device_lanes()}


def test_a_job_too_big_for_one_card_goes_to_the_one_with_room(gpus):
    s, devs = gpus
    devs[0].free = 2 * GiB  # another program holds most of card 0
    job = s.wait(s.submit("test_steps", steps(3, 0.05, mib=4096)).id, 60)
    assert job.status is JobStatus.DONE and job.device == 1
    small = s.wait(s.submit("test_steps", steps(3, 0.05)).id, 60)
    assert small.status is JobStatus.DONE and small.device == 1  # the card with the most free memory


def test_a_job_over_every_cards_budget_is_refused_naming_each_card(gpus):
    s, _ = gpus
    job = s.submit("test_steps", steps(mib=20 * 1024))
    assert job.status is JobStatus.REFUSED
    assert "Fits on no device" in job.error and "GPU 0" in job.error and "GPU 1" in job.error
    with pytest.raises(ValueError, match="there is no device 2"):
        s.submit("test_steps", {**steps(), "device": 2})


def test_a_pinned_job_waits_for_its_card_while_others_use_the_free_one(gpus):
    s, _ = gpus
    long = s.submit("test_steps", {**steps(30, 0.1), "device": 1})
    wait_for(lambda: s.job(long.id).status is JobStatus.RUNNING, 30, "the first job")
    assert s.job(long.id).device == 1 and s.job(long.id).device_pin == 1
    pinned = s.submit("test_steps", steps(3, 0.05), device="1")
    free = s.submit("test_steps", steps(3, 0.05))
    assert s.wait(free.id, 30).status is JobStatus.DONE and s.job(free.id).device == 0  # not behind the pinned one
    pin = s.job(pinned.id)
    assert pin.status is JobStatus.QUEUED and f"Waiting for job {long.id}" in (pin.wait_reason or "")
    assert s.wait(long.id, 60).status is JobStatus.DONE
    done = s.wait(pinned.id, 30)
    assert done.status is JobStatus.DONE and done.device == 1
    from tabs.jobs import summary_html

    assert "<b>device</b> 1 (pinned)" in summary_html(done)  # the Jobs tab says where it ran
    again = s.wait(s.retry(pinned.id).id, 30)  # Retry keeps the pin
    assert again.device_pin == 1 and again.device == 1


def test_a_job_holding_two_cards_waits_for_both_and_keeps_both_while_it_runs(gpus):
    s, _ = gpus
    first = s.submit("test_steps", {**steps(20, 0.1), "device": 1})
    wait_for(lambda: s.job(first.id).status is JobStatus.RUNNING, 30, "the job on card 1")
    both = s.submit("test_multi", {**steps(20, 0.1), "devices": "0,1"})
    later = s.submit("test_steps", steps(2, 0.05))
    time.sleep(0.6)  # a few scheduler ticks
    assert s.job(both.id).status is JobStatus.QUEUED and f"Waiting for job {first.id}" in s.job(both.id).wait_reason
    assert s.job(later.id).status is JobStatus.QUEUED  # card 0 is idle, but kept for the job ahead of it
    wait_for(lambda: s.job(both.id).status is JobStatus.RUNNING, 30, "the two-card job")
    assert {lane.index: lane.running or lane.held_by for lane in s.device_lanes()} == {0: both.id, 1: both.id}
    assert [row["job"] for row in s.meter()["devices"]] == [both.id, both.id]
    assert s.job(later.id).status is JobStatus.QUEUED
    assert s.wait(both.id, 60).status is JobStatus.DONE and s.job(both.id).device == 0  # on the first card's worker
    assert s.wait(later.id, 30).status is JobStatus.DONE
    assert not any(lane.held_by for lane in s.device_lanes())


def test_a_job_sized_for_one_card_is_sized_again_for_the_card_it_starts_on(gpus):
    s, devs = gpus
    devs[1].total, devs[1].free = 24 * GiB, 23 * GiB  # the bigger card: the job is gated (and sized) there
    try:
        busy = s.submit("test_steps", {**steps(20, 0.1), "device": 1})
        wait_for(lambda: s.job(busy.id).status is JobStatus.RUNNING, 30, "card 1 busy")
        job = s.submit("test_fit", {"steps": 2, "seconds": 0.05})
        assert job.device == 1 and job.resolved["mib"] == (23 * GiB // 8) >> 20
        done = s.wait(job.id, 30)  # card 1 is busy, so it starts on card 0, sized for card 0's budget
        assert done.status is JobStatus.DONE and done.device == 0
        assert done.resolved["mib"] == (11 * GiB // 8) >> 20 and done.budget_bytes == 11 * GiB
        assert done.params["mib"] == 0  # as asked: Retry sizes it again
        s.wait(busy.id, 60)
    finally:
        devs[1].total = 12 * GiB


def test_killing_one_worker_interrupts_only_its_job(gpus):
    s, _ = gpus
    a, b = s.submit("test_steps", steps(30, 0.1)), s.submit("test_steps", steps(30, 0.1))
    wait_for(lambda: all(s.job(j.id).status is JobStatus.RUNNING for j in (a, b)), 30, "both jobs running")
    victim = s.job(b.id).device
    lane = next(lane for lane in s.device_lanes() if lane.index == victim)
    pid = lane.info.pid
    os.kill(pid, signal.SIGKILL)
    b = s.wait(b.id, 30)
    assert b.status is JobStatus.INTERRUPTED and "killed by SIGKILL" in b.error
    a = s.wait(a.id, 60)
    assert a.status is JobStatus.DONE  # the other card's job never noticed
    wait_for(lambda: lane.info.ready and lane.info.pid != pid, 120, "the killed card's worker to be restarted")
    again = s.wait(s.submit("test_steps", steps(2, 0.05), device=victim).id, 60)
    assert again.status is JobStatus.DONE and again.device == victim


def test_per_device_settings_budget_and_do_not_use(tmp_path):
    register_test_kinds()
    cfg = replace(Config.load(tmp_path / "d"), devices={"0": {"use": False}, "1": {"budget_gb": 3}})
    devs = [FakeNvml(), FakeNvml()]
    s = Studio(cfg, devices=devs)  # not started: the gate and the lanes are decided from the settings alone
    assert [lane.index for lane in s.device_lanes()] == [1] and s.device_lanes()[0].name == "device"
    with pytest.raises(ValueError, match="do not use"):
        s.submit("test_steps", steps(), device=0)
    big = s.submit("test_steps", steps(mib=4096))
    assert big.status is JobStatus.REFUSED and "budget 3.00 GiB" in big.error
    ok = s.submit("test_steps", steps(mib=512))
    assert ok.status is JobStatus.QUEUED and ok.device == 1 and ok.budget_bytes == 3 * GiB
    assert [row["use"] for row in s.meter()["devices"]] == [False, True]


def test_settings_tab_saves_each_cards_budget_and_use(gpus):
    from gradio_client import Client

    import app
    from conftest import free_port
    from tabs.settings import DEVICE_COLUMNS

    s, _ = gpus
    saved = s.config
    demo = app.build_ui(s)
    port = free_port()
    app.launch(demo, s, server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        rows = [[0, "Fake RTX 4070 Ti", 12.0, 6.0, 1.0, True], [1, "Fake RTX 4070 Ti", 12.0, 0.0, 2.0, False]]
        note = client.predict({"headers": DEVICE_COLUMNS, "data": rows}, api_name="/save_device_settings")
        assert "Saved" in note and "Restart" in note  # card 1's "use" changes at the next start
        assert s.config.devices == {"0": {"budget_gb": 6.0, "reserve_gb": 1.0, "use": True},
                                    "1": {"budget_gb": 0.0, "reserve_gb": 2.0, "use": False}}
        assert Config.load(s.config.data_dir).devices == s.config.devices  # saved to settings.json
        assert s.meter()["devices"][0]["budget"] == 6 * GiB and s.meter()["devices"][1]["budget"] == 10 * GiB
        bad = [[0, "x", 12.0, 20.0, 1.0, True], rows[1]]
        with pytest.raises(Exception, match="cannot exceed"):
            client.predict({"headers": DEVICE_COLUMNS, "data": bad}, api_name="/save_device_settings")
        off = [[0, "x", 12.0, 0.0, 1.0, False], rows[1]]
        with pytest.raises(Exception, match="at least one device"):
            client.predict({"headers": DEVICE_COLUMNS, "data": off}, api_name="/save_device_settings")
    finally:
        demo.close()
        s.update_config(devices=saved.devices)


def test_cli_pins_a_job_to_a_device_and_names_the_devices_there_are(tmp_path):
    from test_cli import app as cli

    ok = cli("run", "selftest", "--param", "mib=1", "--param", "device=0", "--quiet", "--data-dir", str(tmp_path))
    assert ok.returncode == 0, ok.stdout + ok.stderr
    bad = cli("run", "selftest", "--param", "device=3", "--data-dir", str(tmp_path))
    assert bad.returncode == 1 and "there is no device 3; this studio has 0: the CPU" in bad.stdout


def test_a_finetune_across_gpus_names_the_cards_it_holds():
    from workers.finetune.train import Params, devices_of

    def held(devices, n):
        return devices_of(Params(data="d.jsonl", devices=devices), n)

    assert held("0,1", 2) == [0, 1] and held("all", 3) == [0, 1, 2]
    assert held("1", 2) == [1]  # one card: it runs there, in that card's worker
    assert held("", 2) is None and held("2", 0) is None  # CPU processes


def test_the_peak_counts_the_processes_a_job_starts():
    """A multi-process fine-tune's ranks are the job's memory too: the worker's reader adds its descendants."""
    import subprocess
    import sys

    from studio.worker import descendants, memory_reader

    read = memory_reader("cpu")
    before = read()
    child = subprocess.Popen([sys.executable, "-c", "import time; x = bytearray(200 << 20); time.sleep(30)"])
    try:
        wait_for(lambda: read() - before > 150 * 2**20, 20, "the child's memory to count")
        assert child.pid in descendants(os.getpid())
    finally:
        child.kill()
        child.wait()
