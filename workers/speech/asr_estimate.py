"""Training memory of an `asr_finetune` run, from the Whisper config alone (no weights, no CUDA): what the gate reads.

The memory path the studio takes (workers.speech.finetune), and so what is counted:
- CUDA, method full: fp32 master weights, fp32 grads, 8-bit AdamW (2 bytes per trained parameter), bf16/fp16
  autocast; method lora: the base in 16-bit (frozen), LoRA weights fp32 with grads and 8-bit AdamW.
- The encoder always sees a 30 s window (1500 frames after its convolutions): its activations dominate. With
  gradient checkpointing each encoder and decoder layer keeps its input and one layer is recomputed with its grads;
  without, every layer keeps ~(10 d + 2 ffn) values per frame. SDPA on CUDA builds no frames x frames matrix; the
  CPU's attention may. A frozen encoder keeps nothing for backward (its output only).
- The decoder's labels are at most 448 tokens (typically under 100: `max_label_tokens`), its logits over the vocabulary
  in 16-bit with their fp32 loss and grad.
- CPU: everything fp32, AdamW with two fp32 moments, and the libraries' resident memory.
"""
from __future__ import annotations

import json
from pathlib import Path

GiB = 2**30
LABEL_TOKENS = 128  # decoder tokens per example the estimate assumes: a 30 s clip is ~100 words at most
LIBRARIES_CPU = 640 * 2**20  # transformers + peft + faster-whisper + PyAV resident in a torch process (host memory)


def table() -> dict:
    from studio.presets import presets

    return presets()["whisper_hf"]


def preset_name(base: str) -> str | None:
    """The preset a base names: its key (whisper-small) or its hub repo (openai/whisper-small)."""
    t = table()
    if base in t:
        return base
    return next((k for k, v in t.items() if v["repo"] == base), None)


def config_of(base: str) -> dict:
    """The base's Whisper config: a preset's from assets/, a local folder's config.json. ValueError otherwise."""
    name = preset_name(base)
    if name:
        return dict(table()[name]["config"])
    p = Path(base).expanduser()
    if (p / "model.bin").is_file():
        raise ValueError(f"{p.name} is a CTranslate2 (faster-whisper) model, which cannot be trained; give a "
                         "transformers Whisper folder or a preset (whisper-small, whisper-medium, …)")
    if (p / "config.json").is_file():
        cfg = json.loads((p / "config.json").read_text())
        if cfg.get("model_type") != "whisper":
            raise ValueError(f"{p.name} is a {cfg.get('model_type') or 'non-Whisper'} model; give a transformers "
                             "Whisper folder (model_type whisper)")
        return cfg
    if p.is_dir():
        raise ValueError(f"{base} has no config.json: name a transformers Whisper folder")
    raise ValueError(f"base {base!r} is neither a preset ({', '.join(table())}, or their openai/… repo names) nor a "
                     "transformers Whisper folder")


