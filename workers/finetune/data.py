"""The user's fine-tuning data: read, shape detection, rendering through the chat template with answer-only masks,
the data report and the preview.

Shapes (one per file; a file that mixes them is an error naming the first line that differs):
- `alpaca`: `instruction`, `output`, optional `input` (appended to the instruction after a blank line) and `system`
- `messages`: `messages` (OpenAI: `role`/`content`) or `conversations` (ShareGPT: `from`/`value`, roles human/gpt/
  system), multi-turn, optional top-level `system`; every assistant turn is trained
- `prompt_completion`: `prompt`, `completion` (a single user turn and its answer)
- `text`: `text`, continued pre-training: every token is trained

Every example becomes a token sequence through the tokenizer's own chat template, built piece by piece: the part
before each answer (`render(..., add_generation_prompt=True)`) and the answer itself (with the template's end-of-turn
markup), each tokenized on its own. So the prompt's tokens are exactly what the model sees when asked at inference, and
the masked/trained boundary is exact at the token level: `labels` is -100 on every prompt token (unless
`train_on_prompt`) and the token id on every answer token.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

SHAPES = ("alpaca", "messages", "prompt_completion", "text")
SHAPE_NAMES = {"alpaca": "Alpaca", "messages": "messages (ShareGPT/OpenAI)", "prompt_completion": "prompt/completion",
               "text": "plain text"}
SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
ROLES = {"system": "system", "user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant",
         "model": "assistant", "bot": "assistant"}

# Used when a base model's tokenizer has no chat template (a base, not an instruct, model). Written into the saved
# adapter's tokenizer, so Chat renders the same prompts the model was trained on.
FALLBACK_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ m['content'] }}\n\n"
    "{% elif m['role'] == 'user' %}### Instruction:\n{{ m['content'] }}\n\n"
    "{% else %}### Response:\n{{ m['content'] }}{{ eos_token }}\n\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}### Response:\n{% endif %}"
)


@dataclass
class Example:
    """One example as read: where it came from, its shape and its turns (or text)."""

    where: str  # "train.jsonl line 7"
    shape: str
    messages: list[dict] = field(default_factory=list)  # [{"role", "content"}]; empty for text
    text: str = ""

    def key(self) -> str:
        return json.dumps([self.messages, self.text], sort_keys=True, ensure_ascii=False)

    def empty_answer(self) -> bool:
        if self.shape == "text":
            return not self.text.strip()
        return any(m["role"] == "assistant" and not str(m["content"]).strip() for m in self.messages)


# ---- reading ----------------------------------------------------------------------------------------------------
def paths_of(data: str) -> list[Path]:
    """`data` names one file, several separated by commas, or a folder (its data files, sorted)."""
    out: list[Path] = []
    for part in [s.strip() for s in str(data).split(",") if s.strip()]:
        p = Path(part).expanduser()
        if p.is_dir():
            found = sorted(f for f in p.iterdir() if f.suffix.lower() in SUFFIXES)
            if not found:
                raise ValueError(f"{p} holds no data file ({', '.join(SUFFIXES)})")
            out += found
        elif p.is_file():
            if p.suffix.lower() not in SUFFIXES:
                raise ValueError(f"{p.name}: use a {', '.join(SUFFIXES)} file")
            out.append(p)
        else:
            raise ValueError(f"data file not found: {part}")
    if not out:
        raise ValueError("no data given: name a JSONL, JSON, CSV or Parquet file")
    return out


def _records(path: Path) -> Iterable[tuple[str, Any]]:
    """(where, record) for each record of a file; malformed input raises ValueError naming the line."""
    suffix = path.suffix.lower()
    name = path.name
    if suffix == ".jsonl":
        with open(path, encoding="utf-8", errors="strict") as f:
            for i, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    yield f"{name} line {i}", json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{name} line {i}: not valid JSON ({e.msg} at column {e.colno}); "
                                     "each line must be one JSON object") from None
    elif suffix == ".json":
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{name} line {e.lineno}: not valid JSON ({e.msg}); a .json file holds one list of "
                             "objects (JSON Lines go in a .jsonl file)") from None
        if isinstance(doc, dict):
            lists = [v for v in doc.values() if isinstance(v, list)]
            if len(lists) != 1:
                raise ValueError(f"{name}: expected a list of examples (or an object holding one list)")
            doc = lists[0]
        if not isinstance(doc, list):
            raise ValueError(f"{name}: expected a list of examples")
        for i, rec in enumerate(doc, 1):
            yield f"{name} item {i}", rec
    elif suffix == ".csv":
        text = path.read_text(encoding="utf-8-sig")
        reader = csv.DictReader(io.StringIO(text))
        for rec in reader:
            yield f"{name} line {reader.line_num}", {k: v for k, v in rec.items() if k is not None}
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as e:  # noqa: BLE001 (pyarrow raises ArrowInvalid, OSError, …)
            raise ValueError(f"{name}: not a readable Parquet file ({str(e).splitlines()[0][:120]})") from None
        for i, rec in enumerate(table.to_pylist(), 1):
            yield f"{name} row {i}", rec
    else:
        raise ValueError(f"{name}: use a {', '.join(SUFFIXES)} file")


def _str(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float) and v != v:  # NaN from a CSV/Parquet hole
        return ""
    return str(v)


def detect(where: str, rec: Any) -> Example:
    """The example a record holds; a record of no known shape, or with a field missing, raises ValueError."""
    if not isinstance(rec, dict):
        raise ValueError(f"{where}: expected an object with fields, got {type(rec).__name__}")
    keys = {k for k, v in rec.items() if v is not None and not (isinstance(v, float) and v != v)}
    system = _str(rec.get("system")).strip()
    pre = [{"role": "system", "content": system}] if system else []
    if "messages" in keys or "conversations" in keys:
        turns = rec.get("messages") if "messages" in keys else rec.get("conversations")
        if isinstance(turns, str):
            try:
                turns = json.loads(turns)  # CSV cells hold the list as JSON text
            except json.JSONDecodeError:
                raise ValueError(f"{where}: 'messages' is text that is not a JSON list of turns") from None
        if not isinstance(turns, list) or not turns:
            raise ValueError(f"{where}: 'messages' must be a non-empty list of turns")
        msgs = list(pre)
        for j, t in enumerate(turns, 1):
            if not isinstance(t, dict):
                raise ValueError(f"{where}: turn {j} is not an object")
            role = t.get("role", t.get("from"))
            content = t.get("content", t.get("value"))
            if role is None or content is None:
                raise ValueError(f"{where}: turn {j} needs 'role' and 'content' (or ShareGPT's 'from' and 'value')")
            if str(role).lower() not in ROLES:
                raise ValueError(f"{where}: turn {j} has role {role!r}; use system, user or assistant "
                                 "(ShareGPT: system, human, gpt)")
            msgs.append({"role": ROLES[str(role).lower()], "content": _str(content)})
        if not any(m["role"] == "assistant" for m in msgs):
            raise ValueError(f"{where}: the conversation has no assistant turn to learn from")
        return Example(where, "messages", msgs)
    if "instruction" in keys or "output" in keys:
        for need in ("instruction", "output"):
            if need not in keys:
                have = ", ".join(sorted(keys)) or "nothing"
                raise ValueError(f"{where}: Alpaca shape needs '{need}' (this record has {have})")
        user = _str(rec["instruction"]).strip()
        extra = _str(rec.get("input")).strip()
        if extra:
            user = f"{user}\n\n{extra}"
        return Example(where, "alpaca", pre + [{"role": "user", "content": user},
                                                {"role": "assistant", "content": _str(rec["output"])}])
    if "prompt" in keys or "completion" in keys:
        for need in ("prompt", "completion"):
            if need not in keys:
                have = ", ".join(sorted(keys)) or "nothing"
                raise ValueError(f"{where}: prompt/completion shape needs '{need}' (this record has {have})")
        return Example(where, "prompt_completion", pre + [{"role": "user", "content": _str(rec["prompt"])},
                                                          {"role": "assistant", "content": _str(rec["completion"])}])
    if "text" in keys:
        return Example(where, "text", text=_str(rec["text"]))
    have = ", ".join(sorted(keys)) or "no fields"
    raise ValueError(f"{where}: no known shape (has {have}); use Alpaca (instruction, input, output), messages "
                     "(role/content turns), prompt/completion, or text")


def read(data: str) -> list[Example]:
    """Every example of the named file(s). One shape per file; empty files and mixed shapes are errors."""
    out: list[Example] = []
    for path in paths_of(data):
        first: Example | None = None
        n = 0
        for where, rec in _records(path):
            ex = detect(where, rec)
            if first is None:
                first = ex
            elif ex.shape != first.shape:
                raise ValueError(f"{where} is {SHAPE_NAMES[ex.shape]} but {first.where} is "
                                 f"{SHAPE_NAMES[first.shape]}: one shape per file (split the file in two)")
            out.append(ex)
            n += 1
        if n == 0:
            raise ValueError(f"{path.name} is empty: it holds no examples")
    return out


def file_hash(data: str) -> str:
    h = hashlib.sha256()
    for p in paths_of(data):
        h.update(p.name.encode())
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def split(examples: list, fraction: float = 0.05, cap: int = 200, seed: int = 42) -> tuple[list, list]:
    """A seeded dev split: `fraction` of the examples (at least 1 when there are 2 or more), at most `cap`."""
    n = len(examples)
    n_dev = min(cap, max(1 if n >= 2 else 0, round(n * fraction)))
    order = list(range(n))
    random.Random(seed).shuffle(order)
    dev_idx = set(order[:n_dev])
    return [e for i, e in enumerate(examples) if i not in dev_idx], [examples[i] for i in sorted(dev_idx)]


# ---- rendering and masking ---------------------------------------------------------------------------------------
def ensure_template(tokenizer) -> bool:
    """Give a tokenizer without a chat template the plain fallback; True when it had its own."""
    if getattr(tokenizer, "chat_template", None):
        return True
    tokenizer.chat_template = FALLBACK_TEMPLATE
    return False


def _render(tokenizer, messages: list[dict], generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def pieces(ex: Example, tokenizer) -> list[tuple[str, bool]]:
    """The example's text as (piece, trained) pairs, in order: prompts False, answers True."""
    if ex.shape == "text":
        return [(ex.text + (tokenizer.eos_token or ""), True)]
    ensure_template(tokenizer)
    out: list[tuple[str, bool]] = []
    done = ""
    for k, m in enumerate(ex.messages):
        if m["role"] != "assistant":
            continue
        prompt = _render(tokenizer, ex.messages[:k], True)
        full = _render(tokenizer, ex.messages[: k + 1], False)
        if not prompt.startswith(done) or not full.startswith(prompt):
            raise ValueError(f"{ex.where}: the tokenizer's chat template does not render this conversation turn by "
                             "turn (an earlier turn changes when a later one is added), so its answers cannot be "
                             "masked exactly; use single-turn examples or set train_on_prompt=true")
        out.append((prompt[len(done):], False))
        out.append((full[len(prompt):], True))
        done = full
    return [(t, trained) for t, trained in out if t]


