"""The `finetune` kind's core: data shapes and the report, exact answer-only masks, the seeded dev split, a QLoRA
run that learns (bitsandbytes 4-bit on the CPU), resume after cancel and after kill -9 on the same loss curve, the
out-of-memory path, and the gate sizing an 8B QLoRA from the preset's config alone. A tiny Llama built from a config
and a tokenizer trained here (tests/finetune_fixtures.py); CPU, offline."""
import json
import os
import signal

import pytest
from conftest import wait_for
from finetune_fixtures import QA, make_tiny_llama, write_qa

from studio import JobStatus, registry
from studio.config import GiB
from studio.device import DeviceReading
from studio.gate import Refused, full_estimate, gate
from studio.params import build
from workers.finetune import data, train

pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("ft") / "tiny-llama")


@pytest.fixture(scope="module")
def tok(base):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(base))


@pytest.fixture(scope="module")
def qa(tmp_path_factory):
    return write_qa(tmp_path_factory.mktemp("ft-data") / "qa.jsonl")


# ---- data ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,shape,expect", [
    ("a.jsonl", "alpaca", "alpaca"), ("m.json", "messages", "messages"), ("s.jsonl", "sharegpt", "messages"),
    ("s.csv", "sharegpt", "messages"), ("pc.parquet", "prompt_completion", "prompt_completion"),
    ("pc.csv", "prompt_completion", "prompt_completion"), ("t.jsonl", "text", "text"),
])
def test_the_report_reads_every_shape_and_format(tmp_path, tok, name, shape, expect):
    path = write_qa(tmp_path / name, shape)
    r = data.report(str(path), tok, 24)
    assert r["examples"] == 12 and r["per_shape"] == {expect: 12}
    assert sum(b["count"] for b in r["histogram"]) == 12
    lengths = [data.encode(e, tok, 10_000)["length"] for e in data.read(str(path))]
    assert r["truncated"] == sum(n > 24 for n in lengths) > 0  # the chosen max_seq_len cuts the longer ones
    assert r["histogram"][-1]["count"] == r["truncated"]
    assert r["duplicates"] == 0 and r["empty_answers"] == 0 and r["train"] + r["dev"] == 12 and r["dev"] == 1
    assert len(r["preview"]) == 3
    first = r["preview"][0]
    if expect == "text":
        assert [s["trained"] for s in first["segments"]] == [True]
    else:  # the prompt in the tokenizer's own template, masked; the answer trained
        assert [s["trained"] for s in first["segments"]] == [False, True]
        assert first["segments"][0]["text"].startswith("<s><|user|>\nWhat is the code of the red door?")
        # cut where max_seq_len cuts it (28 tokens > 24)
        assert "The red door code is 4417.<|end|>\n".startswith(first["segments"][1]["text"]) and first["truncated"]
        full = data.render_preview(str(path), tok, 512, n=1)[0]
        assert full["segments"][1]["text"] == "The red door code is 4417.<|end|>\n" and not full["truncated"]
    html = data.preview_html(r["preview"])
    assert "ft-trained" in html and ("ft-masked" in html) == (expect != "text")


def test_duplicates_and_empty_answers_are_counted_and_empty_ones_dropped(tmp_path, tok):
    rows = [{"prompt": "a?", "completion": "b"}, {"prompt": "a?", "completion": "b"}, {"prompt": "c?", "completion": " "}]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    r = data.report(str(path), tok, 64)
    assert r["duplicates"] == 1 and r["empty_answers"] == 1
    enc, skipped = data.encode_all(data.read(str(path)), tok, 64)
    assert len(enc) == 2 and skipped["empty_answer"] == 1


