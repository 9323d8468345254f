"""Overhead benchmark: a warm job's fixed cost through the studio (submit → done, minus the same work called
directly), for a no-op, a short transcription and a one-turn chat. Goal: under 100 ms each.

Run inside the project's .venv:
    python tests/benchmarks/overhead.py [--audio PATH] [--runs 5] [--threads 2]
Without --audio an ~11 s clip is spoken with espeak-ng. Models: tiny.en and gemma-3-270m, both packaged on PyPI.
The last line printed is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from studio import Config, Studio  # noqa: E402

TEXT = ("The studio runs one job at a time on the device. It keeps the models a job needs, and it says what it is "
        "doing while a job waits. This clip is about eleven seconds long.")
CHAT = {"model": "gemma-3-270m-packaged", "n_ctx": 1024, "max_tokens": 32, "temperature": 0.0, "seed": 1}


def side_by_side(studio_fn, direct_fn, runs: int) -> tuple[list[float], list[float]]:
    """Seconds per call of each, alternating (so drift on a noisy machine hits both alike), after a warm-up of each."""
    a, b = [], []
    for i in range(runs + 1):
        for fn, out in ((studio_fn, a), (direct_fn, b)):
            t0 = time.perf_counter()
            fn()
            if i:
                out.append(time.perf_counter() - t0)
    return a, b


def through_studio(studio, kind: str, params: dict) -> None:
    job = studio.wait(studio.submit(kind, params).id, 3600)
    if job.status.value != "DONE":
        raise SystemExit(f"{kind} job {job.status.value}: {job.error}")


def direct_transcribe(audio: str, threads: int):
    from faster_whisper import WhisperModel, decode_audio

    from workers.speech.transcribe import model_path

    model = WhisperModel(model_path("tiny.en-packaged", lambda *a: None), device="cpu", compute_type="int8",
                         cpu_threads=threads)

    def run():  # the studio's defaults: VAD, word timestamps, beam 5
        segments, _ = model.transcribe(decode_audio(audio), beam_size=5, vad_filter=True, word_timestamps=True)
        for _ in segments:
            pass

    return run


def direct_chat(threads: int):
    from workers.chat.llm import ensure_local, load_gguf, resolve, stream_chat

    data = Path(tempfile.mkdtemp())
    ref = resolve(CHAT["model"], data)
    path = ensure_local(ref, data, lambda *a: None)
    llm = load_gguf(path, CHAT["n_ctx"], 0, (ref.preset or {}).get("chat_format"), threads)  # as the chat kind does

    def run():
        messages = [{"role": "system", "content": ""}, {"role": "user", "content": "Name three colours."}]
        for _ in stream_chat(llm, messages, max_tokens=CHAT["max_tokens"], temperature=0.0, top_p=0.95, seed=1):
            pass

    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--audio", help="a short clip (default: ~11 s spoken by espeak-ng)")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        audio = args.audio
        if not audio:
            if not (shutil.which("espeak-ng") and shutil.which("sox")):
                raise SystemExit("give --audio, or install espeak-ng and sox to speak the test clip")
            raw, audio = f"{tmp}/raw.wav", f"{tmp}/clip.wav"
            subprocess.run(["espeak-ng", "-s", "150", "-w", raw, TEXT], check=True)
            subprocess.run(["sox", raw, "-r", "16000", "-c", "1", audio], check=True)
        from faster_whisper import decode_audio

        seconds = len(decode_audio(audio)) / 16000
        from studio.params import build
        from workers.system import selftest  # the no-op's own work, called directly (a 1 MiB alloc on the CPU)

        class Ctx:
            device = "cpu"

            @staticmethod
            def progress(*a, **k):
                pass

        studio = Studio(Config.load(Path(tmp) / "data")).start()
        try:
            while not studio.worker_info.ready:
                time.sleep(0.05)
            noop, noop_direct = side_by_side(lambda: through_studio(studio, "selftest", {"mib": 1}),
                                             lambda: selftest.run(build(selftest.Params, {"mib": 1}), Ctx), args.runs)
            tr, tr_direct = side_by_side(
                lambda: through_studio(studio, "transcribe", {"audio": audio, "model": "tiny.en-packaged",
                                                              "threads": args.threads}),
                direct_transcribe(audio, args.threads), args.runs)
            chat, chat_direct = side_by_side(
                lambda: through_studio(studio, "chat", {**CHAT, "prompt": "Name three colours.", "system": "",
                                                        "threads": args.threads}),
                direct_chat(args.threads), args.runs)
        finally:
            studio.shutdown()
    med = statistics.median
    figures = {
        "noop_overhead_ms": round(1000 * (med(noop) - med(noop_direct)), 1),
        "transcribe_overhead_ms": round(1000 * (med(tr) - med(tr_direct)), 1),
        "chat_overhead_ms": round(1000 * (med(chat) - med(chat_direct)), 1),
        "noop_ms": round(1000 * med(noop), 1),
        "transcribe_s": round(med(tr), 3), "transcribe_direct_s": round(med(tr_direct), 3),
        "transcribe_speed_ratio": round(med(tr_direct) / med(tr), 3),
        "chat_s": round(med(chat), 3), "chat_direct_s": round(med(chat_direct), 3),
        "audio_seconds": round(seconds, 1), "runs": args.runs, "threads": args.threads,
    }
    print(f"no-op {figures['noop_overhead_ms']} ms, transcription of {seconds:.1f} s "
          f"{figures['transcribe_overhead_ms']} ms, chat turn {figures['chat_overhead_ms']} ms over direct calls")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
