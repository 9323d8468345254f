"""Job kind `vision_check`: the data report of a vision fine-tune before any GPU time (the Vision chat tab's Check
data), in the io lane beside a training job.

Reads every record (malformed ones are listed with their line, not refused), finds and decodes every image (missing
and unreadable ones listed with their line), and renders each pair through the base's own processor: token lengths
with the image's tokens, what max_seq_len cuts, the dev split, and three pairs exactly as the model sees them with
the masked prompt apart from the trained answer. Only the processor is loaded (tokenizer + image processor), never the
model.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

from studio.gate import Estimate

PACKAGES = ("transformers", "tokenizers", "pillow")  # versions for the run card
PATHS = ("base", "data", "images", "eval_data")  # params that name a server path (studio.access)


@dataclass(frozen=True)
class Params:
    base: str = "llava-1.5-7b-hf"  # the base whose processor (chat template, image tokens) the report uses
    data: str = ""  # a JSONL of {image, question, answer}, or LLaVA's conversation JSON with <image>
    images: str = ""  # the folder or .zip holding the images; empty: beside the data file (and zips there)
    eval_data: str = ""  # a dev set file; empty: the seeded split training would make
    max_seq_len: int = 1024  # the training's max_seq_len (image tokens included): longer pairs are counted as cut
    dev_fraction: float = 0.05  # share held out as the dev set when eval_data is empty
    dev_max: int = 200  # at most this many dev pairs from the split
    seed: int = 42  # the dev split's seed (the same as the training's)

    def __post_init__(self):
        if not self.base.strip():
            raise ValueError("no base model given: its processor sizes the pairs (the preset or a LLaVA folder)")
        if not self.data.strip():
            raise ValueError("no data given: name a JSONL of {image, question, answer} or LLaVA's conversation JSON")
        for name, lo, hi in [("max_seq_len", 16, 262_144), ("dev_fraction", 0.0, 0.5), ("dev_max", 1, 100_000),
                             ("seed", 0, 2**31 - 1)]:
            if not lo <= getattr(self, name) <= hi:
                raise ValueError(f"{name} must be between {lo} and {hi}; got {getattr(self, name)}")


def validate(p: Params, config) -> None:
    """The files exist and are the right kind; the base is a transformers vision model. Malformed records are the
    report's to list, not a refusal."""
    from workers.vision import data
    from workers.vision.model import config_of

    config_of(p.base)
    data.data_path(p.data)
    data.check_images_source(p.images)
    if p.eval_data:
        data.data_path(p.eval_data)


def estimate(p: Params, device) -> Estimate:
    # a processor and the images one at a time; no device. transformers brings torch into the io worker (840 MiB
    # resident measured with torch 2.14 + transformers 5.24), and a large photo decodes to ~100 MB
    return Estimate(parts={"workspace": 384 * 2**20, "libraries": 1152 * 2**20})


def run(p: Params, ctx) -> dict:
    ctx.progress(0, 2, "loading the processor")
    from workers.vision import data
    from workers.vision.model import config_of, source_of
    from workers.vision.train import load_processor

    processor = load_processor(p.base, source_of(p.base))
    enc = data.Encoder.of(processor, config_of(p.base))
    ctx.progress(1, 2, "reading the pairs and their images")
    images = data.Images(p.data, p.images, ctx.data_dir / "vision" / "datasets", confined=ctx.owner is not None)
    report = data.report(p.data, images, enc, p.max_seq_len, p.eval_data, p.dev_fraction, p.dev_max, p.seed)
    (ctx.run_dir / "data_report.json").write_text(json.dumps(report, indent=1, ensure_ascii=False))
    ctx.emit("data_report", report=report)
    ctx.artifact(ctx.run_dir / "data_report.json", "data report")
    ctx.progress(2, 2, f"{report['pairs']} pairs checked, {report['usable']} usable")
    return {"report": report}
