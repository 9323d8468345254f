"""A job kind for tests only: it sleeps without ever reaching a cancel point (a misbehaving job)."""
import time
from dataclasses import dataclass

from studio.gate import Estimate


@dataclass(frozen=True)
class Params:
    seconds: float = 60.0


def estimate(p, device):
    return Estimate(parts={"workspace": 1 << 20})


def run(p, ctx):
    (ctx.run_dir / "started").write_text("yes")
    time.sleep(p.seconds)
    return {"slept": p.seconds}
