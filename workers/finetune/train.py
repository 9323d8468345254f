"""Job kind `finetune`: QLoRA (default), LoRA or full fine-tuning of a chat model on the user's data.

The guide's recipe is the default (`--load_in_4bit --bf16 --gradient_checkpointing --lora_r 16 --lora_alpha 32
--lora_dropout 0.05 --per_device_train_batch_size 1 --gradient_accumulation_steps 16 --max_seq_length 2048
--num_train_epochs 2`). Training is transformers' Trainer through trl's SFTTrainer (its fused LM head: the logits
are never materialised); the studio's callbacks report progress (a cancel point on every micro-batch, step and
evaluation batch), metrics and checkpoints. The data is tokenized here (workers.finetune.data: exact answer-only
masks), so trl sees `input_ids` + `labels` and only pads, packs and batches.

Checkpoints: transformers' own (`checkpoint/checkpoint-<step>/`), recorded with their sha256 in
`checkpoint/state.json`; Resume (a new job with `resume_from`) copies one into its own run folder, checks every
file against those hashes, and hands it to the Trainer, which restores the adapter, optimizer, scheduler, RNG and
data position. Out of memory during a step: the studio saves a checkpoint, halves `micro_batch`, doubles
`grad_accum` and continues from it; a second OOM at micro-batch 1 stops with a suggestion. See the package docstring
for the run folder's layout.

Several devices (`devices`): `run` hands the job to workers.finetune.distributed, which starts one process per device
through accelerate's launcher; each runs `train_job`, this module's single-device path, and the Trainer does DDP (or
DeepSpeed ZeRO with `deepspeed`). Rank 0 alone writes the run folder, so the result is laid out as a single run's.
`micro_batch` is per process: the effective batch is micro_batch x grad_accum x processes.
"""
from __future__ import annotations

import json
import math
import os
import resource
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Literal

from studio.hashing import sha256
from studio.gate import Estimate
from workers.finetune import distributed
from workers.finetune import estimate as est

PACKAGES = ("transformers", "peft", "trl", "bitsandbytes", "accelerate", "datasets")  # versions for the run card
PATHS = ("base", "data", "eval_data", "resume_from")  # params that name a server path or a job (studio.access)


@dataclass(frozen=True)
class Params:
    base: str = "Llama-3.1-8B-Instruct"  # a preset (Llama-3.1-8B-Instruct, Qwen2.5-7B-Instruct, …) or a local transformers folder
    data: str = ""  # your examples: a JSONL, JSON, CSV or Parquet file (several: comma-separated), or a folder of them
    eval_data: str = ""  # a dev set file; empty: a seeded split of `data` (dev_fraction, at most dev_max examples)
    method: Literal["qlora", "lora", "full"] = "qlora"  # qlora: 4-bit base + LoRA; lora: bf16 base + LoRA; full: every weight (small models)
    lora_r: int = 16  # LoRA rank
    lora_alpha: int = 32  # LoRA scale numerator (the update is scaled by alpha / r)
    lora_dropout: float = 0.05  # dropout on the LoRA input
    target_modules: str = "all-linear"  # layers LoRA adapts: all-linear, or names such as q_proj,v_proj
    max_seq_len: int = 2048  # tokens per example; longer ones are cut (the data report counts them)
    micro_batch: int = 1  # examples per forward pass (halved automatically after an out-of-memory error)
    grad_accum: int = 16  # micro-batches per optimizer step: effective batch = micro_batch x grad_accum
    epochs: float = 2.0  # passes over the training examples (max_steps > 0 overrides)
    max_steps: int = 0  # optimizer steps; 0: as many as `epochs` take
    lr: float = 2e-4  # peak learning rate (after warm-up)
    scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = "cosine"  # learning-rate schedule
    warmup: float = 0.03  # warm-up: a fraction of the steps (< 1) or a number of steps (>= 1)
    packing: bool = False  # pack short examples together into max_seq_len rows (faster on many short examples)
    train_on_prompt: bool = False  # false: the loss is on the answers only (the prompt is masked)
    gradient_checkpointing: bool = True  # recompute activations in backward: far less memory for ~30% more time
    seed: int = 42  # data order, the dev split, LoRA init and dropout
    eval_every: int = 50  # optimizer steps between dev-set evaluations (also before and after training); 0: only those two
    save_every: int = 50  # optimizer steps between checkpoints (one is also written on cancel, OOM and at the end)
    dev_fraction: float = 0.05  # share of `data` held out as the dev set when eval_data is empty
    dev_max: int = 200  # at most this many dev examples from the split
    threads: int = 0  # CPU threads; 0 uses every core
    eval_prompts: int = 5  # dev prompts the base and the tuned model answer side by side (ROUGE-L); 0: none
    eval_new_tokens: int = 96  # at most this many tokens per answer (greedy)
    resume_from: str = ""  # a finetune job id whose checkpoint this run continues (set by Resume; also extends a finished run)
    # devices: "" = the worker's one device (as always); on CUDA "0,1" or "all" = DDP over those GPUs through
    # accelerate, holding all of them; on a machine without CUDA a count such as "2" = that many CPU processes (gloo)
    devices: str = ""  # where it trains: "", GPU ids or "all", or without CUDA a number of CPU processes
    deepspeed: Literal["", "zero2", "zero3"] = ""  # ZeRO over devices: zero2 shards optimizer+grads, zero3 weights too

    def __post_init__(self):
        for name, lo, hi in [("lora_r", 1, 1024), ("lora_alpha", 1, 4096), ("lora_dropout", 0.0, 0.9),
                             ("max_seq_len", 16, 262_144), ("micro_batch", 1, 1024), ("grad_accum", 1, 4096),
                             ("epochs", 0.01, 1000.0), ("max_steps", 0, 10_000_000), ("lr", 1e-8, 1.0),
                             ("warmup", 0.0, 100_000.0), ("seed", 0, 2**31 - 1), ("eval_every", 0, 10_000_000),
                             ("save_every", 1, 10_000_000), ("dev_fraction", 0.0, 0.5), ("dev_max", 1, 100_000),
                             ("threads", 0, 1024), ("eval_prompts", 0, 100), ("eval_new_tokens", 1, 1024)]:
            v = getattr(self, name)
            if not lo <= v <= hi:
                raise ValueError(f"{name} must be between {lo} and {hi}; got {v}")
        if not self.base.strip():
            raise ValueError("no base model given: a preset (e.g. Llama-3.1-8B-Instruct) or a model folder")
        if not self.data.strip():
            raise ValueError("no data given: name a JSONL, JSON, CSV or Parquet file of examples")
        distributed.check_syntax(self.devices)


