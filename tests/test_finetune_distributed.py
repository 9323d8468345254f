"""`finetune` across several processes through accelerate (workers/finetune/distributed.py), on the CPU: two gloo
processes train the same tiny LoRA as one process with the same global batch, on the same loss curve, and write the
same result; a two-process run cancelled mid-way keeps a checkpoint and Resume finishes it; a bad `devices` is refused
at submit. The two-process curve is the cancelled run's steps followed by its Resume's, so one launch pair shows both
(each launch imports torch, transformers and trl twice: ~20 s of this 2-core machine). A real Studio, the tiny Llama
of tests/finetune_fixtures.py; offline, nothing GPU-only."""
import json
from dataclasses import replace

import pytest
from conftest import wait_for
from finetune_fixtures import make_tiny_llama, write_qa

from studio import Config, JobStatus, Studio
from workers.finetune import distributed

pytestmark = pytest.mark.timeout(600)

STEPS = 30  # enough optimizer steps that a cancel lands mid-run (a step takes 0.05-0.15 s on two processes here)
# Two processes with micro_batch 1 see the same examples per step as one with micro_batch 2 (accelerate hands batch i
# of the seeded permutation to rank i % 2), and transformers averages the loss over the tokens of both ranks, so the
# curves differ only by float summation order (an all-reduce of two halves vs one padded batch). Measured here: at
# most 2e-5 relative over 30 steps at lr 1e-2 (a LoRA on an fp32 base). 1e-3 leaves room for other CPUs' kernels,
# while ranks that drift apart (no DDP), a changed data order, a per-rank loss or a lost step moved it by 1% to 200%.
CURVE_REL = 1e-3


@pytest.fixture(scope="module")
def studio(tmp_path_factory):
    """A Studio of its own: a cancel grace long enough that the processes' own stop (checkpoint, exit) is what ends a
    cancelled job, not the studio killing its worker."""
    cfg = replace(Config.load(tmp_path_factory.mktemp("dist-studio")), cancel_grace_s=30.0)
    s = Studio(cfg).start()
    yield s
    s.shutdown()


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("dist-ft") / "tiny-llama")


@pytest.fixture(scope="module")
def qa(tmp_path_factory):
    return write_qa(tmp_path_factory.mktemp("dist-data") / "qa.jsonl")


def params(base, qa, **kw):
    return {"base": str(base), "data": str(qa), "eval_data": str(qa), "method": "lora", "max_seq_len": 64,
            "grad_accum": 1, "lr": 1e-2, "warmup": 0, "threads": 1, "lora_dropout": 0.0, "max_steps": STEPS,
            "save_every": 4, "eval_every": 0, "eval_prompts": 1, "eval_new_tokens": 8, **kw}


def curve(studio, job_id):
    return {e["step"]: e["train_loss"] for e in studio.events(job_id)[0]
            if e["type"] == "metric" and "train_loss" in e}


@pytest.fixture(scope="module")
def one_process(studio, base, qa):
    job = studio.wait(studio.submit("finetune", params(base, qa, micro_batch=2)).id, 300)
    assert job.status is JobStatus.DONE, job.error
    return job


@pytest.fixture(scope="module")
def cancelled(studio, base, qa, one_process):
    """Two processes, micro_batch 1 each, cancelled a few steps in."""
    job = studio.submit("finetune", params(base, qa, micro_batch=1, devices="2"))
    wait_for(lambda: len(curve(studio, job.id)) >= 3, 180, "three steps")
    studio.cancel(job.id)
    return studio.wait(job.id, 60)


@pytest.fixture(scope="module")
def resumed(studio, cancelled):
    job = studio.wait(studio.resume(cancelled.id).id, 300)
    assert job.status is JobStatus.DONE, job.error
    return job


