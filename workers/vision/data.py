"""The user's image-text pairs for vision fine-tuning: reading, finding the images, rendering through the processor's
chat template with exact answer-only masks, and the data report.

Shapes (per record; a .jsonl holds one record a line, a .json one list of records):
- `pair`: `{"image": "red.png", "question": "...", "answer": "..."}`
- `llava`: LLaVA's own conversation format, `{"image": "coco/0001.jpg", "conversations": [{"from": "human",
  "value": "<image>\\nWhat is ...?"}, {"from": "gpt", "value": "..."}, ...]}`; multi-turn, every answer trained; the
  image goes where `<image>` stands in the human turn (at the start of the first one when no turn names it)

Images: a relative path is looked up under `images` (a folder, or a .zip extracted once with its size and names
checked), or when `images` is empty beside the data file and then inside the .zip files beside it; an absolute path is
taken as it is. With a login (a job that has an owner) every image must lie inside those folders: a pairs file cannot
reach other files of the server.

Encoding (`encode`): each prompt (the chat template up to and including the assistant's generation prompt, tokenized
as the processor tokenizes it at inference) is masked with -100; each answer (its text and the template's end-of-turn
markup, plus the end-of-sequence token when the template writes none, as LLaVA's own training appends `</s>`) is
trained. The `<image>` placeholder becomes the processor's image tokens (576 for LLaVA-1.5 at 336 px), so lengths and
truncation count them. An example whose image tokens max_seq_len would cut is dropped: the model needs them whole.
"""
from __future__ import annotations

import hashlib
import html
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SUFFIXES = (".jsonl", ".json")
IMAGE = "<image>"
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "model": "assistant",
         "bot": "assistant", "system": "system"}


@dataclass
class Pair:
    """One example as read: where it came from, the image as written, its turns (content lists as processors take
    them: {"type": "image"} and {"type": "text", "text"})."""

    where: str  # "pairs.jsonl line 7"
    image: str
    messages: list[dict] = field(default_factory=list)
    shape: str = "pair"

    def question(self) -> str:
        user = next(m for m in self.messages if m["role"] == "user")
        return " ".join(c["text"] for c in user["content"] if c["type"] == "text").strip()

    def answer(self) -> str:
        first = next(m for m in self.messages if m["role"] == "assistant")
        return "".join(c["text"] for c in first["content"] if c["type"] == "text")

    def empty_answer(self) -> bool:
        return any(m["role"] == "assistant" and not "".join(c.get("text", "") for c in m["content"]).strip()
                   for m in self.messages)


