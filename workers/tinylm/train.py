"""Job kind `tinylm`: train a 1-10 M parameter transformer from scratch on Python code, TinyShakespeare or your own
text."""
from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Literal

from studio.gate import Estimate

Preset = Literal["cpu-quick", "gpu-baby"]

# Sizes and schedules per preset; Params fields left at None take these.
PRESETS: dict[str, dict] = {
    # nanoGPT's CPU recipe shape (4 x 128, context 64, batch 12) with RoPE and a 3x hotter learning rate: reaches
    # val loss 1.88 on TinyShakespeare in about 1000 steps instead of 2000 (tests/benchmarks/tinylm.py).
    "cpu-quick": dict(n_layer=4, n_head=4, n_embd=128, block_size=64, batch_size=12, max_steps=2000, lr=3e-3,
                      min_lr=3e-4, warmup_steps=50, dropout=0.0, eval_every=100, eval_iters=10, beta2=0.99),
    # nanoGPT's shakespeare-char model: 6 layers, 6 heads, 384 wide, context 256 (10.7 M parameters).
    "gpu-baby": dict(n_layer=6, n_head=6, n_embd=384, block_size=256, batch_size=64, max_steps=5000, lr=1e-3,
                     min_lr=1e-4, warmup_steps=100, dropout=0.2, eval_every=250, eval_iters=100, beta2=0.99),
}

# Dense bf16 tensor-core peaks (FLOP/s) for MFU; CPUs have no entry, so MFU is left out there.
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "4090": 165e12, "4080": 97e12, "4070 Ti": 80e12,
              "4070": 58e12, "3090": 71e12, "3080": 59e12, "L4": 121e12, "A10": 125e12, "T4": 65e12}


PACKAGES = ("tokenizers",)  # versions for the run card
PATHS = ("data", "resume_from")  # params that name a server path or a job (studio.access)


@dataclass(frozen=True)
class Params:
    data: str = "python-stdlib"  # on disk everywhere; "tinyshakespeare" (downloaded on first use), a file or a folder
    preset: Preset = "cpu-quick"  # model size and schedule; fields left empty below take the preset's values
    pos: Literal["learned", "rope", "alibi"] = "rope"  # position scheme; RoPE converges fastest here
    tokenizer: Literal["char", "bpe"] = "char"  # char: a token per character; bpe: byte-level BPE trained on the data
    vocab_size: int = 512  # BPE vocabulary (char vocabularies are whatever the text holds)
    max_steps: int | None = None  # optimizer steps (preset: 2000 CPU, 5000 GPU)
    target_val_loss: float = 0.0  # stop as soon as val loss is at or below this; 0 trains all steps
    batch_size: int | None = None  # sequences per step
    block_size: int | None = None  # context in tokens; attention cost grows with its square
    n_layer: int | None = None  # transformer blocks; None: the preset's
    n_head: int | None = None  # attention heads (n_embd must divide by it); None: the preset's
    n_embd: int | None = None  # width; must be a multiple of n_head
    dropout: float | None = None  # 0 for short CPU runs; 0.2 keeps the GPU preset from overfitting
    lr: float | None = None  # peak learning rate after warm-up; cosine decay to min_lr
    min_lr: float | None = None  # learning rate at the end of the cosine decay; None: lr / 10
    warmup_steps: int | None = None  # linear warmup from 0; None: the preset's
    beta2: float | None = None  # AdamW beta2; 0.99 because there are few tokens per step
    weight_decay: float = 0.1  # on matrices only, not on norms
    grad_clip: float = 1.0  # max gradient norm; 0 turns clipping off
    eval_every: int | None = None  # steps between val-loss evaluations (and a text sample)
    eval_iters: int | None = None  # batches per evaluation
    checkpoint_every: int = 500  # steps between checkpoints (one is also written at the end and on cancel)
    seed: int = 1337  # data order and initial weights (nanoGPT's seed, so runs compare)
    compile: Literal["auto", "on", "off"] = "auto"  # torch.compile; auto: on CUDA only (CPU compile costs more than it saves)
    threads: int = 0  # CPU threads; 0 uses every core
    resume_from: str = ""  # a job id whose checkpoint this run continues (set by Resume)

    def __post_init__(self):
        def check(name, lo, hi):
            v = getattr(self, name)
            if v is not None and not (lo <= v <= hi):
                raise ValueError(f"{name} must be between {lo} and {hi}; got {v}")

        for name, lo, hi in [("max_steps", 1, 1_000_000), ("batch_size", 1, 4096), ("block_size", 8, 8192),
                             ("n_layer", 1, 48), ("n_head", 1, 64), ("n_embd", 8, 4096), ("dropout", 0.0, 0.9),
                             ("lr", 1e-6, 1.0), ("min_lr", 0.0, 1.0), ("warmup_steps", 0, 100_000),
                             ("beta2", 0.5, 0.9999), ("eval_every", 1, 1_000_000), ("eval_iters", 1, 10_000),
                             ("vocab_size", 260, 65536), ("target_val_loss", 0.0, 100.0),
                             ("checkpoint_every", 1, 1_000_000), ("weight_decay", 0.0, 1.0), ("grad_clip", 0.0, 100.0),
                             ("threads", 0, 1024), ("seed", 0, 2**32 - 1)]:  # torch: seed + step stays in range
            check(name, lo, hi)
        if not self.data.strip():
            raise ValueError("data is empty: use python-stdlib, tinyshakespeare, a text file or a folder")
        if self.n_embd and self.n_head and self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be a multiple of n_head ({self.n_head})")