@pytest.mark.parametrize("content,says", [
    ('{"prompt": "a", "completion": "b"}\n{"prompt": "c", "completion": "d"}\n{"prompt": "e", "completion": \n',
     r"x\.jsonl line 3: not valid JSON"),
    ('{"instruction": "a", "output": "b"}\n{"instruction": "c"}\n', r"x\.jsonl line 2: Alpaca shape needs 'output'"),
    ('{"instruction": "a", "output": "b"}\n{"prompt": "c", "completion": "d"}\n',
     r"x\.jsonl line 2 is prompt/completion but x\.jsonl line 1 is Alpaca: one shape per file"),
    ('', r"x\.jsonl is empty"),
    ('{"question": "a", "answer": "b"}\n', r"x\.jsonl line 1: no known shape \(has answer, question\)"),
    ('{"messages": [{"role": "user", "content": "hi"}]}\n', r"line 1: the conversation has no assistant turn"),
    ('{"conversations": [{"from": "robot", "value": "hi"}]}\n', r"line 1: turn 1 has role 'robot'"),
])
def test_malformed_input_is_a_clear_error_naming_the_line(tmp_path, content, says):
    path = tmp_path / "x.jsonl"
    path.write_text(content)
    with pytest.raises(ValueError, match=says):
        data.read(str(path))


def test_bad_input_is_refused_at_submit_naming_the_line(studio, base, tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "c"}\n')
    before = len(studio.jobs(limit=10_000))
    with pytest.raises(ValueError, match=r"bad\.jsonl line 2: prompt/completion shape needs 'completion'"):
        studio.submit("finetune", {"base": str(base), "data": str(path), "max_seq_len": 64})
    with pytest.raises(ValueError, match="max_seq_len 2048 is longer than tiny-llama was trained for"):
        studio.submit("finetune", {"base": str(base), "data": str(path)})
    with pytest.raises(ValueError, match="neither a preset"):
        studio.submit("finetune", {"base": "no-such-model", "data": str(path)})
    assert len(studio.jobs(limit=10_000)) == before


def test_answer_only_masking_is_exact_at_the_token_level(tok):
    ex = data.detect("t line 1", {"messages": [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Green."}, {"role": "user", "content": "Another?"},
        {"role": "assistant", "content": "Blue."}]})
    e = data.encode(ex, tok, 512)
    ids, labels = e["input_ids"], e["labels"]
    # the prompt of the first answer is exactly what the model is given at inference
    p1 = tok(tok.apply_chat_template(ex.messages[:3 - 1], tokenize=False, add_generation_prompt=True),
             add_special_tokens=False)["input_ids"]
    a1 = tok("Green.<|end|>\n", add_special_tokens=False)["input_ids"]
    p2 = tok("<|user|>\nAnother?<|end|>\n<|assistant|>\n", add_special_tokens=False)["input_ids"]
    a2 = tok("Blue.<|end|>\n", add_special_tokens=False)["input_ids"]
    assert ids == p1 + a1 + p2 + a2
    assert labels == [-100] * len(p1) + a1 + [-100] * len(p2) + a2
    assert tok.decode([t for t in labels if t != -100]) == "Green.<|end|>\nBlue.<|end|>\n"
    assert data.encode(ex, tok, 512, train_on_prompt=True)["labels"] == ids
    cut = data.encode(ex, tok, len(p1) + 2)  # truncation keeps the start, labels aligned
    assert cut["input_ids"] == ids[: len(p1) + 2] and cut["labels"] == labels[: len(p1) + 2] and cut["truncated"]
    # text: every token trained, the end-of-sequence token too
    t = data.encode(data.detect("t line 2", {"text": "plain words"}), tok, 512)
    assert t["labels"] == t["input_ids"] and t["input_ids"][-1] == tok.eos_token_id


def test_the_dev_split_is_seeded_5_percent_and_capped():
    items = list(range(1000))
    train_a, dev_a = data.split(items, 0.05, 200, seed=1)
    train_b, dev_b = data.split(items, 0.05, 200, seed=1)
    assert dev_a == dev_b and len(dev_a) == 50 and sorted(train_a + dev_a) == items
    assert data.split(items, 0.05, 200, seed=2)[1] != dev_a
    assert len(data.split(list(range(10_000)), 0.05, 200, seed=1)[1]) == 200  # capped
    assert len(data.split([1, 2], 0.05, 200, seed=1)[1]) == 1