# ---- reading ----------------------------------------------------------------------------------------------------
def _records(path: Path, malformed: list[dict] | None):
    """(where, record) for each record; a malformed line raises ValueError naming it, or is listed in `malformed`."""
    name = path.name
    if path.suffix.lower() == ".jsonl":
        with open(path, encoding="utf-8", errors="strict") as f:
            for i, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    yield f"{name} line {i}", json.loads(line)
                except json.JSONDecodeError as e:
                    msg = f"{name} line {i}: not valid JSON ({e.msg} at column {e.colno}); each line must be one object"
                    if malformed is None:
                        raise ValueError(msg) from None
                    malformed.append({"where": f"{name} line {i}", "error": msg})
        return
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{name} line {e.lineno}: not valid JSON ({e.msg}); a .json file holds one list of records "
                         "(JSON Lines go in a .jsonl file)") from None
    if isinstance(doc, dict):
        lists = [v for v in doc.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise ValueError(f"{name}: expected a list of records (LLaVA's format: [{{image, conversations}}, ...])")
        doc = lists[0]
    if not isinstance(doc, list):
        raise ValueError(f"{name}: expected a list of records (LLaVA's format: [{{image, conversations}}, ...])")
    for i, rec in enumerate(doc, 1):
        yield f"{name} item {i}", rec


def _text(value: Any) -> str:
    return "" if value is None else str(value)


def detect(where: str, rec: Any) -> Pair:
    """The pair a record holds; a record of no known shape, or missing a field, raises ValueError naming it."""
    if not isinstance(rec, dict):
        raise ValueError(f"{where}: expected an object with fields, got {type(rec).__name__}")
    image = rec.get("image")
    if isinstance(image, list) and len(image) == 1:
        image = image[0]
    if not isinstance(image, str) or not image.strip():
        have = ", ".join(sorted(rec)) or "nothing"
        raise ValueError(f"{where}: no 'image' (has {have}); every example names its image (text-only examples "
                         "train in the Fine-tune tab)")
    if "conversations" in rec or "messages" in rec:
        turns = rec.get("conversations", rec.get("messages"))
        if not isinstance(turns, list) or not turns:
            raise ValueError(f"{where}: 'conversations' must be a non-empty list of turns")
        msgs: list[dict] = []
        placed = 0
        for j, t in enumerate(turns, 1):
            if not isinstance(t, dict):
                raise ValueError(f"{where}: turn {j} is not an object")
            role, value = t.get("from", t.get("role")), t.get("value", t.get("content"))
            if role is None or value is None or not isinstance(value, str):
                raise ValueError(f"{where}: turn {j} needs 'from' and 'value' (LLaVA) or 'role' and 'content' text")
            if str(role).lower() not in ROLES:
                raise ValueError(f"{where}: turn {j} has role {role!r}; use human and gpt (or user and assistant)")
            role = ROLES[str(role).lower()]
            n = value.count(IMAGE)
            if n and role != "user":
                raise ValueError(f"{where}: turn {j} puts <image> in a {role} turn; it belongs in the human turn")
            placed += n
            if placed > 1:
                raise ValueError(f"{where}: more than one <image>; one image per example")
            msgs.append({"role": role, "content": _parts(value)})
        if not placed:  # LLaVA puts the image before the first question
            first = next((m for m in msgs if m["role"] == "user"), None)
            if first is None:
                raise ValueError(f"{where}: the conversation has no human turn")
            first["content"].insert(0, {"type": "image"})
        if not any(m["role"] == "assistant" for m in msgs):
            raise ValueError(f"{where}: the conversation has no gpt (assistant) turn to learn from")
        return Pair(where, image.strip(), msgs, "llava")
    missing = [k for k in ("question", "answer") if not isinstance(rec.get(k), (str, int, float))]
    if missing:
        have = ", ".join(sorted(rec)) or "nothing"
        raise ValueError(f"{where}: needs {' and '.join(repr(k) for k in missing)} (has {have}); use {{image, "
                         "question, answer}} or LLaVA's {image, conversations}")
    question = _text(rec["question"]).replace(IMAGE, "").strip()
    return Pair(where, image.strip(), [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]},
        {"role": "assistant", "content": [{"type": "text", "text": _text(rec["answer"])}]}])


def _parts(value: str) -> list[dict]:
    """A turn's text as content parts, `<image>` (and the newline LLaVA writes beside it) as the image part."""
    if IMAGE not in value:
        return [{"type": "text", "text": value.strip()}]
    before, after = value.split(IMAGE, 1)
    out = []
    if before.strip():
        out.append({"type": "text", "text": before.strip()})
    out.append({"type": "image"})
    if after.strip():
        out.append({"type": "text", "text": after.strip()})
    return out


def data_path(data: str) -> Path:
    p = Path(str(data).strip()).expanduser()
    if not str(data).strip():
        raise ValueError("no data given: name a JSONL of {image, question, answer} or LLaVA's conversation JSON")
    if not p.is_file():
        raise ValueError(f"data file not found: {data}" + ("; name the pairs file itself, not its folder"
                                                          if p.is_dir() else ""))
    if p.suffix.lower() not in SUFFIXES:
        raise ValueError(f"{p.name}: use a .jsonl of {{image, question, answer}} or LLaVA's .json")
    return p


def read(data: str, strict: bool = True) -> tuple[list[Pair], list[dict]]:
    """The pairs of a file, and its malformed records ({where, error}; empty when strict, which raises on the
    first). An empty file is an error either way."""
    path = data_path(data)
    pairs: list[Pair] = []
    malformed: list[dict] = []
    for where, rec in _records(path, None if strict else malformed):
        try:
            pairs.append(detect(where, rec))
        except ValueError as e:
            if strict:
                raise
            malformed.append({"where": where, "error": str(e)})
    if not pairs and not malformed:
        raise ValueError(f"{path.name} is empty: it holds no pairs")
    return pairs, malformed


