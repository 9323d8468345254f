"""What the Detect kinds share: Ultralytics' environment, which weights may be loaded, and the memory model.

Ultralytics loads `.pt` files with pickle (arbitrary code). The studio loads only:
- a model built from a yaml (`yolov8n.yaml`: random weights, nothing to unpickle) or an exported `.onnx`;
- weights a studio job wrote: their sha256 is in that run's `weights.json`;
- a preset (`yolov8n`, …) fetched through Ultralytics' own download; its sha256 is recorded on the first
  download and must match on every later load;
- any other `.pt` only when the user says they trust it (`trust=true`, the "I trust this file" box).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path


def setup(data_dir: Path) -> Path:
    """Point Ultralytics at the studio's folders before it is imported; returns its weights folder."""
    cfg = Path(os.environ.get("YOLO_CONFIG_DIR") or Path(data_dir) / "ultralytics")
    os.environ["YOLO_CONFIG_DIR"] = str(cfg)
    os.environ.setdefault("YOLO_AUTOINSTALL", "false")  # never pip-install at run time
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        os.environ.setdefault("YOLO_OFFLINE", "1")  # no DNS probe, no font download
    cfg.mkdir(parents=True, exist_ok=True)
    for name in ("Arial.ttf", "Arial.Unicode.ttf"):  # plots want Arial; a local font saves a download
        if not (cfg / name).exists():
            import matplotlib

            font = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"
            if font.exists():
                (cfg / name).write_bytes(font.read_bytes())
    try:
        import cv2  # noqa: F401  (Ultralytics needs it; its wheel loads the system's libGL and GLib)
    except ImportError as e:
        raise RuntimeError(f"OpenCV cannot load ({e}). Install the system libraries it needs, e.g. "
                           "`sudo apt-get install libgl1 libglib2.0-0`") from None
    weights = Path(data_dir) / "models" / "yolo"
    weights.mkdir(parents=True, exist_ok=True)
    return weights


def presets() -> dict[str, dict]:
    from studio.presets import presets as all_presets

    return all_presets()["yolo"]


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def record_weights(run_dir: Path, *paths: Path) -> dict[str, str]:
    """Write the sha256 of weights this run produced into its weights.json (what later loads check)."""
    path = Path(run_dir) / "weights.json"
    known = json.loads(path.read_text()) if path.exists() else {}
    for p in paths:
        if Path(p).exists():
            known[str(Path(p).resolve().relative_to(Path(run_dir).resolve()))] = sha256(Path(p))
    path.write_text(json.dumps(known, indent=1))
    return known


def studio_wrote(path: Path, runs_dir: Path) -> bool:
    """True when `path` lies in a run folder whose weights.json holds its current hash."""
    path, runs_dir = Path(path).resolve(), Path(runs_dir).resolve()
    if not path.is_relative_to(runs_dir):
        return False
    run_dir = runs_dir / path.relative_to(runs_dir).parts[0]
    card = run_dir / "weights.json"
    if not card.exists():
        return False
    return json.loads(card.read_text()).get(str(path.relative_to(run_dir))) == sha256(path)


def resolve(model: str, data_dir: Path, trust: bool = False) -> str:
    """Check `model` may be loaded and say what it is: a yaml or preset name, or a file path. Raises ValueError."""
    name = model.strip()
    if not name:
        raise ValueError("no model given")
    if name.endswith((".yaml", ".yml")):
        if Path(name).expanduser().exists():
            return str(Path(name).expanduser())
        import importlib.util

        spec = importlib.util.find_spec("ultralytics")
        cfgs = Path(spec.origin).parent / "cfg" / "models" if spec else None
        if cfgs and not any(cfgs.rglob(_base_yaml(name))):
            raise ValueError(f"{name} is not a model yaml Ultralytics knows (e.g. yolov8n.yaml, yolo11s.yaml)")
        return name
    stem = name[:-3] if name.endswith(".pt") else name
    if stem in presets() and not Path(name).expanduser().exists():
        return stem
    path = Path(name).expanduser()
    if not path.is_file():
        raise ValueError(f"model {name!r} is neither a preset ({', '.join(presets())}), a model yaml, nor a file")
    if path.suffix == ".onnx":
        return str(path)
    if path.suffix != ".pt":
        raise ValueError(f"{path.name}: use a .pt (PyTorch) or .onnx model")
    from studio.config import Config

    if studio_wrote(path, Config.load(data_dir).runs_dir) or trust:
        return str(path)
    raise ValueError(f"{path.name} was not written by this studio. .pt files are Python pickles and can run code "
                     "when loaded: tick \"I trust this file\" (trust=true) only if you know where it came from")