def test_two_gloo_processes_follow_the_one_process_loss_curve_and_write_the_same_result(studio, one_process,
                                                                                        cancelled, resumed):
    one = curve(studio, one_process.id)
    two = {**curve(studio, cancelled.id), **curve(studio, resumed.id)}
    assert sorted(two) == sorted(one) == list(range(1, STEPS + 1))
    assert one[STEPS] < 0.5 * one[1]  # it learns: the comparison is over a falling curve, not a flat one
    worst = max(abs(two[s] - one[s]) / one[s] for s in one)
    assert worst < CURVE_REL, {s: (one[s], two[s]) for s in one}
    r1, r2 = one_process.result, resumed.result
    assert r2["steps"] == STEPS and r2["train_examples"] == r1["train_examples"]
    assert r2["dev_loss"] < 0.5 * r2["dev_loss_start"]  # (the two dev losses differ a little: means of batch means)
    # the run folder as a single-process run lays it out, so merge, Chat and Resume read it unchanged
    run1, run2 = studio.run_dir(one_process.id), studio.run_dir(resumed.id)
    listing = lambda d: sorted(str(f.relative_to(d)) for f in d.rglob("*") if f.is_file())  # noqa: E731
    assert listing(run2 / "adapter") == listing(run1 / "adapter")
    assert (run2 / "adapter" / "adapter_model.safetensors").stat().st_size > 0
    assert all((run2 / name).exists() for name in ("evaluation.json", "data_report.json", "run.json"))
    card = json.loads((run2 / "run.json").read_text())
    assert card["distributed"]["processes"] == 2 and card["distributed"]["backend"] == "DDP (gloo)"
    assert card["data_hash"] and card["result"] == "adapter" and card["resumed_from"] == cancelled.id
    state = json.loads((run2 / "checkpoint" / "state.json").read_text())
    assert state["step"] == STEPS and {"rng_state_0.pth", "rng_state_1.pth"} <= set(state["sha256"])
    # rank 0 alone wrote the events (one metric per step, the final dev loss once); the worker relayed its progress
    events = studio.events(resumed.id)[0]
    assert len([e for e in events if e["type"] == "metric" and "train_loss" in e]) == STEPS - min(curve(
        studio, resumed.id)) + 1
    assert [e["step"] for e in events if e["type"] == "metric" and "dev_loss" in e] == [STEPS]
    assert any(e["type"] == "progress" and e["message"] == f"step {STEPS}/{STEPS}" for e in events)


def test_a_cancelled_two_process_run_keeps_a_checkpoint_and_resume_finishes_it(studio, cancelled, resumed):
    assert cancelled.status is JobStatus.CANCELLED and "Resume continues" in cancelled.error, cancelled.error
    run = studio.run_dir(cancelled.id)
    saved = json.loads((run / "checkpoint" / "state.json").read_text())["step"]
    assert 3 <= saved < STEPS and saved == max(curve(studio, cancelled.id))  # every rank stopped at the same step
    assert not (run / "adapter").exists()
    assert not _alive(run)  # the launcher and both ranks are gone
    assert resumed.params["devices"] == "2" and resumed.result["steps"] == STEPS
    assert sorted(curve(studio, resumed.id)) == list(range(saved + 1, STEPS + 1))  # no step repeated or lost
    logs = [e["message"] for e in studio.events(resumed.id)[0] if e["type"] == "log"]
    assert any(f"resuming job {cancelled.id} from step {saved}" in m for m in logs), logs
    assert not _alive(studio.run_dir(resumed.id))


def _alive(run) -> list[int]:
    import psutil

    pids = [json.loads(f.read_text())[0] for f in (run / "distributed").glob("rank*.pid")]
    assert len(pids) == 2
    return [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]


@pytest.mark.parametrize("devices,says", [
    ("0,1", "asks for GPUs, and this machine has no CUDA device"),
    ("all", "asks for GPUs, and this machine has no CUDA device"),
    ("two", "devices 'two' is not understood: give GPU ids such as 0,1"),
    ("1,,2", "is not understood"),
    ("0", "a number of CPU processes, from 1 to"),
])
def test_a_bad_devices_value_is_refused_at_submit(studio, base, qa, devices, says):
    assert distributed.cuda_count() == 0  # the machine these tests run on: no CUDA
    before = len(studio.jobs(limit=10_000))
    with pytest.raises(ValueError, match=says):
        studio.submit("finetune", params(base, qa, devices=devices))
    assert len(studio.jobs(limit=10_000)) == before


def test_deepspeed_asks_for_its_package_and_for_gpus(studio, base, qa):
    import importlib.util

    if importlib.util.find_spec("deepspeed") is None:
        with pytest.raises(ValueError, match="pip install deepspeed"):
            studio.submit("finetune", params(base, qa, devices="2", deepspeed="zero2"))
    else:
        with pytest.raises(ValueError, match="shards a run across GPUs"):
            studio.submit("finetune", params(base, qa, devices="2", deepspeed="zero3"))
    cfg = distributed.deepspeed_config("zero3")
    assert cfg["zero_optimization"]["stage"] == 3 and cfg["train_micro_batch_size_per_gpu"] == "auto"