def file_hash(*paths: str) -> str:
    h = hashlib.sha256()
    for p in paths:
        if not p:
            continue
        h.update(Path(p).name.encode())
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def check_images_source(images: str) -> None:
    """`images`, when given, is a folder or a .zip (checked at submit, before anything is unpacked)."""
    import zipfile

    if not images.strip():
        return
    p = Path(images).expanduser()
    if p.is_dir():
        return
    if not p.exists():
        raise ValueError(f"images not found: {images}; give the folder or .zip that holds the pictures (or leave it "
                         "empty: beside the data file)")
    if not zipfile.is_zipfile(p):
        raise ValueError(f"{p.name} is neither a folder nor a .zip; give the folder or .zip that holds the pictures")


# ---- finding the images --------------------------------------------------------------------------------------------
class Images:
    """Where a data file's images are: `images` (a folder or a zip) or the data file's folder and the zips beside it.
    `confined`: every image must resolve inside those (a job with an owner); zips unpack into `cache_dir`."""

    def __init__(self, data: str, images: str, cache_dir: Path, confined: bool):
        self.base = data_path(data).parent
        self.images = images.strip()
        self.cache_dir = Path(cache_dir)
        self.confined = confined
        self._roots: list[Path] | None = None
        self._zips_beside: list[Path] | None = None

    def _unpack(self, zip_path: Path) -> list[Path]:
        from workers.paint.images import unpack  # the studio's safe unzip: size and ratio caps, no path escapes

        self.cache_dir.mkdir(parents=True, exist_ok=True)
        root = unpack(str(zip_path), self.cache_dir)
        inner = [d for d in root.iterdir() if d.is_dir()] if root.is_dir() else []
        files = [f for f in root.iterdir() if f.is_file() and f.name != ".complete"]
        return [root] + (inner if len(inner) == 1 and not files else [])  # a zip of one folder: inside it too

    def roots(self) -> list[Path]:
        if self._roots is None:
            if self.images:
                check_images_source(self.images)
                p = Path(self.images).expanduser()
                self._roots = [p] if p.is_dir() else self._unpack(p)
            else:
                self._roots = [self.base]
        return self._roots

    def _beside(self) -> list[Path]:
        """The zips beside the data file, unpacked only when an image is not found in the folder itself."""
        if self._zips_beside is None:
            self._zips_beside = []
            if not self.images:
                for z in sorted(self.base.glob("*.zip")):
                    self._zips_beside += self._unpack(z)
        return self._zips_beside

    def _inside(self, path: Path) -> bool:
        real = Path(os.path.realpath(path))
        return any(real == r or r in real.parents for r in (Path(os.path.realpath(x)) for x in
                                                            self.roots() + (self._zips_beside or [])))

    def find(self, ref: str) -> tuple[Path | None, str]:
        """(the image's path, "") or (None, why it is missing)."""
        p = Path(ref).expanduser()
        if p.is_absolute():
            cands = [p]
        else:
            cands = [r / p for r in self.roots()]
            if not any(c.is_file() for c in cands):
                cands += [r / p for r in self._beside()]
        for c in cands:
            if c.is_file():
                if self.confined and not self._inside(c):
                    return None, "outside the data's folder (upload the images with the data, or in a .zip)"
                return c, ""
        where = self.images or "beside the data file"
        return None, f"not found ({where})"