def validate(p: Params, config) -> Params:
    """Bad input fails here, before anything is queued: the devices, the base's config, every data line, the
    checkpoint. Returns the params with devices="all" resolved to the GPU ids it stands for."""
    from workers.finetune import data

    devices = distributed.check(p)
    check_seq_len(p.max_seq_len, est.model_config(p.base), p.base)
    examples = data.read(p.data)
    if p.eval_data:
        data.read(p.eval_data)
    elif len(examples) < 2:
        raise ValueError(f"{len(examples)} example: a dev split needs at least 2 (or give eval_data)")
    check_resume(config, p.resume_from, "fine-tuning")
    return replace(p, devices=devices) if devices != p.devices else p


def devices_of(p: Params, n_devices: int) -> list[int] | None:
    """The studio's devices (CUDA ids) this run holds while it runs, so the scheduler keeps them all for it and
    starts it on the first one's worker; None for a run on one device, wherever it fits (or CPU processes)."""
    parsed = distributed.parse_devices(p.devices, n_devices) if p.devices else None
    return parsed if isinstance(parsed, list) else None


def check_seq_len(max_seq_len: int, text_config: dict, base: str) -> None:
    """A max_seq_len past the positions the model was trained for is refused, naming the most it takes."""
    max_pos = int(text_config.get("max_position_embeddings") or 0)
    if max_pos and max_seq_len > max_pos:
        raise ValueError(f"max_seq_len {max_seq_len} is longer than {Path(base).name} was trained for "
                         f"({max_pos}); use at most {max_pos}")


def check_resume(config, resume_from: str, what: str) -> None:
    if resume_from and not (config.runs_dir / resume_from / "checkpoint" / "state.json").exists():
        raise ValueError(f"job {resume_from} has no {what} checkpoint to resume from")


def distinct(p, changes):
    """The gate's changes to try, each naming only what it changes, never the same twice."""
    seen = []
    for change in changes:
        change = {k: v for k, v in change.items() if getattr(p, k) != v}
        if change and change not in seen:
            seen.append(change)
            yield change


# each training process's own runtime, as studio.gate.runtime_context_bytes counts the worker's
RANK_CONTEXT = {"cuda": 620 * 2**20, "cpu": 900 * 2**20}


