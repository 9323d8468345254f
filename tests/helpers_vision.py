"""A job kind for tests only (`test_vision_oom`): the real `vision_finetune` kind with a training step that raises the
CUDA out-of-memory error at a chosen step (tests/helpers_finetune.py's injection)."""
from dataclasses import dataclass

from helpers_finetune import InjectedOOM, run_with_oom

from workers.vision import train
from workers.vision.train import estimate, validate  # noqa: F401  (the kind's own)

PACKAGES = train.PACKAGES


@dataclass(frozen=True)
class Params(train.Params, InjectedOOM):
    pass


def run(p: Params, ctx):
    import transformers

    return run_with_oom(p, ctx, train.run, transformers.Trainer)