# ---- the gate -------------------------------------------------------------------------------------------------
def cuda(total_gib):
    return DeviceReading(kind="cuda", name="Fake RTX", total=int(total_gib * GiB), used=0, free=int(total_gib * GiB),
                         studio_used=0, utilization=0, temperature=40, power_w=30.0, driver="fake", cuda="13.0")


def test_the_gate_sizes_an_8b_qlora_from_the_preset_config_and_suggests_what_fits():
    recipe = build(train.Params, {"data": "unused.jsonl"})  # the guide's recipe: 8B, qlora, seq 2048, r16, mb 1
    est = full_estimate(recipe, train.estimate, cuda(12))
    # measured on a GPU at this shape with the memory path the studio takes: 8.0 GiB (fused loss, bf16, 8-bit Adam)
    assert 7.2 * GiB < est.total < 9.0 * GiB, est.describe()
    assert est.parts["weights"] > 5 * GiB
    long = build(train.Params, {"data": "unused.jsonl", "max_seq_len": 8192})
    with pytest.raises(Refused) as r:
        gate(long, train.estimate, cuda(6), 6 * GiB, train.shrink)
    s = r.value.suggestion
    assert s and "Fits with" in r.value.reason, r.value.reason
    fitted = build(train.Params, {**{"data": "unused.jsonl", "max_seq_len": 8192}, **s})
    assert full_estimate(fitted, train.estimate, cuda(6)).total <= 6 * GiB
    assert s.get("base") == "Phi-3-mini-4k-instruct"  # the 8B's 4-bit weights alone leave no room under 6 GiB
    # under 12 GiB the 8B itself fits at a shorter sequence, and that is what is suggested
    with pytest.raises(Refused) as r12:
        gate(build(train.Params, {"data": "unused.jsonl", "max_seq_len": 65536, "micro_batch": 4}), train.estimate,
             cuda(12), 11 * GiB, train.shrink)
    assert "base" not in r12.value.suggestion and r12.value.suggestion["micro_batch"] == 1
    assert r12.value.suggestion["grad_accum"] == 64  # the effective batch is kept


def test_the_estimate_knows_checkpointing_sequence_length_and_method():
    def total(**kw):
        return train.estimate(build(train.Params, {"data": "x.jsonl", **kw}), cuda(24)).total

    assert total(gradient_checkpointing=False) > total() + 4 * GiB  # 32 layers of activations kept
    assert total(max_seq_len=4096) > total(max_seq_len=2048) > total(max_seq_len=1024)
    assert total(method="lora") > total() + 8 * GiB  # bf16 weights instead of 4-bit
    assert total(base="Phi-3-mini-4k-instruct") < total() - 2 * GiB


# ---- training through the studio -----------------------------------------------------------------------------------
def params(base, qa, **kw):
    return {"base": str(base), "data": str(qa), "eval_data": str(qa), "max_seq_len": 64, "micro_batch": 4,
            "grad_accum": 1, "lr": 1e-2, "warmup": 0, "threads": 2, **kw}


def metrics(studio, job_id):
    return [e for e in studio.events(job_id)[0] if e["type"] == "metric"]


def curve(studio, job_id):
    return {m["step"]: m["train_loss"] for m in metrics(studio, job_id) if "train_loss" in m}


def greedy(model, tok, question, n=16):
    import torch

    ids = tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=n, do_sample=False)
    return tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