def resolve(p: Params) -> Params:
    """Fill fields left as None from the preset."""
    preset = PRESETS[p.preset]
    filled = replace(p, **{k: v for k, v in preset.items() if getattr(p, k) is None})
    if filled.n_embd % filled.n_head:
        raise ValueError(f"n_embd ({filled.n_embd}) must be a multiple of n_head ({filled.n_head})")
    return filled


def validate(p: Params, config) -> None:
    from workers.tinylm.data import check_path

    resolve(p)
    check_path(p.data)
    if p.resume_from and not (config.runs_dir / p.resume_from / "checkpoint" / "state.json").exists():
        raise ValueError(f"job {p.resume_from} has no checkpoint to resume from")


def count_params(vocab: int, r: Params) -> int:
    d, L = r.n_embd, r.n_layer
    n = vocab * d + L * (12 * d * d + 2 * d) + d
    return n + (r.block_size * d if r.pos == "learned" else 0)


def estimate(p: Params, device) -> Estimate:
    """Bytes for fp32 weights, grads and AdamW state, activations at batch x context, and logits."""
    r = resolve(p)
    vocab = r.vocab_size if r.tokenizer == "bpe" else 256  # char vocabularies are at most a few hundred symbols
    n = count_params(vocab, r)
    cuda = getattr(device, "kind", "cpu") == "cuda"
    act_bytes = 2 if cuda else 4  # bf16 autocast on CUDA
    B, T, d, L, H = r.batch_size, r.block_size, r.n_embd, r.n_layer, r.n_head
    # Megatron's per-layer activation count (Korthikanti et al.): s*b*h*34 + 5*a*s^2*b; the s^2 term is gone
    # with fused (flash) attention, which CUDA uses unless ALiBi's explicit bias forces the math path.
    per_layer = B * T * d * 34 * act_bytes / 2
    if not cuda or r.pos == "alibi":
        per_layer += 5 * H * T * T * B * act_bytes / 2
    logits = B * T * vocab * 4 * 3  # logits, softmax and their gradient in fp32
    backward = 2 * per_layer  # gradients of one layer's activations live beside the stored ones in backward
    return Estimate(
        parts={
            "weights": 4 * n,
            "grads": 4 * n,
            "optimizer": 8 * n,  # AdamW: two fp32 moments
            "activations": int(L * per_layer + backward + logits),
            "workspace": 64 * 2**20,
        },
        note=f"{n / 1e6:.1f} M parameters",
    )


