"""A job kind for tests only: steps like helpers_steps, holding the devices its `devices` param names (as a
fine-tune across GPUs does) for the scheduler's multi-device path."""
from dataclasses import dataclass

from helpers_steps import estimate, run  # noqa: F401  (the same steps)


@dataclass(frozen=True)
class Params:
    steps: int = 20  # progress calls
    seconds: float = 0.05  # sleep between them
    mib: int = 1  # working memory it declares
    devices: str = ""  # device ids it holds at once, "0,1"; empty: one device, wherever it fits


def devices_of(p: Params, n_devices: int) -> list[int] | None:
    return [int(x) for x in p.devices.split(",")] if p.devices else None
