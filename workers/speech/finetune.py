"""Job kind `asr_finetune`: fine-tune Whisper (full or LoRA) on your recordings and their transcripts, measure the WER
it gains on a dev set, and convert the result to CTranslate2 for the Transcribe tab (faster-whisper).

Data: workers.speech.asr_data (folders of audio + .txt/.srt/.vtt, manifests, zips, reviewed transcribe jobs); the
data report is written and emitted first. Training is transformers' Seq2SeqTrainer on log-mel features from the
base's own WhisperFeatureExtractor (30 s windows) and labels `<|startoftranscript|> [<|lang|> <|task|>]
<|notimestamps|> text <|endoftext|>` from its tokenizer (the language and task tokens only for a multilingual base,
as faster-whisper prompts it), with Fine-tune's trainer path (workers.finetune.train): the studio callback (live
train and dev loss, each call a cancel point), checkpoints recorded with their hashes, Resume that checks them, the
out-of-memory path (halve micro_batch, double grad_accum, continue from the checkpoint), the run card. Dev WER and
CER (greedy decoding, every eval_every steps too) are measured on the base before training and on the tuned model
after, each dev clip with its word diffs.

Run folder (runs/<job id>/): run.json, events.jsonl, data_report.json, evaluation.json, checkpoint/, model/ (the
transformers folder, LoRA merged) and ct2/ (the CTranslate2 model with tokenizer.json, preprocessor_config.json and
asr_finetune.json). `python app.py run transcribe --param model=<job id>` and the Transcribe tab use ct2/.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from studio.gate import Estimate

PACKAGES = ("transformers", "peft", "accelerate", "ctranslate2", "faster-whisper", "bitsandbytes")  # run card
PATHS = ("base", "data", "eval_data", "resume_from")  # params that name a server path or a job (studio.access)
MARKER = "asr_finetune.json"  # in ct2/: how the transcribe kind decodes this model



def path_items(name: str, value: str) -> list[str]:
    """The paths and job ids a param names, for studio.access: data and eval_data list several, comma-separated."""
    from workers.speech.asr_data import sources

    return sources(value) if name in ("data", "eval_data") else value.splitlines()

@dataclass(frozen=True)
class Params:
    base: str = "whisper-small"  # a preset (whisper-small, whisper-medium, -base, -tiny, -large-v3-turbo; or openai/…) or a transformers Whisper folder
    data: str = ""  # folder of audio + same-named .txt/.srt/.vtt, a CSV/TSV/JSONL manifest, a .zip, or a transcribe job id; several: comma-separated
    eval_data: str = ""  # your own dev set (same layouts); empty: a seeded split of `data`
    language: str = "en"  # the speech's language (ISO code): the label's language token on a multilingual base
    task: Literal["transcribe", "translate"] = "transcribe"  # translate: the labels are English text of other speech
    method: Literal["full", "lora"] = "full"  # full: every weight (small fits 12 GB); lora: adapters, merged at the end (medium on 12 GB)
    lora_r: int = 32  # LoRA rank
    lora_alpha: int = 64  # LoRA scale numerator (the update is scaled by alpha / r)
    lora_dropout: float = 0.05  # dropout on the LoRA input
    epochs: float = 3.0  # passes over the training clips (max_steps > 0 overrides)
    max_steps: int = 0  # optimizer steps; 0: as many as `epochs` take
    lr: float = 1e-5  # peak learning rate: 1e-5 suits full fine-tuning of small/medium, ~1e-3 LoRA
    warmup: float = 0.1  # warm-up: a fraction of the steps (< 1) or a number of steps (>= 1)
    micro_batch: int = 8  # clips per forward pass (halved automatically after an out-of-memory error)
    grad_accum: int = 2  # micro-batches per optimizer step: effective batch = micro_batch x grad_accum
    spec_augment: bool = False  # SpecAugment: mask random time spans of the features (helps on small data sets)
    freeze_encoder: bool = False  # train the decoder only: less memory and time; adapts vocabulary more than acoustics
    gradient_checkpointing: bool = True  # recompute activations in backward: far less memory for ~30% more time
    seed: int = 42  # data order, the dev split, LoRA init
    eval_every: int = 100  # optimizer steps between dev evaluations (loss and WER; also before and after); 0: only those
    save_every: int = 100  # optimizer steps between checkpoints (one is also written on cancel, OOM and at the end)
    dev_fraction: float = 0.1  # share of the clips held out as the dev set when eval_data is empty
    dev_max: int = 200  # at most this many dev clips
    quantization: Literal["float16", "int8", "int8_float16", "float32"] = "float16"  # the CTranslate2 weights
    threads: int = 0  # CPU threads; 0 uses every core
    resume_from: str = ""  # an asr_finetune job id whose checkpoint this run continues (set by Resume)

    def __post_init__(self):
        for name, lo, hi in [("lora_r", 1, 1024), ("lora_alpha", 1, 4096), ("lora_dropout", 0.0, 0.9),
                             ("epochs", 0.01, 1000.0), ("max_steps", 0, 10_000_000), ("lr", 1e-8, 1.0),
                             ("warmup", 0.0, 100_000.0), ("micro_batch", 1, 1024), ("grad_accum", 1, 4096),
                             ("seed", 0, 2**31 - 1), ("eval_every", 0, 10_000_000), ("save_every", 1, 10_000_000),
                             ("dev_fraction", 0.0, 0.5), ("dev_max", 1, 100_000), ("threads", 0, 1024)]:
            v = getattr(self, name)
            if not lo <= v <= hi:
                raise ValueError(f"{name} must be between {lo} and {hi}; got {v}")
        if not self.base.strip():
            raise ValueError("no base model given: a preset (whisper-small, whisper-medium, …) or a Whisper folder")
        if not self.data.strip():
            raise ValueError("no data given: a folder of audio with same-named .txt/.srt/.vtt transcripts, a "
                             "CSV/TSV/JSONL manifest (audio, text), a .zip of either, or a transcribe job id")
        if self.language and not (self.language.isalpha() and 2 <= len(self.language) <= 3):
            raise ValueError(f"language must be an ISO code such as en, de or haw; got {self.language!r}")


def validate(p: Params, config) -> None:
    """Bad input fails here, before anything is queued: the base's config, each data source, the checkpoint."""
    from workers.speech import asr_data
    from workers.speech.asr_estimate import config_of

    cfg = config_of(p.base)
    if int(cfg["vocab_size"]) >= 51865 and not p.language:
        raise ValueError("a multilingual base needs the speech's language (e.g. language=en): it is part of every "
                         "label")
    asr_data.check_sources(p.data, config.runs_dir)
    if p.eval_data:
        asr_data.check_sources(p.eval_data, config.runs_dir)
    from workers.finetune.train import check_resume

    check_resume(config, p.resume_from, "Whisper fine-tuning")


