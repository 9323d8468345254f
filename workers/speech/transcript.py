"""A transcript's files in its run folder: TXT, SRT, VTT and JSON; speaker renames; the post-editor's changes.

Pure file work (no model, no torch), so the tab and the CLI use it directly on a finished job's run folder:
- `transcript.json` is the source of truth (segments with words and speakers, plus `speaker_names`);
  `transcript.{txt,srt,vtt}` are rendered from it.
- `edits.json` holds the post-editor's proposed changes, each `accepted` or not; `corrections.json` the user's own
  corrections of segments' text (segment id -> text); `transcript.edited.*` are the transcript with the accepted
  changes and then the corrections applied, written beside the raw one (what a fine-tune reads from the job).
"""
from __future__ import annotations

import difflib
import html
import json
import re
from pathlib import Path

FORMATS = ("txt", "srt", "vtt", "json")


def ts(t: float, sep: str) -> str:
    ms = int(round(t * 1000))
    return f"{ms // 3600000:02d}:{ms // 60000 % 60:02d}:{ms // 1000 % 60:02d}{sep}{ms % 1000:03d}"


def render(segments: list[dict], names: dict[str, str]) -> dict[str, str]:
    """TXT, SRT and VTT text of the segments, speakers shown by their given names."""
    def line(s):
        spk = s.get("speaker")
        return (f"{names.get(spk, spk)}: " if spk else "") + s["text"].strip()

    return {
        "txt": "\n".join(line(s) for s in segments) + "\n",
        "srt": "\n".join(f"{i}\n{ts(s['start'], ',')} --> {ts(s['end'], ',')}\n{line(s)}\n"
                         for i, s in enumerate(segments, start=1)),
        "vtt": "WEBVTT\n\n" + "\n".join(f"{ts(s['start'], '.')} --> {ts(s['end'], '.')}\n{line(s)}\n"
                                        for s in segments),
    }


def write(run_dir: Path, data: dict, stem: str = "transcript") -> list[Path]:
    """Write `stem`.txt/.srt/.vtt/.json from `data` ({info, partial, segments, speaker_names})."""
    texts = render(data["segments"], data.get("speaker_names") or {})
    texts["json"] = json.dumps(data, indent=1)
    paths = []
    for fmt in FORMATS:
        path = Path(run_dir) / f"{stem}.{fmt}"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(texts[fmt])
        tmp.replace(path)  # a reader (the tab, a download) never sees half a file
        paths.append(path)
    return paths


def load(run_dir: Path) -> dict:
    path = Path(run_dir) / "transcript.json"
    if not path.exists():
        raise FileNotFoundError(f"no transcript in {run_dir} (the job has not written one)")
    return json.loads(path.read_text())


def speakers(data: dict) -> list[str]:
    """Speaker labels in order of first appearance."""
    seen: list[str] = []
    for s in data["segments"]:
        if s.get("speaker") and s["speaker"] not in seen:
            seen.append(s["speaker"])
    return seen


def rename_speakers(run_dir: Path, names: dict[str, str]) -> dict:
    """Give speakers names (S1 → "Alice"); every output, the edited one too, is rewritten with them.
    An empty name restores the label."""
    data = load(run_dir)
    known = speakers(data)
    unknown = [k for k in names if k not in known]
    if unknown:
        raise ValueError(f"no speaker {', '.join(unknown)} in this transcript (speakers: {', '.join(known) or 'none'})")
    merged = {**(data.get("speaker_names") or {}), **{k: v.strip() for k, v in names.items()}}
    data["speaker_names"] = {k: v for k, v in merged.items() if v and v != k}
    write(run_dir, data)
    if (Path(run_dir) / "edits.json").exists() or (Path(run_dir) / "corrections.json").exists():
        write_edited(run_dir)
    return data


def corrections(run_dir: Path) -> dict[int, str]:
    path = Path(run_dir) / "corrections.json"
    return {int(k): v for k, v in json.loads(path.read_text()).items()} if path.exists() else {}


def edited_segments(run_dir: Path) -> list[dict]:
    """The segments as they read now: the accepted post-edits, then the user's corrections."""
    path = Path(run_dir) / "transcript.edited.json"
    return json.loads(path.read_text())["segments"] if path.exists() else load(run_dir)["segments"]


def correct(run_dir: Path, texts: dict[int, str]) -> dict[int, str]:
    """Correct segments' text by hand (segment id -> the right text; the text as it reads now, or empty, drops an
    earlier correction). Kept in corrections.json and applied over the accepted post-edits in transcript.edited.*.
    Returns every correction now in force."""
    data = load(run_dir)
    ids = {s["id"] for s in data["segments"]}
    unknown = sorted(set(texts) - ids)
    if unknown:
        raise ValueError(f"no segment {unknown[0]} in this transcript (segments {min(ids, default=0)}–"
                         f"{max(ids, default=0)})")
    current = {s["id"]: s["text"].strip() for s in edited_segments(run_dir)}
    kept = corrections(run_dir)
    for sid, text in texts.items():
        text = " ".join(str(text).split())
        raw = next(s["text"].strip() for s in data["segments"] if s["id"] == sid)
        if not text or text == raw:
            kept.pop(sid, None)
        elif text != current.get(sid) or sid in kept:
            kept[sid] = text
    path = Path(run_dir) / "corrections.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({str(k): v for k, v in sorted(kept.items())}, indent=1, ensure_ascii=False))
    tmp.replace(path)
    write_edited(run_dir)
    return kept


