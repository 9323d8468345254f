"""vision_check and vision_finetune: the data report names missing and unreadable images and malformed lines with their
line and counts the image's tokens; LLaVA's conversation JSON and a zip of images read like the JSONL beside its
images; answer-only masks are exact token by token against the processor's own inference encoding; a QLoRA run on
four solid-colour images, each with its own answer to the same question, learns (a fresh model with the reloaded
adapter answers each image with its own answer, the base does not); resume after cancel continues at the saved step;
the gate sizes the LLaVA-1.5-7B preset from its config and refuses with a change that fits; the Fine-tune sub-tab
through gradio_client. A tiny LLaVA built in the test (tests/vision_fixtures.py); CPU, offline."""
import json
import zipfile

import pytest
from conftest import FakeNvml, free_port, wait_for
from vision_fixtures import (COLOURS, IMAGE_TOKENS, QUESTION, make_tiny_llava, write_images, write_llava_json,
                             write_pairs)

from studio import JobStatus
from studio.config import GiB
from studio.gate import Refused, full_estimate, gate
from studio.params import build
from workers.vision import data, train

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return make_tiny_llava(tmp_path_factory.mktemp("vlm") / "tiny-llava")


@pytest.fixture(scope="module")
def enc(base):
    from transformers import AutoProcessor

    from workers.vision.model import config_of

    return data.Encoder.of(AutoProcessor.from_pretrained(str(base)), config_of(str(base)))


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """The four colours beside pairs.jsonl (image paths relative to it), each with its own answer."""
    d = tmp_path_factory.mktemp("pairs")
    return write_pairs(d / "pairs.jsonl", write_images(d))


def fast(base, pairs, **kw):
    """A run that memorises the four pairs on two CPU cores: every pair in each step, a high learning rate."""
    return {"base": str(base), "data": str(pairs), "eval_data": str(pairs), "max_seq_len": 128, "micro_batch": 4,
            "grad_accum": 1, "lr": 1e-2, "warmup": 0, "lora_r": 8, "lora_alpha": 16, "lora_dropout": 0.0,
            "eval_new_tokens": 24, "threads": 2, **kw}


def prompt_of(question=QUESTION):
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]


# ---- the data report -------------------------------------------------------------------------------------------------
def test_the_report_names_missing_unreadable_and_malformed_lines_and_counts_image_tokens(studio, base, pairs, enc,
                                                                                         tmp_path):
    write_images(tmp_path)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a picture")
    rows = [json.dumps({"image": f"{c}.png", "question": QUESTION, "answer": a}) for c, (_, a) in COLOURS.items()]
    rows += [json.dumps({"image": "gone.png", "question": QUESTION, "answer": "x"}),
             json.dumps({"image": "broken.png", "question": QUESTION, "answer": "y"}),
             '{"image": "red.png", "question": "cut off',
             json.dumps({"image": "red.png", "question": QUESTION})]
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(rows) + "\n")
    job = studio.wait(studio.submit("vision_check", {"base": str(base), "data": str(bad), "max_seq_len": 57}).id, 120)
    assert job.status is JobStatus.DONE, job.error
    r = job.result["report"]
    assert json.loads((studio.run_dir(job.id) / "data_report.json").read_text()) == r
    assert [e["report"] for e in studio.events(job.id)[0] if e["type"] == "data_report"] == [r]
    assert r["pairs"] == 6 and r["usable"] == 4 and r["per_shape"] == {"pair": 6}
    assert [(m["where"], m["image"]) for m in r["missing_images"]] == [("bad.jsonl line 5", "gone.png")]
    assert [(u["where"], u["image"]) for u in r["unreadable_images"]] == [("bad.jsonl line 6", "broken.png")]
    assert "unreadable" in r["unreadable_images"][0]["reason"]
    assert [m["where"] for m in r["malformed"]] == ["bad.jsonl line 7", "bad.jsonl line 8"]
    assert "not valid JSON" in r["malformed"][0]["error"] and "needs 'answer'" in r["malformed"][1]["error"]
    # token lengths count the image's 16 tokens; max_seq_len 57 cuts the three longer answers
    lengths = [enc.encode(p, 10_000)["length"] for p in data.read(str(pairs))[0]]
    assert r["image_tokens"] == IMAGE_TOKENS and r["tokens"]["min"] == min(lengths) > IMAGE_TOKENS + 20
    assert r["truncated"] == sum(n > 57 for n in lengths) == 3
    first = r["preview"][0]  # rendered with the processor's chat template: the prompt masked, the answer trained
    assert [s["trained"] for s in first["segments"]] == [False, True]
    assert first["segments"][0]["text"] == f"<s><|user|>\n<image>×{IMAGE_TOKENS}\n{QUESTION}<|end|>\n<|assistant|>\n"
    assert first["segments"][1]["text"] == COLOURS["red"][1] + "<|end|>\n"
    html = data.report_html(r)
    assert "bad.jsonl line 5: gone.png" in html and "bad.jsonl line 6: broken.png" in html and "ft-trained" in html
    # training refuses the file at submit, naming the first malformed line (Check data lists them all)
    before = len(studio.jobs(limit=10_000))
    with pytest.raises(ValueError, match=r"bad\.jsonl line 7: not valid JSON"):
        studio.submit("vision_finetune", fast(base, bad))
    assert len(studio.jobs(limit=10_000)) == before