def load_image(path: Path):
    """The image as RGB; raises ValueError saying why it cannot be read."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.load()
            return im.convert("RGB")
    except Exception as e:  # noqa: BLE001 (PIL raises UnidentifiedImageError, OSError, DecompressionBombError, …)
        raise ValueError(f"unreadable ({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else 'no detail'})"
                         ) from None


def locate(pairs: list[Pair], images: Images, check_pixels: bool = True
           ) -> tuple[list[tuple[Pair, Path]], list[dict], list[dict]]:
    """Each pair with its image file, and the pairs left out: missing ({where, image, reason}) and unreadable ({where,
    image, reason}). check_pixels decodes every image (the report does; training decodes as it goes)."""
    found, missing, unreadable = [], [], []
    ok: dict[Path, str] = {}
    for pair in pairs:
        path, why = images.find(pair.image)
        if path is None:
            missing.append({"where": pair.where, "image": pair.image, "reason": why})
            continue
        if check_pixels:
            if path not in ok:
                try:
                    load_image(path)
                    ok[path] = ""
                except ValueError as e:
                    ok[path] = str(e)
            if ok[path]:
                unreadable.append({"where": pair.where, "image": pair.image, "reason": ok[path]})
                continue
        found.append((pair, path))
    return found, missing, unreadable


# ---- rendering and masking ---------------------------------------------------------------------------------------
@dataclass
class Encoder:
    """What encoding needs, without the model: the processor (its chat template, tokenizer, image token), how many
    tokens an image takes, and the ids that end an answer."""

    processor: Any
    image_tokens: int
    end_ids: frozenset[int]

    @classmethod
    def of(cls, processor, cfg: dict) -> "Encoder":
        """From a processor and the model's config (workers.vision.model.config_of): image tokens from the vision
        config, end ids from the tokenizer's EOS and the language model's own eos_token_id(s)."""
        from workers.vision.model import image_tokens

        tok = processor.tokenizer
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        if not getattr(processor, "chat_template", None):
            raise ValueError("the base's processor has no chat template (chat_template.json / .jinja), so it cannot "
                             "render a conversation; use a LLaVA folder saved with its processor (llava-hf's have one)")
        eos = cfg.get("text_config", {}).get("eos_token_id")
        ids = {tok.eos_token_id} | set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        return cls(processor, _tokens_per_image(processor) or image_tokens(cfg),
                   frozenset(i for i in ids if i is not None))

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    @property
    def image_id(self) -> int:
        return self.tokenizer.convert_tokens_to_ids(getattr(self.processor, "image_token", IMAGE))

    def render(self, messages: list[dict], generation_prompt: bool) -> str:
        return self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)

    def pieces(self, pair: Pair) -> list[tuple[str, bool]]:
        """The pair's text as (piece, trained) pairs in order: prompts False, answers True."""
        out: list[tuple[str, bool]] = []
        done = ""
        for k, m in enumerate(pair.messages):
            if m["role"] != "assistant":
                continue
            prompt = self.render(pair.messages[:k], True)
            full = self.render(pair.messages[: k + 1], False)
            if not prompt.startswith(done) or not full.startswith(prompt):
                raise ValueError(f"{pair.where}: the processor's chat template does not render this conversation turn "
                                 "by turn (an earlier turn changes when a later one is added), so its answers cannot "
                                 "be masked exactly; use single-turn pairs")
            out.append((prompt[len(done):], False))
            out.append((full[len(prompt):], True))
            done = full
        return [(t, trained) for t, trained in out if t]

    def ids(self, text: str, first: bool) -> list[int]:
        """A piece's token ids as the processor makes them at inference: special tokens added to the first piece
        unless the template wrote the BOS itself (processor.apply_chat_template's rule), `<image>` expanded."""
        tok = self.tokenizer
        add = first and not (tok.bos_token and text.startswith(tok.bos_token))
        ids = tok(text, add_special_tokens=add)["input_ids"]
        out: list[int] = []
        for t in ids:
            out += [t] * self.image_tokens if t == self.image_id else [t]
        return out

    def encode(self, pair: Pair, max_seq_len: int) -> dict:
        """input_ids and labels (-100 on prompts), truncated to max_seq_len, with each piece's length for the
        preview; `image_cut` when max_seq_len would cut into the image's tokens (the example cannot train)."""
        ids: list[int] = []
        labels: list[int] = []
        spans: list[tuple[int, bool]] = []
        for i, (text, trained) in enumerate(self.pieces(pair)):
            t = self.ids(text, i == 0)
            if trained and not self.end_ids & set(t):
                t.append(self.tokenizer.eos_token_id)  # the template writes no end of turn: teach the model to stop
            ids += t
            labels += t if trained else [-100] * len(t)
            spans.append((len(t), trained))
        full = len(ids)
        image_at = [i for i, t in enumerate(ids) if t == self.image_id]
        return {"input_ids": ids[:max_seq_len], "labels": labels[:max_seq_len], "length": full,
                "truncated": full > max_seq_len, "spans": spans,
                "image_cut": bool(image_at) and image_at[-1] >= max_seq_len}

    def prompt_ids(self, pair: Pair) -> list[int]:
        """The ids before the first answer, exactly as training renders them (what the model is asked at inference)."""
        first = self.pieces(pair)[0]
        return self.ids(first[0], True)

    def pixel_values(self, image):
        """The image as the processor's image processor makes it for the model: a (3, H, W) tensor."""
        return self.processor.image_processor(images=[image], return_tensors="pt")["pixel_values"][0]


