"""Job kind `asr_check`: the data report of a Whisper fine-tune before any GPU time (Transcribe's Fine-tune sub-tab,
Check data), in the io lane beside a training job.

Reads every source (workers.speech.asr_data), decodes every audio file once and reports clips, hours, the clip-length
histogram, unreadable audio, empty or missing transcripts, transcripts without audio, malformed manifest lines, clips
past Whisper's 30 s window, the language, the text normalisation used for WER and the dev split. No model is loaded
(the normaliser's spelling map is read from a local base folder when it has one).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from studio.gate import Estimate

PACKAGES = ("faster-whisper", "transformers")  # versions for the run card
PATHS = ("data", "eval_data", "base")  # params that name a server path or a job (studio.access)



def path_items(name: str, value: str) -> list[str]:
    """The paths and job ids a param names, for studio.access: data and eval_data list several, comma-separated."""
    from workers.speech.asr_data import sources

    return sources(value) if name in ("data", "eval_data") else value.splitlines()

@dataclass(frozen=True)
class Params:
    data: str = ""  # folder of audio + .txt/.srt/.vtt, a CSV/TSV/JSONL manifest, a .zip, or a transcribe job id
    eval_data: str = ""  # your own dev set; empty: the seeded split training would make
    language: str = "en"  # the speech's language: English gets Whisper's English normaliser for WER
    base: str = ""  # optional: a local Whisper folder whose normalizer.json (spelling map) the WER uses
    dev_fraction: float = 0.1  # share held out as the dev set when eval_data is empty
    dev_max: int = 200  # at most this many dev clips
    seed: int = 42  # the dev split's seed (the same as the training's)

    def __post_init__(self):
        if not self.data.strip():
            raise ValueError("no data given: a folder of audio with same-named .txt/.srt/.vtt transcripts, a "
                             "CSV/TSV/JSONL manifest (audio, text), a .zip of either, or a transcribe job id")
        for name, lo, hi in [("dev_fraction", 0.0, 0.5), ("dev_max", 1, 100_000), ("seed", 0, 2**31 - 1)]:
            if not lo <= getattr(self, name) <= hi:
                raise ValueError(f"{name} must be between {lo} and {hi}; got {getattr(self, name)}")


def validate(p: Params, config) -> None:
    """Each source exists and is a layout the report reads; what is wrong inside them is the report's to list."""
    from workers.speech import asr_data

    asr_data.check_sources(p.data, config.runs_dir)
    if p.eval_data:
        asr_data.check_sources(p.eval_data, config.runs_dir)


def estimate(p: Params, device) -> Estimate:
    # PyAV decodes one file at a time (an hour of 16 kHz float32 is 230 MB); transformers' normaliser module pulls
    # torch into the io worker (~840 MiB resident measured with torch 2.14 + transformers 5.24)
    return Estimate(parts={"workspace": 512 * 2**20, "libraries": 1152 * 2**20})


def run(p: Params, ctx) -> dict:
    ctx.progress(0, 1, "reading the clips and decoding their audio")
    from workers.speech import asr_data

    base = Path(p.base).expanduser() if p.base and Path(p.base).expanduser().is_dir() else None
    report = asr_data.report(p.data, ctx.run_dir.parent, ctx.data_dir / "speech" / "datasets", p.language,
                             p.eval_data, p.dev_fraction, p.dev_max, p.seed, base, ctx.check_cancel,
                             confined=ctx.owner is not None)
    (ctx.run_dir / "data_report.json").write_text(json.dumps(report, indent=1, ensure_ascii=False))
    ctx.emit("data_report", report=report)
    ctx.artifact(ctx.run_dir / "data_report.json", "data report")
    ctx.progress(1, 1, f"{report['clips']} clips checked, {report['usable']} usable")
    return {"report": report}
