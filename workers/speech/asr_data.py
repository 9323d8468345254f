"""Speech fine-tuning data: what people have, read into clips of (audio, text, start, end), reported before any GPU
time, and scored (WER/CER with word diffs) after.

Layouts (`data` may list several, comma-separated):
- a folder of audio files, each with a same-named `.txt` (the whole clip's text) or `.srt` / `.vtt` (cut into
  segments by their timestamps);
- a manifest: CSV, TSV or JSONL with `audio` and `text` (optional `start` / `end` in seconds), audio paths relative
  to the manifest;
- a .zip of either (unpacked once, with the studio's size and ratio checks);
- a `transcribe` job id: its segments with their times, after renames and the post-editor changes you accepted
  (transcript.edited.json when it exists), on the file that job transcribed.

Pure Python plus PyAV (through faster-whisper's decoder) for the audio: no torch, so the io lane reads it.
"""
from __future__ import annotations

import csv
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

AUDIO = (".wav", ".mp3", ".flac", ".m4a", ".ogg", ".opus", ".webm", ".aac", ".mp4", ".mkv", ".mov")
TEXT = (".txt", ".srt", ".vtt")
MANIFEST = (".csv", ".tsv", ".jsonl")
MAX_S = 30.0  # Whisper's window: a clip longer than this cannot be one training example
SR = 16000
JOB_ID = re.compile(r"[0-9a-f]{16}|\d{4}-\d{6}-[0-9a-f]{4}")  # the store's job ids (as studio.access reads them)


@dataclass(frozen=True)
class Clip:
    audio: str  # the audio file
    text: str  # what is said
    start: float | None = None  # seconds into the file (a segment of a longer recording); None: the whole file
    end: float | None = None
    where: str = ""  # where it came from, as the report names it: "talk.srt #3", "list.csv line 4"


# ---- reading the layouts ----------------------------------------------------------------------------------------
def _ts(value: str) -> float:
    """SRT/VTT time: 00:01:02,500 / 01:02.500 -> seconds."""
    parts = value.strip().replace(",", ".").split(":")
    s = 0.0
    for p in parts:
        s = s * 60 + float(p)
    return s


def subtitle_segments(path: Path) -> list[tuple[float, float, str]]:
    """(start, end, text) of each cue of an .srt or .vtt file (tags such as <v Bob> and {\\an8} removed)."""
    text = path.read_text(encoding="utf-8-sig", errors="replace").replace("\r\n", "\n")
    out = []
    for block in re.split(r"\n\s*\n", text):
        lines = [ln for ln in block.strip().split("\n") if ln.strip()]
        for i, ln in enumerate(lines):
            m = re.match(r"\s*([\d:.,]+)\s*-->\s*([\d:.,]+)", ln)
            if m:
                words = " ".join(lines[i + 1:])
                words = re.sub(r"<[^>]+>|\{[^}]+\}", "", words).strip()
                out.append((_ts(m.group(1)), _ts(m.group(2)), words))
                break
    return out


def _folder(root: Path, label: str, problems: dict) -> list[Clip]:
    clips: list[Clip] = []
    files = sorted(f for f in root.rglob("*") if f.is_file() and not f.name.startswith("."))
    audio = {f.with_suffix(""): f for f in files if f.suffix.lower() in AUDIO}
    texts = {}
    for f in files:
        if f.suffix.lower() in TEXT:
            texts.setdefault(f.with_suffix(""), f)
    for stem, t in sorted(texts.items()):
        if stem not in audio:
            problems["transcript_without_audio"].append({"where": f"{label}/{t.relative_to(root)}"})
    for stem, a in sorted(audio.items()):
        name = f"{label}/{a.relative_to(root)}"
        t = texts.get(stem)
        if t is None:
            problems["missing_transcript"].append({"where": name})
            continue
        if t.suffix.lower() == ".txt":
            clips.append(Clip(str(a), t.read_text(encoding="utf-8-sig", errors="replace").strip(), where=name))
            continue
        cues = subtitle_segments(t)
        if not cues:
            problems["malformed"].append({"where": f"{label}/{t.relative_to(root)}",
                                          "error": "no cue with a start --> end time"})
        for k, (s, e, words) in enumerate(cues, 1):
            clips.append(Clip(str(a), words, s, e, f"{label}/{t.relative_to(root)} #{k}"))
    return clips


