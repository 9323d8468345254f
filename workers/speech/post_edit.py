"""The LLM post-editor: fixes punctuation, casing and names (from the user's glossary) segment by segment, so
timestamps stay aligned, and refuses any change that adds or drops words.

It runs the Chat tab's LLM backend (workers.chat.chat.load_llm: a GGUF through llama.cpp or a transformers model),
a chunk of numbered segment lines per request. Each proposed change is kept with its word diff in edits.json;
all start accepted and the user may reject any (workers.speech.transcript.apply_edits).
"""
from __future__ import annotations

import re
import time

from workers.speech import transcript

N_CTX = 2048
CHUNK_WORDS = 120  # words per request: short enough for small models to copy faithfully
INSTRUCTIONS = (
    "You correct speech-recognition transcripts. Fix punctuation, capitalisation and the spelling of names and "
    "terms (use the glossary). Never add, remove, reorder or reword anything else. Reply with every line, in the "
    "same \"[n] text\" form, and nothing more.")


def chunks(segments: list[dict], max_words: int = CHUNK_WORDS) -> list[list[dict]]:
    out: list[list[dict]] = []
    n = 0
    for s in segments:
        w = len(s["text"].split())
        if out and n + w <= max_words:
            out[-1].append(s)
            n += w
        else:
            out.append([s])
            n = w
    return out


def messages(chunk: list[dict], glossary: list[str]) -> list[dict]:
    lines = "\n".join(f"[{i}] {s['text'].strip()}" for i, s in enumerate(chunk, start=1))
    gloss = f"Glossary: {', '.join(glossary)}\n\n" if glossary else ""
    return [{"role": "system", "content": INSTRUCTIONS}, {"role": "user", "content": gloss + lines}]


def parse(reply: str, n: int) -> dict[int, str]:
    """Line number → corrected text, for the numbers 1..n the reply has (first occurrence wins)."""
    out: dict[int, str] = {}
    for m in re.finditer(r"^\s*\[(\d+)\]\s*(.+?)\s*$", reply, flags=re.M):
        i = int(m.group(1))
        if 1 <= i <= n and i not in out:
            out[i] = m.group(2)
    return out


def glossary_terms(glossary: str) -> list[str]:
    return [t.strip() for t in re.split(r"[,\n;]", glossary) if t.strip()]


def run(ctx, llm, data: dict, glossary: str, *, seed: int = 0, model_name: str = "") -> dict:
    """Propose edits for every segment of `data`; write edits.json and transcript.edited.*; return a summary."""
    import json

    terms = glossary_terms(glossary)
    segs = [s for s in data["segments"] if s["text"].strip()]
    groups = chunks(segs)
    changes, discarded = [], []
    t0 = time.perf_counter()
    for k, chunk in enumerate(groups):
        ctx.progress(k, len(groups), f"post-editing: chunk {k + 1} of {len(groups)}")
        n_words = sum(len(s["text"].split()) for s in chunk)
        reply = []
        for piece in llm.stream(messages(chunk, terms), max_tokens=2 * n_words + 16 * len(chunk) + 32,
                                temperature=0.0, top_p=1.0, seed=seed or None):
            reply.append(piece)
            ctx.check_cancel()
        proposed = parse("".join(reply), len(chunk))
        for i, s in enumerate(chunk, start=1):
            original, edited = s["text"].strip(), proposed.get(i, "").strip()
            if not edited or edited == original:
                continue
            if not transcript.same_content(original, edited, terms):
                discarded.append({"id": s["id"], "original": original, "proposed": edited,
                                  "why": "adds or drops words"})
                continue
            changes.append({"id": s["id"], "start": s["start"], "end": s["end"], "speaker": s.get("speaker"),
                            "original": original, "edited": edited, "diff": transcript.diff(original, edited),
                            "accepted": True})
    edits = {"model": model_name, "glossary": terms, "changes": changes, "discarded": discarded,
             "chunks": len(groups), "seconds": round(time.perf_counter() - t0, 2)}
    (ctx.run_dir / "edits.json").write_text(json.dumps(edits, indent=1))
    transcript.apply_edits(ctx.run_dir)
    ctx.progress(len(groups), len(groups), f"post-editor proposed {len(changes)} change(s)")
    return {"changes": len(changes), "discarded": len(discarded), "chunks": len(groups)}
