"""A synthetic detection dataset (coloured shapes on noise) and the same set in each export format users bring:
YOLO (data.yaml), Roboflow "YOLOv8", Label Studio "YOLO", COCO JSON; a broken copy; a short video."""
from __future__ import annotations

import json
import random
import shutil
import zipfile
from pathlib import Path

NAMES = ["square", "disc"]
COLOURS = [(230, 40, 40), (40, 90, 230)]


def make_shapes(root: Path, n: int = 40, size: int = 96, seed: int = 0) -> Path:
    """YOLO layout: images/{train,val}, labels/{train,val}, data.yaml (relative paths)."""
    import numpy as np
    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    for i in range(n):
        split = "val" if i % 5 == 0 else "train"
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "labels" / split).mkdir(parents=True, exist_ok=True)
        noise = np.random.default_rng(seed * 1000 + i).integers(90, 160, (size, size, 3), dtype=np.uint8)
        img = Image.fromarray(noise)
        draw = ImageDraw.Draw(img)
        lines = []
        for _ in range(rng.randint(1, 2)):
            cls = rng.randrange(2)
            s = rng.randint(size // 4, size // 2)
            x0, y0 = rng.randint(0, size - s), rng.randint(0, size - s)
            (draw.rectangle if cls == 0 else draw.ellipse)([x0, y0, x0 + s, y0 + s], fill=COLOURS[cls])
            lines.append(f"{cls} {(x0 + s / 2) / size:.5f} {(y0 + s / 2) / size:.5f} {s / size:.5f} {s / size:.5f}")
        img.save(root / "images" / split / f"img{i:03d}.jpg", quality=95)
        (root / "labels" / split / f"img{i:03d}.txt").write_text("\n".join(lines) + "\n")
    (root / "data.yaml").write_text("path: .\ntrain: images/train\nval: images/val\nnames:\n"
                                    + "".join(f"  {i}: {n}\n" for i, n in enumerate(NAMES)))
    return root


def to_roboflow(src: Path, dst: Path) -> Path:
    """Roboflow's YOLOv8 export: train/images, valid/images, data.yaml with ../ paths."""
    for split, rf in (("train", "train"), ("val", "valid")):
        for kind in ("images", "labels"):
            shutil.copytree(src / kind / split, dst / rf / kind)
    (dst / "data.yaml").write_text("train: ../train/images\nval: ../valid/images\n\nnc: 2\nnames: ['square', 'disc']\n\n"
                                   "roboflow:\n  workspace: demo\n  project: shapes\n  version: 1\n")
    return dst


def to_labelstudio(src: Path, dst: Path) -> Path:
    """Label Studio's YOLO export: images/, labels/, classes.txt, notes.json (no split)."""
    for kind in ("images", "labels"):
        (dst / kind).mkdir(parents=True)
        for f in (src / kind).rglob("*.*"):
            shutil.copy(f, dst / kind / f.name)
    (dst / "classes.txt").write_text("\n".join(NAMES) + "\n")
    (dst / "notes.json").write_text(json.dumps({"categories": [{"id": i, "name": n} for i, n in enumerate(NAMES)]}))
    return dst


def to_coco(src: Path, dst: Path) -> Path:
    """COCO JSON: images/ and annotations/instances.json with pixel xywh boxes."""
    from PIL import Image

    (dst / "images").mkdir(parents=True)
    coco = {"images": [], "annotations": [], "categories": [{"id": i + 1, "name": n} for i, n in enumerate(NAMES)]}
    for img_path in sorted((src / "images").rglob("*.jpg")):
        shutil.copy(img_path, dst / "images" / img_path.name)
        w, h = Image.open(img_path).size
        iid = len(coco["images"]) + 1
        coco["images"].append({"id": iid, "file_name": img_path.name, "width": w, "height": h})
        for line in (src / "labels" / img_path.parent.name / f"{img_path.stem}.txt").read_text().split("\n"):
            if line.strip():
                c, x, y, bw, bh = map(float, line.split())
                coco["annotations"].append({"id": len(coco["annotations"]) + 1, "image_id": iid,
                                            "category_id": int(c) + 1, "iscrowd": 0, "area": bw * w * bh * h,
                                            "bbox": [(x - bw / 2) * w, (y - bh / 2) * h, bw * w, bh * h]})
    (dst / "annotations").mkdir()
    (dst / "annotations" / "instances.json").write_text(json.dumps(coco))
    return dst


def broken_copy(src: Path, dst: Path) -> Path:
    """The YOLO set with one of each problem the check must find."""
    shutil.copytree(src, dst)
    (dst / "labels" / "train" / "img001.txt").unlink()  # an image without labels
    (dst / "labels" / "train" / "ghost.txt").write_text("0 0.5 0.5 0.2 0.2\n")  # a label without an image
    (dst / "labels" / "train" / "img002.txt").write_text("0 1.4 0.5 0.2 0.2\n")  # out of range
    (dst / "labels" / "train" / "img003.txt").write_text("7 0.5 0.5 0.2 0.2\n")  # class id outside the names
    shutil.copy(dst / "images" / "train" / "img004.jpg", dst / "images" / "train" / "copy_of_4.jpg")  # duplicate
    shutil.copy(dst / "labels" / "train" / "img004.txt", dst / "labels" / "train" / "copy_of_4.txt")
    return dst


def zip_folder(folder: Path, out: Path) -> Path:
    with zipfile.ZipFile(out, "w") as z:
        for f in sorted(folder.rglob("*")):
            if f.is_file():
                z.write(f, f.relative_to(folder))
    return out


def make_video(path: Path, frames: int = 12, size: int = 96) -> Path:
    import cv2
    import numpy as np

    w = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 10, (size, size))
    for i in range(frames):
        img = np.full((size, size, 3), 128, np.uint8)
        cv2.rectangle(img, (5 + 4 * i, 20), (35 + 4 * i, 50), (40, 40, 230), -1)
        w.write(img)
    w.release()
    return path