def estimate(p: Params, device) -> Estimate:
    from workers.speech import asr_estimate

    parts, note = asr_estimate.breakdown(p, device)
    return Estimate(parts=parts, note=note)


def shrink(p: Params):
    """Changes to try when over budget (the gate takes the first that fits), each naming only what changes."""
    from workers.finetune.train import distinct
    from workers.speech import asr_estimate

    yield from distinct(p, asr_estimate.shrinks(p))


# ---- the model and its labels ---------------------------------------------------------------------------------------
def source_of(base: str) -> str:
    """What from_pretrained loads: the preset's hub repo, or the folder."""
    from workers.speech.asr_estimate import preset_name, table

    name = preset_name(base)
    return table()[name]["repo"] if name else str(Path(base).expanduser())


def _missing(base: str, source: str, e: Exception) -> str:
    from workers.speech.asr_estimate import preset_name

    if preset_name(base):
        return (f"{base} is not on disk and cannot be downloaded here ({str(e).splitlines()[0][:160]}). With "
                f"internet the first run fetches it (or `huggingface-cli download {source} --include '*.json' "
                "'*.safetensors' '*.txt'`), or give a local Whisper folder as base")
    return f"cannot load {source}: {str(e).splitlines()[0][:200]}"


def load_processor(base: str, source: str):
    """(feature extractor, tokenizer) of the base."""
    from transformers import AutoTokenizer, WhisperFeatureExtractor

    try:
        return WhisperFeatureExtractor.from_pretrained(source), AutoTokenizer.from_pretrained(source)
    except OSError as e:
        raise RuntimeError(_missing(base, source, e)) from None


