"""Using a fine-tune's result: chat with base + adapter through the Chat kind, merge it into a folder that loads
anywhere (and the GGUF route), and the Fine-tune tab through gradio_client. A tiny Llama and a LoRA made with PEFT
stand in for a trained run (tests/test_finetune.py trains real ones)."""
import json
import re
from pathlib import Path

import pytest
from adapter_fixtures import as_finetune_job, greedy, make_adapter

from studio import JobStatus
from studio.access import Forbidden
from workers.chat.chat import DEFAULT_SYSTEM

QUESTION = "Where is the backup server?"
MESSAGES = [{"role": "system", "content": DEFAULT_SYSTEM}, {"role": "user", "content": QUESTION}]


@pytest.fixture(scope="module")
def tuned(studio, tmp_path_factory):
    """(base folder, adapter folder, finetune job id holding that adapter)."""
    from rag_fixtures import make_tiny_hf_llm

    d = tmp_path_factory.mktemp("tuned")
    base = make_tiny_hf_llm(d / "base")
    adapter = make_adapter(base, d / "adapter")
    return base, adapter, as_finetune_job(studio, adapter, str(base))


def test_chat_with_it_answers_through_the_adapter(studio, tuned):
    base, adapter, job_id = tuned
    ask = {"prompt": QUESTION, "temperature": 0.0, "max_tokens": 12}
    tuned_job = studio.wait(studio.submit("chat", {**ask, "adapter": job_id}).id, 300)
    assert tuned_job.status is JobStatus.DONE, tuned_job.error
    assert tuned_job.params["adapter"] == job_id  # kept as asked (Retry); the run used the resolved folder
    assert tuned_job.result["model"] == str(base) and tuned_job.result["backend"] == "hf"
    want = greedy(base, adapter, MESSAGES, 12)
    assert tuned_job.result["answer"] == want
    base_job = studio.wait(studio.submit("chat", {**ask, "model": str(base)}).id, 300)
    assert base_job.status is JobStatus.DONE, base_job.error
    assert base_job.result["answer"] == greedy(base, None, MESSAGES, 12)
    assert base_job.result["answer"] != want, "the adapter changed nothing: the test's LoRA is too weak"
    # the adapter as a folder, with its base named: the same answer, and base + adapter is cached as its own model
    again = studio.wait(studio.submit("chat", {**ask, "model": str(base), "adapter": str(adapter)}).id, 300)
    assert again.status is JobStatus.DONE and again.result["answer"] == want
    keys = [k for k in studio.job(again.id).estimate["models"]]
    assert any("adapter=" in k for k in keys), keys