def test_llava_json_and_a_zip_of_images_read_like_the_jsonl_beside_its_images(tmp_path, pairs, enc):
    folder = tmp_path / "llava"
    imgs = write_images(tmp_path / "loose")
    folder.mkdir()
    with zipfile.ZipFile(folder / "images.zip", "w") as z:  # beside the data file, found without naming it
        for name, path in imgs.items():
            z.write(path, f"pics/{path.name}")
    doc = write_llava_json(folder / "llava.json", imgs)
    rows = json.loads(doc.read_text())
    for r in rows:
        r["image"] = f"pics/{r['image']}"
    doc.write_text(json.dumps(rows))
    found, missing, unreadable = data.locate(data.read(str(doc))[0], data.Images(str(doc), "", tmp_path / "cache",
                                                                                confined=True))
    assert len(found) == 4 and not missing and not unreadable
    jsonl = {p.answer(): enc.encode(p, 512) for p in data.read(str(pairs))[0]}
    for pair, path in found:
        assert pair.shape == "llava" and path.parent.name == "pics" and path.is_relative_to(tmp_path / "cache")
        assert enc.encode(pair, 512) == jsonl[pair.answer()]  # the same tokens and masks as the pair shape
    # a zip named by `images`, elsewhere; a zip that reaches outside itself is refused
    (tmp_path / "z.jsonl").write_text(json.dumps({"image": "pics/red.png", "question": "q", "answer": "a"}) + "\n")
    zipped = data.Images(str(tmp_path / "z.jsonl"), str(folder / "images.zip"), tmp_path / "cache", True)
    assert [p.name for _, p in data.locate(data.read(str(tmp_path / "z.jsonl"))[0], zipped)[0]] == ["red.png"]
    evil = tmp_path / "evil.zip"
    with zipfile.ZipFile(evil, "w") as z:
        z.writestr("../../escape.png", b"x")
    with pytest.raises(ValueError, match="outside itself"):
        data.Images(str(tmp_path / "z.jsonl"), str(evil), tmp_path / "cache", True).roots()
    # with a login an absolute path outside the data's folder is not read; without one it is
    (tmp_path / "abs.jsonl").write_text(json.dumps({"image": str(imgs["red"]), "question": "q", "answer": "a"}) + "\n")
    abs_pairs = data.read(str(tmp_path / "abs.jsonl"))[0]
    sub = tmp_path / "sub"
    sub.mkdir()
    (sub / "abs.jsonl").write_text((tmp_path / "abs.jsonl").read_text())
    _, missing, _ = data.locate(abs_pairs, data.Images(str(sub / "abs.jsonl"), "", tmp_path / "cache", True))
    assert missing and "outside the data's folder" in missing[0]["reason"]
    assert data.locate(abs_pairs, data.Images(str(sub / "abs.jsonl"), "", tmp_path / "cache", False))[0]