def test_a_qlora_run_learns_and_its_reloaded_adapter_answers(studio, base, qa, tok):
    job = studio.wait(studio.submit("finetune", params(base, qa, max_steps=200, eval_every=100, save_every=100, lora_dropout=0.0)).id, 600)
    assert job.status is JobStatus.DONE, job.error
    r = job.result
    assert r["dev_loss"] < 0.25 * r["dev_loss_start"], r  # dev loss falls well below its start
    ms = metrics(studio, job.id)
    assert ms[0]["step"] == 0 and "dev_loss" in ms[0]  # evaluated before training
    step_metrics = [m for m in ms if "train_loss" in m]
    assert len(step_metrics) == 200 and all(m["lr"] is not None and m["tokens_per_s"] > 0 for m in step_metrics)
    assert step_metrics[-1]["eta_s"] == 0 and step_metrics[0]["eta_s"] > 0
    assert [m["step"] for m in ms if "dev_loss" in m and m["step"]] == [100, 200, 200]
    assert all(m["perplexity"] for m in ms if "dev_loss" in m)
    run = studio.run_dir(job.id)
    adapter = run / "adapter"
    assert (adapter / "adapter_model.safetensors").exists() and (adapter / "adapter_config.json").exists()
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(base) and cfg["r"] == 16
    card = json.loads((run / "run.json").read_text())
    assert card["data_hash"] == data.file_hash(str(qa)) and card["params"]["seed"] == 42
    assert all(k in card["versions"] for k in train.PACKAGES)
    report = json.loads((run / "data_report.json").read_text())
    assert report["examples"] == 12 and report["dev_source"] == "file"

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(str(base), quantization_config=q, device_map="cpu",
                                                 dtype=torch.float32)
    question, answer = QA[0]
    before = greedy(model, tok, question)
    tuned = PeftModel.from_pretrained(model, str(adapter))
    after = greedy(tuned, tok, question)
    assert answer not in before and after.startswith(answer), (before, after)
    recalled = [a for q_, a in QA if greedy(tuned, tok, q_).startswith(a)]
    assert len(recalled) >= 10, recalled  # memorised, not one lucky answer


@pytest.fixture(scope="module")
def straight(studio, base, qa):
    """An uninterrupted 24-step run: the loss curve the interrupted ones must follow."""
    job = studio.wait(studio.submit("finetune", params(base, qa, max_steps=24, save_every=4, eval_every=0,
                                                       lora_dropout=0.0)).id, 600)
    assert job.status is JobStatus.DONE, job.error
    return curve(studio, job.id)


def _resume_and_compare(studio, job, straight):
    saved = json.loads((studio.run_dir(job.id) / "checkpoint" / "state.json").read_text())["step"]
    assert 0 < saved < 24
    resumed = studio.wait(studio.resume(job.id).id, 600)
    assert resumed.status is JobStatus.DONE, resumed.error
    logs = [e["message"] for e in studio.events(resumed.id)[0] if e["type"] == "log"]
    assert any(f"resuming job {job.id} from step {saved}" in m for m in logs), logs
    after = curve(studio, resumed.id)
    assert min(after) == saved + 1 and max(after) == 24 and resumed.result["steps"] == 24
    for step, loss in after.items():  # the same data order, RNG and optimizer state: the same curve
        assert loss == pytest.approx(straight[step], rel=3e-3), (step, loss, straight[step])
    return saved


def test_resume_after_cancel_continues_at_the_saved_step_on_the_same_curve(studio, base, qa, straight):
    job = studio.submit("finetune", params(base, qa, max_steps=24, save_every=4, eval_every=0, lora_dropout=0.0))
    wait_for(lambda: len(curve(studio, job.id)) >= 6, 300, "six steps")
    studio.cancel(job.id)
    j = studio.wait(job.id, 120)
    assert j.status is JobStatus.CANCELLED and "Resume continues" in j.error
    _resume_and_compare(studio, j, straight)


