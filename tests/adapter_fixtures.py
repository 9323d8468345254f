"""A tiny base model and a LoRA adapter on it, in PEFT's own format, for the tests that use a fine-tune's result (chat
with it, merge) without training one first."""
import json
from pathlib import Path


def make_adapter(base: Path, out: Path, seed: int = 1, scale: float = 4.0) -> Path:
    """A LoRA (r 8, all linear layers) on the transformers folder `base`, with random A and B so it changes the
    model's answers (a freshly initialised LoRA has B = 0 and changes nothing), saved by PEFT's save_pretrained."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    cfg = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear", init_lora_weights=False,
                     task_type="CAUSAL_LM")
    peft = get_peft_model(model, cfg)
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.mul_(scale)  # strong enough that greedy answers differ from the base's
    peft.save_pretrained(str(out))
    return out


def as_finetune_job(studio, adapter: Path, base: str, owner=None) -> str:
    """A finetune job's run folder as the `finetune` kind leaves it (runs/<id>/adapter + run.json), registered in the
    store as DONE, so `adapter=<job id>` resolves the way it does after a real run; returns the job id."""
    import shutil

    from studio import JobStatus

    job = studio.store.add("finetune", {"base": base, "data": "x.jsonl"}, JobStatus.DONE, owner=owner)
    run = studio.run_dir(job.id)
    run.mkdir(parents=True, exist_ok=True)
    shutil.copytree(adapter, run / "adapter")
    (run / "run.json").write_text(json.dumps({"job_id": job.id, "kind": "finetune",
                                              "params": {"base": base, "data": "x.jsonl"}}))
    return job.id


def greedy(base: Path, adapter: Path | None, messages: list[dict], max_new_tokens: int, dtype="float32") -> str:
    """What transformers (+ PEFT) answer greedily, decoded as the chat's streamer decodes it."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(base))
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=getattr(torch, dtype))
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter))
    model.eval()
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tok(text, return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.eos_token_id)
    return tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
