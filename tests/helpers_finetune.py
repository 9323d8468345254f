"""A job kind for tests only (`test_finetune_oom`): the real `finetune` kind with a training step that raises the CUDA
out-of-memory error at a chosen step, the way a card that runs out of memory mid-run does. The injection lives here,
in the test's own kind, not in the studio's code; `InjectedOOM` and `run_with_oom` serve the other trainers' test
kinds too (tests/helpers_vision.py, tests/helpers_asr.py)."""
from dataclasses import dataclass

from workers.finetune import train
from workers.finetune.train import estimate, validate  # noqa: F401  (the kind's own)

PACKAGES = train.PACKAGES


@dataclass(frozen=True)
class InjectedOOM:
    oom_at: int = 1  # the optimizer step (0-based: global_step before it) whose training step runs out of memory
    oom_from: int = 2  # ... while micro_batch is at least this


def run_with_oom(p, ctx, kind_run, trainer_cls):
    """`kind_run(p, ctx)` with `trainer_cls.training_step` raising the CUDA out-of-memory error where `p` says."""
    import torch

    original = trainer_cls.training_step

    def training_step(self, *args, **kwargs):
        if self.state.global_step == p.oom_at and self.args.per_device_train_batch_size >= p.oom_from:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected by the test)")
        return original(self, *args, **kwargs)

    trainer_cls.training_step = training_step
    try:
        return kind_run(p, ctx)
    finally:
        trainer_cls.training_step = original


@dataclass(frozen=True)
class Params(train.Params, InjectedOOM):
    pass


def run(p: Params, ctx):
    import trl

    return run_with_oom(p, ctx, train.run, trl.SFTTrainer)