def estimate(p: Params, device) -> Estimate:
    """Per device. DDP keeps a whole copy of the model, optimizer and a micro-batch's activations on each GPU: about
    the single-device figure, plus the process's own CUDA context (the worker's is the gate's context). ZeRO-2 shards
    the optimizer state and gradients over the GPUs, ZeRO-3 the weights too. Without CUDA the N processes share one
    device, the RAM: N whole copies, each with its own runtime."""
    parts, note = est.breakdown(p, device)
    kind = getattr(device, "kind", "cpu")
    n = distributed.estimate_processes(p.devices, kind)
    if n > 1 and kind == "cuda":
        sharded = {"zero2": ("grads", "optimizer"), "zero3": ("weights", "grads", "optimizer")}.get(p.deepspeed, ())
        parts = {k: v // n if k in sharded else v for k, v in parts.items()}
        parts["workspace"] += RANK_CONTEXT["cuda"]
        note += f"; per GPU of {n} ({f'DeepSpeed ZeRO-{p.deepspeed[-1]}' if p.deepspeed else 'DDP'})"
    elif n > 1:
        parts = {k: v * n for k, v in parts.items()}
        parts["libraries"] = parts.get("libraries", 0) + n * RANK_CONTEXT["cpu"]
        note += f"; {n} CPU processes, each with its own copy"
    return Estimate(parts=parts, note=note)


def shrink(p: Params):
    """Changes to try when over budget (the gate takes the first that fits), each naming only what changes."""
    yield from distinct(p, est.shrinks(p, est.smaller_presets()))


# ---- paths other kinds use ----------------------------------------------------------------------------------------
def adapter_dir(run_dir: Path) -> Path:
    """Where a finetune job's result is: adapter/ (PEFT: adapter_model.safetensors + adapter_config.json) for lora
    and qlora, model/ (a transformers folder) for full."""
    run_dir = Path(run_dir)
    return run_dir / "adapter" if (run_dir / "adapter").exists() or not (run_dir / "model").exists() else \
        run_dir / "model"


def base_source(base: str) -> str:
    """What from_pretrained loads: the preset's hub repo, or the folder."""
    table = est.presets()
    return table[base]["repo"] if base in table else str(Path(base).expanduser())


# ---- checkpoints the studio wrote ------------------------------------------------------------------------------
def _hashes(folder: Path) -> dict[str, str]:
    return {str(f.relative_to(folder)): sha256(f) for f in sorted(folder.rglob("*")) if f.is_file()}


def record_checkpoint(ckpt_root: Path, step: int, extra: dict) -> dict:
    """Write state.json naming checkpoint-<step> and the sha256 of each of its files; drop older checkpoints."""
    name = f"checkpoint-{step}"
    folder = ckpt_root / name
    state = {"step": step, "dir": name, "sha256": _hashes(folder), **extra}
    tmp = ckpt_root / "state.json.tmp"
    tmp.write_text(json.dumps(state, indent=1))
    os.replace(tmp, ckpt_root / "state.json")
    for old in ckpt_root.glob("checkpoint-*"):
        if old.name != name and old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
    return state


def load_state(run_dir: Path) -> dict:
    return json.loads((Path(run_dir) / "checkpoint" / "state.json").read_text())


def checked_copy(runs_dir: Path, job_id: str, dest: Path) -> tuple[Path, dict]:
    """Copy job_id's recorded checkpoint into `dest` and check every file against the hashes its job recorded; a
    file that is missing, extra or changed refuses the resume. Returns (the copy, the state)."""
    src_run = (Path(runs_dir) / job_id).resolve()
    if not src_run.is_relative_to(Path(runs_dir).resolve()):
        raise ValueError(f"{job_id} is not a job of this studio")
    state = load_state(src_run)
    src = src_run / "checkpoint" / state["dir"]
    copy = dest / state["dir"]
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(src, copy)
    found = _hashes(copy)
    if found != state["sha256"]:
        changed = sorted(set(found) ^ set(state["sha256"]) | {k for k in found if found[k] != state["sha256"].get(k)})
        shutil.rmtree(copy, ignore_errors=True)
        raise ValueError(f"job {job_id}'s checkpoint changed since the studio wrote it ({', '.join(changed[:3])}); "
                         "not loading it. Retry to train from scratch")
    return copy, state


def resume_state(ctx, resume_from: str, data_hash: str, micro_batch: int, grad_accum: int) -> tuple:
    """A resume's starting point: the checkpoint copied from job `resume_from` and hash-checked (checked_copy), its
    state, and the micro-batch and accumulation it ran with last (an out-of-memory restart changes them). Refused when
    the data changed since. Returns (checkpoint, state, micro_batch, grad_accum); (None, {}, the given sizes) when
    not resuming."""
    if not resume_from:
        return None, {}, micro_batch, grad_accum
    ckpt, state = checked_copy(ctx.run_dir.parent, resume_from, ctx.run_dir / "resume")
    if state.get("data_hash") != data_hash:
        raise ValueError(f"the data changed since job {resume_from} ran (hash {data_hash[:12]} vs "
                         f"{str(state.get('data_hash'))[:12]}); Retry to train from scratch on the new data")
    mb, ga = state.get("micro_batch", micro_batch), state.get("grad_accum", grad_accum)
    ctx.log(f"resuming job {resume_from} from step {state['step']}"
            + (f" (micro_batch {mb}, grad_accum {ga} after an out-of-memory error)" if mb != micro_batch else ""))
    return ckpt, state, mb, ga


# ---- the run ----------------------------------------------------------------------------------------------------
class OutOfMemoryAtMicroBatch1(RuntimeError):
    pass


def _peak_bytes(cuda: bool) -> int:
    if cuda:
        import torch

        return int(torch.cuda.max_memory_allocated())
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def _load_model(p: Params, source: str, cuda: bool):
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    dtype = torch.bfloat16 if cuda else torch.float32
    zero3 = p.deepspeed == "zero3"
    # each process loads onto its own GPU (LOCAL_RANK: 0 alone); ZeRO-3 places and shards the weights itself
    device_map = None if zero3 else {"": _local_rank()} if cuda else "cpu"
    kw = dict(dtype=dtype, attn_implementation="sdpa", device_map=device_map)
    if p.method == "qlora":
        kw["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
            bnb_4bit_quant_storage=dtype if zero3 else torch.uint8)  # ZeRO-3 shards 4-bit weights stored as bf16
    if p.method == "full":
        kw["dtype"] = torch.float32  # fp32 master weights; bf16 autocast on CUDA
    try:
        model = AutoModelForCausalLM.from_pretrained(source, **kw)
    except OSError as e:
        raise RuntimeError(_missing(p.base, source, e)) from None
    model.config.use_cache = False
    return model


def _missing(base: str, source: str, e: Exception) -> str:
    if base in est.presets():
        return (f"{base} is not on disk and cannot be downloaded here ({str(e).splitlines()[0][:160]}). Download "
                f"{source} in the Models tab (or `huggingface-cli download {source}`) on a machine with internet, "
                "or give a local model folder as base")
    return f"cannot load {source}: {str(e).splitlines()[0][:200]}"


def _load_tokenizer(p: Params, source: str):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(source)
    except OSError as e:
        raise RuntimeError(_missing(p.base, source, e)) from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def _rank() -> int:
    """This process's rank among the training processes (0 alone)."""
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _world() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _local_rank() -> int:
    """The GPU this process trains on among those it sees (torchrun's LOCAL_RANK; 0 alone)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def _barrier() -> None:
    """Wait for every rank (nothing to wait for in a single process)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def run(p: Params, ctx) -> dict:
    if distributed.processes(distributed.parse_devices(
            p.devices, distributed.cuda_count() if ctx.device == "cuda" else 0)) > 1:
        return distributed.run(p, ctx)  # one process per device, each running train_job
    return train_job(p, ctx)


def train_job(p: Params, ctx, resumed: tuple | None = None) -> dict:
    """The fine-tune itself, in the worker or in each process of a multi-process run (rank 0 writes the run folder).
    `resumed`: a resume's (checkpoint, state, micro_batch, grad_accum) already checked by the launching worker."""
    ctx.progress(0, None, "reading the data")
    import torch

    from workers.finetune import data

    cuda = ctx.device == "cuda"
    main = getattr(ctx, "rank", 0) == 0  # a rank's context says which it is; the worker's is the only one
    torch.set_num_threads(p.threads or max(1, (os.cpu_count() or 1) // getattr(ctx, "world", 1)))  # cores shared
    source = base_source(p.base)
    tok = _load_tokenizer(p, source)
    own_template = data.ensure_template(tok)
    examples = data.read(p.data)
    if p.eval_data:
        train_ex, dev_ex = examples, data.read(p.eval_data)
    else:
        train_ex, dev_ex = data.split(examples, p.dev_fraction, p.dev_max, p.seed)
    report = data.report(p.data, tok, p.max_seq_len, p.train_on_prompt, p.eval_data, p.dev_fraction, p.dev_max,
                         p.seed, examples=examples)
    if main:
        (ctx.run_dir / "data_report.json").write_text(json.dumps(report, indent=1, ensure_ascii=False))
    ctx.emit("data_report", report=report)
    train_enc, skipped = data.encode_all(train_ex, tok, p.max_seq_len, p.train_on_prompt)
    dev_enc, _ = data.encode_all(dev_ex, tok, p.max_seq_len, p.train_on_prompt)
    if not train_enc:
        raise ValueError("no training example is left: every answer is empty or cut off by max_seq_len")
    if not own_template:
        ctx.log(f"{Path(source).name} has no chat template: using the plain '### Instruction / ### Response' "
                "format (saved with the adapter, so Chat uses it too)")
    data_hash = data.file_hash(p.data)
    dev_hash = data.file_hash(p.eval_data) if p.eval_data else None
    prompts = eval_set(dev_ex, tok, p.max_seq_len, p.eval_prompts)
    if prompts and p.deepspeed == "zero3":  # rank 0 cannot generate alone from weights sharded over every GPU
        ctx.log("ZeRO-3: the base and tuned dev answers are skipped (the weights are sharded across the GPUs); "
                "Chat with the adapter or merge it to compare")
        prompts = []
    base_answers = None  # answered before training (kept in the checkpoint's state, so a resume has them too)

    resume_ckpt, state, micro_batch, grad_accum = resumed or resume_state(ctx, p.resume_from, data_hash,
                                                                          p.micro_batch, p.grad_accum)
    resumed_step = state.get("step", 0)
    base_answers = state.get("eval_base")  # the base's answers from before the first run

    import peft
    import transformers
    import trl

    ctx.progress(0, None, f"loading {Path(source).name} ({p.method})")
    transformers.set_seed(p.seed)  # LoRA's initial A matrices come from the global RNG
    # ZeRO-3 loads each weight straight into its shard (zero.Init) only when the Trainer's DeepSpeed config exists
    # before from_pretrained: the arguments are made first and kept until the Trainer makes its own
    zero3_args = _sft_config(p, ctx.run_dir / "checkpoint", micro_batch, grad_accum, cuda, bool(dev_enc), trl) \
        if p.deepspeed == "zero3" else None
    model = _load_model(p, source, cuda)
    base_revision = getattr(model.config, "_commit_hash", None)
    if p.method != "full":
        lcfg = peft.LoraConfig(r=p.lora_r, lora_alpha=p.lora_alpha, lora_dropout=p.lora_dropout, bias="none",
                               task_type="CAUSAL_LM",
                               target_modules="all-linear" if p.target_modules.strip() in ("all-linear", "all", "")
                               else [t.strip() for t in p.target_modules.split(",") if t.strip()])
        try:
            model = peft.get_peft_model(model, lcfg)
        except ValueError as e:
            raise ValueError(f"target_modules {p.target_modules!r}: {str(e).splitlines()[0][:200]}") from None
    n_trainable = sum(x.numel() for x in model.parameters() if x.requires_grad)
    n_total = sum(x.numel() * (2 if getattr(x, "quant_type", None) else 1) for x in model.parameters())
    ctx.card(base=p.base, base_source=source, base_revision=base_revision, data=p.data, data_hash=data_hash,
             eval_data=p.eval_data or None, dev_hash=dev_hash, method=p.method, seed=p.seed,
             resumed_from=p.resume_from or None, trainable_params=n_trainable, total_params=n_total,
             memory_path=("4-bit NF4 weights, bf16 non-quantized weights (no fp32 upcast), non-reentrant "
                          "checkpointing, paged 8-bit AdamW, bf16 autocast, SDPA, trl's fused LM head" if cuda else
                          "CPU: fp32 compute, AdamW (torch), SDPA, trl's chunked LM head"),
             train_examples=len(train_enc), dev_examples=len(dev_enc), skipped=skipped, chat_template=(
                 "own" if own_template else "fallback"))
    ctx.log(f"{p.method}: {n_trainable / 1e6:.2f} M trainable of {n_total / 1e6:.1f} M parameters; "
            f"{len(train_enc)} training examples, {len(dev_enc)} dev")

    from datasets import Dataset

    train_ds = Dataset.from_list(train_enc)
    dev_ds = Dataset.from_list(dev_enc) if dev_enc else None
    ckpt_root = ctx.run_dir / "checkpoint"
    ckpt_root.mkdir(parents=True, exist_ok=True)
    sizes = {"micro_batch": micro_batch, "grad_accum": grad_accum}  # halved / doubled by an out-of-memory restart
    extra = lambda: {**sizes, "data_hash": data_hash,  # noqa: E731
                     "dev_hash": dev_hash, "base": p.base, "method": p.method, "params": asdict(p),
                     "dev_loss_start": callback.start_dev, "eval_base": base_answers}
    callback = _make_callback(ctx, cuda, ckpt_root, extra, resumed_step)
    if resume_ckpt is not None:
        callback.start_dev = state.get("dev_loss_start")  # the dev loss before the first of the runs
    if main and prompts and base_answers is None and resume_ckpt is None:  # the base as loaded (a new LoRA changes
        base_answers = _base_answers(model, tok, prompts, ctx, p.eval_new_tokens, cuda)  # nothing); rank 0 records it
    # a rank's cancel sync goes first: every rank reads the cancel just before the studio callback acts on it
    rank_callbacks = ctx.trainer_callbacks if hasattr(ctx, "trainer_callbacks") else list
    trainer, result_metrics, ooms = train_loop(
        lambda mb, ga: _trainer(p, model, tok, train_ds, dev_ds, ckpt_root, mb, ga, cuda,
                                [*rank_callbacks(), callback], trl, transformers),
        ctx, model, ckpt_root, extra, callback, sizes, resume_ckpt, dev_ds is not None, cuda,
        lambda: f"Lower max_seq_len (now {p.max_seq_len}; try {max(256, p.max_seq_len // 2)}), lora_r, or pick a "
                "smaller base")
    del zero3_args  # the Trainer's own arguments hold the DeepSpeed config now
    micro_batch, grad_accum = sizes["micro_batch"], sizes["grad_accum"]
    state, final_dev = finish(trainer, ctx, ckpt_root, extra, callback, dev_ds is not None)
    out_dir = ctx.run_dir / ("model" if p.method == "full" else "adapter")
    ctx.progress(trainer.state.global_step, trainer.state.max_steps, "saving the result")
    trainer.save_model(str(out_dir))  # every rank: ZeRO-3 gathers the shards; rank 0 writes
    if not main:
        return {}  # the other ranks only train: rank 0 writes the result and answers the dev prompts
    if hasattr(ctx, "alone"):
        ctx.alone()
    tok.save_pretrained(str(out_dir))
    if p.method != "full":
        cfg_path = out_dir / "adapter_config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["base_model_name_or_path"] = source
        if base_revision:
            cfg["revision"] = base_revision
        cfg_path.write_text(json.dumps(cfg, indent=2))
    side_by_side = []
    if prompts:
        if base_answers is None and p.method != "full":  # a checkpoint from before the evaluation: adapter off
            base_answers = _base_answers(model, tok, prompts, ctx, p.eval_new_tokens, cuda)
        tuned = answers(model, tok, prompts, ctx, "tuned", p.eval_new_tokens, cuda)
        side_by_side = score(prompts, base_answers, tuned)
        (ctx.run_dir / "evaluation.json").write_text(json.dumps(side_by_side, indent=1, ensure_ascii=False))
        ctx.artifact(ctx.run_dir / "evaluation.json", "base vs tuned answers (ROUGE-L)")
    rouge_base, rouge_tuned = (_mean(r[k] for r in side_by_side) for k in ("rouge_l_base", "rouge_l_tuned"))
    if side_by_side:
        ctx.log(f"ROUGE-L on {len(side_by_side)} dev prompts: base {_fmt(rouge_base)}, tuned {_fmt(rouge_tuned)}")
    hashes = {str(f.relative_to(ctx.run_dir)): sha256(f) for f in sorted(out_dir.rglob("*.safetensors"))}
    ctx.card(result=str(out_dir.relative_to(ctx.run_dir)), result_sha256=hashes, micro_batch=micro_batch,
             grad_accum=grad_accum, out_of_memory_restarts=ooms)
    weights = "adapter_model.safetensors" if p.method != "full" else next(
        (f.name for f in sorted(out_dir.glob("*.safetensors"))), "model.safetensors")
    ctx.artifact(out_dir / weights, "adapter (safetensors)" if p.method != "full" else "model (safetensors)")
    ctx.artifact(ctx.run_dir / "data_report.json", "data report")
    return {
        "steps": trainer.state.global_step,
        "epochs": round(float(trainer.state.epoch or 0), 3),
        "train_loss": result_metrics.get("train_loss"),
        "dev_loss_start": callback.start_dev,
        "dev_loss": final_dev,
        "dev_loss_before": callback.start_dev,
        "dev_loss_after": final_dev,
        "perplexity_before": _ppl(callback.start_dev),
        "side_by_side": side_by_side,
        "rouge_l_base": rouge_base,
        "rouge_l_tuned": rouge_tuned,
        "perplexity": _ppl(final_dev),
        "tokens_per_s": callback.tokens_per_s,
        "seconds": round(callback.seconds, 2),
        "peak_bytes": _peak_bytes(cuda),
        "micro_batch": micro_batch,
        "grad_accum": grad_accum,
        "out_of_memory_restarts": ooms,
        "result": str(out_dir),
        "checkpoint_step": state["step"] if state else None,
        "device": ctx.device,
        "train_examples": len(train_enc),
        "dev_examples": len(dev_enc),
    }


def _ppl(loss):
    return math.exp(min(loss, 50)) if loss is not None else None


# ---- the loop every studio trainer runs (finetune, vision_finetune) -------------------------------------------------
def train_loop(make_trainer, ctx, model, ckpt_root: Path, extra, callback, sizes: dict, resume_ckpt, has_dev: bool,
               cuda: bool, advice):
    """Train to the end: the dev loss first (unless resuming), then the Trainer from `resume_ckpt`. Cancel saves a
    checkpoint and re-raises. Out of memory saves one, halves sizes["micro_batch"], doubles sizes["grad_accum"] (the
    same effective batch) and continues from it with a new trainer (make_trainer(micro_batch, grad_accum)); at
    micro-batch 1 it stops with `advice()` (what to lower). Returns (trainer, its train metrics, OOM restarts)."""
    import torch

    from studio.context import JobCancelled

    ooms = 0
    while True:
        trainer = make_trainer(sizes["micro_batch"], sizes["grad_accum"])
        try:
            if resume_ckpt is None and has_dev and callback.start_dev is None:
                callback.evaluating = "start"
                m = trainer.evaluate()
                callback.evaluating = None
                callback.start_dev = m.get("eval_loss")
                ctx.metric(0, dev_loss=callback.start_dev, perplexity=_ppl(callback.start_dev))
                if _world() > 1:  # evaluate() marked the model prepared (for inference), and accelerate then skips
                    trainer.model._is_accelerate_prepared = False  # the DDP wrapper train() needs: ranks would drift
            out = trainer.train(resume_from_checkpoint=str(resume_ckpt) if resume_ckpt else None)
            return trainer, dict(out.metrics), ooms
        except JobCancelled:
            _save(trainer, ckpt_root, extra, callback)
            ctx.log(f"cancelled at step {trainer.state.global_step}; the checkpoint is kept and Resume continues "
                    "from it")
            raise
        except torch.OutOfMemoryError:
            step = trainer.state.global_step
            if _world() > 1:  # the other ranks wait in an all-reduce this one never joins: stop them all
                raise OutOfMemoryAtMicroBatch1(
                    f"Out of memory at step {step + 1} on one of the {_world()} devices (micro_batch "
                    f"{sizes['micro_batch']} per device). Across several devices the studio does not halve the "
                    "micro-batch mid-run: lower micro_batch and raise grad_accum to keep the effective batch, then "
                    f"Resume. {advice()}") from None
            model.zero_grad(set_to_none=True)
            if cuda:
                torch.cuda.empty_cache()
            saved = _save(trainer, ckpt_root, extra, callback) if step > 0 else None
            ooms += 1
            mb, ga = sizes["micro_batch"], sizes["grad_accum"]
            if mb == 1:
                where = f" Its checkpoint at step {step} is kept." if saved else ""
                raise OutOfMemoryAtMicroBatch1(
                    f"Out of memory at step {step + 1} with micro_batch 1 (grad_accum {ga}). {advice()}; close other "
                    f"programs using the GPU.{where}") from None
            sizes.update(micro_batch=mb // 2, grad_accum=ga * 2)
            if saved:
                saved = record_checkpoint(ckpt_root, saved["step"], extra())  # the new sizes go into the state
            msg = (f"out of memory at step {step + 1}: saved a checkpoint at step {step}, micro_batch now "
                   f"{sizes['micro_batch']}, grad_accum {sizes['grad_accum']} (same effective batch); continuing")
            ctx.emit("oom", step=step, micro_batch=sizes["micro_batch"], grad_accum=sizes["grad_accum"], message=msg)
            ctx.log(msg)
            resume_ckpt = (ckpt_root / saved["dir"]) if saved else None
            callback.resumed_step = step
            del trainer


def finish(trainer, ctx, ckpt_root: Path, extra, callback, has_dev: bool) -> tuple[dict | None, float | None]:
    """The last checkpoint (its state) and the final dev loss, reported at the last step."""
    state = _save(trainer, ckpt_root, extra, callback)
    final_dev = None
    if has_dev:
        callback.evaluating = "end"
        final_dev = trainer.evaluate().get("eval_loss")
        callback.evaluating = None
        ctx.metric(trainer.state.global_step, dev_loss=final_dev, perplexity=_ppl(final_dev))
    return state, final_dev


# ---- evaluation: the base and the tuned model on dev prompts ---------------------------------------------------------
def eval_set(examples, tok, max_seq_len: int, n: int) -> list[dict]:
    """The first n dev examples with an answer, each as {prompt (the last question, as shown), reference (the last
    answer), ids (the token ids before that answer exactly as training renders them: the chat template with the
    generation prompt, earlier turns included)}. Plain-text examples have no question and are left out."""
    from workers.finetune import data

    out = []
    for ex in examples:
        if len(out) >= n:
            break
        if ex.shape == "text" or ex.empty_answer():
            continue
        last = max(i for i, m in enumerate(ex.messages) if m["role"] == "assistant")
        parts = data.pieces(data.Example(ex.where, ex.shape, ex.messages[: last + 1]), tok)
        ids = [t for text, _ in parts[:-1] for t in tok(text, add_special_tokens=False)["input_ids"]]
        if not ids or len(ids) >= max_seq_len:  # training never saw this answer
            continue
        asked = next((m["content"] for m in reversed(ex.messages[:last]) if m["role"] == "user"), "")
        out.append({"prompt": str(asked), "reference": str(ex.messages[last]["content"]), "ids": ids})
    return out


def answers(model, tok, prompts: list[dict], ctx, who: str, max_new_tokens: int, cuda: bool, inputs=None,
            what: str = "dev prompt") -> list[str]:
    """Greedy answers to each prompt; every generated token is a cancel point. `inputs(prompt, device)` adds to what
    generate takes (a vision model's pixel_values)."""
    import contextlib

    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList

    n = len(prompts)

    class CancelPoint(StoppingCriteria):
        def __init__(self, i: int, start: int):
            self.i, self.start = i, start

        def __call__(self, input_ids, scores, **kw):
            k = input_ids.shape[1] - self.start
            ctx.progress(self.i + k / max_new_tokens, n, f"{what} {self.i + 1}/{n}: the {who} model's answer, "
                                                         f"{k} tokens")
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    was_training = model.training
    model.eval()
    cfg = getattr(model.config, "text_config", None) or model.config
    limit = int(getattr(cfg, "max_position_embeddings", 0) or 0)
    device = next(model.parameters()).device
    out = []
    try:
        for i, pr in enumerate(prompts):
            ctx.progress(i, n, f"{what} {i + 1}/{n}: the {who} model's answer")
            ids = torch.tensor([pr["ids"]], device=device)
            new = min(max_new_tokens, limit - ids.shape[1]) if limit else max_new_tokens
            if new < 1:
                out.append("")
                continue
            amp = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()
            with torch.no_grad(), amp:
                gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                                     do_sample=False, use_cache=True, pad_token_id=tok.pad_token_id,
                                     stopping_criteria=StoppingCriteriaList([CancelPoint(i, ids.shape[1])]),
                                     **(inputs(pr, device) if inputs else {}))
            out.append(tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=True).strip())
    finally:
        model.train(was_training)
    return out


def _base_answers(model, tok, prompts, ctx, max_new_tokens: int, cuda: bool) -> list[str]:
    """The base model's answers: with LoRA, the adapter switched off (the same weights in memory)."""
    import contextlib

    off = model.disable_adapter() if hasattr(model, "disable_adapter") else contextlib.nullcontext()
    with off:
        return answers(model, tok, prompts, ctx, "base", max_new_tokens, cuda)


def score(prompts: list[dict], base: list[str] | None, tuned: list[str]) -> list[dict]:
    """Each prompt with its reference and both answers, and their ROUGE-L F1 against the reference (rouge-score,
    stemmed, as the RAG evaluation scores answers)."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)

    def rouge(answer, ref):
        return round(scorer.score(ref, answer)["rougeL"].fmeasure, 4) if answer is not None else None

    rows = []
    for k, pr in enumerate(prompts):
        ref = pr["reference"]
        b = base[k] if base and k < len(base) else None
        rows.append({"prompt": pr["prompt"], "reference": ref, "base": b, "tuned": tuned[k],
                     "rouge_l_base": rouge(b, ref), "rouge_l_tuned": rouge(tuned[k], ref)})
    return rows


def _mean(values):
    vals = [v for v in values if v is not None]
    return round(sum(vals) / len(vals), 4) if vals else None


def _fmt(v):
    return "—" if v is None else f"{v:.3f}"


def _save(trainer, ckpt_root: Path, extra, callback) -> dict | None:
    """A checkpoint at the trainer's step (unless the last recorded one is already there) and its state.json. With
    several ranks every one calls this at the same step: each writes its part (its RNG state, its ZeRO shard) and rank
    0 records the checkpoint once all are written; the others return None."""
    step = trainer.state.global_step
    if step == 0:
        return None
    _barrier()  # rank 0's last record is complete: every rank reads the same state.json
    state_file = ckpt_root / "state.json"
    if state_file.exists():
        st = json.loads(state_file.read_text())
        if st["step"] == step and (ckpt_root / st["dir"]).exists():
            return st
    trainer._save_checkpoint(trainer.model, trial=None)  # transformers' own checkpoint writer
    return _record_when_written(ckpt_root, step, extra)


def _record_when_written(ckpt_root: Path, step: int, extra) -> dict | None:
    """record_checkpoint once every rank has written its files (rank 0 hashes them all); the other ranks wait until it
    is recorded, so none exits (on a cancel) while rank 0 still hashes."""
    _barrier()
    state = record_checkpoint(ckpt_root, step, extra()) if _rank() == 0 else None
    _barrier()
    return state


def trainer_args(p, ckpt_root: Path, micro_batch: int, grad_accum: int, cuda: bool, has_dev: bool) -> dict:
    """The Trainer arguments every studio trainer shares (from a Params with epochs, max_steps, lr, warmup, seed,
    eval_every, save_every): logging every step for the live plot, checkpoints the studio records, bf16 on CUDA, no
    reporting, no progress bars."""
    evaluate = has_dev and p.eval_every > 0
    return dict(
        output_dir=str(ckpt_root),
        per_device_train_batch_size=micro_batch,
        per_device_eval_batch_size=micro_batch,
        gradient_accumulation_steps=grad_accum,
        num_train_epochs=p.epochs,
        max_steps=p.max_steps if p.max_steps > 0 else -1,
        learning_rate=p.lr,
        warmup_steps=p.warmup,
        logging_steps=1,
        eval_strategy="steps" if evaluate else "no",
        eval_steps=p.eval_every if evaluate else None,
        save_strategy="steps",
        save_steps=p.save_every,
        seed=p.seed,
        data_seed=p.seed,
        bf16=cuda,
        use_cpu=not cuda,
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        include_num_input_tokens_seen="non_padding",
        save_only_model=False,
    )


def _sft_config(p: Params, ckpt_root: Path, micro_batch: int, grad_accum: int, cuda: bool, has_dev: bool, trl):
    if p.deepspeed:
        optim = "adamw_torch"  # ZeRO shards the Trainer's AdamW; a paged 8-bit one is not DeepSpeed's to shard
    else:
        optim = ("paged_adamw_8bit" if p.method != "full" else "adamw_torch_fused") if cuda else "adamw_torch"
    return trl.SFTConfig(
        **trainer_args(p, ckpt_root, micro_batch, grad_accum, cuda, has_dev),
        lr_scheduler_type=p.scheduler,
        optim=optim,
        gradient_checkpointing=p.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if p.gradient_checkpointing else None,
        max_length=p.max_seq_len,
        packing=p.packing,
        ddp_find_unused_parameters=False,  # every LoRA (or full) weight gets a gradient: DDP need not search
        # ZeRO: the config the launcher's DeepSpeed plugin reads, its "auto" values filled from these arguments
        deepspeed=str(ckpt_root.parent / distributed.FOLDER / "deepspeed.json") if p.deepspeed else None,
    )


def _trainer(p: Params, model, tok, train_ds, dev_ds, ckpt_root, micro_batch, grad_accum, cuda, callbacks: list, trl,
             transformers):
    args = _sft_config(p, ckpt_root, micro_batch, grad_accum, cuda, dev_ds is not None, trl)
    transformers.logging.set_verbosity_error()
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=train_ds, eval_dataset=dev_ds,
                             processing_class=tok, callbacks=callbacks)
    trainer.remove_callback(transformers.trainer_callback.PrinterCallback)  # the studio's events say it instead
    return trainer


def _make_callback(ctx, cuda: bool, ckpt_root: Path, extra, resumed_step: int):
    """Progress, metrics and cancel through the Trainer's callbacks (each call a cancel point) and the studio's
    record of every checkpoint the Trainer writes."""
    from transformers import TrainerCallback

    class StudioCallback(TrainerCallback):
        def __init__(self):
            self.resumed_step = resumed_step
            self.start_dev = None
            self.evaluating = None
            self.tokens_per_s = 0.0
            self.seconds = 0.0
            self._t0 = None
            self._window = None  # (time, tokens, step) where the speed window starts

        def on_train_begin(self, args, state, control, **kw):
            now = time.perf_counter()
            self._t0 = now
            self._window = (now, state.num_input_tokens_seen or 0, state.global_step)

        def on_substep_end(self, args, state, control, **kw):
            ctx.check_cancel()  # a micro-batch within the accumulation

        def on_step_begin(self, args, state, control, **kw):
            ctx.check_cancel()

        def on_step_end(self, args, state, control, **kw):
            ctx.progress(state.global_step, state.max_steps, f"step {state.global_step}/{state.max_steps}")

        def on_prediction_step(self, args, state, control, **kw):
            ctx.check_cancel()  # each dev batch

        def on_save(self, args, state, control, **kw):
            if (ckpt_root / f"checkpoint-{state.global_step}").exists():
                _record_when_written(ckpt_root, state.global_step, extra)

        def on_log(self, args, state, control, logs=None, **kw):
            logs = logs or {}
            now = time.perf_counter()
            step = state.global_step
            if "loss" in logs:
                t0, tok0, step0 = self._window
                dt = max(now - t0, 1e-9)
                self.tokens_per_s = ((state.num_input_tokens_seen or 0) - tok0) / dt
                self.seconds = now - self._t0
                done = step - step0
                eta = (state.max_steps - step) * dt / done if done else None
                ctx.metric(step, train_loss=logs["loss"], lr=logs.get("learning_rate"),
                           grad_norm=logs.get("grad_norm"), tokens_per_s=round(self.tokens_per_s, 1),
                           peak_bytes=_peak_bytes(cuda), eta_s=round(eta, 1) if eta is not None else None,
                           epoch=round(float(state.epoch or 0), 4))
            if "eval_loss" in logs and self.evaluating is None:
                ctx.metric(step, dev_loss=logs["eval_loss"], perplexity=_ppl(logs["eval_loss"]))

        def on_train_end(self, args, state, control, **kw):
            if self._t0 is not None:
                self.seconds = time.perf_counter() - self._t0

    return StudioCallback()
