"""The `parameters` PNG text chunk in AUTOMATIC1111's format, written with every image and read back (a dropped
PNG restores its settings; A1111, Forge and civitai read the same text):

    a cat in a hat <lora:style:0.8>
    Negative prompt: blurry
    Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 42, Size: 512x512, Model hash: 6ce0161689, Model: sd15, ...

LoRAs appear as A1111 writes them: `<lora:NAME:WEIGHT>` tags at the end of the prompt and a `Lora hashes` field;
the studio adds `Loras` (each LoRA's path or job id with its weight) so the image is reproducible here.
"""
from __future__ import annotations

import re
from pathlib import Path

# A1111 field -> our param, and how the value reads back
FIELDS = {"Steps": ("steps", int), "Sampler": ("sampler", str), "CFG scale": ("cfg", float), "Seed": ("seed", int),
          "Model": ("model_name", str), "Model hash": ("model_hash", str), "Denoising strength": ("strength", float),
          "Loras": ("loras", str), "Lora hashes": ("lora_hashes", str), "Batch size": ("batch", int)}
LORA_TAG = re.compile(r"\s*<lora:([^:>]+):([-+0-9.eE]+)>")
# key: value pairs on the last line; a value is "quoted, with \" escapes" or runs to the next comma
PAIR = re.compile(r'\s*([\w][\w \-/]*):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)')


def _quote(v: str) -> str:
    v = str(v)
    return v if not any(c in v for c in ',:"\n') else '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _unquote(v: str) -> str:
    v = v.strip()
    if len(v) >= 2 and v[0] == v[-1] == '"':
        return re.sub(r"\\(.)", r"\1", v[1:-1])
    return v


def format_parameters(*, prompt: str, negative_prompt: str, steps: int, sampler: str, cfg: float, seed: int,
                      width: int, height: int, model_name: str, model_hash: str = "", loras: list = (),
                      strength: float | None = None, extra: dict | None = None) -> str:
    """`loras`: [(spec as given, name, weight, hash)]."""
    tags = "".join(f" <lora:{name}:{weight:g}>" for _, name, weight, _ in loras)
    lines = [prompt + tags]
    if negative_prompt:
        lines.append(f"Negative prompt: {negative_prompt}")
    fields = {"Steps": steps, "Sampler": sampler, "CFG scale": f"{cfg:g}", "Seed": seed, "Size": f"{width}x{height}"}
    if model_hash:
        fields["Model hash"] = model_hash
    fields["Model"] = model_name
    if strength is not None:
        fields["Denoising strength"] = f"{strength:g}"
    if loras:
        fields["Lora hashes"] = ", ".join(f"{name}: {h}" for _, name, _, h in loras if h)
        fields["Loras"] = ", ".join(f"{spec}:{weight:g}" for spec, _, weight, _ in loras)
    fields.update(extra or {})
    lines.append(", ".join(f"{k}: {_quote(v)}" for k, v in fields.items() if v not in ("", None)))
    return "\n".join(lines)


def parse_parameters(text: str) -> dict:
    """A1111's `parameters` text -> the paint params it names (prompt, negative_prompt, steps, sampler, cfg, seed,
    width, height, strength, loras) plus model_name / model_hash / lora_hashes; unknown fields are kept under
    `other`. Raises ValueError when the text holds no settings line."""
    lines = text.strip().split("\n")
    if not lines or not PAIR.match(lines[-1]) or "Steps:" not in lines[-1]:
        raise ValueError("this text holds no generation settings (no 'Steps: …' line as A1111 writes it)")
    settings, body = lines[-1], lines[:-1]
    neg_at = next((i for i, ln in enumerate(body) if ln.startswith("Negative prompt:")), None)
    prompt_lines = body if neg_at is None else body[:neg_at]
    negative = "" if neg_at is None else "\n".join(body[neg_at:])[len("Negative prompt:"):].strip()
    prompt = "\n".join(prompt_lines).strip()
    tags = [(m.group(1), float(m.group(2))) for m in LORA_TAG.finditer(prompt)]
    prompt = LORA_TAG.sub("", prompt).strip()
    out: dict = {"prompt": prompt, "negative_prompt": negative, "other": {}}
    for m in PAIR.finditer(settings):
        key, value = m.group(1).strip(), _unquote(m.group(2))
        if not key:
            continue
        if key == "Size":
            w, _, h = value.partition("x")
            out["width"], out["height"] = int(w), int(h)
        elif key in FIELDS:
            name, conv = FIELDS[key]
            try:
                out[name] = conv(value)
            except ValueError:
                out["other"][key] = value
        else:
            out["other"][key] = value
    if "loras" not in out and tags:  # an A1111 image: the tags name LoRAs by file name
        out["loras"] = ", ".join(f"{n}:{w:g}" for n, w in tags)
    return out


def read_png_parameters(path: str | Path) -> str:
    """The `parameters` text of a PNG (or the EXIF UserComment A1111 writes into JPEG/WebP); ValueError if none."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            text = im.info.get("parameters")
            if text is None and im.format in ("JPEG", "WEBP"):
                raw = im.getexif().get_ifd(0x8769).get(0x9286)  # UserComment
                if isinstance(raw, bytes):
                    text = raw[8:].decode("utf-16-be" if raw[:8] == b"UNICODE\0" else "utf-8", "ignore")
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"{Path(path).name} is not an image ({e})") from None
    if not text:
        raise ValueError(f"{Path(path).name} carries no generation settings (no 'parameters' text chunk)")
    return text