def shrink(p: Params):
    """Changes to try, most preferred first, when the job is over budget."""
    r = resolve(p)
    b = r.batch_size
    while b > 1:
        b //= 2
        yield {"batch_size": b}
    t = r.block_size
    while t > 32:
        t //= 2
        yield {"batch_size": 1, "block_size": t}
    w = r.n_embd
    while w // 2 >= r.n_head * 8:
        w //= 2
        yield {"batch_size": 1, "block_size": 32, "n_embd": w - w % r.n_head}


# ---------------------------------------------------------------------------------------------------------------
def _lr_at(step: int, r: Params) -> float:
    if step < r.warmup_steps:
        return r.lr * (step + 1) / (r.warmup_steps + 1)
    progress = (step - r.warmup_steps) / max(1, r.max_steps - r.warmup_steps)
    return r.min_lr + 0.5 * (1 + math.cos(math.pi * min(1.0, progress))) * (r.lr - r.min_lr)


def _peak_flops(device: str) -> float | None:
    if device != "cuda":
        return None
    import torch

    name = torch.cuda.get_device_name(0)
    for key, flops in PEAK_FLOPS.items():
        if key in name:
            return flops
    return None


def save_checkpoint(ckpt_dir: Path, model, optim, state: dict) -> None:
    """Weights and optimizer moments as safetensors, then state.json naming them: a crash leaves the last good one."""
    import torch
    from safetensors.torch import save_file, save_model

    ckpt_dir.mkdir(parents=True, exist_ok=True)
    step = state["step"]
    model_file, optim_file = f"model-{step}.safetensors", f"optim-{step}.safetensors"
    osd = optim.state_dict()
    tensors = {}
    for idx, st in osd["state"].items():
        for k, v in st.items():
            tensors[f"{idx}.{k}"] = (v if torch.is_tensor(v) else torch.tensor(v)).detach().cpu().contiguous()
    state = {**state, "model_file": model_file, "optim_file": optim_file, "param_groups": osd["param_groups"]}
    # Written under temporary names and renamed only when all of it is on disk: a failed write (disk full) leaves
    # the previous checkpoint whole and removes its own pieces.
    written = [ckpt_dir / f"{model_file}.tmp", ckpt_dir / f"{optim_file}.tmp", ckpt_dir / "state.json.tmp"]
    try:
        save_model(model, str(written[0]))
        save_file(tensors, str(written[1]))
        written[2].write_text(json.dumps(state))
    except BaseException:
        for f in written:
            f.unlink(missing_ok=True)
        raise
    os.replace(written[0], ckpt_dir / model_file)
    os.replace(written[1], ckpt_dir / optim_file)
    os.replace(written[2], ckpt_dir / "state.json")
    for f in ckpt_dir.glob("*.safetensors"):
        if f.name not in (model_file, optim_file):
            f.unlink()


def load_state(ckpt_dir: Path) -> dict:
    return json.loads((ckpt_dir / "state.json").read_text())


def load_checkpoint(ckpt_dir: Path, model, optim=None) -> dict:
    from safetensors.torch import load_file, load_model

    state = load_state(ckpt_dir)
    load_model(model, str(ckpt_dir / state["model_file"]), device=str(next(model.parameters()).device))
    if optim is not None:
        flat = load_file(str(ckpt_dir / state["optim_file"]))
        per: dict[int, dict] = {}
        for key, v in flat.items():
            idx, name = key.split(".", 1)
            per.setdefault(int(idx), {})[name] = v
        optim.load_state_dict({"state": per, "param_groups": state["param_groups"]})
    return state