def _manifest(path: Path, problems: dict, confined: bool = False) -> list[Clip]:
    rows: list[tuple[int, dict]] = []
    if path.suffix.lower() == ".jsonl":
        for n, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                problems["malformed"].append({"where": f"{path.name} line {n}", "error": f"not valid JSON ({e.msg})"})
                continue
            rows.append((n, rec))
    else:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f, delimiter="\t" if path.suffix.lower() == ".tsv" else ",")
            for n, rec in enumerate(reader, 2):
                rows.append((n, rec))
    clips = []
    for n, rec in rows:
        where = f"{path.name} line {n}"
        if not isinstance(rec, dict) or not str(rec.get("audio") or "").strip():
            problems["malformed"].append({"where": where, "error": "needs 'audio' (the file) and 'text'"})
            continue
        a = Path(str(rec["audio"]).strip()).expanduser()
        a = a if a.is_absolute() else path.parent / a
        try:
            start = float(rec["start"]) if str(rec.get("start") or "").strip() else None
            end = float(rec["end"]) if str(rec.get("end") or "").strip() else None
        except ValueError:
            problems["malformed"].append({"where": where, "error": "start and end must be seconds (numbers)"})
            continue
        if confined and path.parent.resolve() not in a.resolve().parents:
            problems["transcript_without_audio"].append({"where": f"{where}: {rec['audio']} (outside the manifest's "
                                                                  "folder: upload the audio with it, or in a .zip)"})
            continue
        if not a.is_file():
            problems["transcript_without_audio"].append({"where": f"{where}: {rec['audio']}"})
            continue
        clips.append(Clip(str(a), str(rec.get("text") or "").strip(), start, end, where))
    return clips


def transcribe_job(job_id: str, runs_dir: Path) -> tuple[Path, list[Clip]]:
    """A reviewed `transcribe` job as training clips: each segment on the file it transcribed, the accepted
    post-editor changes and the user's hand corrections applied (speaker renames change no words)."""
    run = Path(runs_dir) / job_id
    data_file = next((f for f in (run / "transcript.edited.json", run / "transcript.json") if f.is_file()), None)
    card = run / "run.json"
    if data_file is None or not card.is_file():
        raise ValueError(f"job {job_id} has no transcript: give a finished transcribe job")
    params = json.loads(card.read_text()).get("params") or {}
    audio = Path(str(params.get("audio") or ""))
    if not audio.is_file():
        raise ValueError(f"the audio transcribe job {job_id} read ({audio.name or '?'}) is gone; its transcript "
                         "cannot train without it")
    data = json.loads(data_file.read_text())
    if data.get("partial"):
        raise ValueError(f"transcribe job {job_id} was cancelled part-way: its transcript is partial")
    clips = [Clip(str(audio), s["text"].strip(), float(s["start"]), float(s["end"]),
                  f"job {job_id} segment {s['id']}") for s in data["segments"]]
    return data_file, clips


def sources(data: str) -> list[str]:
    return [s.strip() for s in data.split(",") if s.strip()]


def check_sources(data: str, runs_dir: Path) -> None:
    """Each source exists and is a layout this reads (at submit, before anything is unpacked)."""
    import zipfile

    if not sources(data):
        raise ValueError("no data given: a folder of audio + .txt/.srt/.vtt, a CSV/TSV/JSONL manifest, a .zip of "
                         "either, or a transcribe job id")
    for s in sources(data):
        if JOB_ID.fullmatch(s):
            transcribe_job(s, runs_dir)
            continue
        p = Path(s).expanduser()
        if not p.exists():
            raise ValueError(f"data not found: {s}; give a folder of audio with same-named .txt/.srt/.vtt "
                             "transcripts, a CSV/TSV/JSONL manifest, a .zip, or a transcribe job id")
        if p.is_file() and p.suffix.lower() not in MANIFEST and not zipfile.is_zipfile(p):
            raise ValueError(f"{p.name} is not a manifest (.csv, .tsv, .jsonl), a .zip or a folder")
        if p.is_file() and p.stat().st_size == 0:
            raise ValueError(f"{p.name} is empty (0 bytes)")