def encode(ex: Example, tokenizer, max_seq_len: int, train_on_prompt: bool = False) -> dict:
    """input_ids and labels (-100 where the loss is off), truncated to max_seq_len (keeping the start), with each
    piece's token count for the preview."""
    ids: list[int] = []
    labels: list[int] = []
    spans: list[tuple[int, bool]] = []
    for text, trained in pieces(ex, tokenizer):
        t = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids += t
        labels += t if (trained or train_on_prompt) else [-100] * len(t)
        spans.append((len(t), trained))
    full = len(ids)
    return {"input_ids": ids[:max_seq_len], "labels": labels[:max_seq_len], "length": full,
            "truncated": full > max_seq_len, "spans": spans}


def encode_all(examples: list[Example], tokenizer, max_seq_len: int, train_on_prompt: bool = False
               ) -> tuple[list[dict], dict]:
    """Encoded examples ready for training (no empty answer, something left to learn after truncation) and counts of
    what was left out."""
    out, skipped = [], {"empty_answer": 0, "nothing_trained": 0}
    for ex in examples:
        if ex.empty_answer():
            skipped["empty_answer"] += 1
            continue
        e = encode(ex, tokenizer, max_seq_len, train_on_prompt)
        if not any(x != -100 for x in e["labels"]):
            skipped["nothing_trained"] += 1  # the prompt alone fills max_seq_len
            continue
        out.append({"input_ids": e["input_ids"], "labels": e["labels"]})
    return out, skipped