def _base_yaml(name: str) -> str:
    """yolov8s.yaml → yolov8.yaml (Ultralytics derives the scale from the name)."""
    import re

    return re.sub(r"^(yolo(?:v\d+|\d+))[nslmx]", r"\1", Path(name).name)


def load(model: str, data_dir: Path, trust: bool, progress=None):
    """An ultralytics YOLO for a resolved model; presets are fetched through Ultralytics and hash-pinned."""
    weights = setup(data_dir)
    name = resolve(model, data_dir, trust)
    from ultralytics import YOLO

    if name in presets():
        path = weights / presets()[name]["file"]
        if not path.exists():
            if os.environ.get("YOLO_OFFLINE") == "1":
                raise RuntimeError(f"{name} is not downloaded and this machine is offline; download it when online "
                                   f"(Models tab, or run a detect job with model={name}) or use a .yaml / your "
                                   "own trained weights")
            _download(path, progress)
        pins = weights / "sha256.json"
        known = json.loads(pins.read_text()) if pins.exists() else {}
        digest = sha256(path)
        if known.setdefault(path.name, digest) != digest:
            raise ValueError(f"{path} changed since it was downloaded (sha256 {digest[:12]}… vs "
                             f"{known[path.name][:12]}…); delete it to download it again")
        pins.write_text(json.dumps(known, indent=1))
        name = str(path)
    return YOLO(name, task="detect")


def _download(path: Path, progress=None) -> None:
    """Fetch a preset through Ultralytics' own download (its release assets), its byte counter sent to `progress`."""
    from ultralytics.utils import downloads

    plain = downloads.TQDM

    class Reported(plain):  # Ultralytics counts bytes on a TQDM bar: pass each update on (a cancel point)
        def update(self, n=1):
            super().update(n)
            if progress:
                progress(self.n, self.total or None, f"downloading {path.name}")

    cwd = os.getcwd()
    os.chdir(path.parent)
    downloads.TQDM = Reported
    try:
        downloads.attempt_download_asset(path.name)
    finally:
        downloads.TQDM = plain
        os.chdir(cwd)
    if not path.exists():
        raise RuntimeError(f"could not download {path.name} from Ultralytics' release assets; check the network "
                           "and try again")


# ---- memory --------------------------------------------------------------------------------------------------------
SCALES_M = {"n": 3.2, "s": 11.2, "m": 25.9, "l": 43.7, "x": 68.2}  # YOLOv8 parameters (millions) per scale


def size_of(model: str) -> tuple[float, str]:
    """(parameters in millions, scale letter) of a preset, a yaml name, or a weights file (from its size: a
    trained best.pt holds fp16 weights, an .onnx fp32; a file name like best.pt says nothing of the scale)."""
    import re

    path = Path(model)
    if path.stem in presets():
        params = presets()[path.stem]["params_m"]
    elif path.suffix in (".pt", ".onnx") and path.is_file():
        params = path.stat().st_size / (4e6 if path.suffix == ".onnx" else 2e6)
    else:
        m = re.search(r"yolo(?:v\d+|\d+)([nslmx])", path.stem)
        params = SCALES_M[m.group(1) if m else "n"]
    return params, min(SCALES_M, key=lambda k: abs(SCALES_M[k] - params))


# activations per image at 640 px with AMP, MiB (measured order of magnitude for the n/s/m/l/x scales)
ACT_MIB_640 = {"n": 110, "s": 200, "m": 380, "l": 560, "x": 800}


def activation_bytes(scale: str, imgsz: int, batch: int, amp: bool, training: bool) -> int:
    per = ACT_MIB_640[scale] * (imgsz / 640) ** 2 * (1 if amp else 1.8)
    if not training:
        per *= 0.15  # no stored activations for backward
    return int(per * batch * 2**20)