def _tokens_per_image(processor) -> int:
    """How many tokens the processor expands one image into: asked of the processor itself (a blank image through
    it), so training counts what inference will see."""
    from PIL import Image

    image = getattr(processor, "image_token", IMAGE)
    try:
        out = processor(text=image, images=[Image.new("RGB", (64, 64))], return_tensors=None)
    except Exception:  # noqa: BLE001 (a processor that cannot do this: the config's count instead)
        return 0
    image_id = processor.tokenizer.convert_tokens_to_ids(image)
    return sum(1 for t in out["input_ids"][0] if t == image_id)


def encode_all(found: list[tuple[Pair, Path]], enc: Encoder, max_seq_len: int) -> tuple[list[dict], dict]:
    """Encoded examples ready for training ({input_ids, labels, image}) and counts of what was left out."""
    out, skipped = [], {"empty_answer": 0, "image_cut": 0, "nothing_trained": 0}
    for pair, path in found:
        if pair.empty_answer():
            skipped["empty_answer"] += 1
            continue
        e = enc.encode(pair, max_seq_len)
        if e["image_cut"]:
            skipped["image_cut"] += 1
            continue
        if not any(x != -100 for x in e["labels"]):
            skipped["nothing_trained"] += 1
            continue
        out.append({"input_ids": e["input_ids"], "labels": e["labels"], "image": str(path)})
    return out, skipped