def read(data: str, runs_dir: Path, cache_dir: Path, confined: bool = False) -> tuple[list[Clip], dict]:
    """Every clip of every source, and the problems found on the way (lists of {where, …}). `confined` (a job with
    an owner): a manifest's audio must be inside the manifest's own folder."""
    import zipfile

    problems: dict[str, list] = {"transcript_without_audio": [], "missing_transcript": [], "malformed": []}
    clips: list[Clip] = []
    for s in sources(data):
        if JOB_ID.fullmatch(s):
            clips += transcribe_job(s, runs_dir)[1]
            continue
        p = Path(s).expanduser()
        if p.is_file() and zipfile.is_zipfile(p):
            from workers.paint.images import unpack  # the studio's safe unzip: size and ratio caps, no escapes

            Path(cache_dir).mkdir(parents=True, exist_ok=True)
            root = unpack(str(p), Path(cache_dir))
            inner = [f for f in root.rglob("*") if f.is_file() and f.suffix.lower() in MANIFEST]
            clips += _manifest(inner[0], problems, confined) if len(inner) == 1 else _folder(root, p.name, problems)
        elif p.is_dir():
            clips += _folder(p, p.name, problems)
        else:
            clips += _manifest(p, problems, confined)
    return clips, problems


def data_hash(data: str, runs_dir: Path) -> str:
    """A hash of every file the sources name (audio and transcripts), for the run card and Resume."""
    h = hashlib.sha256()
    files: list[Path] = []
    for s in sources(data):
        if JOB_ID.fullmatch(s):
            data_file, clips = transcribe_job(s, runs_dir)
            files += [data_file, Path(clips[0].audio)] if clips else [data_file]
            continue
        p = Path(s).expanduser()
        files += sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
    for f in files:
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


# ---- audio --------------------------------------------------------------------------------------------------------
class AudioFiles:
    """Decoded audio (16 kHz mono float32), one file at a time kept (segments of one recording come together)."""

    def __init__(self):
        self._path, self._audio = None, None

    def load(self, path: str):
        if path != self._path:
            from faster_whisper import decode_audio

            self._audio, self._path = None, path
            self._audio = decode_audio(path, sampling_rate=SR)
        return self._audio

    def clip(self, c: Clip):
        audio = self.load(c.audio)
        if c.start is None:
            return audio
        return audio[int(c.start * SR): int((c.end if c.end is not None else len(audio) / SR) * SR)]


def probe(clips: list[Clip], check=lambda: None) -> tuple[list[tuple[Clip, float]], list[dict], list[dict], list[dict]]:
    """Decode every audio file once: (usable clips with their seconds, unreadable, empty transcripts, too long)."""
    usable, unreadable, empty, too_long = [], [], [], []
    bad: dict[str, str] = {}
    durations: dict[str, float] = {}
    files = AudioFiles()
    for c in clips:
        check()
        if c.audio not in durations and c.audio not in bad:
            p = Path(c.audio)
            if p.stat().st_size == 0:
                bad[c.audio] = "0 bytes"
            else:
                try:
                    durations[c.audio] = len(files.load(c.audio)) / SR
                except Exception as e:  # PyAV raises InvalidDataError, IndexError (no audio stream), …
                    why = getattr(e, "strerror", None) or str(e).replace(str(p), p.name)[:120] or type(e).__name__
                    bad[c.audio] = f"not readable as audio ({why})"
            if c.audio not in durations and c.audio in bad:
                unreadable.append({"where": c.where, "audio": Path(c.audio).name, "reason": bad[c.audio]})
                continue
        if c.audio in bad:
            continue
        total = durations[c.audio]
        s = c.start or 0.0
        e = min(c.end if c.end is not None else total, total)
        if not c.text.strip():
            empty.append({"where": c.where})
            continue
        if e - s <= 0.05:
            unreadable.append({"where": c.where, "audio": Path(c.audio).name,
                               "reason": f"no audio at {s:.2f}-{e:.2f} s (the file is {total:.2f} s)"})
            continue
        if e - s > MAX_S:
            why = ("a segment longer than Whisper's 30 s window: split it" if c.start is not None else
                   "longer than Whisper's 30 s window and has no timestamps: give it as .srt/.vtt or a manifest "
                   "with start/end, or cut it")
            too_long.append({"where": c.where, "seconds": round(e - s, 1), "reason": why})
            continue
        usable.append((c, e - s))
    return usable, unreadable, empty, too_long


