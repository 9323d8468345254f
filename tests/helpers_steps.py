"""A job kind for tests only: N steps of a fixed length, each a progress call (so each a cancel point)."""
import time
from dataclasses import dataclass

from studio.gate import Estimate


@dataclass(frozen=True)
class Params:
    steps: int = 20  # progress calls
    seconds: float = 0.05  # sleep between them
    mib: int = 1  # working memory it declares


def estimate(p, device):
    return Estimate(parts={"workspace": p.mib << 20})


def run(p, ctx):
    for i in range(p.steps):
        time.sleep(p.seconds)
        ctx.progress(i + 1, p.steps, f"step {i + 1}")
    return {"steps": p.steps}
