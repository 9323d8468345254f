"""Fine-tune benchmark: what the studio costs over the trainer it drives, and (with --gpu) the memory path at the
Llama-3.1-8B shape against the usual QLoRA recipe.

Run inside the project's .venv:

    python tests/benchmarks/finetune.py [--steps 30] [--method lora]     # CPU: studio vs the trainer called directly
    python tests/benchmarks/finetune.py --gpu [--cap-gib 12]             # CUDA: 8B shape, random weights

CPU: a tiny Llama and a tokenizer built here, the same encoded examples and the same trl SFTTrainer settings, once as
a `finetune` job through the studio (queue, worker process, its callbacks: progress, metrics, cancel points) and once
with the trainer called directly in this process: `speed_ratio` = studio tokens/s / direct tokens/s (goal >= 0.95).

--gpu: a random-weight model with the config of assets/presets/finetune.json's Llama-3.1-8B-Instruct (no download),
seq 2048, micro-batch 1, r 16 on all linear layers, under a per-process cap of --cap-gib: the studio's path (bf16
non-quantized weights, trl's fused LM head, non-reentrant checkpointing, paged 8-bit AdamW) vs the usual recipe
(`prepare_model_for_kbit_training`, which upcasts the non-quantized weights to fp32, and the full logits):
`peak_gib` (goal <= 8.0), `tok_s_ratio` (goal >= 1.5), the estimate vs the measured NVML peak (`estimate_error`, goal
within +-10%), and the longest max_seq_len the estimate fits in the cap (`longest_seq_fits`, goal >= 16k; measured
with one step there when --verify-longest).

The last line printed is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from studio.config import GiB  # noqa: E402

WORDS = ("the valve on pump seven leaks when the night shift starts the cooling loop so check the gasket and log the "
         "pressure before noon every day unless the supervisor says otherwise").split()


def long_examples(path: Path, n: int, words: int, seed: int = 0) -> Path:
    """`n` Alpaca examples of about `words` words each (a long log-like prompt, a short answer)."""
    import random

    rng = random.Random(seed)
    rows = []
    for i in range(n):
        body = " ".join(rng.choice(WORDS) for _ in range(words))
        rows.append({"instruction": f"Summarise log {i}:\n{body}", "input": "", "output": f"Log {i}: {body[:80]}"})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _params(base: str, data: str, **kw):
    from studio.params import build
    from workers.finetune import train

    return build(train.Params, {"base": base, "data": data, **kw})


def _encoded(p):
    """The examples as the finetune kind encodes them (the same input for both paths)."""
    from datasets import Dataset

    from workers.finetune import data
    from workers.finetune.train import _load_tokenizer, base_source

    tok = _load_tokenizer(p, base_source(p.base))
    data.ensure_template(tok)
    enc, _ = data.encode_all(data.read(p.data), tok, p.max_seq_len, p.train_on_prompt)
    return tok, Dataset.from_list(enc)


def direct(p, out: Path, cuda: bool) -> dict:
    """The same trainer (the kind's own SFTConfig) called directly: no queue, no worker, no studio callback."""
    import torch
    import peft
    import transformers
    import trl
    from transformers import TrainerCallback

    from workers.finetune.train import _load_model, _trainer, base_source

    torch.set_num_threads(p.threads or os.cpu_count() or 1)
    tok, ds = _encoded(p)
    model = _load_model(p, base_source(p.base), cuda)
    model = peft.get_peft_model(model, peft.LoraConfig(r=p.lora_r, lora_alpha=p.lora_alpha,
                                                       lora_dropout=p.lora_dropout, bias="none",
                                                       task_type="CAUSAL_LM", target_modules="all-linear"))
    class Clock(TrainerCallback):
        """Times the window the studio's callback reports tokens/s over: training start to the last logged step."""

        def on_train_begin(self, args, state, control, **kw):
            self.t0, self.tok0 = time.perf_counter(), state.num_input_tokens_seen or 0

        def on_log(self, args, state, control, logs=None, **kw):
            if "loss" in (logs or {}):
                self.seconds = time.perf_counter() - self.t0
                self.tokens = (state.num_input_tokens_seen or 0) - self.tok0

    clock = Clock()
    torch.manual_seed(p.seed)
    trainer = _trainer(p, model, tok, ds, ds, out, p.micro_batch, p.grad_accum, cuda, clock, trl, transformers)
    trainer.evaluate()  # as the studio's run does first (the dev loss before training); it warms the kernels too
    result = trainer.train()
    return {"tokens_per_s": clock.tokens / clock.seconds, "tokens": clock.tokens, "seconds": clock.seconds,
            "train_loss": result.metrics.get("train_loss")}


def cpu_benchmark(args) -> dict:
    from finetune_fixtures import make_tiny_llama

    from studio import Config, Studio

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        base = str(make_tiny_llama(tmp / "llama"))
        data = str(long_examples(tmp / "logs.jsonl", n=64, words=40))
        common = dict(method=args.method, max_seq_len=args.seq, micro_batch=args.micro_batch, grad_accum=1,
                      max_steps=args.steps, eval_every=0, save_every=10_000, lr=1e-3, scheduler="constant",
                      warmup=0, gradient_checkpointing=False, threads=args.threads, seed=1, eval_data=data)
        studio = Studio(Config.load(tmp / "data")).start()
        try:
            studio.wait(studio.submit("selftest", {"mib": 1}).id, timeout=120)  # a warm worker (torch imported)
            job = studio.wait(studio.submit("finetune", {"base": base, "data": data, **common}).id, timeout=3600)
            if job.status.value != "DONE":
                raise SystemExit(f"the studio's run {job.status.value}: {job.error}")
            s = job.result
        finally:
            studio.shutdown()
        d = direct(_params(base, data, **common), tmp / "direct", cuda=False)
    print(f"studio: {s['tokens_per_s']:.0f} tokens/s over {s['steps']} steps; direct trainer: "
          f"{d['tokens_per_s']:.0f} tokens/s ({d['tokens']} tokens in {d['seconds']:.1f} s)", flush=True)
    return {"device": "cpu", "method": args.method, "steps": args.steps, "seq": args.seq,
            "studio_tok_s": s["tokens_per_s"], "direct_tok_s": d["tokens_per_s"],
            "speed_ratio": s["tokens_per_s"] / d["tokens_per_s"]}


# ---- the GPU: 8B shape, random weights -----------------------------------------------------------------------
def random_8b(folder: Path) -> Path:
    """A transformers folder with Llama-3.1-8B's config (assets/presets/finetune.json) and random bf16 weights, plus a
    small tokenizer built here (the real one is a download; the 128k-vocabulary LM head is in the model either way)."""
    import torch
    from finetune_fixtures import make_tokenizer
    from transformers import AutoModelForCausalLM, LlamaConfig

    from workers.finetune.estimate import presets

    cfg = dict(presets()["Llama-3.1-8B-Instruct"]["config"])
    tok = make_tokenizer(folder, extra_text=" ".join(WORDS))
    cfg.update(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    config = LlamaConfig(**{k: v for k, v in cfg.items() if k not in ("architectures", "model_type", "torch_dtype")})
    torch.manual_seed(0)
    # in RAM (16 GB in bf16: more than the capped card holds), saved in shards for the 4-bit load
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(str(folder), max_shard_size="4GB")
    del model
    return folder


def studio_path(p, run_dir: Path, data_dir: Path, reading) -> dict:
    """The finetune kind itself, in this process, under the NVML peak sampler: (result, estimate, NVML peak)."""
    from studio.context import JobContext
    from studio.gate import full_estimate
    from studio.worker import PeakSampler, memory_reader
    from workers.finetune import train

    import torch

    run_dir.mkdir(parents=True, exist_ok=True)
    est = full_estimate(p, train.estimate, reading).total
    torch.cuda.reset_peak_memory_stats()
    ctx = JobContext(run_dir.name, "finetune", run_dir, data_dir, "cuda", threading.Event())
    with PeakSampler(memory_reader("cuda")) as s:
        r = train.run(p, ctx)
    return {"tokens_per_s": r["tokens_per_s"], "peak_gib": s.peak / GiB, "estimate_gib": est / GiB,
            "torch_peak_gib": torch.cuda.max_memory_allocated() / GiB}


def usual_recipe(p, out: Path) -> dict:
    """The common QLoRA recipe on the same data: prepare_model_for_kbit_training (fp32 upcast of the non-quantized
    weights), reentrant-free checkpointing, paged 8-bit AdamW, the full logits (transformers' own loss)."""
    import peft
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    tok, ds = _encoded(p)
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(p.base, quantization_config=q, dtype=torch.bfloat16,
                                                 device_map={"": 0}, attn_implementation="sdpa")
    model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                                 gradient_checkpointing_kwargs={"use_reentrant": False})
    model = peft.get_peft_model(model, peft.LoraConfig(r=p.lora_r, lora_alpha=p.lora_alpha,
                                                       lora_dropout=p.lora_dropout, task_type="CAUSAL_LM",
                                                       target_modules="all-linear"))
    args = transformers.TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=1, gradient_accumulation_steps=p.grad_accum,
        max_steps=p.max_steps, learning_rate=p.lr, bf16=True, optim="paged_adamw_8bit", logging_steps=1,
        save_strategy="no", report_to="none", disable_tqdm=True, gradient_checkpointing=True,
        gradient_checkpointing_kwargs={"use_reentrant": False}, include_num_input_tokens_seen="non_padding")
    collator = transformers.DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=ds, data_collator=collator)
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - t0
    return {"tokens_per_s": trainer.state.num_input_tokens_seen / seconds,
            "torch_peak_gib": torch.cuda.max_memory_allocated() / GiB}