class Labels:
    """Token ids as faster-whisper prompts the model: <|startoftranscript|>, then <|lang|> <|task|> on a
    multilingual base (faster-whisper and CTranslate2 call a vocabulary of 51865 or more multilingual), then either
    <|notimestamps|> and the text, or (Whisper's own segment format, which faster-whisper decodes by default)
    <|0.00|> text <|end|>; the text after a space, as Whisper writes it; <|endoftext|> last."""

    def __init__(self, tok, vocab_size: int, language: str, task: str, max_tokens: int):
        def one(t):
            i = tok.convert_tokens_to_ids(t)
            if i is None or tok.convert_ids_to_tokens(i) != t:  # Whisper's unknown token is <|endoftext|> itself
                raise ValueError(f"the base's tokenizer has no {t} token: is it a Whisper tokenizer?")
            return i

        self.tok = tok
        self.multilingual = vocab_size >= 51865
        self.eot = one("<|endoftext|>")
        self.prefix = [one("<|startoftranscript|>")]
        if self.multilingual:
            self.prefix += [one(f"<|{language or 'en'}|>"), one(f"<|{task}|>")]
        self.notimestamps = one("<|notimestamps|>")
        self.prefix.append(self.notimestamps)
        self.timestamp_begin = self.notimestamps + 1  # <|0.00|>, then one id per 20 ms (as faster-whisper counts)
        self.max_tokens = max_tokens
        self.blank = tok(" ", add_special_tokens=False)["input_ids"]

    def ids(self, text: str, seconds: float | None = None) -> list[int]:
        """The label of a clip; with `seconds`, as one timestamped segment from 0.00 to its end."""
        body = self.tok(" " + text.strip(), add_special_tokens=False)["input_ids"]
        if seconds is None:
            return (self.prefix + body)[: self.max_tokens - 1] + [self.eot]
        end = self.timestamp_begin + min(1500, round(seconds / 0.02))
        return (self.prefix[:-1] + [self.timestamp_begin] + body)[: self.max_tokens - 2] + [end, self.eot]

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode([i for i in ids if i < self.eot], skip_special_tokens=True).strip()


