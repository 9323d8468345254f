"""The image set a LoRA trains on: a folder or a zip, captions from `.txt` files beside the images (kohya's layout),
kohya's `N_concept` repeat folders, aspect-ratio buckets, and the report the user reads before training starts.

Layouts read:
    images/a.png + images/a.txt               a caption per image (an empty or missing .txt uses instance_prompt)
    images/10_sks mug/a.png                    kohya's repeat folder: each image counts 10 times per epoch, and the
                                               folder's concept ("sks mug") is the caption when there is no .txt
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}
MIN_SIDE = 64  # below this an image carries nothing a 64x64 latent grid can learn from (kohya skips tiny images too)
REPEAT_DIR = re.compile(r"^(\d+)_(.*)$")  # kohya: "<repeats>_<concept>"
MAX_ZIP_RATIO = 100  # images barely compress: a zip that expands 100x is a zip bomb, not photos
MAX_ZIP_BYTES = 8 * 2**30  # an image set larger than this is not a LoRA data set


@dataclass
class Item:
    path: Path
    caption: str
    repeats: int
    size: tuple[int, int]  # (width, height)
    bucket: tuple[int, int] = (0, 0)  # (width, height) it trains at


@dataclass
class ImageSet:
    items: list[Item]
    report: dict = field(default_factory=dict)


def make_buckets(resolution: int, step: int = 64, min_side: int = 256, max_side: int = 1024) -> list[tuple[int, int]]:
    """kohya's bucket set: sides in multiples of `step`, each bucket's area at most resolution², from min_side to
    max_side (scaled down with the resolution)."""
    area = resolution * resolution
    min_side = min(min_side, resolution)
    max_side = max(resolution, min(max_side, resolution * 2))
    out = set()
    w = min_side
    while w <= max_side:
        h = min(max_side, (area // w) // step * step)
        if h >= min_side:
            out.add((w, h))
            out.add((h, w))
        w += step
    out.add((resolution, resolution))
    return sorted(out)


def pick_bucket(size: tuple[int, int], buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is nearest the image's (kohya: by ratio error), the larger one on a tie."""
    ar = size[0] / size[1]
    return min(buckets, key=lambda b: (abs(b[0] / b[1] - ar), -b[0] * b[1]))


def unpack(source: str, cache_dir: Path) -> Path:
    """A folder as it is; a zip extracted once into cache_dir/<hash>/ after checking its size, ratio and names."""
    p = Path(source).expanduser()
    if p.is_dir():
        return p
    if not p.exists():
        raise ValueError(f"images not found: {source}; give a folder of images or a .zip of them")
    if not zipfile.is_zipfile(p):
        raise ValueError(f"{p.name} is neither a folder nor a zip file; give a folder of images or a .zip of them")
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    dest = cache_dir / h.hexdigest()[:16]
    if (dest / ".complete").exists():
        return dest
    with zipfile.ZipFile(p) as z:
        infos = [i for i in z.infolist() if not i.is_dir()]
        total = sum(i.file_size for i in infos)
        packed = max(1, sum(i.compress_size for i in infos))
        if total > MAX_ZIP_BYTES or total / packed > MAX_ZIP_RATIO:
            raise ValueError(f"{p.name} expands to {total / 2**20:.0f} MiB ({total / packed:.0f}x its size); "
                             "that is not an image set: zip the images themselves")
        free = shutil.disk_usage(cache_dir.parent if cache_dir.parent.exists() else "/").free
        if total > free // 2:
            raise ValueError(f"{p.name} needs {total / 2**30:.1f} GiB to unpack; {free / 2**30:.1f} GiB is free")
        tmp = dest.with_name(dest.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True, mode=0o700)
        for info in infos:
            name = Path(info.filename)
            if name.is_absolute() or ".." in name.parts:
                raise ValueError(f"{p.name} holds a path outside itself ({info.filename}); not extracting it")
            target = tmp / name
            target.parent.mkdir(parents=True, exist_ok=True)
            with z.open(info) as src, open(target, "wb") as out:
                shutil.copyfileobj(src, out)
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(tmp, dest)
    (dest / ".complete").touch()
    return dest


def _repeats_and_concept(path: Path, root: Path) -> tuple[int, str]:
    for part in path.relative_to(root).parts[:-1]:
        m = REPEAT_DIR.match(part)
        if m:
            return max(1, int(m.group(1))), m.group(2).strip()
    return 1, ""