def test_the_job_fails_with_the_error_of_the_rank_that_failed_first(tmp_path):
    """The others fail because it did (a closed connection): their errors are not the story."""
    (tmp_path / "rank0.log").write_text("loading\nTraceback (most recent call last):\nKeyError: 'lm_head'\n")
    (tmp_path / "rank0.error.json").write_text(json.dumps({"rank": 0, "t": 10.0, "type": "KeyError",
                                                             "message": "'lm_head'"}))
    (tmp_path / "rank1.error.json").write_text(json.dumps({"rank": 1, "t": 11.0, "type": "DistBackendError",
                                                             "message": "Connection closed by peer"}))
    e = distributed._failure(tmp_path, 1, 2)
    assert isinstance(e, distributed.RankError)
    assert str(e).startswith("process 0 of 2 failed: KeyError: 'lm_head'\n") and str(e).endswith("KeyError: 'lm_head'")
    (tmp_path / "rank1.error.json").write_text(json.dumps({"rank": 1, "t": 9.0, "type": "ValueError",
                                                             "message": "no training example is left"}))
    e = distributed._failure(tmp_path, 1, 2)  # bad input reads as a single-process run says it
    assert type(e) is ValueError and str(e) == "no training example is left"
    for f in tmp_path.glob("rank*"):
        f.unlink()
    (tmp_path / "launch.log").write_text("torch.distributed.elastic: failed to bind port\n")
    assert "failed to bind port" in str(distributed._failure(tmp_path, 1, 2))


def test_devices_on_a_machine_with_gpus_names_existing_cards_only():
    assert distributed.parse_devices("all", 4) == [0, 1, 2, 3] and distributed.parse_devices("1, 3", 4) == [1, 3]
    assert distributed.parse_devices("", 4) is None and distributed.parse_devices("2", 0) == 2
    assert distributed.processes(distributed.parse_devices("2", 4)) == 1  # with GPUs, "2" is card 2: one process
    with pytest.raises(ValueError, match="there is no GPU 2; this machine has 2 .ids 0 to 1."):
        distributed.parse_devices("0,2", 2)
    with pytest.raises(ValueError, match="names a GPU twice"):
        distributed.parse_devices("1,1", 2)


def test_the_estimate_is_per_device():
    """DDP: each GPU holds what one GPU holds alone (plus its process's CUDA context); ZeRO shards what it shards;
    CPU processes share the RAM, a whole copy each."""
    from studio.config import GiB
    from studio.device import DeviceReading
    from studio.params import build
    from workers.finetune import train

    gpu = DeviceReading(kind="cuda", name="Fake RTX", total=24 * GiB, used=0, free=24 * GiB, studio_used=0,
                        utilization=0, temperature=40, power_w=30.0, driver="fake", cuda="13.0")
    ram = DeviceReading(kind="cpu", name="CPU", total=64 * GiB, used=0, free=64 * GiB, studio_used=0, utilization=0)

    def est(device, **kw):
        return train.estimate(build(train.Params, {"data": "x.jsonl", "method": "lora", **kw}), device)

    one, ddp = est(gpu), est(gpu, devices="0,1")
    assert ddp.parts["weights"] == one.parts["weights"] and ddp.parts["optimizer"] == one.parts["optimizer"]
    assert 0 < ddp.total - one.total < 1 * GiB and "per GPU of 2 (DDP)" in ddp.note
    zero2, zero3 = est(gpu, devices="0,1", deepspeed="zero2"), est(gpu, devices="0,1,2,3", deepspeed="zero3")
    assert zero2.parts["optimizer"] == one.parts["optimizer"] // 2 and zero2.parts["weights"] == one.parts["weights"]
    assert zero3.parts["weights"] == one.parts["weights"] // 4 and zero3.total < 0.5 * one.total
    single, two = est(ram, base="Phi-3-mini-4k-instruct"), est(ram, base="Phi-3-mini-4k-instruct", devices="2")
    assert two.working > 2 * single.working and "2 CPU processes" in two.note