# ---- masks ---------------------------------------------------------------------------------------------------------
def test_answer_only_masking_is_exact_token_by_token(enc, pairs):
    from PIL import Image

    proc, tok = enc.processor, enc.tokenizer
    pair = data.read(str(pairs))[0][0]
    e = enc.encode(pair, 512)
    # the prompt is exactly what the processor gives the model at inference: the chat template, <image> expanded
    asked = proc.apply_chat_template(prompt_of(), add_generation_prompt=True, tokenize=True, return_dict=True,
                                     images=[Image.new("RGB", (40, 30), COLOURS["red"][0])])["input_ids"][0]
    answer = tok(COLOURS["red"][1] + "<|end|>\n", add_special_tokens=False)["input_ids"]
    assert e["input_ids"] == list(asked) + answer
    assert e["labels"] == [-100] * len(asked) + answer
    assert e["input_ids"].count(enc.image_id) == IMAGE_TOKENS and e["labels"][len(asked) - 1] == -100
    assert tok.decode([t for t in e["labels"] if t != -100]) == COLOURS["red"][1] + "<|end|>\n"
    # LLaVA's multi-turn conversation: every answer trained, every later question masked
    two = data.detect("t item 1", {"image": "red.png", "conversations": [
        {"from": "human", "value": f"{QUESTION}\n<image>"}, {"from": "gpt", "value": "Red."},
        {"from": "human", "value": "And the code?"}, {"from": "gpt", "value": "4417."}]})
    e2 = enc.encode(two, 512)
    q2 = tok("<|user|>\nAnd the code?<|end|>\n<|assistant|>\n", add_special_tokens=False)["input_ids"]
    a1, a2 = (tok(t, add_special_tokens=False)["input_ids"] for t in ("Red.<|end|>\n", "4417.<|end|>\n"))
    n1 = len(e2["input_ids"]) - len(a1) - len(q2) - len(a2)
    assert e2["labels"] == [-100] * n1 + a1 + [-100] * len(q2) + a2
    # the image stays where <image> stood in the human turn (after the question here)
    image = "<image>" * IMAGE_TOKENS
    assert tok.decode(e2["input_ids"][:n1]) == f"<s><|user|>\n{QUESTION}{image}\n<|end|>\n<|assistant|>\n"
    # cut inside the image's tokens: the example cannot train (the model needs them whole)
    assert enc.encode(pair, 10)["image_cut"] and not enc.encode(pair, 40)["image_cut"]
    # a template that writes no end of turn (llava-hf's "USER: … ASSISTANT: answer"): the EOS is appended and trained
    plain = data.Encoder(type(proc).from_pretrained(proc.tokenizer.name_or_path), enc.image_tokens, enc.end_ids)
    plain.processor.chat_template = (
        "{% for m in messages %}{{ m['role'].upper() }}: {% for c in m['content'] %}{% if c['type'] == 'image' %}"
        "<image>\n{% else %}{{ c['text'] }} {% endif %}{% endfor %}{% endfor %}"
        "{% if add_generation_prompt %}ASSISTANT:{% endif %}")
    e3 = plain.encode(pair, 512)
    assert e3["labels"][-1] == tok.eos_token_id and e3["input_ids"][-1] == tok.eos_token_id
    trained = tok.decode([t for t in e3["labels"] if t != -100])
    assert trained == f" {COLOURS['red'][1]} </s>"


