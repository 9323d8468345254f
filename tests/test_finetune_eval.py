"""The finetune kind's evaluation: dev loss before and after, the base's and the tuned model's greedy answers to dev
prompts side by side with ROUGE-L, every generated token a cancel point; and the Fine-tune tab showing a run's answers
and every run side by side (gradio_client). A tiny Llama built from a config (tests/finetune_fixtures.py); CPU,
offline."""
import json
import time

import pytest
from conftest import wait_for
from finetune_fixtures import QA, make_tiny_llama, write_qa

from studio import JobStatus
from workers.finetune import data, train

pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("ft-eval") / "tiny-llama")


@pytest.fixture(scope="module")
def qa(tmp_path_factory):
    return write_qa(tmp_path_factory.mktemp("ft-eval-data") / "qa.jsonl")


def params(base, qa, **kw):
    # the dev set is the training file itself: the prompts answered are pairs the run memorises
    return {"base": str(base), "data": str(qa), "eval_data": str(qa), "max_seq_len": 64, "micro_batch": 4,
            "grad_accum": 1, "lr": 1e-2, "warmup": 0, "threads": 2, "lora_dropout": 0.0, "eval_every": 0,
            "save_every": 1000, **kw}


@pytest.fixture(scope="module")
def memorised(studio, base, qa):
    job = studio.wait(studio.submit("finetune", params(base, qa, max_steps=250)).id, 600)
    assert job.status is JobStatus.DONE, job.error
    return job


@pytest.fixture(scope="module")
def short(studio, base, qa, memorised):
    """A second run that changes the rank and trains far less: the one the first is compared with."""
    job = studio.wait(studio.submit("finetune", params(base, qa, max_steps=4, lora_r=4, lora_alpha=8,
                                                       eval_prompts=3)).id, 600)
    assert job.status is JobStatus.DONE, job.error
    return job


def test_the_memorising_run_answers_dev_prompts_better_than_its_base(studio, memorised):
    from rouge_score import rouge_scorer

    r = memorised.result
    side = r["side_by_side"]
    assert [s["prompt"] for s in side] == [q for q, _ in QA[:5]]  # eval_prompts=5 by default, in dev-set order
    assert [s["reference"] for s in side] == [a for _, a in QA[:5]]
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    for s in side:
        for who in ("base", "tuned"):
            assert s[f"rouge_l_{who}"] == pytest.approx(scorer.score(s["reference"], s[who])["rougeL"].fmeasure,
                                                         abs=1e-4)
    assert r["rouge_l_tuned"] > r["rouge_l_base"] + 0.5, side
    assert r["rouge_l_tuned"] >= 0.9, side  # trained pairs: the tuned model says them back
    assert sum(s["tuned"] == s["reference"] for s in side) >= 4, side
    assert r["rouge_l_base"] < 0.3 and not any(s["base"] == s["reference"] for s in side), side
    assert r["rouge_l_base"] == pytest.approx(sum(s["rouge_l_base"] for s in side) / 5, abs=1e-3)
    assert r["dev_loss_after"] < 0.25 * r["dev_loss_before"] and r["dev_loss_before"] == r["dev_loss_start"]
    assert r["train_examples"] == 12 and r["dev_examples"] == 12
    assert json.loads((studio.run_dir(memorised.id) / "evaluation.json").read_text()) == side


