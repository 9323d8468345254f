"""Job kind `vision_finetune`: QLoRA of a LLaVA-style vision-language model on the user's image-text pairs.

The guide's recipe: the language model in 4-bit NF4 with LoRA on its linear layers, the vision tower frozen in 16-bit,
the projector (the "head" between them) trained fully when `train_projector` (PEFT's modules_to_save, so it is saved
with the adapter). The trainer path is Fine-tune's (workers.finetune.train): transformers' Trainer with its studio
callback (live train and dev loss, each call a cancel point), checkpoints recorded with their hashes and Resume
(`resume_from`) that checks them, the out-of-memory path (halve micro_batch, double grad_accum, continue from the
checkpoint), the run card, the base and the tuned model answering dev images side by side with ROUGE-L.
Only the batches differ: a collator pads input_ids and labels and stacks the images' pixel_values.

Run folder (runs/<job id>/): run.json, events.jsonl, data_report.json, evaluation.json, checkpoint/ (as Fine-tune's),
and adapter/ (adapter_model.safetensors with the projector when trained, adapter_config.json whose
base_model_name_or_path is the base's repo or folder, the processor's files). Vision chat's `adapter=` takes the job id.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from studio.gate import Estimate
from studio.hashing import sha256
from workers.finetune.train import check_resume, check_seq_len, distinct

PACKAGES = ("transformers", "peft", "bitsandbytes", "accelerate", "pillow")  # versions for the run card
PATHS = ("base", "data", "images", "eval_data", "resume_from")  # params that name a server path or a job
LM_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# kept in 16-bit (never quantized): the vision tower, the projector and the LM head (transformers 5 names them under
# `model.`; older layouts at the top)
KEEP_16BIT = ["vision_tower", "multi_modal_projector", "model.vision_tower", "model.multi_modal_projector", "lm_head"]


@dataclass(frozen=True)
class Params:
    base: str = "llava-1.5-7b-hf"  # the hf preset (llava-hf/llava-1.5-7b-hf) or a transformers LLaVA-style folder
    data: str = ""  # a JSONL of {image, question, answer}, or LLaVA's conversation JSON with <image> in the human turn
    images: str = ""  # the folder or .zip holding the images; empty: beside the data file (and zips there)
    eval_data: str = ""  # a dev set file; empty: a seeded split of `data` (dev_fraction, at most dev_max pairs)
    dev_fraction: float = 0.05  # share of `data` held out as the dev set when eval_data is empty
    dev_max: int = 200  # at most this many dev pairs from the split
    lora_r: int = 16  # LoRA rank
    lora_alpha: int = 32  # LoRA scale numerator (the update is scaled by alpha / r)
    lora_dropout: float = 0.05  # dropout on the LoRA input
    target_modules: str = "all-linear"  # the language model's layers LoRA adapts: all-linear, or names (q_proj,v_proj)
    train_projector: bool = True  # train the vision-to-language projector fully (saved with the adapter)
    max_seq_len: int = 1024  # tokens per example, the image's included (576 for LLaVA-1.5); longer ones are cut
    micro_batch: int = 1  # examples per forward pass (halved automatically after an out-of-memory error)
    grad_accum: int = 16  # micro-batches per optimizer step: effective batch = micro_batch x grad_accum
    epochs: float = 2.0  # passes over the training pairs (max_steps > 0 overrides)
    max_steps: int = 0  # optimizer steps; 0: as many as `epochs` take
    lr: float = 2e-4  # peak learning rate (after warm-up)
    warmup: float = 0.03  # warm-up: a fraction of the steps (< 1) or a number of steps (>= 1)
    gradient_checkpointing: bool = True  # recompute the language model's activations in backward: far less memory
    seed: int = 42  # data order, the dev split, LoRA init and dropout
    eval_every: int = 50  # optimizer steps between dev-set evaluations (also before and after training); 0: only those
    save_every: int = 50  # optimizer steps between checkpoints (one is also written on cancel, OOM and at the end)
    eval_prompts: int = 5  # dev images the base and the tuned model answer side by side (ROUGE-L); 0: none
    eval_new_tokens: int = 64  # at most this many tokens per answer (greedy)
    threads: int = 0  # CPU threads; 0 uses every core
    resume_from: str = ""  # a vision_finetune job id whose checkpoint this run continues (set by Resume)

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
            raise ValueError("no base model given: the llava-1.5-7b-hf preset or a transformers LLaVA folder")
        if not self.data.strip():
            raise ValueError("no data given: name a JSONL of {image, question, answer} or LLaVA's conversation JSON")


def validate(p: Params, config) -> None:
    """Bad input fails here, before anything is queued: the base's config, every record of the data (a malformed
    one is named), the images' folder or zip, room for the image's tokens, the checkpoint."""
    from workers.vision import data
    from workers.vision.model import config_of, image_tokens

    cfg = config_of(p.base)
    n_img = image_tokens(cfg)
    if p.max_seq_len <= n_img + 8:
        raise ValueError(f"max_seq_len {p.max_seq_len} leaves no room for text after the image's {n_img} tokens; "
                         f"use at least {n_img + 64}")
    check_seq_len(p.max_seq_len, cfg["text_config"], p.base)
    data.check_images_source(p.images)
    pairs, _ = data.read(p.data)  # strict: the first malformed record is named (Check data lists them all)
    if p.eval_data:
        data.read(p.eval_data)
    elif len(pairs) < 2:
        raise ValueError(f"{len(pairs)} pair: a dev split needs at least 2 (or give eval_data)")
    check_resume(config, p.resume_from, "vision fine-tuning")


def estimate(p: Params, device) -> Estimate:
    from workers.vision import train_estimate

    parts, note = train_estimate.breakdown(p, device)
    return Estimate(parts=parts, note=note)


def shrink(p: Params):
    """Changes to try when over budget (the gate takes the first that fits), each naming only what changes."""
    from workers.vision import train_estimate

    yield from distinct(p, train_estimate.shrinks(p))


# ---- the model ----------------------------------------------------------------------------------------------------
def lora_targets(target_modules: str) -> str:
    """PEFT's target_modules as a regex over the language model's linear layers only: the vision tower and the
    projector never get LoRA (PEFT's own "all-linear" would reach into the vision tower)."""
    t = target_modules.strip()
    names = LM_LINEAR if t in ("all-linear", "all", "") else tuple(x.strip() for x in t.split(",") if x.strip())
    bad = [n for n in names if not n.replace("_", "").isalnum()]
    if bad or not names:
        raise ValueError(f"target_modules {target_modules!r}: give all-linear or layer names such as q_proj,v_proj")
    return rf".*language_model.*\.({'|'.join(names)})"


def _missing(base: str, source: str, e: Exception) -> str:
    from workers.vision.model import table

    if base in table():
        return (f"{base} is not on disk and cannot be downloaded here ({str(e).splitlines()[0][:160]}). Download "
                f"{source} in the Models tab (or `huggingface-cli download {source}`) on a machine with internet, "
                "or give a local LLaVA folder as base")
    return f"cannot load {source}: {str(e).splitlines()[0][:200]}"


def load_processor(base: str, source: str):
    from transformers import AutoProcessor

    try:
        return AutoProcessor.from_pretrained(source)
    except OSError as e:
        raise RuntimeError(_missing(base, source, e)) from None


def load_model(base: str, source: str, cuda: bool, four_bit: bool = True):
    """The LLaVA model for training or evaluation: the language model in 4-bit NF4 (double-quantised) with bf16
    compute on CUDA, fp32 on the CPU; vision tower, projector and LM head unquantized."""
    import torch
    from transformers import BitsAndBytesConfig, LlavaForConditionalGeneration

    dtype = torch.bfloat16 if cuda else torch.float32
    kw = dict(dtype=dtype, device_map={"": 0} if cuda else "cpu")
    if four_bit:
        kw["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype,
            bnb_4bit_quant_storage=torch.uint8, llm_int8_skip_modules=KEEP_16BIT)
    try:
        model = LlavaForConditionalGeneration.from_pretrained(source, **kw)
    except OSError as e:
        raise RuntimeError(_missing(base, source, e)) from None
    model.config.use_cache = False
    keep_4bit_trainable(model)
    return model


def keep_4bit_trainable(model) -> None:
    """bitsandbytes repacks a 4-bit layer's weights for a faster CPU kernel the first time it runs in eval mode
    without grads, on CPUs with AVX512-BF16, and training the layer afterwards gives wrong LoRA gradients. A model
    that evaluates between training steps (dev loss, base answers) must never repack."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        return
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = False


# ---- batches -----------------------------------------------------------------------------------------------------
class PairDataset:
    """Encoded pairs; each item's image is read and processed when the batch is made (a dataset of thousands of
    images is not held in memory)."""

    def __init__(self, rows: list[dict], enc):
        self.rows, self.enc = rows, enc

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        from workers.vision.data import load_image

        r = self.rows[i]
        return {"input_ids": r["input_ids"], "labels": r["labels"],
                "pixel_values": self.enc.pixel_values(load_image(Path(r["image"])))}


def collate(pad_id: int):
    """Pad input_ids (pad id) and labels (-100) on the right, mask the padding, stack the images."""
    def fn(items):
        import torch

        n = max(len(x["input_ids"]) for x in items)
        ids = torch.full((len(items), n), pad_id, dtype=torch.long)
        labels = torch.full((len(items), n), -100, dtype=torch.long)
        mask = torch.zeros((len(items), n), dtype=torch.long)
        for k, x in enumerate(items):
            m = len(x["input_ids"])
            ids[k, :m] = torch.tensor(x["input_ids"])
            labels[k, :m] = torch.tensor(x["labels"])
            mask[k, :m] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask,
                "pixel_values": torch.stack([x["pixel_values"] for x in items])}
    return fn


# ---- the run ------------------------------------------------------------------------------------------------------
def run(p: Params, ctx) -> dict:
    ctx.progress(0, None, "reading the data")
    import torch

    from workers.finetune.data import split
    from workers.finetune.train import (_fmt, _make_callback, _mean, _peak_bytes, _ppl, finish, resume_state, score,
                                        train_loop)
    from workers.vision import data
    from workers.vision.model import config_of, source_of

    cuda = ctx.device == "cuda"
    torch.set_num_threads(p.threads or os.cpu_count() or 1)
    cfg = config_of(p.base)
    source = source_of(p.base)
    processor = load_processor(p.base, source)
    enc = data.Encoder.of(processor, cfg)
    cache = ctx.data_dir / "vision" / "datasets"
    confined = ctx.owner is not None  # with a login, images come only from the data's own folder or zip
    images = data.Images(p.data, p.images, cache, confined)
    report = data.report(p.data, images, enc, p.max_seq_len, p.eval_data, p.dev_fraction, p.dev_max, p.seed)
    (ctx.run_dir / "data_report.json").write_text(json.dumps(report, indent=1, ensure_ascii=False))
    ctx.emit("data_report", report=report)
    pairs, _ = data.read(p.data)
    found, missing, unreadable = data.locate(pairs, images, check_pixels=False)
    found = [(pr, path) for pr, path in found if not any(u["where"] == pr.where for u in report["unreadable_images"])]
    if missing or report["unreadable_images"]:
        ctx.log(f"left out: {len(missing)} missing and {len(report['unreadable_images'])} unreadable images "
                "(named in the data report)")
    if p.eval_data:
        dev_pairs, _ = data.read(p.eval_data)
        dev_found, _, _ = data.locate(dev_pairs, data.Images(p.eval_data, p.images, cache, confined))
        train_found = found
    else:
        train_found, dev_found = split(found, p.dev_fraction, p.dev_max, p.seed)
    train_rows, skipped = data.encode_all(train_found, enc, p.max_seq_len)
    dev_rows, _ = data.encode_all(dev_found, enc, p.max_seq_len)
    if not train_rows:
        raise ValueError("no training pair is left: every image is missing or unreadable, or every answer is empty "
                         "or cut off by max_seq_len (see the data report)")
    data_hash = data.file_hash(p.data)
    dev_hash = data.file_hash(p.eval_data) if p.eval_data else None
    prompts = eval_set(dev_found, enc, p.max_seq_len, p.eval_prompts)
    base_answers = None

    resume_ckpt, state, micro_batch, grad_accum = resume_state(ctx, p.resume_from, data_hash, p.micro_batch,
                                                               p.grad_accum)
    resumed_step = state.get("step", 0)
    base_answers = state.get("eval_base")  # the base's answers from before the first run

    import peft
    import transformers

    ctx.progress(0, None, f"loading {Path(source).name} (4-bit language model)")
    transformers.set_seed(p.seed)  # LoRA's initial A matrices come from the global RNG
    model = load_model(p.base, source, cuda)
    base_revision = getattr(model.config, "_commit_hash", None)
    lcfg = peft.LoraConfig(r=p.lora_r, lora_alpha=p.lora_alpha, lora_dropout=p.lora_dropout, bias="none",
                           task_type="CAUSAL_LM", target_modules=lora_targets(p.target_modules),
                           modules_to_save=["multi_modal_projector"] if p.train_projector else None)
    try:
        model = peft.get_peft_model(model, lcfg)
    except ValueError as e:
        raise ValueError(f"target_modules {p.target_modules!r}: {str(e).splitlines()[0][:200]}") from None
    n_trainable = sum(x.numel() for x in model.parameters() if x.requires_grad)
    n_total = sum(x.numel() * (2 if getattr(x, "quant_type", None) else 1) for x in model.parameters())
    ctx.card(base=p.base, base_source=source, base_revision=base_revision, data=p.data, data_hash=data_hash,
             images=p.images or None, eval_data=p.eval_data or None, dev_hash=dev_hash, method="qlora",
             seed=p.seed, resumed_from=p.resume_from or None, trainable_params=n_trainable, total_params=n_total,
             image_tokens=enc.image_tokens, train_projector=p.train_projector,
             memory_path=("language model 4-bit NF4 (double quant), vision tower + projector + LM head bf16, "
                          "non-reentrant checkpointing, paged 8-bit AdamW, bf16 autocast, SDPA" if cuda else
                          "CPU: language model 4-bit NF4 with fp32 compute, the rest fp32, AdamW (torch)"),
             train_examples=len(train_rows), dev_examples=len(dev_rows), skipped=skipped,
             missing_images=len(report["missing_images"]), unreadable_images=len(report["unreadable_images"]))
    ctx.log(f"qlora: {n_trainable / 1e6:.2f} M trainable of {n_total / 1e6:.1f} M parameters (projector "
            f"{'trained' if p.train_projector else 'frozen'}); {len(train_rows)} training pairs, {len(dev_rows)} dev")

    train_ds = PairDataset(train_rows, enc)
    dev_ds = PairDataset(dev_rows, enc) if dev_rows else None
    ckpt_root = ctx.run_dir / "checkpoint"
    ckpt_root.mkdir(parents=True, exist_ok=True)
    sizes = {"micro_batch": micro_batch, "grad_accum": grad_accum}  # halved / doubled by an out-of-memory restart
    extra = lambda: {**sizes, "data_hash": data_hash,  # noqa: E731
                     "dev_hash": dev_hash, "base": p.base, "method": "qlora", "params": asdict(p),
                     "dev_loss_start": callback.start_dev, "eval_base": base_answers}
    callback = _make_callback(ctx, cuda, ckpt_root, extra, resumed_step)
    if resume_ckpt is not None:
        callback.start_dev = state.get("dev_loss_start")
    if prompts and base_answers is None and resume_ckpt is None:  # a new LoRA is zero, the projector a copy: the base
        base_answers = answers(model, enc, prompts, ctx, "base", p.eval_new_tokens, cuda)
    pad = enc.tokenizer.pad_token_id
    trainer, result_metrics, ooms = train_loop(
        lambda mb, ga: _trainer(p, model, train_ds, dev_ds, ckpt_root, mb, ga, cuda, callback, pad, transformers),
        ctx, model, ckpt_root, extra, callback, sizes, resume_ckpt, dev_ds is not None, cuda,
        lambda: f"Lower max_seq_len (now {p.max_seq_len}, {enc.image_tokens} of them the image's), lora_r, or set "
                "train_projector=false")
    micro_batch, grad_accum = sizes["micro_batch"], sizes["grad_accum"]
    state, final_dev = finish(trainer, ctx, ckpt_root, extra, callback, dev_ds is not None)
    out_dir = ctx.run_dir / "adapter"
    ctx.progress(trainer.state.global_step, trainer.state.max_steps, "saving the adapter")
    trainer.save_model(str(out_dir))
    processor.save_pretrained(str(out_dir))
    cfg_path = out_dir / "adapter_config.json"
    acfg = json.loads(cfg_path.read_text())
    acfg["base_model_name_or_path"] = source
    if base_revision:
        acfg["revision"] = base_revision
    cfg_path.write_text(json.dumps(acfg, indent=2))
    side_by_side = []
    if prompts:
        if base_answers is None:  # a checkpoint from before the evaluation: the adapter (and projector copy) off
            with model.disable_adapter():
                base_answers = answers(model, enc, prompts, ctx, "base", p.eval_new_tokens, cuda)
        tuned = answers(model, enc, prompts, ctx, "tuned", p.eval_new_tokens, cuda)
        side_by_side = [{"image": pr["image"], **row} for pr, row in zip(prompts, score(prompts, base_answers, tuned))]
        (ctx.run_dir / "evaluation.json").write_text(json.dumps(side_by_side, indent=1, ensure_ascii=False))
        ctx.artifact(ctx.run_dir / "evaluation.json", "base vs tuned answers on dev images (ROUGE-L)")
    rouge_base, rouge_tuned = (_mean(r[k] for r in side_by_side) for k in ("rouge_l_base", "rouge_l_tuned"))
    if side_by_side:
        ctx.log(f"ROUGE-L on {len(side_by_side)} dev images: base {_fmt(rouge_base)}, tuned {_fmt(rouge_tuned)}")
    hashes = {str(f.relative_to(ctx.run_dir)): sha256(f) for f in sorted(out_dir.rglob("*.safetensors"))}
    ctx.card(result="adapter", result_sha256=hashes, micro_batch=micro_batch, grad_accum=grad_accum,
             out_of_memory_restarts=ooms)
    ctx.artifact(out_dir / "adapter_model.safetensors", "adapter (safetensors)")
    ctx.artifact(ctx.run_dir / "data_report.json", "data report")
    return {
        "steps": trainer.state.global_step,
        "epochs": round(float(trainer.state.epoch or 0), 3),
        "train_loss": result_metrics.get("train_loss"),
        "dev_loss_before": callback.start_dev,
        "dev_loss_after": final_dev,
        "dev_loss": final_dev,
        "perplexity": _ppl(final_dev),
        "side_by_side": side_by_side,
        "rouge_l_base": rouge_base,
        "rouge_l_tuned": rouge_tuned,
        "tokens_per_s": callback.tokens_per_s,
        "seconds": round(callback.seconds, 2),
        "peak_bytes": _peak_bytes(cuda),
        "micro_batch": micro_batch,
        "grad_accum": grad_accum,
        "out_of_memory_restarts": ooms,
        "result": str(out_dir),
        "checkpoint_step": state["step"] if state else None,
        "device": ctx.device,
        "train_examples": len(train_rows),
        "dev_examples": len(dev_rows),
        "image_tokens": enc.image_tokens,
    }


def _trainer(p: Params, model, train_ds, dev_ds, ckpt_root: Path, micro_batch: int, grad_accum: int, cuda: bool,
             callback, pad_id: int, transformers):
    from workers.finetune.train import trainer_args

    args = transformers.TrainingArguments(
        **trainer_args(p, ckpt_root, micro_batch, grad_accum, cuda, dev_ds is not None),
        lr_scheduler_type="cosine",
        optim="paged_adamw_8bit" if cuda else "adamw_torch",
        activation_checkpointing=p.gradient_checkpointing,  # transformers 5's name for gradient checkpointing
        activation_checkpointing_kwargs={"use_reentrant": False} if p.gradient_checkpointing else None,
        remove_unused_columns=False,  # pixel_values go to the model as they are
        prediction_loss_only=True,  # the dev loss only: no (batch x seq x vocab) logits gathered
    )
    transformers.logging.set_verbosity_error()
    trainer = transformers.Trainer(model=model, args=args, train_dataset=train_ds, eval_dataset=dev_ds,
                                   data_collator=collate(pad_id), callbacks=[callback])
    trainer.remove_callback(transformers.trainer_callback.PrinterCallback)  # the studio's events say it instead
    return trainer


# ---- evaluation: the base and the tuned model on dev images ---------------------------------------------------------
def eval_set(found: list, enc, max_seq_len: int, n: int) -> list[dict]:
    """The first n dev pairs with an answer, each as {image (the file), prompt (the question), reference (the first
    answer), ids (the prompt's tokens exactly as training renders them)}."""
    out = []
    for pair, path in found:
        if len(out) >= n:
            break
        if pair.empty_answer():
            continue
        ids = enc.prompt_ids(pair)
        if len(ids) >= max_seq_len:
            continue
        out.append({"image": str(path), "prompt": pair.question(), "reference": pair.answer().strip(), "ids": ids})
    return out


def answers(model, enc, prompts: list[dict], ctx, who: str, max_new_tokens: int, cuda: bool) -> list[str]:
    """Greedy answers about each dev image (Fine-tune's, with the image's pixel values); each token a cancel point."""
    import torch

    from workers.finetune.train import answers as text_answers
    from workers.vision.data import load_image

    dtype = torch.bfloat16 if cuda else torch.float32

    def pixels(pr: dict, device) -> dict:
        return {"pixel_values": enc.pixel_values(load_image(Path(pr["image"])))[None].to(device, dtype)}

    return text_answers(model, enc.tokenizer, prompts, ctx, who, max_new_tokens, cuda, inputs=pixels,
                        what="dev image")