# ---- training ------------------------------------------------------------------------------------------------------
def greedy(model, proc, colour, n=24):
    import torch
    from PIL import Image

    inputs = proc.apply_chat_template(prompt_of(), add_generation_prompt=True, tokenize=True, return_dict=True,
                                      return_tensors="pt", images=[Image.new("RGB", (40, 30), COLOURS[colour][0])])
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=n, do_sample=False)
    return proc.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def metrics(studio, job_id):
    return [e for e in studio.events(job_id)[0] if e["type"] == "metric"]


def test_a_qlora_run_learns_each_image_and_its_reloaded_adapter_answers(studio, base, pairs, enc):
    job = studio.wait(studio.submit("vision_finetune", fast(base, pairs, max_steps=40, eval_every=20,
                                                            save_every=20)).id, 300)
    assert job.status is JobStatus.DONE, job.error
    r, run = job.result, studio.run_dir(job.id)
    assert r["steps"] == 40 and r["dev_loss_after"] < 0.1 * r["dev_loss_before"], r
    # before/after on the dev images side by side: the tuned model gives each image its answer, the base does not
    rows = json.loads((run / "evaluation.json").read_text())
    assert rows == r["side_by_side"] and len(rows) == 4
    for row in rows:
        colour = row["image"].rsplit("/", 1)[-1].removesuffix(".png")
        assert row["reference"] == COLOURS[colour][1] == row["tuned"] and row["rouge_l_tuned"] == 1.0
        assert row["base"] != row["reference"] and row["rouge_l_base"] < 0.5
    assert r["rouge_l_tuned"] == 1.0 > r["rouge_l_base"]
    ms = metrics(studio, job.id)
    assert ms[0]["step"] == 0 and "dev_loss" in ms[0]  # evaluated before training
    assert len([m for m in ms if "train_loss" in m]) == 40
    assert [m["step"] for m in ms if "dev_loss" in m and m["step"]] == [20, 40, 40]
    events = studio.events(job.id)[0]
    report = next(e["report"] for e in events if e["type"] == "data_report")
    assert report == json.loads((run / "data_report.json").read_text()) and report["usable"] == 4
    # the adapter: PEFT safetensors, LoRA on the language model only, the projector saved whole, the base named
    adapter = run / "adapter"
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(base) and cfg["modules_to_save"] == ["multi_modal_projector"]
    assert (adapter / "processor_config.json").exists() and (adapter / "chat_template.jinja").exists()
    from safetensors import safe_open

    with safe_open(str(adapter / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert any("language_model" in k and "lora_A" in k for k in keys)
    assert not any("vision_tower" in k for k in keys) and any("multi_modal_projector" in k for k in keys)
    card = json.loads((run / "run.json").read_text())
    assert card["base"] == str(base) and card["data_hash"] == data.file_hash(str(pairs)) and card["train_projector"]
    from workers.finetune.adapter import adapter_base, adapter_dir

    assert adapter_dir(job.id, studio.config.data_dir) == adapter.resolve()
    assert adapter_base(adapter) == str(base)  # Vision chat's adapter= finds its base through the run card

    # a fresh 4-bit model with the adapter loaded from the folder answers each image with its own answer
    from peft import PeftModel
    from transformers import AutoProcessor

    proc = AutoProcessor.from_pretrained(str(adapter))
    model = train.load_model(str(base), str(base), cuda=False)
    before = {c: greedy(model, proc, c) for c in COLOURS}
    tuned = PeftModel.from_pretrained(model, str(adapter)).eval()
    after = {c: greedy(tuned, proc, c) for c in COLOURS}
    for c, (_, answer) in COLOURS.items():
        assert after[c] == answer, after
        assert answer not in before[c], before
    # and through Vision chat, as "Chat with it" runs it: the job id as adapter, the model left empty (its base)
    images = {p.stem: p for p in pairs.parent.rglob("*.png")}
    chat = studio.wait(studio.submit("vision_chat", {"adapter": job.id, "image": str(images["blue"]),
                                                     "prompt": QUESTION, "temperature": 0, "max_tokens": 32,
                                                     "n_ctx": 512}).id, 300)
    assert chat.status is JobStatus.DONE, chat.error
    assert chat.result["answer"].strip() == COLOURS["blue"][1] and chat.params["adapter"] == job.id


def test_resume_after_cancel_continues_at_the_saved_step(studio, base, pairs):
    p = fast(base, pairs, max_steps=40, save_every=3, eval_every=0, eval_prompts=0)
    job = studio.submit("vision_finetune", p)
    losses = lambda j: {m["step"]: m["train_loss"] for m in metrics(studio, j) if "train_loss" in m}  # noqa: E731
    wait_for(lambda: len(losses(job.id)) >= 5, 120, "five steps")
    studio.cancel(job.id)
    j = studio.wait(job.id, 120)
    assert j.status is JobStatus.CANCELLED and "Resume continues" in j.error
    saved = json.loads((studio.run_dir(job.id) / "checkpoint" / "state.json").read_text())["step"]
    first = losses(job.id)
    assert saved in (max(first), max(first) + 1) and saved >= 5  # cancel saves where it stopped (its loss may
    # not be logged: the metric call is the cancel point that stopped it)
    resumed = studio.wait(studio.resume(job.id).id, 300)
    assert resumed.status is JobStatus.DONE, resumed.error
    assert resumed.params["resume_from"] == job.id
    logs = [e["message"] for e in studio.events(resumed.id)[0] if e["type"] == "log"]
    assert any(f"resuming job {job.id} from step {saved}" in m for m in logs), logs
    after = losses(resumed.id)
    assert sorted(after) == list(range(saved + 1, 41)) and resumed.result["steps"] == 40
    assert after[40] < first[1]  # the same run, further down its curve


def test_out_of_memory_halves_the_micro_batch_doubles_accumulation_and_finishes(studio, base, pairs):
    from studio import registry

    if "test_vision_oom" not in registry.WORKERS:
        registry.register("test_vision_oom", "helpers_vision")
    job = studio.wait(studio.submit("test_vision_oom", fast(base, pairs, max_steps=6, save_every=100, eval_every=0,
                                                            eval_prompts=0, grad_accum=2, oom_at=3, oom_from=4)).id,
                      300)
    assert job.status is JobStatus.DONE, job.error
    ooms = [e for e in studio.events(job.id)[0] if e["type"] == "oom"]
    assert [(e["step"], e["micro_batch"], e["grad_accum"]) for e in ooms] == [(3, 2, 4)]
    assert job.result["micro_batch"] == 2 and job.result["grad_accum"] == 4 and job.result["steps"] == 6
    assert sorted(m["step"] for m in metrics(studio, job.id) if "train_loss" in m) == list(range(1, 7))


# ---- the gate ----------------------------------------------------------------------------------------------------
def test_the_gate_sizes_llava_7b_qlora_from_the_preset_and_refuses_with_a_change_that_fits():
    card = FakeNvml().read()  # a 12 GiB card
    recipe = build(train.Params, {"data": "unused.jsonl"})  # llava-1.5-7b-hf, seq 1024, r16, projector trained
    est = full_estimate(recipe, train.estimate, card)
    # measured on a GPU at this shape: 6.2 GiB NVML peak with the CUDA context (the goal: at most 8 GiB)
    assert 6.2 * 0.9 * GiB <= est.total <= 6.2 * 1.1 * GiB, est.describe()
    assert 3.8 * GiB < est.parts["weights"] < 4.8 * GiB and "576 image tokens" in est.note

    def total(**kw):
        return full_estimate(build(train.Params, {"data": "x.jsonl", **kw}), train.estimate, card).total

    assert total(max_seq_len=2048) > est.total + 0.5 * GiB and total(gradient_checkpointing=False) > est.total + 3 * GiB
    assert total(micro_batch=4) > est.total and total(train_projector=False) < est.total
    big = {"data": "x.jsonl", "max_seq_len": 4096, "micro_batch": 4}
    with pytest.raises(Refused) as r:
        gate(build(train.Params, big), train.estimate, card, 7 * GiB, train.shrink)
    s = r.value.suggestion
    assert s and "Fits with" in r.value.reason, r.value.reason
    assert s["micro_batch"] == 1 and s["grad_accum"] == 64  # the effective batch is kept
    assert full_estimate(build(train.Params, {**big, **s}), train.estimate, card).total <= 7 * GiB


def test_bad_input_is_refused_at_submit_with_what_to_do(studio, base, pairs, tmp_path):
    before = len(studio.jobs(limit=10_000))
    cases = [({"max_seq_len": 20}, "leaves no room for text after the image's 16 tokens"),
             ({"images": str(tmp_path / "nope.zip")}, "images not found"),
             ({"base": "llava-1.5-7b-q4k"}, "is a GGUF model"),
             ({"data": str(pairs.parent)}, "name the pairs file itself"),
             ({"max_seq_len": 4096}, "longer than tiny-llava was trained for"),
             ({"resume_from": "0000-000000-abcd"}, "no vision fine-tuning checkpoint")]
    for change, says in cases:
        with pytest.raises(ValueError, match=says):
            studio.submit("vision_finetune", {**fast(base, pairs), **change})
    with pytest.raises(ValueError, match="target_modules"):
        train.lora_targets("q_proj; drop table")
    assert len(studio.jobs(limit=10_000)) == before


# ---- the Fine-tune sub-tab through gradio_client -------------------------------------------------------------------
@pytest.fixture(scope="module")
def served(studio):
    """The sub-tab as tabs.vision mounts it: build_train in a tab, the Chat sub-tab's model and adapter beside it,
    wire_use, fill and re-attach."""
    import gradio as gr

    from tabs import common
    from tabs import vision_finetune as vf

    with gr.Blocks() as demo:
        with gr.Tabs() as tabs:
            with gr.Tab("Chat", id="vision_chat_sub"):
                model = gr.Dropdown([], allow_custom_value=True, label="Model")
                adapter = gr.Textbox(label="Adapter")
            with gr.Tab("Fine-tune", id="vision_ft_sub"):
                ui = vf.build_train(studio)
        ui |= {"model": model, "adapter": adapter}
        vf.wire_use(studio, ui, tabs)
        common.fill_on_load(demo, studio, "vision", ui, vf.fill, False)
        common.reattach(demo, studio, "vision", ui, vf.KINDS, False, vf.FORMS)
    port = free_port()
    demo.queue().launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    yield f"http://127.0.0.1:{port}/"
    demo.close()


def test_the_sub_tab_checks_trains_live_resumes_compares_chats_and_applies_the_gates_change(served, studio, base, tmp_path):
    from gradio_client import Client, handle_file

    from tabs.common import offer_fix
    from tabs.vision_finetune import FIX_INPUTS

    client = Client(served, verbose=False)
    imgs = write_images(tmp_path)
    pairs = write_pairs(tmp_path / "mine.jsonl", imgs, repeat=2)
    with open(pairs, "a") as f:
        f.write(json.dumps({"image": "lost.png", "question": QUESTION, "answer": "?"}) + "\n")
    dev = write_pairs(tmp_path / "dev.jsonl", imgs)
    files = [handle_file(str(pairs))] + [handle_file(str(p)) for p in imgs.values()]
    data_in = dict(vf_files=files, vf_eval_file=handle_file(str(dev)), vf_data_path="", vf_images_path="",
                   vf_eval_path="")
    report = client.predict(**data_in, vf_base=str(base), vf_max_seq_len=128, vf_seed=42, api_name="/vision_ft_check")
    assert "<b>9 pairs</b> in mine.jsonl, dev.jsonl" in report and "mine.jsonl line 9: lost.png" in report, report
    assert f"&lt;image&gt;×{IMAGE_TOKENS}" in report and "ft-trained" in report
    form = dict(vf_base=str(base), vf_max_seq_len=128, vf_epochs=1, vf_max_steps=12, vf_lr=1e-2, vf_lora_r=8,
                vf_lora_alpha=16, vf_lora_dropout=0.0, vf_target_modules="all-linear", vf_train_projector=True,
                vf_micro_batch=2, vf_grad_accum=1, vf_eval_every=0, vf_eval_prompts=2, vf_seed=42)
    live = client.submit(**data_in, **form, api_name="/vision_ft_train")
    wait_for(lambda: any(j.kind == "vision_finetune" and j.status is JobStatus.RUNNING
                         for j in studio.jobs(limit=5)), 60, "the tab's job")
    job = studio.jobs(limit=1, kind="vision_finetune")[0]
    wait_for(lambda: len([m for m in metrics(studio, job.id) if "train_loss" in m]) >= 3, 120, "three steps")
    studio.cancel(job.id)
    status, plot, stats, shown, evaluation, run, *_ = live.result()
    assert studio.job(job.id).status is JobStatus.CANCELLED and "CANCELLED" in status
    assert job.params["data"].endswith("mine.jsonl") and job.params["max_steps"] == 12
    assert job.params["eval_data"] == job.params["data"].replace("mine.jsonl", "dev.jsonl")  # one folder
    assert plot is not None and "train loss" in stats and "mine.jsonl line 9: lost.png" in shown
    status, plot, stats, shown, evaluation, run, *_ = client.predict(api_name="/vision_ft_resume")
    resumed = studio.jobs(limit=1, kind="vision_finetune")[0]
    assert resumed.resume_of == job.id and resumed.status is JobStatus.DONE and "DONE" in status, status
    steps = sorted(m["step"] for m in metrics(studio, resumed.id) if "train_loss" in m)
    assert steps[0] > 1 and steps[-1] == 12  # continued from the checkpoint, not from the start
    assert "adapter saved" in stats
    table = evaluation["data"] if isinstance(evaluation, dict) else evaluation
    assert len(table) == 2 and all(row[0].endswith(".png") and row[1] == QUESTION for row in table)
    assert all(row[2] in {a for _, a in COLOURS.values()} for row in table)  # each dev image with its reference
    model, adapter = client.predict(picked="", api_name="/vision_ft_chat")  # the Tabs switch has no value for a client
    assert (model, adapter) == (str(base), resumed.id)
    # over the budget: refused, and Apply offers the gate's change that fits (the 7B preset, 4096 tokens, batch 64)
    huge = {**form, "vf_base": "llava-1.5-7b-hf", "vf_max_seq_len": 4096, "vf_micro_batch": 64}
    status, *_ = client.predict(**data_in, **huge, api_name="/vision_ft_train")
    refused = studio.jobs(limit=1, kind="vision_finetune")[0]
    assert refused.status is JobStatus.REFUSED and "REFUSED" in status, status
    change = next(e["suggestion"] for e in studio.events(refused.id)[0] if e["type"] == "end")
    button, offered = offer_fix(studio, refused.id, None, FIX_INPUTS)  # what /vision_ft_fix_offer shows
    assert button["visible"] and button["value"].startswith("Apply: Micro-batch 1, Accumulation 64"), button
    client.predict(api_name="/vision_ft_fix_offer")  # the page runs it after Train (a Button is not an API output)
    shown = dict(zip(FIX_INPUTS, client.predict(api_name="/vision_ft_apply_fix")))
    assert offered == {FIX_INPUTS[k][0]: v for k, v in change.items()} and "Fits with" in status
    assert {k: v["value"] for k, v in shown.items() if "value" in v} == change  # into the form; the rest stays
    fitted = build(train.Params, {**refused.params, **change})
    assert full_estimate(fitted, train.estimate, studio.device.read()).total < refused.estimate_bytes
