"""Training memory of a `vision_finetune` run, from the model's config alone (no weights, no CUDA): what the gate reads.

The memory path the studio takes (workers.vision.train), and so what is counted:
- CUDA: the language model's linear layers in 4-bit NF4, double-quantised (~0.52 bytes per parameter); its embeddings,
  LM head and norms in bf16; the vision tower and the projector in bf16 (frozen, so no activations are kept for
  them); LoRA weights in fp32 with their grads and paged 8-bit AdamW; the projector, when trained, as a second bf16
  copy (PEFT's modules_to_save) with grads and optimizer state; non-reentrant checkpointing on the language model
  (one hidden state per layer kept); the full-vocabulary logits with their fp32 loss and its grad. Every sequence is
  max_seq_len tokens at worst, the image's tokens (576 for LLaVA-1.5) among them.
- CPU: the same 4-bit weights with fp32 compute, everything else fp32, AdamW with two fp32 moments, the libraries'
  resident memory.
Measured on a GPU at the LLaVA-1.5-7B shape, r16, seq 1024, micro-batch 1: 6.2 GiB NVML peak with the CUDA context.
"""
from __future__ import annotations

from workers.finetune import estimate as ft

GiB = 2**30


def breakdown(p, device) -> tuple[dict, str]:
    """The parts of the estimate (bytes) and a note; `p` is a vision_finetune Params."""
    from workers.vision.model import config_of, image_tokens, vision_params

    cuda = getattr(device, "kind", "cpu") == "cuda"
    cfg = config_of(p.base)
    s = ft.shape(cfg["text_config"])
    half = 2 if cuda else 4  # bf16 on CUDA, fp32 on the CPU
    B, T, h, i, L, V = p.micro_batch, p.max_seq_len, s["h"], s["i"], s["L"], s["V"]
    vh = int(cfg["vision_config"].get("hidden_size", 1024))
    vi = int(cfg["vision_config"].get("intermediate_size", 4 * vh))
    proj = vh * h + h * h + 2 * h  # two linear layers (LLaVA-1.5's mlp2x_gelu)
    vision = vision_params(cfg)
    lora = ft.lora_params(s, p.lora_r, p.target_modules)
    weights = s["linear"] * 0.52 + s["other"] * half + vision * half + lora * 4
    trainable = lora + (proj if p.train_projector else 0)
    if p.train_projector:
        weights += proj * half  # modules_to_save: the trained copy beside the frozen original
    grads = lora * 4 + (proj * half if p.train_projector else 0)
    optim = trainable * (2 if cuda else 8)  # paged 8-bit AdamW on CUDA; two fp32 moments on the CPU
    layer = B * T * (10 * h + 4 * i) * half  # one decoder layer's activations (q/k/v/o, MLP, norms, LoRA dropout)
    if not cuda:
        layer += B * s["H"] * T * T * 4  # the CPU's attention may build the score matrix
    acts = (L * B * T * h * half + 2 * layer) if p.gradient_checkpointing else (L + 1) * layer
    logits = B * T * V * (half + 4 + 4)  # the logits, their fp32 upcast in the loss, and its grad
    n_img = image_tokens(cfg)
    vision_acts = B * (n_img + 1) * (4 * vh + vi) * half * 2  # the frozen tower's forward, one layer at a time
    parts = {
        "weights": int(weights),
        "grads": int(grads),
        "optimizer": int(optim),
        "activations": int(acts + logits + vision_acts),
        "workspace": (256 if cuda else 128) * 2**20,
    }
    if not cuda:
        parts["libraries"] = ft.LIBRARIES_CPU
    note = (f"qlora, language model {(s['linear'] + s['other']) / 1e9:.2f} B params in 4-bit NF4, vision tower + "
            f"projector {vision / 1e6:.0f} M in {'bf16' if cuda else 'fp32'}; {lora / 1e6:.1f} M LoRA params (r "
            f"{p.lora_r})" + (f" + projector {proj / 1e6:.0f} M trained" if p.train_projector else "")
            + f"; seq {T} ({n_img} image tokens) x micro-batch {B}"
            + (", checkpointing" if p.gradient_checkpointing else ""))
    return parts, note


def shrinks(p):
    """Changes to try, most preferred first: checkpointing, micro-batch 1 (same effective batch), shorter sequences
    (never below the image's tokens and some text), a smaller rank, the projector frozen."""
    from workers.vision.model import config_of, image_tokens

    floor = image_tokens(config_of(p.base)) + 128
    if not p.gradient_checkpointing:
        yield {"gradient_checkpointing": True}
    mb = {"micro_batch": 1, "grad_accum": p.grad_accum * p.micro_batch} if p.micro_batch > 1 else {}
    ck = {"gradient_checkpointing": True} if not p.gradient_checkpointing else {}
    if mb:
        yield {**mb, **ck}
    t = p.max_seq_len
    while t // 2 >= floor:
        t //= 2
        yield {**mb, **ck, "max_seq_len": t}
    if p.max_seq_len > floor:
        yield {**mb, **ck, "max_seq_len": floor}
    t = min(p.max_seq_len, max(floor, t))
    r = p.lora_r
    while r > 4:
        r //= 2
        yield {**mb, **ck, "max_seq_len": t, "lora_r": r}
    if p.train_projector:
        yield {**mb, **ck, "max_seq_len": t, "lora_r": min(p.lora_r, 4), "train_projector": False}
