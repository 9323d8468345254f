"""A job kind for tests only: steps like helpers_steps, whose working memory is chosen to fit the card it is gated
on (`fit`, as an LLM's GPU layers are), so the scheduler's re-fit to another card shows in its resolved params."""
from dataclasses import dataclass, replace

from helpers_steps import estimate, run  # noqa: F401  (the same steps)


@dataclass(frozen=True)
class Params:
    steps: int = 20  # progress calls
    seconds: float = 0.05  # sleep between them
    mib: int = 0  # working memory it declares; 0: an eighth of the card's budget


def fit(p: Params, reading, budget: int) -> Params:
    return replace(p, mib=budget // 8 >> 20) if p.mib == 0 else p