def test_the_estimate_counts_the_adapter_and_bad_adapters_are_refused_plainly(studio, tuned, tmp_path):
    from studio.device import CpuDevice
    from studio.params import build
    from workers.chat import chat
    from workers.finetune.adapter import read_adapter

    base, adapter, job_id = tuned
    reading = CpuDevice("test").read()
    plain = chat.validate(build(chat.Params, {"prompt": "hi", "model": str(base)}), studio.config)
    with_a = chat.validate(build(chat.Params, {"prompt": "hi", "adapter": job_id}), studio.config)
    grew = chat.estimate(with_a, reading).total - chat.estimate(plain, reading).total
    assert grew == 4 * read_adapter(Path(with_a.adapter))["n_params"] > 0
    assert chat.llm_key(plain) != chat.llm_key(with_a)
    before = len(studio.jobs(limit=10_000))
    cases = [({"adapter": str(tmp_path)}, "holds no adapter_config.json"),
             ({"adapter": "0123456789abcdef"}, "no job"),
             ({"adapter": job_id, "model": "gemma-3-270m-packaged"}, "trained on"),
             ({"adapter": str(adapter), "model": "gemma-3-270m-packaged"}, "trained on")]
    for extra, says in cases:
        with pytest.raises(ValueError, match=says):
            studio.submit("chat", {"prompt": "hi", **extra})
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_text((adapter / "adapter_config.json").read_text())
    (broken / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
    with pytest.raises(ValueError, match="not a readable safetensors"):
        studio.submit("chat", {"prompt": "hi", "adapter": str(broken)})
    with pytest.raises(Forbidden, match="not one of yours"):  # another user's fine-tune
        studio.submit("chat", {"prompt": "hi", "adapter": job_id}, owner="bob")
    assert len(studio.jobs(limit=10_000)) == before


def test_merge_writes_a_folder_that_loads_and_answers_as_base_plus_adapter(studio, tuned, tmp_path):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    base, adapter, job_id = tuned
    job = studio.wait(studio.submit("finetune_merge", {"adapter": job_id, "dtype": "float32"}).id, 300)
    assert job.status is JobStatus.DONE, job.error
    merged = Path(job.result["merged"])
    assert merged == studio.run_dir(job.id) / "merged" and (merged / "model.safetensors").exists()
    assert not list(merged.glob("adapter_*")), "a merged folder is a plain model, not an adapter"
    model = AutoModelForCausalLM.from_pretrained(str(merged))
    assert not hasattr(model, "peft_config") and next(model.parameters()).dtype == torch.float32
    assert greedy(merged, None, MESSAGES, 12) == greedy(base, adapter, MESSAGES, 12)
    # the default: 16-bit weights, plus the GGUF route, into a folder of the user's choosing
    out = tmp_path / "my-model"
    job = studio.wait(studio.submit("finetune_merge", {"adapter": str(adapter), "out": str(out), "gguf": True}).id, 300)
    assert job.status is JobStatus.DONE, job.error
    assert AutoConfig.from_pretrained(str(out)).dtype == torch.bfloat16
    g = job.result["gguf"]
    assert not g["done"] and "convert_hf_to_gguf.py" in g["commands"][2] and "LLAMA_FTYPE_MOSTLY_Q4_K_M" in \
        g["commands"][3]
    assert Path(g["script"]).read_text().count("\n") >= 5 and json.loads((out / "studio_merge.json").read_text())[
        "base"] == str(base)
    # the merged folder is a model the Chat kind takes as it is
    chat = studio.wait(studio.submit("chat", {"prompt": QUESTION, "model": str(out), "max_tokens": 4,
                                              "temperature": 0.0}).id, 300)
    assert chat.status is JobStatus.DONE, chat.error
    with pytest.raises(ValueError, match="not an empty folder"):  # nothing is overwritten
        studio.submit("finetune_merge", {"adapter": str(adapter), "out": str(out)})


# ---- the Fine-tune tab through gradio_client ------------------------------------------------------------------------
def _core(module: str):
    """The finetune kind's core (tests/test_finetune.py tests it); the tab's tests that drive it need it there."""
    import importlib.util

    if importlib.util.find_spec(f"workers.finetune.{module}") is None:
        pytest.skip(f"workers/finetune/{module}.py (the finetune kind's core) is not there yet")


@pytest.fixture(scope="module")
def served(studio):
    from conftest import serve

    url, demo = serve(studio, show_error=True)
    yield url
    demo.close()


@pytest.fixture(scope="module")
def qa(tmp_path_factory):
    """(a tiny Llama with a chat template that marks turns, twelve question/answer pairs as Alpaca JSONL)."""
    _core("data")
    from finetune_fixtures import make_tiny_llama, write_qa

    d = tmp_path_factory.mktemp("ft-tab")
    return make_tiny_llama(d / "llama"), write_qa(d / "qa.jsonl")


def test_check_data_shows_the_report_and_the_masked_preview(served, qa, tmp_path):
    from gradio_client import Client, handle_file

    base, data = qa
    client = Client(served, verbose=False)
    shown = client.predict(data_files=[handle_file(str(data))], data_path="", eval_file=None, eval_path="",
                           base=str(base), max_seq_len=64, train_on_prompt=False, seed=42, api_name="/finetune_check")
    assert "12 examples" in shown and "Alpaca 12" in shown and "answers only" in shown
    # the preview: three examples, the prompt masked (grey) and the answer trained (green), the answer's own words
    assert shown.count("ft-example") == 3 and "ft-masked" in shown and "ft-trained" in shown
    trained = re.findall(r'class="ft-trained"[^>]*>([^<]*)<', shown)
    masked = re.findall(r'class="ft-masked"[^>]*>([^<]*)<', shown)
    assert "4417" in "".join(trained) and "4417" not in "".join(masked)
    assert "What is the code" in "".join(masked) and "What is the code" not in "".join(trained)
    # a malformed file says which line
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": \n')
    with pytest.raises(Exception, match="line 2"):
        client.predict(data_files=[handle_file(str(bad))], data_path="", eval_file=None, eval_path="",
                       base=str(base), max_seq_len=64, train_on_prompt=False, seed=42, api_name="/finetune_check")


def test_chat_with_it_opens_the_chat_on_base_plus_adapter_and_merge(served, studio, tuned):
    from gradio_client import Client

    base, adapter, job_id = tuned
    client = Client(served, verbose=False)
    model, adapter_box, four_bit = client.predict(run=job_id, api_name="/finetune_chat_with_it")
    assert (model, adapter_box, four_bit) == (str(base), job_id, False)  # the CPU: plain, not 4-bit
    # the Chat tab's Send with what Chat with it filled in: the tuned model answers
    chatbot, *_ = client.predict(message=QUESTION, conversation=None, model=model, collection="", system=DEFAULT_SYSTEM,
                                 temperature=0.0, top_p=1.0, max_tokens=16, n_ctx=2048, top_k=4, reranker="",
                                 tools=False, load_in_4bit=four_bit, chat_format="auto", top_k_tokens=1,
                                 repeat_penalty=1.0, adapter=adapter_box, api_name="/chat")
    assert chatbot[-1]["content"][0]["text"] == greedy(base, adapter, MESSAGES, 16)
    merged = client.predict(run=job_id, gguf=True, quant="Q4_K_M", api_name="/finetune_merge")
    assert "Merged into" in merged and "convert_hf_to_gguf.py" in merged and "Q4_K_M" in merged
    path = re.search(r"Merged into `([^`]+)`", merged).group(1)
    assert (Path(path) / "config.json").exists()


def test_train_streams_the_loss_and_the_form_comes_back(served, studio, qa):
    _core("train")
    from gradio_client import Client, handle_file

    base, data = qa
    client = Client(served, verbose=False)
    form = dict(data_path="", eval_file=None, eval_path="", base=str(base), method="lora", lora_r=8, lora_alpha=16,
                lora_dropout=0.0, target_modules="all-linear", max_seq_len=64, micro_batch=2, grad_accum=1, epochs=1,
                max_steps=6, lr=0.01, scheduler="constant", warmup=0, packing=False, train_on_prompt=False,
                gradient_checkpointing=False, seed=7, eval_every=3)
    status, plot, stats, report, evaluation, run = client.predict(
        data_files=[handle_file(str(data))], **form, api_name="/finetune_train")
    job_id = run["value"]  # the finished run becomes the one Chat with it and Merge use
    assert job_id in [c[1] for c in run["choices"]]
    job = studio.job(job_id)
    assert job.status is JobStatus.DONE, job.error
    assert "DONE" in status and "dev loss" in stats and "12 examples" in report
    try:  # the form's Devices box: GPUs asked for on a machine without CUDA are refused, saying what to give
        said = json.dumps(client.predict(data_files=[handle_file(str(data))], **{**form, "devices": "0,1"},
                                         api_name="/finetune_train"))
    except Exception as e:  # noqa: BLE001 - gr.Error reaches the client as an exception
        said = str(e)
    assert "asks for GPUs" in said and "devices=2" in said
    series = {row["series"] for row in plot["value"]["data"]} if isinstance(plot, dict) and "value" in plot else \
        {row[2] for row in plot["data"]}
    assert {"train_loss", "dev_loss"} <= series
    assert job.params["max_steps"] == 6 and job.params["lora_r"] == 8 and job.params["method"] == "lora"
    # a reload puts the last-used settings back (the uploaded file is not kept): the base, rank and steps
    restored = json.dumps(Client(served, verbose=False).predict(api_name="/finetune_attach"))
    assert str(base) in restored and "lora" in restored
    # Train more: the finished run goes on for another epoch from its last checkpoint, as a new job
    status, *_ = client.predict(run=job_id, more=1, api_name="/finetune_extend")
    more = studio.jobs(kind="finetune")[0]
    assert more.params["resume_from"] == job_id and more.status is JobStatus.DONE, more.error
    assert more.result["steps"] == 2 * job.result["steps"] and more.result["epochs"] == 2 * job.result["epochs"]
    assert "DONE" in status
