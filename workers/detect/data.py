"""Detection datasets: import (YOLO data.yaml, Roboflow "YOLOv8" export, Label Studio YOLO export, COCO JSON),
check, split, and write one data.yaml Ultralytics trains from.

`prepare()` reads a zip (extracted safely), a folder or a data.yaml and returns the data.yaml it wrote plus a
report: images without labels, labels without images, boxes out of range, class ids outside the names,
malformed lines, duplicate images, and the train/val split (proposed when the dataset has none).
No torch or Ultralytics here: the tab runs the check directly.
"""
from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

IMAGE_EXT = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}
EXAMPLES = 5  # findings listed by name; the counts are complete
MAX_ZIP_BYTES = 20 * 2**30  # a dataset zip may unpack to this much (5,000 large photos fit)
MAX_ZIP_FILES = 200_000


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXT and p.is_file())


def label_for(image: Path) -> Path:
    """Ultralytics' rule: the last /images/ in the path becomes /labels/, the suffix .txt."""
    parts = list(image.parts)
    for i in range(len(parts) - 1, -1, -1):
        if parts[i] == "images":
            parts[i] = "labels"
            break
    return Path(*parts).with_suffix(".txt")


def _read_yaml(path: Path) -> dict:
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise ValueError(f"{path.name} is not UTF-8 text (undecodable byte at offset {e.start})") from None
    except yaml.YAMLError as e:
        raise ValueError(f"{path.name} is not valid YAML: {e}") from None
    if not isinstance(data, dict) or "names" not in data:
        raise ValueError(f"{path.name} has no `names` (the class names)")
    names = data["names"]
    if isinstance(names, dict):
        names = [names[k] for k in sorted(names)]
    data["names"] = [str(n) for n in names]
    return data


def _split_dir(root: Path, yaml_dir: Path, value) -> list[Path]:
    """Resolve a data.yaml split entry (a folder, a list file or a list of them); Roboflow writes `../train/images`
    relative to a yaml that sits beside `train/`, so a path is also tried without its leading `../`."""
    values = value if isinstance(value, list) else [value]
    out = []
    for v in values:
        rel = str(v)
        candidates = [root / rel, yaml_dir / rel, yaml_dir / rel.lstrip("./").removeprefix("../"),
                      root / rel.replace("../", "")]
        found = next((c for c in candidates if c.exists()), None)
        if found is None:
            raise ValueError(f"data.yaml names {rel!r} as a split, but no such folder or file is in the dataset")
        if found.is_file() and found.suffix == ".txt":  # a list of image paths
            out += [(found.parent / line.strip()).resolve() for line in found.read_text().splitlines() if line.strip()]
        else:
            out += _images(found)
    return out


def _coco_to_yolo(coco_json: Path, root: Path, out: Path) -> tuple[list[str], list[Path]]:
    """Write YOLO labels beside copies of the COCO images (out/images, out/labels); return names and images. A
    malformed file (an entry without its keys, a wrong type) is a ValueError naming it."""
    try:
        return _coco_convert(coco_json, root, out)
    except KeyError as e:
        raise ValueError(f"{coco_json.name} is not COCO annotations the studio can read: an entry lacks "
                         f"{e.args[0]!r}") from None
    except (TypeError, ValueError, AttributeError, IndexError, ZeroDivisionError) as e:
        raise ValueError(f"{coco_json.name} is not COCO annotations the studio can read: a malformed entry "
                         f"({type(e).__name__}: {e})") from None


