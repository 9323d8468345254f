"""A job kind for tests only (`test_asr_oom`): the real `asr_finetune` kind with a training step that raises the CUDA
out-of-memory error at a chosen step, the way a card that runs out of memory mid-run does. The injection lives here,
in the test's own kind, not in the studio's code."""
from dataclasses import dataclass

from workers.speech import finetune
from workers.speech.finetune import estimate, path_items, validate  # noqa: F401  (the kind's own)

PACKAGES = finetune.PACKAGES


@dataclass(frozen=True)
class Params(finetune.Params):
    oom_at: int = 1  # the optimizer step (0-based: global_step before it) whose training step runs out of memory
    oom_from: int = 2  # ... while micro_batch is at least this


def run(p: Params, ctx):
    import torch
    import transformers

    original = transformers.Trainer.training_step

    def training_step(self, *args, **kwargs):
        if self.state.global_step == p.oom_at and self.args.per_device_train_batch_size >= p.oom_from:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected by the test)")
        return original(self, *args, **kwargs)

    transformers.Trainer.training_step = training_step
    try:
        return finetune.run(p, ctx)
    finally:
        transformers.Trainer.training_step = original
