"""Job kind `finetune_check`: the data report before any GPU time (the Fine-tune tab's Check data), off the device.

Reads the user's files, detects their shape (a malformed line is refused at submit, naming it), and tokenizes every
example with the chosen base's own tokenizer and chat template: examples per shape, the token-length histogram, how
many max_seq_len would cut, duplicates, empty answers, the dev split, and three examples rendered exactly as the
model will see them with the masked (prompt) part apart from the trained (answer) part. Only the tokenizer is
loaded (a few MB), never the model, so it runs in the io lane beside a training job.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

from studio.gate import Estimate

PACKAGES = ("transformers", "tokenizers")  # versions for the run card
PATHS = ("base", "data", "eval_data")  # params that name a server path (studio.access)


@dataclass(frozen=True)
class Params:
    base: str = "Llama-3.1-8B-Instruct"  # the base whose tokenizer and chat template the report uses (preset/folder)
    data: str = ""  # the training examples: JSONL, JSON, CSV or Parquet (several: comma-separated), or a folder
    eval_data: str = ""  # a dev set file; empty: the seeded split training would make
    max_seq_len: int = 2048  # the training's max_seq_len: longer examples are counted as cut
    train_on_prompt: bool = False  # false: only the answers are trained (the preview marks the prompt masked)
    dev_fraction: float = 0.05  # share held out as the dev set when eval_data is empty
    dev_max: int = 200  # at most this many dev examples from the split
    seed: int = 42  # the dev split's seed (the same as the training's)

    def __post_init__(self):
        if not self.base.strip():
            raise ValueError("no base model given: its tokenizer sizes the examples (a preset or a model folder)")
        if not self.data.strip():
            raise ValueError("no data given: name a JSONL, JSON, CSV or Parquet file of examples")
        for name, lo, hi in [("max_seq_len", 16, 262_144), ("dev_fraction", 0.0, 0.5), ("dev_max", 1, 100_000),
                             ("seed", 0, 2**31 - 1)]:
            if not lo <= getattr(self, name) <= hi:
                raise ValueError(f"{name} must be between {lo} and {hi}; got {getattr(self, name)}")


def validate(p: Params, config) -> None:
    """Every line of the data read and its shape detected now: a bad file is refused before anything is queued."""
    from workers.finetune import data

    data.read(p.data)
    if p.eval_data:
        data.read(p.eval_data)


def estimate(p: Params, device) -> Estimate:
    # a tokenizer and the texts; no device. transformers brings torch into the io worker, which has no runtime
    # context of its own to count it (840 MiB resident measured with torch 2.14 + transformers 5.24)
    return Estimate(parts={"workspace": 256 * 2**20, "libraries": 1152 * 2**20})


def run(p: Params, ctx) -> dict:
    ctx.progress(0, 2, "loading the tokenizer")
    from workers.finetune import data
    from workers.finetune.train import base_source

    source = base_source(p.base)
    tok = _tokenizer(p.base, source)
    ctx.progress(1, 2, "tokenizing the examples")
    report = data.report(p.data, tok, p.max_seq_len, p.train_on_prompt, p.eval_data, p.dev_fraction, p.dev_max,
                         p.seed)
    (ctx.run_dir / "data_report.json").write_text(json.dumps(report, indent=1, ensure_ascii=False))
    ctx.artifact(ctx.run_dir / "data_report.json", "data report")
    ctx.progress(2, 2, f"{report['examples']} examples checked")
    return {"report": report}


def _tokenizer(base: str, source: str):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(source)
    except OSError as e:
        raise RuntimeError(f"the tokenizer of {base} is not on disk and cannot be downloaded here "
                           f"({str(e).splitlines()[0][:160]}): download {source} in the Models tab, or give a "
                           "local model folder as base") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok
