"""Using a fine-tune's result: chat with base + adapter through the Chat kind, merge it into a folder that loads
anywhere (and the GGUF route), and the Fine-tune tab through gradio_client. A tiny Llama and a LoRA made with PEFT
stand in for a trained run (tests/test_finetune.py trains real ones)."""
import json
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