# ---- the post-editor's changes ---------------------------------------------------------------------------------
def words(text: str) -> list[str]:
    return text.split()


def bare(word: str) -> str:
    """A word without case and punctuation: what must not change when only punctuation and casing are fixed."""
    return re.sub(r"[^\w']", "", word.lower())


def diff(original: str, edited: str) -> list[list[str]]:
    """Word-level changes as [op, old, new] runs: op is "=", "-", "+" or "~" (replaced)."""
    a, b = words(original), words(edited)
    out = []
    for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(a=a, b=b, autojunk=False).get_opcodes():
        op = {"equal": "=", "delete": "-", "insert": "+", "replace": "~"}[tag]
        out.append([op, " ".join(a[i1:i2]), " ".join(b[j1:j2])])
    return out


def diff_html(ops: list[list[str]]) -> str:
    parts = []
    for op, old, new in ops:
        if op == "=":
            parts.append(html.escape(old))
            continue
        if old:
            parts.append(f"<del>{html.escape(old)}</del>")
        if new:
            parts.append(f"<ins>{html.escape(new)}</ins>")
    return " ".join(parts)


def diff_text(ops: list[list[str]]) -> str:
    """The diff as git's --word-diff prints it: [-old-]{+new+}."""
    parts = []
    for op, old, new in ops:
        if op == "=":
            parts.append(old)
        else:
            parts.append((f"[-{old}-]" if old else "") + (f"{{+{new}+}}" if new else ""))
    return " ".join(parts)


def same_content(original: str, edited: str, glossary: list[str] = ()) -> bool:
    """True when `edited` changes punctuation, casing and spellings of names, but adds or drops nothing:
    the bare word sequences match closely (a glossary name may replace a misheard word)."""
    a, b = [bare(w) for w in words(original)], [bare(w) for w in words(edited)]
    a, b = [w for w in a if w], [w for w in b if w]
    if not b:
        return not a
    if abs(len(a) - len(b)) > max(2, len(a) // 5):
        return False
    names = {bare(w) for g in glossary for w in g.split()}
    sm = difflib.SequenceMatcher(a=a, b=b, autojunk=False)
    changed_new = [w for tag, _, _, j1, j2 in sm.get_opcodes() if tag != "equal" for w in b[j1:j2]]
    unexplained = [w for w in changed_new if w not in names]  # replaced words that are not glossary names
    return sm.ratio() >= 0.7 and len(unexplained) <= max(1, len(a) // 10)


def apply_edits(run_dir: Path, accepted: list[int] | None = None) -> dict:
    """Write transcript.edited.* with the accepted changes (`accepted`: segment ids to accept, the rest rejected;
    None keeps the current choices). Returns edits.json's content."""
    run_dir = Path(run_dir)
    path = run_dir / "edits.json"
    if not path.exists():
        raise FileNotFoundError("this transcript has no post-editor changes (run it with post_edit=true)")
    edits = json.loads(path.read_text())
    if accepted is not None:
        ids = {c["id"] for c in edits["changes"]}
        unknown = sorted(set(accepted) - ids)
        if unknown:
            raise ValueError(f"no change for segment(s) {unknown}; changed segments: {sorted(ids)}")
        for c in edits["changes"]:
            c["accepted"] = c["id"] in accepted
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(edits, indent=1))
        tmp.replace(path)
    write_edited(run_dir)
    return edits


def write_edited(run_dir: Path) -> dict:
    """transcript.edited.*: the transcript with the post-editor's accepted changes, then the user's corrections."""
    run_dir = Path(run_dir)
    data = load(run_dir)
    path = run_dir / "edits.json"
    if path.exists():
        edits = json.loads(path.read_text())
        by_id = {c["id"]: c for c in edits["changes"] if c["accepted"]}
        for s in data["segments"]:
            c = by_id.get(s["id"])
            if c and c["original"] == s["text"].strip():  # the segment is the one the editor saw
                s["text_raw"], s["text"] = s["text"], " " + c["edited"]
        data["post_edit"] = {"model": edits.get("model"), "accepted": sorted(by_id),
                             "proposed": len(edits["changes"])}
    fixed = corrections(run_dir)
    for s in data["segments"]:
        if s["id"] in fixed:
            s.setdefault("text_raw", s["text"])
            s["text"] = " " + fixed[s["id"]]
            s.pop("words", None)  # the word timings belonged to the words as heard
    if fixed:
        data["corrected"] = sorted(fixed)
    write(run_dir, data, stem="transcript.edited")
    return data