def test_resume_after_kill_9_of_the_worker_continues_on_the_same_curve(studio, base, qa, straight):
    job = studio.submit("finetune", params(base, qa, max_steps=24, save_every=4, eval_every=0, lora_dropout=0.0))
    state = studio.run_dir(job.id) / "checkpoint" / "state.json"
    wait_for(lambda: state.exists() and json.loads(state.read_text())["step"] >= 8, 300, "a checkpoint at step 8")
    os.kill(studio.worker_info.pid, signal.SIGKILL)
    j = studio.wait(job.id, 120)
    assert j.status is JobStatus.INTERRUPTED
    _resume_and_compare(studio, j, straight)


def test_a_finished_run_is_extended_by_more_steps_from_its_last_checkpoint(studio, base, qa, straight):
    done = [j for j in studio.jobs(limit=10_000) if j.kind == "finetune" and j.status is JobStatus.DONE
            and j.params.get("max_steps") == 24 and not j.params.get("resume_from")][0]
    more = studio.wait(studio.submit("finetune", params(base, qa, max_steps=30, save_every=4, eval_every=0,
                                                       lora_dropout=0.0, resume_from=done.id)).id, 600)
    assert more.status is JobStatus.DONE, more.error
    assert sorted(curve(studio, more.id)) == list(range(25, 31)) and more.result["steps"] == 30


def test_a_checkpoint_changed_on_disk_is_not_loaded(studio, base, qa, straight, tmp_path):
    job = studio.submit("finetune", params(base, qa, max_steps=24, save_every=4, eval_every=0, lora_dropout=0.0))
    state = studio.run_dir(job.id) / "checkpoint" / "state.json"
    wait_for(lambda: state.exists(), 300, "a checkpoint")
    studio.cancel(job.id)
    studio.wait(job.id, 120)
    st = json.loads(state.read_text())
    weights = studio.run_dir(job.id) / "checkpoint" / st["dir"] / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)
    resumed = studio.wait(studio.resume(job.id).id, 300)
    assert resumed.status is JobStatus.FAILED and "changed since the studio wrote it" in resumed.error


# ---- out of memory ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def oom_kind():
    if "test_finetune_oom" not in registry.WORKERS:
        registry.register("test_finetune_oom", "helpers_finetune")
    return "test_finetune_oom"


def test_out_of_memory_saves_halves_the_micro_batch_doubles_accumulation_and_finishes(studio, base, qa, oom_kind):
    job = studio.wait(studio.submit(oom_kind, params(base, qa, max_steps=8, save_every=100, eval_every=0,
                                                     micro_batch=4, grad_accum=2, oom_at=3, oom_from=4)).id, 600)
    assert job.status is JobStatus.DONE, job.error
    ooms = [e for e in studio.events(job.id)[0] if e["type"] == "oom"]
    assert len(ooms) == 1 and ooms[0]["step"] == 3 and ooms[0]["micro_batch"] == 2 and ooms[0]["grad_accum"] == 4
    assert "saved a checkpoint at step 3, micro_batch now 2, grad_accum 4" in ooms[0]["message"]
    assert job.result["micro_batch"] == 2 and job.result["grad_accum"] == 4 and job.result["steps"] == 8
    steps = sorted(curve(studio, job.id))
    assert steps == list(range(1, 9))  # continued from the checkpoint: steps 4..8 once each, none repeated


def test_a_second_out_of_memory_at_micro_batch_1_stops_with_a_suggestion(studio, base, qa, oom_kind):
    job = studio.wait(studio.submit(oom_kind, params(base, qa, max_steps=8, save_every=100, eval_every=0,
                                                     micro_batch=2, grad_accum=2, oom_at=2, oom_from=1)).id, 600)
    assert job.status is JobStatus.FAILED
    assert "Out of memory at step 3 with micro_batch 1" in job.error and "Lower max_seq_len" in job.error
    assert "checkpoint at step 2 is kept" in job.error
    assert [e["micro_batch"] for e in studio.events(job.id)[0] if e["type"] == "oom"] == [1]
