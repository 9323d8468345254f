"""Whisper fine-tune benchmark: what the studio costs over the trainer it drives, and the WER the run gains.

Run inside the project's .venv:

    python tests/benchmarks/asr_finetune.py [--steps 6] [--base FOLDER]

The real Whisper tiny.en (read from the packaged faster-whisper model, tests/asr_fixtures.py; or a transformers Whisper
folder given as --base) learns a small domain of espeak-ng sentences with made-up names: the same clips, the same
features and labels and the same Seq2SeqTrainer settings, once as an `asr_finetune` job through the studio (queue,
worker process, its callbacks: progress, metrics, cancel points, the dev WER before and after) and once with the
trainer called directly in this process. `speed_ratio` = studio training samples/s / direct samples/s (goal >= 0.95;
both are the Trainer's own train_samples_per_second over train()); `wer_before` / `wer_after` are the studio run's dev
WER of the base and the tuned model on held-apart sentences. Needs espeak-ng and sox. The last line printed is one
JSON object. (Memory at whisper-small / whisper-medium shape on a GPU: tests/gpu/check.py --asr-steps.)
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def direct(p, runs_dir: Path, cache: Path, out: Path) -> dict:
    """The same trainer (the kind's own Seq2SeqTrainingArguments) called directly: no queue, no worker, no studio
    callback, no dev evaluation."""
    import torch
    import transformers

    from workers.speech import asr_data
    from workers.speech.asr_estimate import config_of
    from workers.speech.finetune import ClipDataset, Labels, _trainer, load_model, load_processor, source_of

    torch.set_num_threads(p.threads or os.cpu_count() or 1)
    cfg, source = config_of(p.base), source_of(p.base)
    fe, tok = load_processor(p.base, source)
    clips = [c for c, _ in asr_data.probe(asr_data.read(p.data, runs_dir, cache)[0])[0]]
    labels = Labels(tok, int(cfg["vocab_size"]), p.language, p.task, int(cfg["max_target_positions"]))
    transformers.set_seed(p.seed)
    model = load_model(source, p.base, p.method, False, False)
    if p.freeze_encoder:
        model.freeze_encoder()
    trainer = _trainer(p, model, ClipDataset(clips, fe, labels), None, out, p.micro_batch, p.grad_accum, False,
                       False, [], transformers)
    m = trainer.train().metrics
    return {"samples_per_s": m["train_samples_per_second"], "train_loss": m.get("train_loss")}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=6, help="optimizer steps of each run")
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--base", default=None, help="a transformers Whisper folder (default: tiny.en from the package)")
    args = ap.parse_args()

    from asr_fixtures import folder_of_clips, sentences, tiny_en

    from studio import Config, Studio
    from studio.params import build
    from workers.speech import finetune

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        base = args.base or str(tiny_en(tmp / "tiny.en"))
        texts = sentences(20)
        train, dev = folder_of_clips(tmp / "train", texts[:16]), folder_of_clips(tmp / "dev", texts[16:])
        common = dict(base=base, data=str(train), language="en", freeze_encoder=True, lr=3e-4, warmup=0,
                      max_steps=args.steps, micro_batch=args.micro_batch, grad_accum=1, eval_every=0,
                      save_every=10_000, gradient_checkpointing=False, threads=args.threads, seed=1)
        studio = Studio(Config.load(tmp / "data")).start()
        try:
            studio.wait(studio.submit("selftest", {"mib": 1}).id, timeout=120)  # a warm worker (torch imported)
            job = studio.wait(studio.submit("asr_finetune", {**common, "eval_data": str(dev)}).id, timeout=3600)
            if job.status.value != "DONE":
                raise SystemExit(f"the studio's run {job.status.value}: {job.error}")
            s = job.result
        finally:
            studio.shutdown()
        d = direct(build(finetune.Params, common), tmp / "data" / "runs", tmp / "cache", tmp / "direct")
    print(f"studio: {s['samples_per_s']:.2f} samples/s over {s['steps']} steps (dev WER {s['wer_base']:.3f} -> "
          f"{s['wer_tuned']:.3f}); direct trainer: {d['samples_per_s']:.2f} samples/s", flush=True)
    print(json.dumps({"device": "cpu", "base": "tiny.en (packaged)" if not args.base else args.base,
                      "steps": args.steps, "micro_batch": args.micro_batch,
                      "studio_samples_s": s["samples_per_s"], "direct_samples_s": d["samples_per_s"],
                      "speed_ratio": round(s["samples_per_s"] / d["samples_per_s"], 3),
                      "wer_before": s["wer_base"], "wer_after": s["wer_tuned"]}))


if __name__ == "__main__":
    main()