def read_set(source: str, instance_prompt: str, resolution: int, bucketing: bool, cache_dir: Path) -> ImageSet:
    """Every image under `source` with its caption and bucket, and the report. ValueError when nothing trainable is
    left (the reason says what to fix)."""
    from PIL import Image, UnidentifiedImageError

    root = unpack(source, cache_dir)
    files = sorted(f for f in root.rglob("*") if f.is_file() and not any(
        part.startswith(".") or part == "__MACOSX" for part in f.relative_to(root).parts))
    images = [f for f in files if f.suffix.lower() in IMAGE_EXTS]
    captions = {f.with_suffix("") for f in files if f.suffix.lower() == ".txt"}
    others = [f for f in files if f.suffix.lower() not in IMAGE_EXTS and f.suffix.lower() != ".txt"]
    buckets = make_buckets(resolution) if bucketing else [(resolution, resolution)]
    items: list[Item] = []
    skipped: list[dict] = []
    missing, empty, too_small, seen = [], [], [], {}
    duplicates: list[list[str]] = []
    for f in images:
        rel = str(f.relative_to(root))
        try:
            with Image.open(f) as im:
                im.verify()  # a truncated or corrupt file fails here, not in the middle of training
            with Image.open(f) as im:
                size = im.size
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError, ImportError) as e:  # ImportError: see
            # workers.paint.generate.check_image (Ultralytics' patched Image.open looks for pi_heif)
            why = "not an image PIL can read" if isinstance(e, ImportError) else str(e).splitlines()[0][:120]
            skipped.append({"file": rel, "reason": f"unreadable: {why}"})
            continue
        if min(size) < MIN_SIDE:
            too_small.append(rel)
            skipped.append({"file": rel, "reason": f"too small: {size[0]}x{size[1]} (at least {MIN_SIDE} px a side)"})
            continue
        digest = hashlib.sha256(f.read_bytes()).hexdigest()
        if digest in seen:
            duplicates.append([seen[digest], rel])
            skipped.append({"file": rel, "reason": f"duplicate of {seen[digest]}"})
            continue
        seen[digest] = rel
        repeats, concept = _repeats_and_concept(f, root)
        txt = f.with_suffix(".txt")
        caption = ""
        if txt.exists():
            caption = txt.read_text(encoding="utf-8", errors="replace").strip()
            if not caption:
                empty.append(rel)
        else:
            missing.append(rel)
        caption = caption or concept or instance_prompt.strip()
        if not caption:
            skipped.append({"file": rel, "reason": "no caption: add a .txt beside it or set instance_prompt"})
            continue
        items.append(Item(f, caption, repeats, size, pick_bucket(size, buckets)))
    orphans = sorted(str(c.relative_to(root)) + ".txt" for c in captions
                     if not any(c.with_suffix(e).exists() or c.with_suffix(e.upper()).exists() for e in IMAGE_EXTS))
    report = {
        "source": str(source),
        "images": len(items),
        "files": len(files),
        "repeats": sum(i.repeats for i in items),
        "sizes": _size_summary([i.size for i in items]),
        "buckets": _bucket_counts(items),
        "missing_captions": missing,
        "empty_captions": empty,
        "captions_without_images": orphans,
        "too_small": too_small,
        "duplicates": duplicates,
        "skipped": skipped,
        "not_images": [str(f.relative_to(root)) for f in others][:50],
        "caption_source": ("per-image .txt" if len(missing) + len(empty) == 0 and items else
                           "instance_prompt / folder concept for images without a caption"),
    }
    if not items:
        if not images and orphans:
            raise ValueError(f"{len(orphans)} caption file(s) but no images in {source} (e.g. {orphans[0]}); put the "
                             "images beside their .txt files")
        if not images:
            raise ValueError(f"no images in {source}: put .png, .jpg or .webp files there (or zip them)")
        reasons = "; ".join(f"{s['file']}: {s['reason']}" for s in skipped[:3])
        raise ValueError(f"no usable image in {source} ({reasons})")
    return ImageSet(items, report)


def _size_summary(sizes: list[tuple[int, int]]) -> dict:
    if not sizes:
        return {}
    ws, hs = [s[0] for s in sizes], [s[1] for s in sizes]
    return {"min": [min(ws), min(hs)], "max": [max(ws), max(hs)],
            "portrait": sum(h > w for w, h in sizes), "landscape": sum(w > h for w, h in sizes),
            "square": sum(w == h for w, h in sizes)}


def _bucket_counts(items: list[Item]) -> dict[str, int]:
    out: dict[str, int] = {}
    for i in items:
        key = f"{i.bucket[0]}x{i.bucket[1]}"
        out[key] = out.get(key, 0) + 1
    return dict(sorted(out.items()))


def load_pixels(path: Path, bucket: tuple[int, int]):
    """The image resized to cover its bucket and centre-cropped, as a (3, H, W) tensor in [-1, 1]."""
    import numpy as np
    import torch
    from PIL import Image

    w, h = bucket
    with Image.open(path) as im:
        im = im.convert("RGB")
        scale = max(w / im.width, h / im.height)
        im = im.resize((max(w, round(im.width * scale)), max(h, round(im.height * scale))), Image.Resampling.LANCZOS)
        left, top = (im.width - w) // 2, (im.height - h) // 2
        im = im.crop((left, top, left + w, top + h))
        arr = np.asarray(im, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def fingerprint(items: list[Item]) -> str:
    """A hash of what training sees: each image's bytes, caption, repeats and bucket (Resume refuses a changed set)."""
    h = hashlib.sha256()
    for i in items:
        h.update(hashlib.sha256(i.path.read_bytes()).digest())
        h.update(f"{i.caption}\0{i.repeats}\0{i.bucket}".encode())
    return h.hexdigest()