def split(items: list, fraction: float, cap: int, seed: int) -> tuple[list, list]:
    """Fine-tune's seeded dev split (the same rule: `fraction`, at least 1 of 2 or more, at most `cap`)."""
    from workers.finetune.data import split as ft_split

    return ft_split(items, fraction, cap, seed)


# ---- normalising and scoring ------------------------------------------------------------------------------------
class Normalizer:
    """The text normalisation applied before WER/CER: Whisper's English normaliser (with the model's spelling map,
    normalizer.json, when it ships one) for English, Whisper's basic one otherwise."""

    def __init__(self, language: str, model_dir: Path | None = None, spelling: dict | None = None):
        from transformers.models.whisper.english_normalizer import BasicTextNormalizer, EnglishTextNormalizer

        f = Path(model_dir) / "normalizer.json" if model_dir else None
        if not spelling and f is not None and f.is_file():
            spelling = json.loads(f.read_text())
        spelling = spelling or {}
        if (language or "en") == "en":
            self.fn = EnglishTextNormalizer(spelling)
            self.name = "Whisper English normaliser" + (" with its spelling map" if spelling else "")
        else:
            self.fn = BasicTextNormalizer(remove_diacritics=False)
            self.name = "Whisper basic normaliser (lower case, no punctuation or symbols)"

    def __call__(self, text: str) -> str:
        return " ".join(self.fn(text).split())


def errors(ref: str, hyp: str) -> dict:
    """Word and character edit counts of a normalised hypothesis against its normalised reference (jiwer's
    alignment; characters without the spaces), and the word diff as [op, ref word, hyp word] with op "=" (same),
    "~" (substituted), "-" (deleted) or "+" (inserted)."""
    import jiwer

    rw, hw = ref.split(), hyp.split()
    rc, hc = ref.replace(" ", ""), hyp.replace(" ", "")
    if not rw:  # jiwer needs a reference: every word heard is an insertion
        return {"word_errors": len(hw), "words": 0, "char_errors": len(hc), "chars": 0,
                "diff": [["+", "", w] for w in hw]}
    w = jiwer.process_words(" ".join(rw), " ".join(hw))
    c = jiwer.process_characters(rc, hc)
    diff = []
    for chunk in w.alignments[0]:
        refs, hyps = rw[chunk.ref_start_idx:chunk.ref_end_idx], hw[chunk.hyp_start_idx:chunk.hyp_end_idx]
        if chunk.type == "equal":
            diff += [["=", r, r] for r in refs]
        elif chunk.type == "substitute":
            diff += [["~", r, h] for r, h in zip(refs, hyps)]
        elif chunk.type == "delete":
            diff += [["-", r, ""] for r in refs]
        else:
            diff += [["+", "", h] for h in hyps]
    return {"word_errors": w.substitutions + w.deletions + w.insertions, "words": len(rw),
            "char_errors": c.substitutions + c.deletions + c.insertions, "chars": len(rc), "diff": diff}


def rate(rows: list[dict], kind: str) -> float | None:
    """Corpus WER ("word") or CER ("char"): all errors over all reference words/characters."""
    total = sum(r[f"{kind}s"] for r in rows)
    return round(sum(r[f"{kind}_errors"] for r in rows) / total, 4) if total else None


def diff_html(ops: list) -> str:
    """A word diff: deleted reference words struck, inserted or substituted hypothesis words marked."""
    import html

    out = []
    for op, r, h in ops:
        if op == "=":
            out.append(html.escape(r))
        else:
            out.append((f"<del>{html.escape(r)}</del>" if r else "") + (f"<ins>{html.escape(h)}</ins>" if h else ""))
    return " ".join(out)


# ---- the report ---------------------------------------------------------------------------------------------------
HIST_EDGES = (0, 2, 5, 10, 20, 30)