def longest_fit(base: str, data: str, cap_gib: float, reading) -> int:
    """The longest max_seq_len (a multiple of 1024) whose estimate fits the cap."""
    from studio.gate import full_estimate
    from workers.finetune import train

    best, t = 0, 1024
    while t <= 131072:
        p = _params(base, data, max_seq_len=t, micro_batch=1)
        if full_estimate(p, train.estimate, reading).total > cap_gib * GiB:
            break
        best, t = t, t + 1024
    return best


def gpu_benchmark(args) -> dict:
    import torch

    from studio.device import detect

    if not torch.cuda.is_available():
        raise SystemExit("--gpu needs CUDA (this machine has none); run without --gpu for the CPU benchmark")
    dev = detect()
    reading = dev.read()
    torch.cuda.set_per_process_memory_fraction(min(1.0, args.cap_gib * GiB / reading.total))
    out: dict = {"device": reading.name, "cap_gib": args.cap_gib, "seq": 2048}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t0 = time.time()
        base = str(random_8b(tmp / "llama-8b-random"))
        print(f"random 8B model written in {time.time() - t0:.0f} s", flush=True)
        data = str(long_examples(tmp / "logs.jsonl", n=64, words=1200))  # ~2k tokens each with the small tokenizer
        common = dict(method="qlora", max_seq_len=2048, micro_batch=1, grad_accum=4, max_steps=args.gpu_steps,
                      eval_every=0, save_every=10_000, eval_data=data, lr=1e-4)
        p = _params(base, data, **common)
        ours = studio_path(p, tmp / "runs" / "studio", tmp, reading)
        print("studio", json.dumps(ours), flush=True)
        torch.cuda.empty_cache()
        usual = usual_recipe(p, tmp / "usual")
        print("usual recipe", json.dumps(usual), flush=True)
        longest = longest_fit(base, data, args.cap_gib, reading)
        out.update(studio=ours, usual=usual, peak_gib=ours["peak_gib"],
                   tok_s_ratio=ours["tokens_per_s"] / usual["tokens_per_s"],
                   estimate_error=(ours["estimate_gib"] - ours["peak_gib"]) / ours["peak_gib"],
                   longest_seq_fits=longest)
        if args.verify_longest and longest:
            torch.cuda.empty_cache()
            v = studio_path(_params(base, data, **{**common, "max_seq_len": longest, "max_steps": 1}),
                            tmp / "runs" / "longest", tmp, reading)
            out["longest_measured_peak_gib"] = v["peak_gib"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpu", action="store_true", help="the 8B-shape QLoRA on CUDA instead of the CPU comparison")
    ap.add_argument("--steps", type=int, default=30, help="CPU: optimizer steps for each path")
    ap.add_argument("--method", default="lora", choices=("lora", "qlora", "full"), help="CPU: the method")
    ap.add_argument("--seq", type=int, default=256, help="CPU: max_seq_len")
    ap.add_argument("--micro-batch", type=int, default=4, help="CPU: micro-batch")
    ap.add_argument("--threads", type=int, default=0, help="CPU threads (0: all cores)")
    ap.add_argument("--cap-gib", type=float, default=12.0, help="--gpu: per-process CUDA memory cap")
    ap.add_argument("--gpu-steps", type=int, default=6, help="--gpu: optimizer steps (x4 micro-batches) per path")
    ap.add_argument("--verify-longest", action="store_true", help="--gpu: one step at the longest fitting length")
    args = ap.parse_args()
    summary = gpu_benchmark(args) if args.gpu else cpu_benchmark(args)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
