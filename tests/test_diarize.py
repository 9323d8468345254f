"""Diarization's automatic speaker count (num_speakers=0): one voice gets one label, two get two, three taking
turns get three, on espeak-ng voices (several variants, pitches and speeds) and on the real speech shipped in
gradio's media assets. `python tests/test_diarize.py` reprints the calibration behind workers.speech.diarize's
thresholds (distances within and between voices)."""
import itertools
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from test_transcribe import LINES, MODEL, TURNS, duration, speak

from studio import JobStatus

pytestmark = pytest.mark.skipif(not (shutil.which("espeak-ng") and shutil.which("sox")),
                                reason="espeak-ng and sox make the test speech (python app.py test installs them)")
GRADIO_AUDIO = Path(__import__("gradio").__file__).parent / "media_assets" / "audio"
# (espeak voice, pitch, tempo): resemblyzer tells these apart (cluster means 0.29-0.42 apart); espeak's male
# variants (m1-m7, klatt, the accents) are one voice to it, so each speaker here is from a different family
HOST, GUEST, THIRD, FOURTH = ("en-us", 35, 1.0), ("en-us+f3", 80, 1.0), ("en-us+f5", 50, 0.85), \
    ("en-gb-scotland", 50, 1.1)
MORE = ["Thanks, that is a good point and I agree with most of it.",
        "Let us move on to the schedule for the spring release.",
        "The printer on the second floor has been broken since Monday.",
        "I will send the minutes to everyone by the end of the day."]


def say(d: Path, name: str, text: str, voice) -> Path:
    """One utterance in a voice (espeak voice, pitch, tempo: sox changes the speaking rate)."""
    name_, pitch, tempo = voice
    path = speak(d / f"{name}.wav", text, name_, pitch)
    if tempo != 1.0:
        fast = d / f"{name}.tempo.wav"
        subprocess.run(["sox", str(path), str(fast), "tempo", str(tempo)], check=True)
        fast.replace(path)
    return path


def join(d: Path, name: str, parts: list[tuple[Path, float]]) -> tuple[Path, list[tuple[float, float]]]:
    """Utterances with the given pause after each; returns the file and each utterance's (start, end)."""
    files, bounds, t = [], [], 0.0
    for i, (p, pause) in enumerate(parts):
        files.append(str(p))
        bounds.append((t, t + duration(p)))
        t = bounds[-1][1] + pause
        if pause and i + 1 < len(parts):
            gap = d / f"pause{pause:.1f}.wav"
            if not gap.exists():
                subprocess.run(["sox", "-n", "-r", "16000", "-c", "1", str(gap), "trim", "0", str(pause)], check=True)
            files.append(str(gap))
    out = d / f"{name}.wav"
    subprocess.run(["sox", *files, str(out)], check=True)
    return out, bounds


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    d = tmp_path_factory.mktemp("diarize")
    singles = {f"{v[0]}/p{v[1]}": join(d, f"single{i}", [(say(d, f"s{i}_{j}", LINES[(2 * i + j) % 8], v), 0.6)
                                                          for j in range(2)])[0]
               for i, v in enumerate([HOST, GUEST, THIRD, FOURTH])}
    # about a minute of one voice, 12 sentences with pauses of 0.5-2.5 s (VAD makes a region of each)
    long_parts = [(say(d, f"long{j}", text, ("en-gb+m7", 40, 1.0)), [0.5, 1.2, 2.5][j % 3])
                  for j, text in enumerate(LINES + MORE)]
    two = join(d, "two", [(say(d, f"two{j}", t, FOURTH if j % 2 == 0 else THIRD), 0.8) for j, (_, _, t) in
                          enumerate(TURNS)])
    # three voices taking turns; the host's second turn is long (three sentences, ~12 s), as on the recording
    # whose long turn came out as a speaker of its own
    script = [(HOST, TURNS[0][2]), (GUEST, TURNS[1][2]), (THIRD, MORE[0]), (HOST, " ".join(LINES[1:4])),
              (GUEST, TURNS[3][2]), (THIRD, MORE[3])]
    three = join(d, "three", [(say(d, f"three{j}", t, v), 0.8) for j, (v, t) in enumerate(script)])
    return {"singles": singles, "long": join(d, "long", long_parts), "two": two, "three": three, "dir": d}


def turns_of(path, num_speakers=0):
    from faster_whisper import decode_audio

    from workers.speech import diarize as dz
    return dz.resemblyzer_turns(decode_audio(str(path)), num_speakers=num_speakers, vad_threshold=0.5,
                                min_silence_ms=500, device="cpu", check=lambda: None)