def run(p: Params, ctx) -> dict:
    import torch

    from workers.tinylm.data import BpeTokenizer, CharTokenizer, load_text, load_tokenizer, save_tokenizer
    from workers.tinylm.model import GPT, GPTConfig, generate

    r = resolve(p)
    dev = ctx.device
    torch.set_num_threads(r.threads or os.cpu_count() or 1)
    torch.manual_seed(r.seed)
    text, source = load_text(r.data, ctx.data_dir / "datasets", lambda d, t, m: ctx.progress(d, t, m))
    data_hash = hashlib.sha256(text.encode()).hexdigest()

    resume_dir = ctx.run_dir.parent / r.resume_from / "checkpoint" if r.resume_from else None
    if resume_dir:
        state = load_state(resume_dir)
        if state["data_hash"] != data_hash:
            raise ValueError(f"the data changed since job {r.resume_from} ran (hash {data_hash[:12]} vs "
                             f"{state['data_hash'][:12]}); Retry to train from scratch on the new data")
        tok = load_tokenizer(resume_dir / "tokenizer.json")
        ctx.log(f"resuming job {r.resume_from} from step {state['step']}")
    else:
        ctx.log(f"training a {r.tokenizer} tokenizer on {source} ({len(text):,} characters)")
        tok = CharTokenizer.train(text) if r.tokenizer == "char" else BpeTokenizer.train(text, r.vocab_size)
    ckpt_dir = ctx.run_dir / "checkpoint"
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    save_tokenizer(tok, ckpt_dir / "tokenizer.json")

    ids = torch.tensor(tok.encode(text), dtype=torch.long)
    n_train = int(0.9 * len(ids))
    train, val = ids[:n_train], ids[n_train:]
    if len(val) <= r.block_size + 1:
        need = int((r.block_size + 2) / 0.1) + 1
        raise ValueError(f"the data is too short: {len(ids):,} tokens, so {len(val):,} for validation; context "
                         f"{r.block_size} needs at least {need:,} tokens (or lower block_size)")

    cfg = GPTConfig(vocab_size=tok.vocab_size, block_size=r.block_size, n_layer=r.n_layer, n_head=r.n_head,
                    n_embd=r.n_embd, dropout=r.dropout, pos=r.pos)
    model = GPT(cfg).to(dev)
    decay = [p_ for n_, p_ in model.named_parameters() if p_.dim() >= 2]
    no_decay = [p_ for n_, p_ in model.named_parameters() if p_.dim() < 2]
    optim = torch.optim.AdamW([{"params": decay, "weight_decay": r.weight_decay},
                               {"params": no_decay, "weight_decay": 0.0}],
                              lr=r.lr, betas=(0.9, r.beta2), fused=dev == "cuda")
    step, best_val, tokens_seen, elapsed_before = 0, float("inf"), 0, 0.0
    if resume_dir:
        state = load_checkpoint(resume_dir, model, optim)
        step, best_val = state["step"], state.get("best_val", float("inf"))
        tokens_seen, elapsed_before = state.get("tokens", 0), state.get("seconds", 0.0)
    n_params = model.num_params()
    ctx.card(data=source, data_hash=data_hash, tokenizer=tok.kind, vocab_size=tok.vocab_size, n_params=n_params,
             model=cfg.to_dict(), resumed_from=r.resume_from or None, preset=r.preset)
    ctx.log(f"model: {n_params / 1e6:.2f} M parameters, {r.pos} positions, vocab {tok.vocab_size}, on {dev}")

    use_compile = r.compile == "on" or (r.compile == "auto" and dev == "cuda")
    fwd = torch.compile(model) if use_compile else model
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if dev == "cuda" else torch.autocast("cpu", enabled=False)
    gen = torch.Generator().manual_seed(r.seed + step)  # resumed runs draw fresh batches
    peak = _peak_flops(dev)
    flops_tok = model.flops_per_token()

    def batch(split):
        src = train if split == "train" else val
        ix = torch.randint(len(src) - r.block_size - 1, (r.batch_size,), generator=gen)
        x = torch.stack([src[i : i + r.block_size] for i in ix])
        y = torch.stack([src[i + 1 : i + 1 + r.block_size] for i in ix])
        return x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)

    @torch.no_grad()
    def evaluate() -> float:
        model.eval()
        losses = []
        for _ in range(r.eval_iters):
            ctx.check_cancel()  # evaluation can take seconds: a cancel here still checkpoints in time
            x, y = batch("val")
            with amp:
                losses.append(fwd(x, y)[1].item())
        model.train()
        return sum(losses) / len(losses)

    def checkpoint(seconds):
        save_checkpoint(ckpt_dir, model, optim, {"step": step, "best_val": best_val, "tokens": tokens_seen,
                                                 "seconds": seconds, "data_hash": data_hash, "config": cfg.to_dict(),
                                                 "n_params": n_params, "params": {f.name: getattr(r, f.name)
                                                                                  for f in fields(r)}})

    from studio.context import JobCancelled

    t0 = time.perf_counter()
    window_t, window_tokens, train_losses = t0, 0, []
    val_loss, reached_at, tok_s = None, None, 0.0
    model.train()
    try:
        while step < r.max_steps:
            lr = _lr_at(step, r)
            for g in optim.param_groups:
                g["lr"] = lr
            x, y = batch("train")
            with amp:
                _, loss = fwd(x, y)
            loss.backward()
            if r.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), r.grad_clip)
            optim.step()
            optim.zero_grad(set_to_none=True)
            step += 1
            tokens_seen += x.numel()
            window_tokens += x.numel()
            train_losses.append(loss.item())
            ctx.progress(step, r.max_steps, f"step {step}/{r.max_steps} · loss {train_losses[-1]:.3f}")
            last = step == r.max_steps
            if step % r.eval_every == 0 or last:
                now = time.perf_counter()
                tok_s = window_tokens / max(now - window_t, 1e-9)
                val_loss = evaluate()
                best_val = min(best_val, val_loss)
                seconds = elapsed_before + time.perf_counter() - t0
                metrics = dict(train_loss=sum(train_losses) / len(train_losses), val_loss=val_loss,
                               perplexity=math.exp(min(val_loss, 50)), tokens_per_s=tok_s, lr=lr, seconds=seconds,
                               gflops=flops_tok * tok_s / 1e9)
                if peak:
                    metrics["mfu"] = flops_tok * tok_s / peak
                ctx.metric(step, **metrics)
                sample_ids = generate(model, torch.zeros((1, 1), dtype=torch.long, device=dev), 120,
                                      temperature=0.8, top_k=40, on_token=ctx.check_cancel)[0, 1:].tolist()
                model.train()
                ctx.emit("sample", step=step, text=tok.decode(sample_ids))
                train_losses, window_tokens = [], 0
                window_t = time.perf_counter()  # eval and sampling time stays out of tokens/s
                if r.target_val_loss and val_loss <= r.target_val_loss:
                    reached_at = seconds
                    ctx.log(f"val loss {val_loss:.4f} reached the target {r.target_val_loss} at step {step}")
                    break
            if step % r.checkpoint_every == 0 and not last:
                checkpoint(elapsed_before + time.perf_counter() - t0)
    except JobCancelled:
        checkpoint(elapsed_before + time.perf_counter() - t0)  # Resume continues from here
        raise
    seconds = elapsed_before + time.perf_counter() - t0
    checkpoint(seconds)
    ctx.artifact(ckpt_dir / load_state(ckpt_dir)["model_file"], "weights (safetensors)")
    ctx.artifact(ckpt_dir / "tokenizer.json", "tokenizer")
    return {
        "steps": step,
        "val_loss": val_loss,
        "best_val_loss": best_val,
        "perplexity": math.exp(min(val_loss, 50)) if val_loss is not None else None,
        "seconds": seconds,
        "reached_target": reached_at is not None,
        "seconds_to_target": reached_at,
        "tokens_per_s": tok_s,
        "n_params": n_params,
        "compiled": use_compile,
        "device": dev,
    }