# ---- report and preview --------------------------------------------------------------------------------------------
def histogram(lengths: list[int], max_seq_len: int) -> list[dict]:
    """Token lengths in power-of-two bins up to max_seq_len, and one bin past it."""
    edges = [0]
    e = 32
    while e < max_seq_len:
        edges.append(e)
        e *= 2
    edges.append(max_seq_len)
    bins = []
    for lo, hi in zip(edges, edges[1:]):
        bins.append({"range": f"{lo + 1 if lo else 1}–{hi}", "lo": lo, "hi": hi,
                     "count": sum(1 for n in lengths if lo < n <= hi)})
    bins.append({"range": f">{max_seq_len}", "lo": max_seq_len, "hi": None,
                 "count": sum(1 for n in lengths if n > max_seq_len)})
    return bins


def report(path: str, tokenizer, max_seq_len: int, train_on_prompt: bool = False, eval_data: str = "",
           dev_fraction: float = 0.05, dev_max: int = 200, seed: int = 42, examples: list[Example] | None = None
           ) -> dict:
    """The data report shown before any GPU time: examples per shape, token lengths under this tokenizer (histogram,
    truncated at max_seq_len), duplicates, empty answers, trained-token share, the dev split and a 3-example preview.
    Raises ValueError (naming the line) on malformed input."""
    examples = read(path) if examples is None else examples
    ensure_template(tokenizer)
    per_shape = {s: 0 for s in SHAPES}
    for ex in examples:
        per_shape[ex.shape] += 1
    seen: set[str] = set()
    duplicates = 0
    for ex in examples:
        k = ex.key()
        duplicates += k in seen
        seen.add(k)
    lengths, trained_tokens, total_tokens, nothing_trained = [], 0, 0, 0
    for ex in examples:
        e = encode(ex, tokenizer, max_seq_len, train_on_prompt)
        lengths.append(e["length"])
        trained = sum(1 for x in e["labels"] if x != -100)
        trained_tokens += trained
        total_tokens += len(e["input_ids"])
        nothing_trained += trained == 0 and not ex.empty_answer()
    empty = sum(ex.empty_answer() for ex in examples)
    if eval_data:
        dev_n, train_n, dev_source = len(read(eval_data)), len(examples), "file"
    else:
        train, dev = split(examples, dev_fraction, dev_max, seed)
        train_n, dev_n, dev_source = len(train), len(dev), "split"
    sorted_l = sorted(lengths)
    return {
        "files": [p.name for p in paths_of(path)],
        "examples": len(examples),
        "per_shape": {s: n for s, n in per_shape.items() if n},
        "tokens": {"min": sorted_l[0], "median": sorted_l[len(sorted_l) // 2], "max": sorted_l[-1],
                   "mean": round(sum(lengths) / len(lengths), 1), "total": sum(lengths)},
        "histogram": histogram(lengths, max_seq_len),
        "max_seq_len": max_seq_len,
        "truncated": sum(1 for n in lengths if n > max_seq_len),
        "nothing_trained": nothing_trained,  # the prompt alone fills max_seq_len: dropped
        "duplicates": duplicates,
        "empty_answers": empty,  # dropped from training
        "trained_fraction": round(trained_tokens / max(1, total_tokens), 4),
        "train_on_prompt": train_on_prompt,
        "train": train_n,
        "dev": dev_n,
        "dev_source": dev_source,
        "chat_template": "own" if getattr(tokenizer, "chat_template", None) != FALLBACK_TEMPLATE else "fallback",
        "preview": render_preview(examples, tokenizer, max_seq_len, train_on_prompt),
    }


def render_preview(examples: list[Example] | str, tokenizer, max_seq_len: int, train_on_prompt: bool = False,
                   n: int = 3) -> list[dict]:
    """The first `n` examples exactly as the model sees them: the decoded tokens in pieces, each marked trained
    (the loss is on it) or masked, cut where max_seq_len truncates."""
    if isinstance(examples, str):
        examples = read(examples)
    out = []
    for ex in examples[:n]:
        segs, used = [], 0
        for text, trained in pieces(ex, tokenizer):
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            keep = ids[: max(0, max_seq_len - used)]
            used += len(ids)
            if keep:
                segs.append({"text": tokenizer.decode(keep, skip_special_tokens=False),
                             "trained": trained or train_on_prompt, "tokens": len(keep)})
        out.append({"where": ex.where, "shape": ex.shape, "segments": segs, "tokens": used,
                    "truncated": used > max_seq_len})
    return out


def preview_html(preview: list[dict]) -> str:
    """The preview as HTML: masked (prompt) text grey, trained (answer) text highlighted."""
    import html

    blocks = []
    for ex in preview:
        spans = "".join(
            f'<span class="{"ft-trained" if s["trained"] else "ft-masked"}" style="'
            f'{"background:#d9f2d9;color:#0b3d0b" if s["trained"] else "color:#777"}">{html.escape(s["text"])}</span>'
            for s in ex["segments"])
        cut = " · truncated at max_seq_len" if ex["truncated"] else ""
        blocks.append(f'<div class="ft-example"><div class="ft-where">{html.escape(ex["where"])} · '
                      f'{ex["tokens"]} tokens{cut}</div><pre style="white-space:pre-wrap">{spans}</pre></div>')
    return "\n".join(blocks)
