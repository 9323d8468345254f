"""A job kind for tests only (`test_paint_oom`): the real `paint_lora` kind with a UNet forward pass that raises the
CUDA out-of-memory error at a chosen step when it holds enough images, the way a card that runs out of memory mid-run
does. The injection lives here, in the test's own kind, not in the studio's code."""
from dataclasses import dataclass

from workers.paint import lora_train
from workers.paint.lora_train import PATHS, estimate, validate  # noqa: F401  (the kind's own)

PACKAGES = lora_train.PACKAGES


@dataclass(frozen=True)
class Params(lora_train.Params):
    oom_at: int = 1  # the step (0-based: the steps done before it) whose training forward runs out of memory
    oom_from: int = 2  # ... when it holds at least this many images


def run(p: Params, ctx):
    import torch
    from diffusers import UNet2DConditionModel

    step_rng, forward = lora_train._step_rng, UNet2DConditionModel.forward
    now = [None]

    def at_step(seed, step):  # the run draws each step's randomness first: that says which step runs
        now[0] = step
        return step_rng(seed, step)

    def oom_forward(self, sample, *args, **kwargs):
        if torch.is_grad_enabled() and now[0] == p.oom_at and sample.shape[0] >= p.oom_from:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected by the test)")
        return forward(self, sample, *args, **kwargs)

    lora_train._step_rng, UNet2DConditionModel.forward = at_step, oom_forward
    try:
        return lora_train.run(p, ctx)
    finally:
        lora_train._step_rng, UNet2DConditionModel.forward = step_rng, forward