# ---- report and preview --------------------------------------------------------------------------------------------
def report(data: str, images: Images, enc: Encoder, max_seq_len: int, eval_data: str = "", dev_fraction: float = 0.05,
           dev_max: int = 200, seed: int = 42) -> dict:
    """The data report before any GPU time: pairs per shape, missing and unreadable images and malformed records
    (each with its line), token lengths with the image tokens (histogram, what max_seq_len cuts), the dev split and a
    3-example preview with the masked prompt apart from the trained answer."""
    from workers.finetune.data import histogram, split

    pairs, malformed = read(data, strict=False)
    found, missing, unreadable = locate(pairs, images)
    per_shape: dict[str, int] = {}
    for p in pairs:
        per_shape[p.shape] = per_shape.get(p.shape, 0) + 1
    lengths, trained_tokens, total_tokens = [], 0, 0
    for pair, _ in found:
        e = enc.encode(pair, max_seq_len)
        lengths.append(e["length"])
        trained_tokens += sum(1 for x in e["labels"] if x != -100)
        total_tokens += len(e["input_ids"])
    usable, skipped = encode_all(found, enc, max_seq_len)
    if eval_data:
        dev_pairs, dev_bad = read(eval_data, strict=False)
        dev_found, dev_missing, dev_unreadable = locate(dev_pairs, Images(eval_data, images.images, images.cache_dir,
                                                                          images.confined))
        train_n, dev_n, dev_source = len(usable), len(dev_found), "file"
        missing += dev_missing
        unreadable += dev_unreadable
        malformed += dev_bad
    else:
        train, dev = split(usable, dev_fraction, dev_max, seed)
        train_n, dev_n, dev_source = len(train), len(dev), "split"
    s = sorted(lengths) or [0]
    return {
        "files": [data_path(data).name] + ([data_path(eval_data).name] if eval_data else []),
        "pairs": len(pairs),
        "usable": len(usable),
        "per_shape": per_shape,
        "malformed": malformed,
        "missing_images": missing,
        "unreadable_images": unreadable,
        "image_tokens": enc.image_tokens,
        "tokens": {"min": s[0], "median": s[len(s) // 2], "max": s[-1],
                   "mean": round(sum(lengths) / max(1, len(lengths)), 1), "total": sum(lengths)},
        "histogram": histogram(lengths, max_seq_len),
        "max_seq_len": max_seq_len,
        "truncated": sum(1 for n in lengths if n > max_seq_len),
        "skipped": skipped,  # empty answers, image tokens cut by max_seq_len, nothing left to train: dropped
        "trained_fraction": round(trained_tokens / max(1, total_tokens), 4),
        "train": train_n,
        "dev": dev_n,
        "dev_source": dev_source,
        "preview": preview([p for p, _ in found], enc, max_seq_len),
    }


def preview(pairs: list[Pair], enc: Encoder, max_seq_len: int, n: int = 3) -> list[dict]:
    """The first `n` pairs exactly as the model sees them, in pieces marked trained or masked, the image's tokens
    shown as one `<image>×N` run, cut where max_seq_len cuts."""
    out = []
    tok = enc.tokenizer
    for pair in pairs[:n]:
        segs, used = [], 0
        for i, (text, trained) in enumerate(enc.pieces(pair)):
            ids = enc.ids(text, i == 0)
            if trained and not enc.end_ids & set(ids):
                ids.append(tok.eos_token_id)
            keep = ids[: max(0, max_seq_len - used)]
            used += len(ids)
            if keep:
                segs.append({"text": _decode(tok, keep, enc.image_id), "trained": trained, "tokens": len(keep)})
        out.append({"where": pair.where, "image": pair.image, "segments": segs, "tokens": used,
                    "truncated": used > max_seq_len})
    return out


def _decode(tok, ids: list[int], image_id: int) -> str:
    """Token ids as text, each run of image tokens as `<image>×N`."""
    out, run, chunk = [], 0, []
    for t in ids + [None]:
        if t == image_id:
            if chunk:
                out.append(tok.decode(chunk, skip_special_tokens=False))
                chunk = []
            run += 1
            continue
        if run:
            out.append(f"{IMAGE}×{run}")
            run = 0
        if t is not None:
            chunk.append(t)
    if chunk:
        out.append(tok.decode(chunk, skip_special_tokens=False))
    return "".join(out)


def report_html(report: dict) -> str:
    """The report as the tab shows it: counts, what is left out and why (with the line), the token lengths and the
    preview (masked prompt grey, trained answer green)."""
    from workers.finetune.data import preview_html

    t = report["tokens"]
    e = html.escape
    lines = [f"<b>{report['pairs']} pairs</b> in {e(', '.join(report['files']))} "
             f"({', '.join(f'{k} {v}' for k, v in report['per_shape'].items()) or 'none readable'}); "
             f"<b>{report['usable']}</b> usable: {report['train']} to train on, {report['dev']} dev "
             f"({'your dev file' if report['dev_source'] == 'file' else 'a seeded split'}).",
             f"Tokens per pair, {report['image_tokens']} image tokens included: min {t['min']}, median {t['median']}, "
             f"max {t['max']} · {100 * report['trained_fraction']:.0f}% trained (answers only)"
             + (f" · <b>{report['truncated']}</b> longer than max_seq_len {report['max_seq_len']} (cut)"
                if report["truncated"] else "")]
    for key, what in (("malformed", "malformed"), ("missing_images", "missing image"),
                      ("unreadable_images", "unreadable image")):
        items = report.get(key) or []
        if items:
            shown = "; ".join(f"{e(x['where'])}: " + (e(x['image']) + f" ({e(x['reason'])})" if "image" in x
                                                       else e(x["error"])) for x in items[:8])
            lines.append(f"⚠ <b>{len(items)} {what}{'s' if len(items) > 1 else ''}</b> (left out): {shown}"
                         + (" …" if len(items) > 8 else ""))
    cut = {k: v for k, v in report["skipped"].items() if v}
    if cut:
        lines.append("⚠ dropped: " + ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in cut.items()))
    return ("<div class='vf-report'>" + "<br>".join(lines)
            + "<br><b>As the model sees them</b> (<span style='color:#777'>grey: prompt, masked</span> · "
              "<span style='background:#d9f2d9;color:#0b3d0b'>green: answer, trained</span>)"
            + preview_html(report["preview"]) + "</div>")