def _coco_convert(coco_json: Path, root: Path, out: Path) -> tuple[list[str], list[Path]]:
    import shutil

    data = json.loads(coco_json.read_text())
    cats = sorted(data["categories"], key=lambda c: c["id"])
    cat_index = {c["id"]: i for i, c in enumerate(cats)}
    by_image: dict[int, list] = {}
    for a in data["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "labels").mkdir(parents=True, exist_ok=True)
    images = []
    for im in data["images"]:
        src = next((c for c in (coco_json.parent / im["file_name"], root / im["file_name"],
                                root / "images" / im["file_name"]) if c.exists()), None)
        if src is None:
            continue  # reported below as a label without an image
        dst = out / "images" / Path(im["file_name"]).name
        shutil.copy(src, dst)
        w, h = im["width"], im["height"]
        lines = []
        for a in by_image.get(im["id"], []):
            x, y, bw, bh = a["bbox"]
            cls = cat_index.get(a["category_id"], a["category_id"])
            lines.append(f"{cls} {(x + bw / 2) / w:.6f} {(y + bh / 2) / h:.6f} {bw / w:.6f} {bh / h:.6f}")
        (out / "labels" / dst.with_suffix(".txt").name).write_text("\n".join(lines) + ("\n" if lines else ""))
        images.append(dst)
    missing = [im["file_name"] for im in data["images"] if not any(p.name == Path(im["file_name"]).name
                                                                    for p in images)]
    (out / "coco_missing.json").write_text(json.dumps(missing))
    return [c["name"] for c in cats], images


def detect_format(root: Path) -> tuple[str, Path | None]:
    """("yolo" | "roboflow" | "labelstudio" | "coco", the file that says so)."""
    yamls = sorted(root.rglob("data.yaml")) or sorted(root.rglob("*.yaml"))
    if yamls:
        text = yamls[0].read_text(errors="ignore")
        return ("roboflow" if "roboflow" in text.lower() or "../train" in text else "yolo"), yamls[0]
    for j in sorted(root.rglob("*.json")):
        try:
            d = json.loads(j.read_text())
        except (ValueError, UnicodeDecodeError):
            continue
        if isinstance(d, dict) and {"images", "annotations", "categories"} <= d.keys():
            return "coco", j
    classes = sorted(root.rglob("classes.txt"))
    if classes:
        return "labelstudio", classes[0]
    raise ValueError("no data.yaml, COCO annotations JSON or classes.txt found: export the dataset as YOLO "
                     "(Ultralytics / Roboflow \"YOLOv8\"), Label Studio \"YOLO\", or COCO JSON")


def check_zip(source: Path, dest: Path) -> None:
    """A dataset zip against the dataset limits and the free disk where it will land, at submit."""
    from workers.rag.chunk import check_zip as check

    check(source, dest, MAX_ZIP_BYTES, MAX_ZIP_FILES)


def prepare(source: Path, out: Path, val_split: float = 0.2, seed: int = 0) -> tuple[Path, dict]:
    """Import and check a dataset into `out` (a new folder); return (data.yaml, report)."""
    from workers.rag.chunk import safe_extract

    source = Path(source).expanduser()
    if not source.exists():
        raise ValueError(f"dataset not found: {source}")
    out.mkdir(parents=True, exist_ok=True)
    if source.suffix.lower() == ".zip":
        root = safe_extract(source, out / "extracted", MAX_ZIP_BYTES, MAX_ZIP_FILES)
    elif source.is_file() and source.suffix in (".yaml", ".yml"):
        root = source.parent
    elif source.is_dir():
        root = source
    else:
        raise ValueError(f"{source.name}: give a zip, a folder or a data.yaml")
    try:
        fmt, marker = detect_format(root)
    except ValueError as e:
        raise ValueError(f"{source.name}: {e}") from None
    splits: dict[str, list[Path]] = {}
    if fmt in ("yolo", "roboflow"):
        spec = _read_yaml(marker)
        names = spec["names"]
        base = (marker.parent / str(spec.get("path") or "")).resolve()  # `path:` is relative to the yaml, or absolute
        for split, key in (("train", "train"), ("val", "val"), ("test", "test")):
            if spec.get(key):
                splits[split] = _split_dir(base, marker.parent, spec[key])
    elif fmt == "coco":
        names, images = _coco_to_yolo(marker, root, out / "coco")
        splits["all"] = images
    else:  # Label Studio: classes.txt, images/, labels/
        names = [n.strip() for n in marker.read_text().splitlines() if n.strip()]
        splits["all"] = _images(marker.parent / "images") if (marker.parent / "images").exists() else _images(root)
    if not names:
        raise ValueError("the dataset names no classes")
    report = check(root if fmt != "coco" else out / "coco", splits, names)
    report["format"] = fmt
    if fmt == "coco":
        report["labels_without_images"]["count"] += len(json.loads((out / "coco" / "coco_missing.json").read_text()))
    # a split: the dataset's own, or a proposed one (seeded, so a retrain sees the same split)
    if "train" in splits and "val" in splits and splits["val"]:
        train, val = splits["train"], splits["val"]
        report["split"] = {"train": len(train), "val": len(val), "proposed": False}
    else:
        pool = sorted(set(p for ps in splits.values() for p in ps))
        rng = random.Random(seed)
        rng.shuffle(pool)
        n_val = max(1, round(len(pool) * val_split)) if len(pool) > 1 else 0
        val, train = pool[:n_val], pool[n_val:]
        report["split"] = {"train": len(train), "val": len(val), "proposed": True, "val_fraction": val_split,
                           "seed": seed}
    if not train or not val:
        raise ValueError(f"the dataset has {len(train)} training and {len(val)} validation images; it needs both")
    (out / "train.txt").write_text("\n".join(str(p.resolve()) for p in train) + "\n")
    (out / "val.txt").write_text("\n".join(str(p.resolve()) for p in val) + "\n")
    import yaml

    data_yaml = out / "data.yaml"
    data_yaml.write_text(yaml.safe_dump({"path": str(out.resolve()), "train": str((out / "train.txt").resolve()),
                                         "val": str((out / "val.txt").resolve()),
                                         "names": {i: n for i, n in enumerate(names)}}, sort_keys=False))
    report["names"] = names
    report["data_yaml"] = str(data_yaml)
    (out / "check.json").write_text(json.dumps(report, indent=1))
    return data_yaml, report


def _finding(items: list) -> dict:
    return {"count": len(items), "examples": items[:EXAMPLES]}


def check(root: Path, splits: dict[str, list[Path]], names: list[str]) -> dict:
    images = sorted(set(p for ps in splits.values() for p in ps))
    no_label, out_of_range, bad_class, malformed = [], [], [], []
    boxes = 0
    per_class = [0] * len(names)
    hashes: dict[str, list[str]] = {}
    for img in images:
        hashes.setdefault(hashlib.sha256(img.read_bytes()).hexdigest(), []).append(_rel(img, root))
        lab = label_for(img)
        if not lab.exists():
            no_label.append(_rel(img, root))
            continue
        for n, line in enumerate(lab.read_text().splitlines(), start=1):
            parts = line.split()
            if not parts:
                continue
            where = f"{_rel(lab, root)}:{n}"
            try:
                cls, x, y, w, h = int(parts[0]), *map(float, parts[1:5])
                if len(parts) != 5:
                    raise ValueError
            except ValueError:
                malformed.append(where)
                continue
            boxes += 1
            if not 0 <= cls < len(names):
                bad_class.append(f"{where} (class {cls}; names has {len(names)})")
            else:
                per_class[cls] += 1
            if not (0 <= x <= 1 and 0 <= y <= 1 and 0 < w <= 1 and 0 < h <= 1
                    and x - w / 2 >= -0.01 and x + w / 2 <= 1.01 and y - h / 2 >= -0.01 and y + h / 2 <= 1.01):
                out_of_range.append(where)
    labelled = {label_for(p).resolve() for p in images}
    label_dirs = {label_for(p).parent for p in images if label_for(p).parent.exists()}
    orphans = [_rel(lab, root) for d in label_dirs for lab in sorted(d.glob("*.txt"))
               if lab.resolve() not in labelled and lab.name != "classes.txt"]
    dupes = [group for group in hashes.values() if len(group) > 1]
    return {
        "images": len(images), "boxes": boxes, "classes": len(names),
        "boxes_per_class": dict(zip(names, per_class)),
        "images_without_labels": _finding(no_label),
        "labels_without_images": _finding(orphans),
        "boxes_out_of_range": _finding(out_of_range),
        "class_ids_outside_names": _finding(bad_class),
        "malformed_lines": _finding(malformed),
        "duplicate_images": _finding(dupes),
    }


def _rel(p: Path, root: Path) -> str:
    try:
        return str(p.resolve().relative_to(root.resolve()))
    except ValueError:
        return p.name


FINDINGS = ("images_without_labels", "labels_without_images", "boxes_out_of_range", "class_ids_outside_names",
            "malformed_lines", "duplicate_images")


def summary(report: dict) -> str:
    """The report as Markdown for the tab and the job log."""
    split = report["split"]
    lines = [f"**{report['format']}** dataset: {report['images']} images, {report['boxes']} boxes, "
             f"{report['classes']} classes ({', '.join(f'{k} {v}' for k, v in report['boxes_per_class'].items())})",
             f"split: {split['train']} train / {split['val']} val"
             + (f" (proposed: {100 * split['val_fraction']:.0f}% val, seed {split['seed']})"
                if split["proposed"] else "")]
    for key in FINDINGS:
        f = report[key]
        if f["count"]:
            ex = "; ".join(str(e) for e in f["examples"])
            lines.append(f"- ⚠ {key.replace('_', ' ')}: **{f['count']}** (e.g. {ex})")
    if not any(report[k]["count"] for k in FINDINGS):
        lines.append("- ✓ no problems found")
    return "\n".join(lines)