def speakers_of(turns) -> set[int]:
    return {s for _, _, s in turns}


def speaker_per_utterance(turns, bounds) -> list[int]:
    """The speaker who holds most of each utterance; asserts that it holds nearly all of it."""
    out = []
    for a, b in bounds:
        held: dict[int, float] = {}
        for lo, hi, s in turns:
            held[s] = held.get(s, 0.0) + max(0.0, min(hi, b) - max(lo, a))
        top = max(held, key=held.get)
        assert held[top] >= 0.85 * sum(held.values()), (a, b, held)
        out.append(top)
    return out


def test_one_voice_gets_one_speaker(clips):
    for voice, path in clips["singles"].items():
        assert len(speakers_of(turns_of(path))) == 1, voice


def test_a_minute_of_one_voice_with_pauses_gets_one_speaker(clips):
    path, bounds = clips["long"]
    assert 50 < duration(path) < 80
    turns = turns_of(path)
    assert speakers_of(turns) == {0}, turns
    assert turns[0][0] < bounds[0][0] + 0.5 and turns[-1][1] > bounds[-1][1] - 0.5  # all of the speech, labelled


def test_two_voices_get_two_speakers(clips):
    path, bounds = clips["two"]
    labels = speaker_per_utterance(turns_of(path), bounds)
    assert labels == [labels[0], labels[1]] * 2 and labels[0] != labels[1]


def test_three_voices_taking_turns_get_three_speakers_and_a_long_turn_stays_one(clips):
    path, bounds = clips["three"]
    turns = turns_of(path)
    assert len(speakers_of(turns)) == 3, turns
    a, b, c = speaker_per_utterance(turns, bounds)[:3]
    assert speaker_per_utterance(turns, bounds) == [a, b, c, a, b, c] and len({a, b, c}) == 3
    long_a, long_b = bounds[3]
    assert {s for lo, hi, s in turns if lo < long_b and hi > long_a} == {a}  # the long turn: one speaker
    assert len(speakers_of(turns_of(path, num_speakers=3))) == 3  # a given count still holds


@pytest.mark.skipif(not (GRADIO_AUDIO / "heath_ledger.mp3").exists(), reason="gradio ships no media assets")
def test_real_speech_one_voice_one_speaker_two_voices_two():
    from faster_whisper import decode_audio

    from workers.speech import diarize as dz
    cate, heath = (decode_audio(str(GRADIO_AUDIO / f)) for f in ("cate_blanch.mp3", "heath_ledger.mp3"))

    def count(audio) -> int:
        return len(speakers_of(dz.resemblyzer_turns(audio, num_speakers=0, vad_threshold=0.5, min_silence_ms=500,
                                                    device="cpu", check=lambda: None)))
    assert count(cate) == 1  # the average linkage alone made three of this 8 s clip (its onset and trail-off)
    pause = np.zeros(dz.SR, dtype=cate.dtype)
    assert count(np.concatenate([cate, pause, heath])) == 2


def test_merging_joins_near_means_and_folds_in_clusters_with_too_little_speech():
    from workers.speech import diarize as dz
    rng = np.random.default_rng(0)
    axes = np.eye(256, dtype=np.float32)

    def voice(direction, n, spread=0.6):  # windows scattered around a direction: mean distance ~0.15 to it
        return direction + spread * rng.standard_normal((n, 256)).astype(np.float32) / 16

    a, b = axes[0], axes[1]  # orthogonal: distance 1
    near = 0.9 * a + 0.3 * axes[2]  # 0.05 from a
    embs = np.concatenate([voice(a, 40), voice(near, 40), voice(b, 40), voice(0.6 * b + 0.8 * axes[3], 3)])
    labels = np.r_[np.zeros(40), np.ones(40), np.full(40, 2), np.full(3, 3)].astype(int)
    out = dz.merge_clusters(embs, labels, np.full(len(embs), 0.25))
    assert (out[:80] == 0).all() and (out[80:] == 1).all()  # a and near: one speaker; b and its 0.75 s stray: one
    out = dz.merge_clusters(embs, labels, np.r_[np.full(120, 0.25), np.full(3, 1.0)])
    assert set(out[120:]) == {2} and (out[80:120] == 1).all()  # 3 s of speech far from the rest: a speaker


