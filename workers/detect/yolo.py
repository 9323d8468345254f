"""What the Detect kinds share: Ultralytics' environment, which weights may be loaded, and the memory model.

Ultralytics loads `.pt` files with pickle (arbitrary code). The studio loads only:
- a model built from a yaml (`yolov8n.yaml`: random weights, nothing to unpickle) or an exported `.onnx`; a yaml of
  the user's is data too: Ultralytics `eval()`s its `activation:` and looks its module names up by name, so it is
  parsed with yaml.safe_load and checked against what Ultralytics' own yamls use (`check_model_yaml`) unless trusted;
- weights a studio job wrote: their sha256 is in that run's `weights.json`;
- a preset (`yolov8n`, …) fetched through Ultralytics' own download; its sha256 is recorded on the first
  download and must match on every later load;
- any other `.pt` only when the user says they trust it (`trust=true`, the "I trust this file" box).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from functools import lru_cache
from pathlib import Path

from studio.hashing import sha256


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
            path = Path(name).expanduser()
            if not trust:
                check_model_yaml(path)
            return str(path)
        import importlib.util

        spec = importlib.util.find_spec("ultralytics")
        cfgs = Path(spec.origin).parent / "cfg" / "models" if spec else None
        if cfgs and not any(cfgs.rglob(_base_yaml(name))):
            raise ValueError(f"{name} is not a model yaml Ultralytics knows (e.g. yolov8n.yaml, yolo11s.yaml)")
        return Path(name).name  # a bare name Ultralytics finds among its own yamls, not a path filled in after now
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

    if name.endswith((".yaml", ".yml")) and Path(name).is_file() and not trust:
        name = str(_checked_copy(Path(name), weights))

    if name in presets():
        path = weights / presets()[name]["file"]
        if not path.exists():
            if os.environ.get("YOLO_OFFLINE") == "1":
                raise RuntimeError(missing_preset(name, path, f"{name} is not downloaded and this machine is offline"))
            try:
                _download(path, progress)
            except (OSError, RuntimeError) as e:  # Ultralytics raises ConnectionError("❌ Download failure …")
                why = (str(e).replace("❌", "").strip().splitlines() or [type(e).__name__])[0][:200]
                raise RuntimeError(missing_preset(name, path, f"{name} could not be downloaded ({why})")) from None
        pins = weights / "sha256.json"
        known = json.loads(pins.read_text()) if pins.exists() else {}
        digest = sha256(path)
        if known.setdefault(path.name, digest) != digest:
            raise ValueError(f"{path} changed since it was downloaded (sha256 {digest[:12]}… vs "
                             f"{known[path.name][:12]}…); delete it to download it again")
        pins.write_text(json.dumps(known, indent=1))
        name = str(path)
    if name.endswith(".onnx"):
        check_onnx(Path(name))
    return YOLO(name, task="detect")


def preset_url(file: str) -> str:
    """Where Ultralytics' own download fetches a preset: its GitHub release assets, at the release the installed
    Ultralytics pins (read from it, so a newer Ultralytics names its own)."""
    import inspect

    from ultralytics.utils import downloads

    release = inspect.signature(downloads.attempt_download_asset).parameters["release"].default
    return f"https://github.com/ultralytics/assets/releases/download/{release}/{file}"


def missing_preset(name: str, path: Path, why: str) -> str:
    """What to do when a preset's weights are not on disk and cannot be fetched: which file, where it goes, or the
    way that needs no download at all."""
    return (f"{why}. To use it offline, download {preset_url(path.name)} on a machine with internet and save it as "
            f"{path} (the studio pins its sha256 on first use), or download it from the Models tab when online. "
            f"Without a download: train a model in Detect → Train from an architecture such as {name}.yaml "
            "(random weights, nothing to fetch) and pick its best.pt here.")


def check_onnx(path: Path) -> None:
    """An .onnx file is loaded lazily by Ultralytics (ONNX Runtime's error then names no file): check it first."""
    try:
        import onnx

        onnx.checker.check_model(str(path))
    except Exception as e:  # noqa: BLE001 (onnx raises ValidationError, DecodeError, OSError, …)
        why = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise ValueError(f"{path.name} is not a usable ONNX model ({why}); export it again") from None


# ---- model yaml files are data ---------------------------------------------------------------------------------
# the only `activation:` values accepted, matched as text (spaces ignored), never evaluated
ACTIVATIONS = frozenset(f"{prefix}{act}" for prefix in ("nn.", "torch.nn.") for act in (
    "SiLU()", "ReLU()", "ReLU6()", "LeakyReLU()", "LeakyReLU(0.1)", "Hardswish()", "GELU()", "Mish()", "ELU()",
    "Identity()"))
ARG_STRINGS = frozenset({"None", "nearest", "bilinear", "nc"})  # besides those Ultralytics' own yamls use
MAX_INT = 8192  # channels, kernel sizes, layer indices: Ultralytics' largest is 2048
MAX_LAYERS, MAX_REPEATS = 500, 100  # its largest model has 43 layers, a module repeated 18 times


@lru_cache(maxsize=1)
def _shipped() -> tuple[frozenset, frozenset, frozenset]:
    """(module names, string arguments, text models) of every model yaml Ultralytics ships:
    what a user's yaml may use. Read from the installed package, so a new Ultralytics brings its new modules."""
    import importlib.util

    import yaml

    spec = importlib.util.find_spec("ultralytics")
    modules, strings, text_models = set(), set(ARG_STRINGS), set()
    for f in (Path(spec.origin).parent / "cfg" / "models").rglob("*.yaml") if spec else ():
        d = yaml.safe_load(f.read_text()) or {}
        if isinstance(d.get("text_model"), str):
            text_models.add(d["text_model"])
        for row in (d.get("backbone") or []) + (d.get("head") or []):
            modules.add(row[2])
            strings |= {a for a in _flat(row[3]) if isinstance(a, str)}
    return frozenset(modules), frozenset(strings), frozenset(text_models)


def _flat(v):
    if isinstance(v, list):
        for x in v:
            yield from _flat(x)
    else:
        yield v


def _number(v, positive: bool = False) -> bool:
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    return ok and (v > 0 if positive else True)


def _int(v, lo: int, hi: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi


def check_model_yaml(path: Path) -> dict:
    """A user's model yaml, read as data and checked field by field against what Ultralytics' own yamls use:
    Ultralytics `eval()`s `activation:`, looks module names up among its globals and string arguments up among its
    locals, so anything beyond plain names and literals could run code. Raises ValueError naming the field."""
    import yaml

    where = Path(path).name
    trust = ("; start from one of Ultralytics' model yamls, or tick \"I trust this file\" (trust=true) only if you "
             "know where it came from")
    try:
        d = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ValueError(f"{where} is not a valid YAML file ({str(e).splitlines()[0]})") from None
    if not isinstance(d, dict):
        raise ValueError(f"{where} is not a model yaml: it holds no `backbone:` and `head:`")
    modules, strings, text_models = _shipped()

    def bad(field: str, why: str):
        return ValueError(f"{where}: {field} {why}{trust}")

    for key, v in d.items():
        if key in ("backbone", "head"):
            continue
        if key == "activation":
            if v is not None and (not isinstance(v, str) or v.replace(" ", "") not in ACTIVATIONS):
                raise bad("activation", "must be a plain name such as nn.SiLU(), nn.ReLU() or nn.LeakyReLU(0.1) "
                                        f"(matched as text, never run); got {str(v)[:80]!r}")
        elif key in ("nc", "ch", "channels", "reg_max"):
            top = 100_000 if key == "nc" else 64  # input channels and DFL bins: 3 and 16 in Ultralytics' own
            if not _int(v, 1, top):
                raise bad(key, f"must be a whole number from 1 to {top}; got {str(v)[:40]!r}")
        elif key in ("depth_multiple", "width_multiple"):
            if not (_number(v, positive=True) and v <= 16):
                raise bad(key, f"must be a number above 0 and at most 16; got {str(v)[:40]!r}")
        elif key == "kpt_shape":
            if not (isinstance(v, list) and 1 <= len(v) <= 4 and all(_int(x, 1, 10_000) for x in v)):
                raise bad(key, f"must be a list of whole numbers, e.g. [17, 3]; got {str(v)[:40]!r}")
        elif key == "scales":
            if not (isinstance(v, dict) and v and all(
                    isinstance(k, str) and len(k) == 1 and isinstance(s, list) and len(s) == 3
                    and all(_number(x, positive=True) for x in s) and s[0] <= 16 and s[1] <= 16 and s[2] <= MAX_INT
                    for k, s in v.items())):
                raise bad("scales", "must map scale letters to [depth, width, max_channels] numbers, "
                                    "e.g. n: [0.33, 0.25, 1024]")
        elif key in ("end2end", "inplace"):
            if not isinstance(v, bool):
                raise bad(key, f"must be true or false; got {str(v)[:40]!r}")
        elif key == "scale":  # Ultralytics sets it from the file name
            if not (isinstance(v, str) and len(v) <= 1):
                raise bad(key, f"must be a scale letter (n, s, m, l, x); got {str(v)[:40]!r}")
        elif key == "names":  # not read by Ultralytics when it builds a model, but plain data some yamls carry
            items = list(v.values()) if isinstance(v, dict) else v
            if not (isinstance(items, list) and all(isinstance(x, (str, int)) for x in items)):
                raise bad(key, "must be a list of class names")
        elif key == "text_model":  # YOLO-World / YOLOE load this text encoder by name
            if v not in text_models:
                raise bad(key, f"must be one of {', '.join(sorted(text_models))}; got {str(v)[:40]!r}")
        else:
            raise bad(f"`{str(key)[:40]}`", "is not a field of a model yaml (known: nc, scales, backbone, head, "
                                            "activation, depth_multiple, width_multiple, kpt_shape, ch)")
    for section in ("backbone", "head"):
        rows = d.get(section)
        if not isinstance(rows, list) or not rows:
            raise bad(section, "must be a list of layers [from, repeats, module, args]")
    if len(d["backbone"]) + len(d["head"]) > MAX_LAYERS:
        raise bad("backbone/head", f"hold more than {MAX_LAYERS} layers")
    for section in ("backbone", "head"):
        for i, row in enumerate(d[section]):
            field = f"{section}[{i}]"
            if not (isinstance(row, list) and len(row) == 4):
                raise bad(field, f"must be [from, repeats, module, args]; got {str(row)[:80]!r}")
            frm, n, module, args = row
            if not (_int(frm, -MAX_LAYERS, MAX_LAYERS) or (isinstance(frm, list) and frm
                                                            and all(_int(x, -MAX_LAYERS, MAX_LAYERS) for x in frm))):
                raise bad(f"{field} from", f"must be a layer index or a list of them; got {str(frm)[:40]!r}")
            if not _int(n, 1, MAX_REPEATS):
                raise bad(f"{field} repeats", f"must be a whole number from 1 to {MAX_REPEATS}; got {str(n)[:40]!r}")
            if not isinstance(module, str) or module not in modules:
                raise bad(f"{field} module", f"{str(module)[:60]!r} is not a module Ultralytics' own model yamls use "
                                             f"(e.g. Conv, C2f, SPPF, nn.Upsample, Concat, Detect)")
            if not isinstance(args, list):
                raise bad(f"{field} args", f"must be a list; got {str(args)[:40]!r}")
            for a in _flat(args):
                if a is None or isinstance(a, bool):
                    continue
                if isinstance(a, str):
                    if a not in strings:
                        raise bad(f"{field} args", f"may name only {', '.join(sorted(strings))}; got {a[:60]!r}")
                elif not (_int(a, -MAX_INT, MAX_INT) or (isinstance(a, float) and _number(a) and abs(a) <= MAX_INT)):
                    raise bad(f"{field} args", f"must be numbers up to {MAX_INT}, a few names, true/false or null; "
                                               f"got {str(a)[:40]!r}")
    return d


def _checked_copy(path: Path, weights: Path) -> Path:
    """The user's yaml checked once more and written back out from the checked data into the studio's folder, under
    its own name (Ultralytics reads the scale from it): Ultralytics then reads exactly what was checked, not a file
    that changed since, nor a sibling it would look for beside it (`yolov8n6.yaml` -> `yolov8n-p6.yaml`)."""
    import yaml

    d = check_model_yaml(path)
    text = yaml.safe_dump(d, sort_keys=False)
    out = weights / "checked" / hashlib.sha256(text.encode()).hexdigest()[:16] / path.name
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    return out


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
