"""Transcribe benchmark: real-time factor through the studio vs faster-whisper called directly, same clip and model.

Run inside the project's .venv:
    python tests/benchmarks/transcribe.py --audio PATH --model PATH_OR_PRESET [--runs 3] [--threads 2]
The last line printed is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from studio import Config, Studio  # noqa: E402


def direct(audio: str, model: str, runs: int, threads: int, beam: int) -> list[float]:
    """Seconds per run with faster-whisper alone (decode + transcribe), after one warm-up run."""
    from faster_whisper import WhisperModel, decode_audio

    from workers.speech.transcribe import model_path

    m = WhisperModel(model_path(model, lambda *a: None), device="cpu", compute_type="int8", cpu_threads=threads)
    out = []
    for i in range(runs + 1):
        t0 = time.perf_counter()
        segments, _ = m.transcribe(decode_audio(audio), beam_size=beam, vad_filter=True, word_timestamps=True)
        for _ in segments:
            pass
        if i:
            out.append(time.perf_counter() - t0)
    return out


def studio_runs(studio, audio: str, model: str, runs: int, threads: int, beam: int) -> list[float]:
    """Seconds per job, submit to done, with the model already in the worker's cache."""
    out = []
    for i in range(runs + 1):
        t0 = time.perf_counter()
        job = studio.wait(studio.submit("transcribe", {"audio": audio, "model": model, "threads": threads,
                                                       "beam_size": beam, "vad": True,
                                                       "word_timestamps": True}).id, 3600)
        if job.status.value != "DONE":
            raise SystemExit(f"transcribe job {job.status.value}: {job.error}")
        if i:
            out.append(time.perf_counter() - t0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--audio", required=True)
    ap.add_argument("--model", required=True, help="a CTranslate2 folder or a preset (tiny.en-packaged works offline)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--beam", type=int, default=5)
    args = ap.parse_args()
    from faster_whisper import decode_audio

    seconds = len(decode_audio(args.audio)) / 16000
    with tempfile.TemporaryDirectory() as tmp:
        studio = Studio(Config.load(tmp)).start()
        try:
            s = studio_runs(studio, args.audio, args.model, args.runs, args.threads, args.beam)
            studio.unload_models()  # the direct runs get the machine to themselves
            time.sleep(1.0)
        finally:
            studio.shutdown()
    d = direct(args.audio, args.model, args.runs, args.threads, args.beam)
    rtf_s, rtf_d = statistics.median(s) / seconds, statistics.median(d) / seconds
    print(f"{seconds:.1f} s of audio: studio RTF {rtf_s:.3f} (submit to done), direct RTF {rtf_d:.3f}")
    print(json.dumps({"speed_ratio": rtf_d / rtf_s, "rtf_studio": rtf_s, "rtf_direct": rtf_d,
                      "audio_seconds": seconds, "runs": args.runs, "threads": args.threads, "beam": args.beam}))


if __name__ == "__main__":
    main()