def test_the_transcript_of_three_voices_names_three_speakers(studio, clips):
    path, bounds = clips["three"]
    job = studio.wait(studio.submit("transcribe", {"audio": str(path), **MODEL, "diarize": True}).id, 300)
    assert job.status is JobStatus.DONE, job.error
    assert job.result["speakers"] == ["S1", "S2", "S3"]
    data = json.loads((studio.run_dir(job.id) / "transcript.json").read_text())
    words = [(w, s["speaker"]) for s in data["segments"] for w in s["words"]]
    per_turn = []
    for a, b in bounds:
        labels = [w["speaker"] for w, _ in words if a <= (w["start"] + w["end"]) / 2 <= b]
        per_turn.append(max(set(labels), key=labels.count))
        assert labels.count(per_turn[-1]) >= 0.85 * len(labels), (a, b, labels)
    assert per_turn == ["S1", "S2", "S3", "S1", "S2", "S3"]


# ---- calibration: python tests/test_diarize.py ------------------------------------------------------------------
CALIBRATION_VOICES = [("en-us", 35, 150), ("en-us+f3", 80, 150), ("en-gb+m7", 40, 140), ("en-gb-scotland", 50, 160),
                      ("en-us+f1", 60, 170), ("en-gb+m3", 30, 130), ("en-029+f4", 70, 150), ("en-gb-x-rp+m1", 45, 155),
                      ("en-us+m2", 55, 180), ("en-gb+f2", 65, 145), ("en-us-nyc+m5", 40, 150), ("en-us+Alex", 50, 150),
                      ("en-gb+klatt", 50, 150), ("en-us+f5", 50, 120), ("en-gb-x-gbclan+m4", 25, 165),
                      ("en-us", 70, 200)]


def calibrate(d: Path) -> None:
    """Distances between resemblyzer embeddings within and between voices: windows, and means of a sentence."""
    from faster_whisper import decode_audio

    from workers.speech import diarize as dz

    def windows(audio):
        return dz.embed_windows(audio, dz.speech_regions(audio, 0.5, 500), "cpu", lambda: None)[0]

    def unit(e):
        return e / np.linalg.norm(e, axis=-1, keepdims=True)

    def mean(e):
        return unit(unit(e).mean(0))

    def pct(x):
        return " ".join(f"{v:.3f}" for v in np.percentile(x, [1, 5, 50, 95, 99]))

    voices = {}
    for v, (voice, pitch, speed) in enumerate(CALIBRATION_VOICES):
        per_sentence = []
        for i, text in enumerate(LINES):
            raw, wav = d / f"v{v}_{i}.raw.wav", d / f"v{v}_{i}.wav"
            subprocess.run(["espeak-ng", "-v", voice, "-p", str(pitch), "-s", str(speed), "-w", str(raw), text],
                           check=True)
            subprocess.run(["sox", "-q", str(raw), "-r", "16000", "-c", "1", str(wav)], check=True)
            per_sentence.append(windows(decode_audio(str(wav))))
        voices[f"{voice} p{pitch} s{speed}"] = per_sentence
    names = list(voices)
    within = np.concatenate([1 - (unit(e := np.concatenate(voices[n])) @ unit(e).T)[np.triu_indices(len(e), 1)]
                             for n in names])
    between = np.concatenate([(1 - unit(np.concatenate(voices[a])) @ unit(np.concatenate(voices[b])).T).ravel()
                              for a, b in itertools.combinations(names, 2)])
    print(f"window pairs, percentiles 1 5 50 95 99: same voice {pct(within)} | two voices {pct(between)}")
    same = [1 - mean(x) @ mean(y) for n in names for x, y in itertools.combinations(voices[n], 2)]
    print(f"sentence means: same voice {pct(same)}")
    print("median distance between sentence means, voice by voice:")
    for i, a in enumerate(names):
        row = [np.median([1 - mean(x) @ mean(y) for x in voices[a] for y in voices[b] if x is not y]) for b in names]
        print(f"{i:2d} " + " ".join(f"{r:.2f}" for r in row), a)
    real = {f: windows(decode_audio(str(GRADIO_AUDIO / f))) for f in
            ("cate_blanch.mp3", "cate_blanch_2.mp3", "heath_ledger.mp3")}
    for a, b in itertools.combinations(real, 2):
        print(f"real {a} / {b}: means {1 - mean(real[a]) @ mean(real[b]):.3f}")
    for a, e in real.items():
        h = len(e) // 2
        print(f"real {a}: {len(e)} windows, its two halves' means {1 - mean(e[:h]) @ mean(e[h:]):.3f}")
    print(f"thresholds: AUTO {dz.AUTO_THRESHOLD} MERGE {dz.MERGE_THRESHOLD} MIN_SPEAKER_S {dz.MIN_SPEAKER_S}")


if __name__ == "__main__":
    import sys
    import tempfile
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    with tempfile.TemporaryDirectory() as tmp:
        calibrate(Path(tmp))