def shape(cfg: dict) -> dict:
    d = int(cfg["d_model"])
    fe, fd = int(cfg.get("encoder_ffn_dim") or 4 * d), int(cfg.get("decoder_ffn_dim") or 4 * d)
    Le, Ld = int(cfg["encoder_layers"]), int(cfg["decoder_layers"])
    V, mels = int(cfg["vocab_size"]), int(cfg.get("num_mel_bins") or 80)
    frames, tokens = int(cfg.get("max_source_positions") or 1500), int(cfg.get("max_target_positions") or 448)
    enc = mels * d * 3 + d * d * 3 + 2 * d + Le * (4 * d * d + 2 * d * fe + 9 * d + fe) + frames * d + 2 * d
    dec = V * d + tokens * d + Ld * (8 * d * d + 2 * d * fd + 15 * d + fd) + 2 * d
    return {"d": d, "fe": fe, "fd": fd, "Le": Le, "Ld": Ld, "V": V, "frames": frames, "enc": enc, "dec": dec,
            "H": int(cfg.get("encoder_attention_heads") or max(1, d // 64))}


def lora_params(s: dict, r: int, freeze_encoder: bool) -> int:
    """LoRA on q/k/v/out of every attention and fc1/fc2 (the decoder's only when the encoder is frozen)."""
    d = s["d"]
    enc = 0 if freeze_encoder else s["Le"] * (4 * r * 2 * d + r * (d + s["fe"]) * 2)
    dec = s["Ld"] * (8 * r * 2 * d + r * (d + s["fd"]) * 2)
    return enc + dec


def breakdown(p, device) -> tuple[dict, str]:
    """The parts of the estimate (bytes) and a note; `p` is an asr_finetune Params."""
    cuda = getattr(device, "kind", "cpu") == "cuda"
    s = shape(config_of(p.base))
    half = 2 if cuda else 4
    B, F, d, T = p.micro_batch, s["frames"], s["d"], LABEL_TOKENS
    n_all = s["enc"] + s["dec"]
    if p.method == "lora":
        trainable = lora_params(s, p.lora_r, p.freeze_encoder)
        weights = n_all * half + trainable * 4
    else:
        trainable = s["dec"] + (0 if p.freeze_encoder else s["enc"])
        weights = n_all * 4  # fp32 master weights; 16-bit autocast on CUDA
    grads = trainable * 4
    optim = trainable * (2 if cuda else 8)  # 8-bit AdamW on CUDA; two fp32 moments on the CPU
    enc_layer = B * F * (10 * d + 2 * s["fe"]) * half
    if not cuda:
        enc_layer += B * s["H"] * F * F * 4  # the CPU's attention may build the score matrix
    conv = B * 2 * F * (s["d"] + 80) * half * 2  # the two convolutions' outputs over 3000 and 1500 frames
    if p.freeze_encoder:
        enc_acts = conv + 2 * enc_layer + B * F * d * half  # forward only: one layer alive at a time, the output kept
    elif p.gradient_checkpointing:
        enc_acts = conv + s["Le"] * B * F * d * half + 2 * enc_layer
    else:
        enc_acts = conv + s["Le"] * enc_layer
    dec_layer = B * T * (12 * d + 2 * s["fd"]) * half + B * s["H"] * T * F * half  # cross-attention to the frames
    dec_acts = (s["Ld"] * B * T * d * half + 2 * dec_layer) if p.gradient_checkpointing else s["Ld"] * dec_layer
    cross_kv = s["Ld"] * B * F * d * half * 2  # each decoder layer's keys and values over the 1500 frames
    logits = B * T * s["V"] * (half + 4 + 4)
    parts = {
        "weights": int(weights),
        "grads": int(grads),
        "optimizer": int(optim),
        "activations": int(enc_acts + dec_acts + cross_kv + logits),
        "workspace": (384 if cuda else 128) * 2**20,
    }
    if not cuda:
        parts["libraries"] = LIBRARIES_CPU
    what = (f"{trainable / 1e6:.1f} M LoRA params (r {p.lora_r})" if p.method == "lora"
            else f"{trainable / 1e6:.0f} M params trained")
    note = (f"{p.method}, {n_all / 1e6:.0f} M params ({'16-bit base' if p.method == 'lora' and cuda else 'fp32'}); "
            f"{what}{', encoder frozen' if p.freeze_encoder else ''}; 30 s windows x micro-batch {B}"
            + (", checkpointing" if p.gradient_checkpointing else ""))
    return parts, note


def shrinks(p):
    """Changes to try, most preferred first: checkpointing, micro-batch down (same effective batch), LoRA instead of
    full, a frozen encoder, then smaller presets."""
    ck = {} if p.gradient_checkpointing else {"gradient_checkpointing": True}
    if ck:
        yield ck
    mb = p.micro_batch
    while mb > 1:
        mb //= 2
        yield {**ck, "micro_batch": mb, "grad_accum": p.grad_accum * p.micro_batch // mb}
    mbc = {"micro_batch": 1, "grad_accum": p.grad_accum * p.micro_batch} if p.micro_batch > 1 else {}
    if p.method == "full":
        yield {**ck, **mbc, "method": "lora"}
    if not p.freeze_encoder:
        yield {**ck, **mbc, "method": "lora", "freeze_encoder": True}
    size = _params(p.base)
    for name in sorted(table(), key=_params, reverse=True):
        if _params(name) < size:
            yield {**ck, **mbc, "base": name}
            yield {**ck, **mbc, "base": name, "method": "lora"}


def _params(base: str) -> int:
    s = shape(config_of(base))
    return s["enc"] + s["dec"]
