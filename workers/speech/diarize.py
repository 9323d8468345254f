"""Speaker diarization without an account or token: resemblyzer speaker embeddings over Silero VAD speech,
clustered into speakers, merged into the transcript's words and segments.

pyannote.audio is an optional backend: used when it is installed and a Hugging Face token is set
(HF_TOKEN); without it the studio uses resemblyzer, whose weights ship inside its wheel.
"""
from __future__ import annotations

import os
from typing import Callable

import numpy as np

SR = 16000
WINDOW_RATE = 4.0  # embeddings per second of speech (each over resemblyzer's 1.6 s window)
AUTO_THRESHOLD = 0.35  # cosine distance between cluster means above which they are different speakers


def pyannote_available() -> bool:
    import importlib.util

    try:
        found = importlib.util.find_spec("pyannote.audio") is not None
    except ModuleNotFoundError:  # no pyannote package at all
        found = False
    return found and bool(os.environ.get("HF_TOKEN"))


def backend(choice: str) -> str:
    if choice == "auto":
        return "pyannote" if pyannote_available() else "resemblyzer"
    if choice == "pyannote" and not pyannote_available():
        raise ValueError("the pyannote backend needs `pip install pyannote.audio` and a Hugging Face token in "
                         "HF_TOKEN (with the pyannote/speaker-diarization-3.1 terms accepted); or use resemblyzer")
    return choice


# ---- turns: (start s, end s, speaker index) ----------------------------------------------------------------------
def speech_regions(audio: np.ndarray, threshold: float, min_silence_ms: int) -> list[tuple[int, int]]:
    from faster_whisper.vad import VadOptions, get_speech_timestamps

    ts = get_speech_timestamps(audio, VadOptions(threshold=threshold, min_silence_duration_ms=min_silence_ms,
                                                 speech_pad_ms=100))
    return [(t["start"], t["end"]) for t in ts]


def embed_windows(audio: np.ndarray, regions, device: str, check: Callable[[], None]):
    """One embedding per window of speech: (embeddings (n, 256), window centres in seconds, region index)."""
    import warnings

    with warnings.catch_warnings():  # webrtcvad, imported by resemblyzer, warns that pkg_resources is deprecated
        warnings.simplefilter("ignore", UserWarning)
        from resemblyzer import VoiceEncoder

    enc = VoiceEncoder(device=device, verbose=False)
    embs, centres, owner = [], [], []
    for r, (a, b) in enumerate(regions):
        check()
        _, partials, splits = enc.embed_utterance(audio[a:b], return_partials=True, rate=WINDOW_RATE)
        for e, sl in zip(partials, splits):
            centres.append((a + min((sl.start + sl.stop) / 2, b - a)) / SR)
            embs.append(e)
            owner.append(r)
    return np.asarray(embs, dtype=np.float32), np.asarray(centres), np.asarray(owner)


def cluster(embs: np.ndarray, num_speakers: int = 0) -> np.ndarray:
    """Agglomerative clustering (average linkage, cosine). A fixed count when given; otherwise clusters merge
    until their means are AUTO_THRESHOLD apart."""
    if len(embs) < 2:
        return np.zeros(len(embs), dtype=int)
    from scipy.cluster.hierarchy import fcluster, linkage

    z = linkage(embs, method="average", metric="cosine")
    if num_speakers:
        labels = fcluster(z, t=min(num_speakers, len(embs)), criterion="maxclust")
    else:
        labels = fcluster(z, t=AUTO_THRESHOLD, criterion="distance")
    return labels - 1


def smooth(labels: np.ndarray, owner: np.ndarray, width: int = 5) -> np.ndarray:
    """Majority vote over neighbouring windows of the same speech region: no one-window flicker."""
    out = labels.copy()
    half = width // 2
    for i in range(len(labels)):
        lo, hi = max(0, i - half), min(len(labels), i + half + 1)
        near = labels[lo:hi][owner[lo:hi] == owner[i]]
        out[i] = np.bincount(near).argmax()
    return out