def test_the_base_answers_are_the_base_models_own(memorised, base):
    """The base column is the base model's, asked before training: loaded afresh in 4-bit, it answers the same."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    tok = AutoTokenizer.from_pretrained(str(base))
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(str(base), quantization_config=q, device_map="cpu",
                                                 dtype=torch.float32)
    for s in memorised.result["side_by_side"]:
        # the prompt exactly as training renders it: the chat template with the generation prompt
        rendered = tok.apply_chat_template([{"role": "user", "content": s["prompt"]}], tokenize=False,
                                           add_generation_prompt=True)
        ids = torch.tensor([tok(rendered, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=96,
                                 do_sample=False, pad_token_id=tok.pad_token_id)
        assert tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip() == s["base"]


def test_a_run_extended_from_a_checkpoint_keeps_the_base_answers_and_the_starting_dev_loss(studio, base, qa,
                                                                                          memorised):
    more = studio.wait(studio.submit("finetune", params(base, qa, max_steps=252, resume_from=memorised.id)).id, 600)
    assert more.status is JobStatus.DONE, more.error
    r, first = more.result, memorised.result
    assert r["steps"] == 252 and r["dev_loss_before"] == first["dev_loss_before"]  # the first run's start
    assert [s["base"] for s in r["side_by_side"]] == [s["base"] for s in first["side_by_side"]]
    assert r["rouge_l_tuned"] >= 0.9


def test_eval_prompts_are_rendered_as_training_sees_them(base, qa):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(base))
    examples = data.read(str(qa))
    prompts = train.eval_set(examples, tok, 64, 3)
    assert len(prompts) == 3
    for ex, pr in zip(examples, prompts):
        enc = data.encode(ex, tok, 64)
        n_prompt = enc["labels"].index(next(t for t in enc["labels"] if t != -100))
        assert pr["ids"] == enc["input_ids"][:n_prompt]  # every token before the trained answer, nothing more
        assert tok.decode(pr["ids"]).endswith("<|assistant|>\n")
    # multi-turn: the earlier turns are context, the last answer is the reference; plain text has no question
    turns = data.detect("t line 1", {"messages": [
        {"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Green."},
        {"role": "user", "content": "Another?"}, {"role": "assistant", "content": "Blue."}]})
    text = data.detect("t line 2", {"text": "plain words"})
    (pr,) = train.eval_set([text, turns], tok, 64, 5)
    assert pr["prompt"] == "Another?" and pr["reference"] == "Blue."
    assert tok.decode(pr["ids"]).endswith("Green.<|end|>\n<|user|>\nAnother?<|end|>\n<|assistant|>\n")
    assert train.eval_set(examples, tok, 8, 5) == []  # a prompt that fills max_seq_len was never trained
    assert train.eval_set(examples, tok, 64, 0) == []


def test_generating_the_dev_answers_is_cancellable_at_every_token(studio, base, qa):
    # the untrained base runs on for the whole budget: long enough to cancel in the middle of an answer
    job = studio.submit("finetune", params(base, qa, max_steps=1, eval_prompts=12, eval_new_tokens=400))

    def answering():
        evs = studio.events(job.id)[0]
        return any(e["type"] == "progress" and "model's answer, " in (e.get("message") or "") for e in evs)

    wait_for(answering, 300, "a dev answer being generated")
    t0 = time.monotonic()
    studio.cancel(job.id)
    j = studio.wait(job.id, 120)
    assert j.status is JobStatus.CANCELLED, (j.status, j.error)
    assert time.monotonic() - t0 < 10
    assert not (studio.run_dir(job.id) / "evaluation.json").exists()


def test_bad_eval_params_are_refused_at_submit(studio, base, qa):
    for bad, says in (({"eval_prompts": -1}, "eval_prompts must be between 0 and 100"),
                      ({"eval_new_tokens": 0}, "eval_new_tokens must be between 1 and 1024")):
        with pytest.raises(ValueError, match=says):
            studio.submit("finetune", params(base, qa, **bad))


# ---- the tab ---------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def served(studio):
    from conftest import serve

    url, demo = serve(studio, show_error=True)
    yield url
    demo.close()


def _rows(table):
    return table["data"] if isinstance(table, dict) else table


def test_the_tab_shows_a_runs_answers_and_the_runs_side_by_side(served, memorised, short):
    from gradio_client import Client

    client = Client(served, verbose=False)
    evaluation, runs = client.predict(run=memorised.id, api_name="/finetune_runs")
    rows = _rows(evaluation)
    side = memorised.result["side_by_side"]
    assert [row[:4] for row in rows] == [[s["prompt"], s["reference"], s["base"], s["tuned"]] for s in side]
    assert [row[4:] for row in rows] == [[round(s["rouge_l_base"], 3), round(s["rouge_l_tuned"], 3)] for s in side]
    table = {row[0]: row for row in _rows(runs)}
    ids = list(table)
    assert ids[0] == short.id and ids.index(short.id) < ids.index(memorised.id)  # newest first
    for job, r in ((memorised, 16), (short, 4)):
        row, res = table[job.id], job.result
        assert row[1] == "tiny-llama" and row[2] == "qlora" and int(row[3]) == r and row[4] == "qa.jsonl"
        assert row[5] == "12 train · 12 dev" and int(row[6]) == res["steps"]
        assert row[7] == f"{res['dev_loss_before']:.3f} → {res['dev_loss_after']:.3f}"
        assert row[8] == f"{res['rouge_l_base']:.3f} → {res['rouge_l_tuned']:.3f}"
    assert len(short.result["side_by_side"]) == 3
    # a page load fills both: every run side by side, and the newest run's answers
    filled = client.predict(api_name="/finetune_fill")
    tables = [x["data"] for x in filled if isinstance(x, dict) and "headers" in x]
    assert any([row[0] for row in t] == ids for t in tables), filled
    assert any(len(t) == 3 and t[0][0] == QA[0][0] for t in tables), filled  # the short run's 3 answers
