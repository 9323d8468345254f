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
# The automatic speaker count (num_speakers=0) in three steps (cluster()):
# 1. average-linkage clusters of windows, cut at AUTO_THRESHOLD (cosine distance averaged over window pairs);
# 2. clusters whose mean embeddings are closer than MERGE_THRESHOLD are one speaker;
# 3. a cluster with less than MIN_SPEAKER_S of speech is not a speaker: it joins its nearest cluster.
# Why: an average over window pairs counts each window's own spread, and real speech spreads more than synthetic
# (mean window-to-mean distance 0.10-0.13 for espeak, up to 0.2 and more for real voices), so step 1 alone cut one
# real speaker into two or three; a cluster's mean cancels that spread. Calibrated (python tests/test_diarize.py
# reprints it) on 16 espeak-ng voices (en-us, en-gb, en-gb-scotland, en-029, en-gb-x-rp, en-us-nyc, en-gb-x-gbclan
# with variants m1-m7, f1-f5, Alex, klatt; pitch 25-80, 120-200 words/min), 8 sentences each, and the real
# speech in gradio's media assets (two Cate Blanchett clips, one Heath Ledger clip). Cosine distance between
# means of one sentence (a turn): same voice median 0.08, 99th percentile 0.14, max 0.15; distinct voices
# 0.25-0.46 (median over pairs); real: same voice, two halves of a clip 0.16-0.20, across two recordings 0.33,
# two people 0.47-0.51. Window pairs: same voice median 0.21 (95th pct 0.33), distinct 0.35; real same 0.25
# (95th pct 0.47), distinct 0.54-0.59. Edge windows of a speech region (onset, trail-off) drift up to 0.56 from
# their speaker: step 3 folds them back. What it cannot split: espeak's male variants (m1-m7, klatt, Alex and
# the accents above share one formant voice, 0.07-0.20 apart) sound like one speaker to resemblyzer.
AUTO_THRESHOLD = 0.35  # step 1: average cosine distance between windows above which clusters stay apart
MERGE_THRESHOLD = 0.2  # step 2: cosine distance between cluster means below which they are one speaker
MIN_SPEAKER_S = 2.0  # step 3: seconds of speech a cluster needs to count as a speaker


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


def cluster(embs: np.ndarray, num_speakers: int = 0, seconds: np.ndarray | None = None) -> np.ndarray:
    """Agglomerative clustering (average linkage, cosine). A fixed count when given; otherwise the three steps
    above (seconds: the speech each window speaks for; 1/WINDOW_RATE each when not given). Labels 0..k-1."""
    if len(embs) < 2:
        return np.zeros(len(embs), dtype=int)
    from scipy.cluster.hierarchy import fcluster, linkage

    z = linkage(embs, method="average", metric="cosine")
    if num_speakers:
        return fcluster(z, t=min(num_speakers, len(embs)), criterion="maxclust") - 1
    labels = fcluster(z, t=AUTO_THRESHOLD, criterion="distance") - 1
    seconds = np.full(len(embs), 1 / WINDOW_RATE) if seconds is None else np.asarray(seconds, dtype=float)
    return merge_clusters(embs, labels, seconds)


def merge_clusters(embs: np.ndarray, labels: np.ndarray, seconds: np.ndarray) -> np.ndarray:
    """Steps 2 and 3: join the two clusters with the nearest means while they are MERGE_THRESHOLD apart or less;
    then the one with the least speech into its nearest while it has under MIN_SPEAKER_S. Labels 0..k-1."""
    unit = embs / np.maximum(np.linalg.norm(embs, axis=1, keepdims=True), 1e-9)
    groups = [np.flatnonzero(labels == k) for k in np.unique(labels)]
    while len(groups) > 1:
        means = np.stack([unit[g].mean(0) for g in groups])
        means /= np.maximum(np.linalg.norm(means, axis=1, keepdims=True), 1e-9)
        dist = 1 - means @ means.T
        np.fill_diagonal(dist, np.inf)
        a, b = np.unravel_index(np.argmin(dist), dist.shape)
        if dist[a, b] > MERGE_THRESHOLD:
            speech = [seconds[g].sum() for g in groups]
            a = int(np.argmin(speech))
            if speech[a] >= MIN_SPEAKER_S:
                break
            b = int(np.argmin(dist[a]))
        a, b = min(a, b), max(a, b)
        groups[a] = np.concatenate([groups[a], groups[b]])
        del groups[b]
    out = np.empty(len(embs), dtype=int)
    for k, g in enumerate(sorted(groups, key=min)):
        out[g] = k
    return out


def window_spans(centres: np.ndarray, owner: np.ndarray, regions) -> list[tuple[float, float]]:
    """The time each window speaks for: from halfway to its neighbours, out to its region's edges."""
    spans = []
    for i, c in enumerate(centres):
        a, b = regions[owner[i]]
        lo = a / SR if i == 0 or owner[i - 1] != owner[i] else (centres[i - 1] + c) / 2
        hi = b / SR if i + 1 == len(centres) or owner[i + 1] != owner[i] else (c + centres[i + 1]) / 2
        spans.append((lo, hi))
    return spans


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
    spans = window_spans(centres, owner, regions)
    labels = smooth(cluster(embs, num_speakers, np.array([hi - lo for lo, hi in spans])), owner)
    turns = []
    for (lo, hi), lab in zip(spans, labels):
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