def whisper_of(model):
    """The WhisperForConditionalGeneration under a PEFT wrapper (LoRA layers are injected into it in place)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def lora_targets(freeze_encoder: bool) -> str:
    """Attention projections and the MLP of every layer (the decoder's only when the encoder is frozen)."""
    where = r"model\.decoder" if freeze_encoder else r"model\.(encoder|decoder)"
    return rf".*{where}\.layers\.\d+\.((self_attn|encoder_attn)\.(q_proj|k_proj|v_proj|out_proj)|fc1|fc2)$"


def load_model(source: str, base: str, method: str, cuda: bool, bf16: bool):
    import torch
    from transformers import WhisperForConditionalGeneration

    half = torch.bfloat16 if bf16 else torch.float16
    dtype = half if (cuda and method == "lora") else torch.float32  # full: fp32 master weights, 16-bit autocast
    try:
        model = WhisperForConditionalGeneration.from_pretrained(source, dtype=dtype, attn_implementation="sdpa")
    except OSError as e:
        raise RuntimeError(_missing(base, source, e)) from None
    model.config.use_cache = False
    return model.to("cuda" if cuda else "cpu")


# ---- batches -------------------------------------------------------------------------------------------------------
class ClipDataset:
    """Clips as {input_features, labels}; the audio is decoded and its log-mel computed when the batch is made, exactly
    as faster-whisper computes it when it transcribes (its own feature extractor with the base's settings: the
    spectrogram of the clip alone, then zeros up to the 30 s window; a transformers WhisperFeatureExtractor pads the
    audio with silence instead, which the tuned model would then never see at transcription)."""

    def __init__(self, clips: list, fe, labels: Labels):
        from faster_whisper.feature_extractor import FeatureExtractor

        from workers.speech.asr_data import AudioFiles

        self.clips, self.labels, self.audio, self.audio_rate = clips, labels, AudioFiles(), fe.sampling_rate
        self.fe = FeatureExtractor(feature_size=fe.feature_size, sampling_rate=fe.sampling_rate,
                                   hop_length=fe.hop_length, chunk_length=fe.chunk_length, n_fft=fe.n_fft)

    def __len__(self):
        return len(self.clips)

    def features(self, i: int):
        import torch
        from faster_whisper.audio import pad_or_trim

        mel = self.fe(self.audio.clip(self.clips[i]))
        return torch.from_numpy(pad_or_trim(mel[:, : mel.shape[-1] - 1], self.fe.nb_max_frames)).float()

    def timestamped(self, i: int) -> bool:
        """Half the clips (fixed by their name) teach the timestamped form faster-whisper decodes by default, the
        other half the <|notimestamps|> form the dev WER is measured with: the model keeps both, as Whisper was
        trained."""
        return int(hashlib.sha256(self.clips[i].where.encode()).hexdigest(), 16) % 2 == 0

    def __getitem__(self, i):
        c = self.clips[i]
        stamp = None
        if self.timestamped(i):
            stamp = min(30.0, (c.end - c.start) if c.start is not None and c.end is not None else
                        len(self.audio.clip(c)) / self.audio_rate)
        return {"input_features": self.features(i), "labels": self.labels.ids(c.text, stamp)[1:]}


def collate(items):
    """Stack the features; pad labels with -100 (the model shifts <|startoftranscript|> in for the decoder)."""
    import torch

    n = max(len(x["labels"]) for x in items)
    labels = torch.full((len(items), n), -100, dtype=torch.long)
    for k, x in enumerate(items):
        labels[k, :len(x["labels"])] = torch.tensor(x["labels"])
    return {"input_features": torch.stack([x["input_features"] for x in items]), "labels": labels}


# ---- decoding and scoring ------------------------------------------------------------------------------------------
def greedy(model, feats, labels: Labels, check=lambda: None, max_new: int | None = None) -> list[list[int]]:
    """Greedy decoding of a batch of features with the KV cache: the prefix faster-whisper uses, special tokens and
    timestamps suppressed, a blank or <|endoftext|> suppressed at the first step (faster-whisper's suppress_blank)."""
    import torch
    from transformers.modeling_outputs import BaseModelOutput

    w = whisper_of(model)
    was = model.training
    model.eval()
    device, dtype = next(w.parameters()).device, next(w.parameters()).dtype
    limit = int(w.config.max_target_positions)
    steps = min(max_new or limit, limit - len(labels.prefix))
    vocab = int(w.config.vocab_size)
    try:
        with torch.no_grad():
            enc = w.model.encoder(feats.to(device, dtype)).last_hidden_state
            B = feats.shape[0]
            ids = torch.tensor([labels.prefix] * B, device=device)
            out = [[] for _ in range(B)]
            done = torch.zeros(B, dtype=torch.bool, device=device)
            past = None
            for step in range(steps):
                check()
                o = w(encoder_outputs=BaseModelOutput(last_hidden_state=enc),
                      decoder_input_ids=ids if past is None else ids[:, -1:], cache=past, use_cache=True)
                past = o.cache
                logits = o.logits[:, -1].float()
                logits[:, labels.eot + 1: vocab] = -math.inf  # special tokens and timestamps
                if step == 0:
                    logits[:, labels.blank + [labels.eot]] = -math.inf
                nxt = logits.argmax(-1)
                nxt[done] = labels.eot
                for k in range(B):
                    if not done[k] and nxt[k] != labels.eot:
                        out[k].append(int(nxt[k]))
                done |= nxt == labels.eot
                ids = torch.cat([ids, nxt[:, None]], 1)
                if bool(done.all()):
                    break
    finally:
        model.train(was)
    return out


def transcribe_dev(model, ds: ClipDataset, labels: Labels, ctx, who: str, batch: int) -> list[str]:
    """The dev clips transcribed greedily; every decoded token is a cancel point."""
    n = len(ds)
    texts: list[str] = []
    for i in range(0, n, batch):
        ctx.progress(i, n, f"dev WER: the {who} model, clip {i + 1}/{n}")
        import torch

        feats = torch.stack([ds.features(k) for k in range(i, min(n, i + batch))])
        texts += [labels.decode(x) for x in greedy(model, feats, labels, ctx.check_cancel)]
    return texts


def score(clips: list, base: list[str] | None, tuned: list[str] | None, norm) -> list[dict]:
    """Each dev clip: its reference, the base's and the tuned model's text, word errors and diffs (normalised)."""
    from workers.speech.asr_data import errors

    rows = []
    for k, c in enumerate(clips):
        ref = norm(c.text)
        row = {"where": c.where, "reference": c.text}
        for who, texts in (("base", base), ("tuned", tuned)):
            if texts is None:
                continue
            e = errors(ref, norm(texts[k]))
            row |= {who: texts[k], f"{who}_word_errors": e["word_errors"], f"{who}_char_errors": e["char_errors"],
                    f"{who}_diff": e["diff"], "words": e["words"], "chars": e["chars"]}
        rows.append(row)
    return rows


def rates(rows: list[dict], who: str) -> tuple[float | None, float | None]:
    """(WER, CER) of `who` over the rows."""
    from workers.speech.asr_data import rate

    if not rows or f"{who}_word_errors" not in rows[0]:
        return None, None
    r = [{"word_errors": x[f"{who}_word_errors"], "words": x["words"], "char_errors": x[f"{who}_char_errors"],
          "chars": x["chars"]} for x in rows]
    return rate(r, "word"), rate(r, "char")


def extremes(rows: list[dict], n: int = 5) -> tuple[list[dict], list[dict]]:
    """(most improved, worst improved) dev clips by word errors gained, each at most n."""
    both = [r for r in rows if "base_word_errors" in r and "tuned_word_errors" in r]
    gain = sorted(both, key=lambda r: r["base_word_errors"] - r["tuned_word_errors"], reverse=True)
    return gain[:n], gain[::-1][:n]


# ---- the run -----------------------------------------------------------------------------------------------------
def run(p: Params, ctx) -> dict:
    ctx.progress(0, None, "reading the data")
    import torch

    from studio.hashing import sha256
    from workers.finetune.train import _make_callback, _peak_bytes, finish, resume_state, train_loop
    from workers.speech import asr_data
    from workers.speech.asr_estimate import config_of

    cuda = ctx.device == "cuda"
    bf16 = cuda and torch.cuda.is_bf16_supported()
    torch.set_num_threads(p.threads or os.cpu_count() or 1)
    cfg = config_of(p.base)
    source = source_of(p.base)
    runs_dir, cache = ctx.run_dir.parent, ctx.data_dir / "speech" / "datasets"
    fe, tok = load_processor(p.base, source)
    model_dir = Path(source) if Path(source).is_dir() else None
    confined = ctx.owner is not None  # with a login, a manifest's audio only from its own folder
    report = asr_data.report(p.data, runs_dir, cache, p.language, p.eval_data, p.dev_fraction, p.dev_max, p.seed,
                             model_dir, ctx.check_cancel, confined)
    (ctx.run_dir / "data_report.json").write_text(json.dumps(report, indent=1, ensure_ascii=False))
    ctx.emit("data_report", report=report)
    usable = [c for c, _ in asr_data.probe(asr_data.read(p.data, runs_dir, cache, confined)[0], ctx.check_cancel)[0]]
    if p.eval_data:
        train_clips = usable
        dev_clips = [c for c, _ in asr_data.probe(asr_data.read(p.eval_data, runs_dir, cache, confined)[0])[0]]
        dev_clips = dev_clips[: p.dev_max]
    else:
        train_clips, dev_clips = asr_data.split(usable, p.dev_fraction, p.dev_max, p.seed)
    if not train_clips:
        raise ValueError("no training clip is left: every clip is unreadable, empty or longer than 30 s (see the "
                         "data report)")
    left_out = sum(len(report[k]) for k in ("unreadable_audio", "empty_transcripts", "too_long"))
    if left_out:
        ctx.log(f"left out {left_out} clips (unreadable, empty or past 30 s: named in the data report)")
    data_hash = asr_data.data_hash(p.data, runs_dir)
    dev_hash = asr_data.data_hash(p.eval_data, runs_dir) if p.eval_data else None
    labels = Labels(tok, int(cfg["vocab_size"]), p.language, p.task, int(cfg.get("max_target_positions") or 448))
    norm = asr_data.Normalizer(p.language, model_dir, getattr(tok, "english_spelling_normalizer", None))
    base_texts = None

    resume_ckpt, state, micro_batch, grad_accum = resume_state(ctx, p.resume_from, data_hash, p.micro_batch,
                                                               p.grad_accum)
    resumed_step = state.get("step", 0)
    base_texts = state.get("eval_base")  # the base's answers from before the first run

    import peft
    import transformers

    ctx.progress(0, None, f"loading {Path(source).name} ({p.method})")
    transformers.set_seed(p.seed)  # LoRA's initial A matrices come from the global RNG
    model = load_model(source, p.base, p.method, cuda, bf16)
    base_revision = getattr(model.config, "_commit_hash", None)
    model.config.apply_spec_augment = p.spec_augment
    if p.spec_augment:
        model.config.mask_time_prob = max(float(model.config.mask_time_prob or 0), 0.05)
    if p.freeze_encoder:
        model.freeze_encoder()
    if p.method == "lora":
        lcfg = peft.LoraConfig(r=p.lora_r, lora_alpha=p.lora_alpha, lora_dropout=p.lora_dropout, bias="none",
                               target_modules=lora_targets(p.freeze_encoder))
        model = peft.get_peft_model(model, lcfg)
    n_trainable = sum(x.numel() for x in model.parameters() if x.requires_grad)
    n_total = sum(x.numel() for x in model.parameters())
    ctx.card(base=p.base, base_source=source, base_revision=base_revision, data=p.data, data_hash=data_hash,
             eval_data=p.eval_data or None, dev_hash=dev_hash, method=p.method, seed=p.seed,
             resumed_from=p.resume_from or None, trainable_params=n_trainable, total_params=n_total,
             multilingual=labels.multilingual, prefix=labels.prefix, normalizer=norm.name,
             memory_path=(f"{'fp32 master weights' if p.method == 'full' else '16-bit base + fp32 LoRA'}, "
                          f"{'bf16' if bf16 else 'fp16'} autocast, paged 8-bit AdamW, SDPA"
                          + (", non-reentrant checkpointing" if p.gradient_checkpointing else "") if cuda else
                          "CPU: fp32, AdamW (torch), SDPA"),
             train_clips=len(train_clips), dev_clips=len(dev_clips))
    ctx.log(f"{p.method}: {n_trainable / 1e6:.2f} M trainable of {n_total / 1e6:.1f} M parameters; "
            f"{len(train_clips)} training clips, {len(dev_clips)} dev; labels start "
            f"{tok.convert_ids_to_tokens(labels.prefix)}")

    train_ds = ClipDataset(train_clips, fe, labels)
    dev_ds = ClipDataset(dev_clips, fe, labels) if dev_clips else None
    ckpt_root = ctx.run_dir / "checkpoint"
    ckpt_root.mkdir(parents=True, exist_ok=True)
    sizes = {"micro_batch": micro_batch, "grad_accum": grad_accum}  # halved / doubled by an out-of-memory restart
    extra = lambda: {**sizes, "data_hash": data_hash,  # noqa: E731
                     "dev_hash": dev_hash, "base": p.base, "method": p.method, "params": asdict(p),
                     "dev_loss_start": callback.start_dev, "eval_base": base_texts}
    callback = _make_callback(ctx, cuda, ckpt_root, extra, resumed_step)
    if resume_ckpt is not None:
        callback.start_dev = state.get("dev_loss_start")
    eval_batch = max(1, micro_batch)
    if dev_ds is not None and base_texts is None and resume_ckpt is None:  # a new LoRA changes nothing: the base
        base_texts = transcribe_dev(model, dev_ds, labels, ctx, "base", eval_batch)
        wer0, cer0 = rates(score(dev_clips, base_texts, None, norm), "base")
        ctx.metric(0, dev_wer=wer0, dev_cer=cer0)
    wer_cb = _wer_callback(ctx, callback, dev_ds, dev_clips, labels, norm, eval_batch)
    trainer, result_metrics, ooms = train_loop(
        lambda mb, ga: _trainer(p, model, train_ds, dev_ds, ckpt_root, mb, ga, cuda, bf16, [callback, wer_cb],
                                transformers),
        ctx, model, ckpt_root, extra, callback, sizes, resume_ckpt, dev_ds is not None, cuda,
        lambda: "Use method=lora, freeze_encoder=true or a smaller base")
    micro_batch, grad_accum = sizes["micro_batch"], sizes["grad_accum"]
    state, final_dev = finish(trainer, ctx, ckpt_root, extra, callback, dev_ds is not None)
    rows, tuned_texts = [], None
    if dev_ds is not None:
        if base_texts is None and p.method == "lora":  # resumed from a checkpoint written before the evaluation
            with model.disable_adapter():
                base_texts = transcribe_dev(model, dev_ds, labels, ctx, "base", eval_batch)
        tuned_texts = transcribe_dev(model, dev_ds, labels, ctx, "tuned", eval_batch)
        rows = score(dev_clips, base_texts, tuned_texts, norm)
    wer_base, cer_base = rates(rows, "base")
    wer_tuned, cer_tuned = rates(rows, "tuned")
    step = trainer.state.global_step
    ctx.metric(step, dev_wer=wer_tuned, dev_cer=cer_tuned)
    most, worst = extremes(rows)
    evaluation = {"normalizer": norm.name, "wer_base": wer_base, "wer_tuned": wer_tuned, "cer_base": cer_base,
                  "cer_tuned": cer_tuned, "clips": rows}
    (ctx.run_dir / "evaluation.json").write_text(json.dumps(evaluation, indent=1, ensure_ascii=False))
    if rows:
        ctx.log(f"dev WER {_fmt(wer_base)} → {_fmt(wer_tuned)}, CER {_fmt(cer_base)} → {_fmt(cer_tuned)} on "
                f"{len(rows)} clips ({norm.name})")
        ctx.artifact(ctx.run_dir / "evaluation.json", "base vs tuned transcripts on the dev set (WER, CER, diffs)")

    ctx.progress(step, trainer.state.max_steps, "saving the model (LoRA merged)")
    merged = model.merge_and_unload() if p.method == "lora" else model
    out_dir, ct2_dir = ctx.run_dir / "model", ctx.run_dir / "ct2"
    merged.config.use_cache = True
    merged.save_pretrained(str(out_dir))
    tok.save_pretrained(str(out_dir))
    fe.save_pretrained(str(out_dir))
    ctx.progress(step, trainer.state.max_steps, f"converting to CTranslate2 ({p.quantization})")
    convert(out_dir, ct2_dir, p.quantization)
    (ct2_dir / MARKER).write_text(json.dumps({
        "job_id": ctx.job_id, "base": p.base, "language": p.language, "task": p.task,
        "d_model": int(cfg["d_model"]), "decoder_layers": int(cfg["decoder_layers"]),
        "params_m": round(n_total / 1e6, 1) if p.method == "full" else round(
            sum(x.numel() for x in merged.parameters()) / 1e6, 1), "quantization": p.quantization}, indent=1))
    hashes = {str(f.relative_to(ctx.run_dir)): sha256(f) for f in [*sorted(out_dir.glob("*.safetensors")),
                                                                    ct2_dir / "model.bin"]}
    ctx.card(result="ct2", transformers_model="model", result_sha256=hashes, micro_batch=micro_batch,
             grad_accum=grad_accum, out_of_memory_restarts=ooms, wer_base=wer_base, wer_tuned=wer_tuned)
    ctx.artifact(ct2_dir / "model.bin", f"CTranslate2 model ({p.quantization}) for Transcribe")
    ctx.artifact(ctx.run_dir / "data_report.json", "data report")
    return {
        "steps": step,
        "epochs": round(float(trainer.state.epoch or 0), 3),
        "train_loss": result_metrics.get("train_loss"),
        "samples_per_s": result_metrics.get("train_samples_per_second"),
        "dev_loss_before": callback.start_dev,
        "dev_loss_after": final_dev,
        "wer_base": wer_base,
        "wer_tuned": wer_tuned,
        "cer_base": cer_base,
        "cer_tuned": cer_tuned,
        "normalizer": norm.name,
        "most_improved": most,
        "worst_improved": worst,
        "seconds": round(callback.seconds, 2),
        "peak_bytes": _peak_bytes(cuda),
        "micro_batch": micro_batch,
        "grad_accum": grad_accum,
        "out_of_memory_restarts": ooms,
        "model": str(out_dir),
        "ct2": str(ct2_dir),
        "checkpoint_step": state["step"] if state else None,
        "device": ctx.device,
        "train_clips": len(train_clips),
        "dev_clips": len(dev_clips),
    }


def _fmt(v):
    return "—" if v is None else f"{v:.3f}"


def convert(model_dir: Path, ct2_dir: Path, quantization: str) -> Path:
    """The transformers folder to CTranslate2 with ctranslate2's own converter, the tokenizer and the feature
    extractor's settings copied beside it (faster-whisper reads both)."""
    import ctranslate2

    copy = [f for f in ("tokenizer.json", "preprocessor_config.json") if (Path(model_dir) / f).exists()]
    ctranslate2.converters.TransformersConverter(str(model_dir), copy_files=copy).convert(
        str(ct2_dir), quantization=quantization, force=True)
    return ct2_dir


def _wer_callback(ctx, studio_cb, dev_ds, dev_clips, labels, norm, batch: int):
    """Dev WER and CER at every periodic evaluation (the ones before and after training are measured apart)."""
    from transformers import TrainerCallback

    class WerCallback(TrainerCallback):
        def on_evaluate(self, args, state, control, model=None, **kw):
            if dev_ds is None or studio_cb.evaluating is not None or model is None:
                return
            texts = transcribe_dev(model, dev_ds, labels, ctx, f"step {state.global_step}", batch)
            wer, cer = rates(score(dev_clips, None, texts, norm), "tuned")
            ctx.metric(state.global_step, dev_wer=wer, dev_cer=cer)

    return WerCallback()


def _trainer(p: Params, model, train_ds, dev_ds, ckpt_root: Path, micro_batch: int, grad_accum: int, cuda: bool,
             bf16: bool, callbacks: list, transformers):
    evaluate = dev_ds is not None and p.eval_every > 0
    args = transformers.Seq2SeqTrainingArguments(
        output_dir=str(ckpt_root),
        per_device_train_batch_size=micro_batch,
        per_device_eval_batch_size=micro_batch,
        gradient_accumulation_steps=grad_accum,
        num_train_epochs=p.epochs,
        max_steps=p.max_steps if p.max_steps > 0 else -1,
        learning_rate=p.lr,
        lr_scheduler_type="linear",
        warmup_steps=p.warmup,
        logging_steps=1,
        eval_strategy="steps" if evaluate else "no",
        eval_steps=p.eval_every if evaluate else None,
        save_strategy="steps",
        save_steps=p.save_every,
        seed=p.seed,
        data_seed=p.seed,
        bf16=cuda and bf16,
        fp16=cuda and not bf16,
        use_cpu=not cuda,
        optim="paged_adamw_8bit" if cuda else "adamw_torch",
        activation_checkpointing=p.gradient_checkpointing,  # transformers 5's name for gradient checkpointing
        activation_checkpointing_kwargs={"use_reentrant": False} if p.gradient_checkpointing else None,
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        remove_unused_columns=False,  # input_features go to the model as they are
        label_names=["labels"],
        prediction_loss_only=True,  # the dev loss here; the dev WER is decoded apart (greedy, with the KV cache)
        predict_with_generate=False,
        save_only_model=False,
    )
    transformers.logging.set_verbosity_error()
    trainer = transformers.Seq2SeqTrainer(model=model, args=args, train_dataset=train_ds, eval_dataset=dev_ds,
                                          data_collator=collate, callbacks=callbacks)
    trainer.remove_callback(transformers.trainer_callback.PrinterCallback)  # the studio's events say it instead
    return trainer