def resemblyzer_turns(audio, *, num_speakers: int, vad_threshold: float, min_silence_ms: int, device: str,
                      check: Callable[[], None]) -> list[tuple[float, float, int]]:
    regions = speech_regions(audio, vad_threshold, min_silence_ms)
    if not regions:
        return []
    embs, centres, owner = embed_windows(audio, regions, device, check)
    labels = smooth(cluster(embs, num_speakers), owner)
    # each window speaks for the time around its centre, inside its region
    turns = []
    for i, (c, lab) in enumerate(zip(centres, labels)):
        a, b = regions[owner[i]]
        lo = a / SR if i == 0 or owner[i - 1] != owner[i] else (centres[i - 1] + c) / 2
        hi = b / SR if i + 1 == len(centres) or owner[i + 1] != owner[i] else (c + centres[i + 1]) / 2
        if turns and turns[-1][2] == lab and abs(turns[-1][1] - lo) < 1e-6:
            turns[-1] = (turns[-1][0], hi, lab)
        else:
            turns.append((lo, hi, int(lab)))
    return turns


def pyannote_turns(audio, *, num_speakers: int, device: str) -> list[tuple[float, float, int]]:
    import torch
    from pyannote.audio import Pipeline

    try:  # pyannote.audio 4 takes `token`, 3.x `use_auth_token`
        pipe = Pipeline.from_pretrained("pyannote/speaker-diarization-3.1", token=os.environ["HF_TOKEN"])
    except TypeError:
        pipe = Pipeline.from_pretrained("pyannote/speaker-diarization-3.1", use_auth_token=os.environ["HF_TOKEN"])
    pipe.to(torch.device(device))
    out = pipe({"waveform": torch.from_numpy(audio)[None], "sample_rate": SR},
               **({"num_speakers": num_speakers} if num_speakers else {}))
    annotation = getattr(out, "speaker_diarization", out)  # pyannote 4 wraps the annotation
    ids: dict[str, int] = {}
    return [(seg.start, seg.end, ids.setdefault(spk, len(ids)))
            for seg, _, spk in annotation.itertracks(yield_label=True)]


# ---- merge into the transcript -----------------------------------------------------------------------------------
def speaker_at(turns, t0: float, t1: float) -> int | None:
    """The speaker who talks most within [t0, t1]; the nearest turn when none overlaps."""
    if not turns:
        return None
    overlap: dict[int, float] = {}
    for a, b, s in turns:
        o = min(b, t1) - max(a, t0)
        if o > 0:
            overlap[s] = overlap.get(s, 0.0) + o
    if overlap:
        return max(overlap, key=overlap.get)
    mid = (t0 + t1) / 2
    return min(turns, key=lambda x: min(abs(x[0] - mid), abs(x[1] - mid)))[2]


def assign(segments: list[dict], turns) -> list[dict]:
    """Label every word and segment with a speaker; a segment whose words change speaker is split there.
    Labels are S1, S2, … in order of first appearance."""
    names: dict[int, str] = {}

    def label(idx):
        return None if idx is None else names.setdefault(idx, f"S{len(names) + 1}")

    out: list[dict] = []
    for seg in segments:
        ws = seg.get("words") or []
        if not ws:
            out.append({**seg, "speaker": label(speaker_at(turns, seg["start"], seg["end"]))})
            continue
        for w in ws:
            w["speaker"] = label(speaker_at(turns, w["start"], w["end"]))
        groups: list[list[dict]] = []
        for w in ws:
            if groups and groups[-1][-1]["speaker"] == w["speaker"]:
                groups[-1].append(w)
            else:
                groups.append([w])
        if len(groups) == 1:
            out.append({**seg, "speaker": groups[0][0]["speaker"]})
            continue
        for g in groups:
            out.append({**seg, "start": g[0]["start"], "end": g[-1]["end"], "text": "".join(w["word"] for w in g),
                        "words": g, "speaker": g[0]["speaker"]})
    for i, s in enumerate(out):
        s["id"] = i
    return out
