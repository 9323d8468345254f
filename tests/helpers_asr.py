"""A job kind for tests only (`test_asr_oom`): the real `asr_finetune` kind with a training step that raises the CUDA
out-of-memory error at a chosen step (tests/helpers_finetune.py's injection)."""
from dataclasses import dataclass

from helpers_finetune import InjectedOOM, run_with_oom

from workers.speech import finetune
from workers.speech.finetune import estimate, path_items, validate  # noqa: F401  (the kind's own)

PACKAGES = finetune.PACKAGES


@dataclass(frozen=True)
class Params(finetune.Params, InjectedOOM):
    pass


def run(p: Params, ctx):
    import transformers

    return run_with_oom(p, ctx, finetune.run, transformers.Trainer)