def report(data: str, runs_dir: Path, cache_dir: Path, language: str = "", eval_data: str = "",
           dev_fraction: float = 0.05, dev_max: int = 200, seed: int = 42, model_dir: Path | None = None,
           check=lambda: None, confined: bool = False) -> dict:
    """The data report: clips, hours, clip-length histogram, unreadable audio, empty or missing transcripts,
    transcripts without audio, malformed lines, clips past 30 s, language(s), the WER normalisation, the dev split."""
    clips, problems = read(data, runs_dir, cache_dir, confined)
    usable, unreadable, empty, too_long = probe(clips, check)
    dev_n = None
    if eval_data:
        dev_clips, _ = read(eval_data, runs_dir, cache_dir, confined)
        dev_usable = probe(dev_clips, check)[0]
        dev_n = len(dev_usable)
        train_n = len(usable)
    else:
        train, dev = split(usable, dev_fraction, dev_max, seed)
        train_n, dev_n = len(train), len(dev)
    seconds = [s for _, s in usable]
    hist = []
    for lo, hi in zip(HIST_EDGES, HIST_EDGES[1:]):
        hist.append({"range": f"{lo}-{hi} s", "clips": sum(lo < s <= hi or (lo == 0 and s == 0) for s in seconds)})
    hist.append({"range": "over 30 s", "clips": len(too_long)})
    norm = Normalizer(language, model_dir)
    return {
        "sources": sources(data),
        "clips": len(clips) + len(problems["transcript_without_audio"]) + len(problems["missing_transcript"]),
        "usable": len(usable),
        "hours": round(sum(seconds) / 3600, 4),
        "seconds": {"total": round(sum(seconds), 1), "min": round(min(seconds), 2) if seconds else None,
                    "max": round(max(seconds), 2) if seconds else None,
                    "mean": round(sum(seconds) / len(seconds), 2) if seconds else None},
        "histogram": hist,
        "unreadable_audio": unreadable,
        "empty_transcripts": empty,
        "missing_transcripts": problems["missing_transcript"],
        "transcripts_without_audio": problems["transcript_without_audio"],
        "malformed": problems["malformed"],
        "too_long": too_long,
        "cut_by_timestamps": sum(c.start is not None for c, _ in usable),
        "language": language or "detected per clip by the base model",
        "languages": [language] if language else [],
        "normalizer": norm.name,
        "dev": {"source": eval_data or f"seeded split of {dev_fraction:.0%} (at most {dev_max}, seed {seed})",
                "train_clips": train_n, "dev_clips": dev_n},
        "preview": [{"where": c.where, "seconds": round(s, 2), "text": c.text,
                     "normalized": norm(c.text)} for c, s in usable[:3]],
    }


def report_html(r: dict) -> str:
    """The report as the sub-tab shows it."""
    import html

    e = html.escape
    lines = [f"<b>{r['usable']} usable clips</b> of {r['clips']} in {e(', '.join(r['sources']))} · "
             f"{r['hours']:.2f} h ({r['seconds']['total']} s; {r['seconds']['min']}–{r['seconds']['max']} s per "
             f"clip) · {r['cut_by_timestamps']} cut by timestamps",
             "lengths: " + ", ".join(f"{h['range']}: {h['clips']}" for h in r["histogram"]),
             f"dev set: {e(str(r['dev']['dev_clips']))} clips ({e(r['dev']['source'])}), train "
             f"{r['dev']['train_clips']}",
             f"language: {e(r['language'])} · WER normalisation: {e(r['normalizer'])}"]
    for key, label in (("unreadable_audio", "unreadable audio"), ("empty_transcripts", "empty transcripts"),
                       ("missing_transcripts", "audio without a transcript"),
                       ("transcripts_without_audio", "transcripts without audio"), ("malformed", "malformed"),
                       ("too_long", "too long (left out)")):
        items = r.get(key) or []
        if items:
            shown = "; ".join(e(i["where"] + (f": {i['audio']}" if i.get("audio") else "")
                                + (f" ({i['reason']})" if i.get("reason") else "")
                                + (f" ({i['error']})" if i.get("error") else "")) for i in items[:8])
            more = f" … and {len(items) - 8} more" if len(items) > 8 else ""
            lines.append(f"⚠ {len(items)} {label}: {shown}{more}")
    for p in r.get("preview") or []:
        lines.append(f"<code>{e(p['where'])}</code> ({p['seconds']} s): {e(p['text'])} → <i>{e(p['normalized'])}</i>")
    return "<div class='asr-report'>" + "<br>".join(lines) + "</div>"
