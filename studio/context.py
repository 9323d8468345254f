"""What a running job sees: progress, metrics, logs, artifacts (each a cancel point), the run folder and the model cache."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable

from . import events


class JobCancelled(Exception):
    """Raised at a progress call once the user asked to cancel; the worker records CANCELLED."""


class JobContext:
    def __init__(
        self,
        job_id: str,
        kind: str,
        run_dir: Path,
        data_dir: Path,
        device: str,
        cancel_flag: Any,  # anything with is_set(): a multiprocessing.Event in the worker
        cache: "ModelCache | None" = None,
        notify: Callable[[dict], None] | None = None,  # forwards progress to the scheduler
        owner: str | None = None,  # the user who submitted the job (None: the person at the machine)
    ):
        self.job_id = job_id
        self.kind = kind
        self.run_dir = Path(run_dir)
        self.data_dir = Path(data_dir)
        self.device = device  # "cuda" or "cpu": where torch work goes
        self._cancel = cancel_flag
        self.cache = cache
        self._notify = notify or (lambda msg: None)
        self.owner = owner
        self._last_progress = 0.0

    # ---- cancel points ------------------------------------------------------
    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def check_cancel(self) -> None:
        if self._cancel.is_set():
            raise JobCancelled("cancelled by the user")

    def progress(self, done: float, total: float | None = None, message: str = "", **extra: Any) -> None:
        """Report progress (`done` of `total`); raises JobCancelled when a cancel is pending."""
        self.check_cancel()
        now = time.time()
        final = total is not None and done >= total
        if not final and now - self._last_progress < 0.2:
            return  # keep the log and the store light in tight loops; the cancel check above still ran
        self._last_progress = now
        fraction = (done / total) if total else None
        events.append(self.run_dir, "progress", done=done, total=total, fraction=fraction, message=message, **extra)
        self._notify({"type": "progress", "job_id": self.job_id, "fraction": fraction, "message": message})

    def metric(self, step: int, **values: Any) -> None:
        self.check_cancel()
        events.append(self.run_dir, "metric", step=step, **values)

    def log(self, message: str) -> None:
        self.check_cancel()
        events.append(self.run_dir, "log", message=message)

    def emit(self, type: str, **data: Any) -> None:
        """A kind-specific event (a text sample, a preview); also a cancel point."""
        self.check_cancel()
        events.append(self.run_dir, type, **data)

    def artifact(self, path: Path | str, label: str = "") -> None:
        path = Path(path)
        rel = path.relative_to(self.run_dir) if path.is_relative_to(self.run_dir) else path
        events.append(self.run_dir, "artifact", path=str(rel), label=label or path.name)

    # ---- run card -------------------------------------------------------------
    def card(self, **fields: Any) -> None:
        """Merge fields into the run card `run.json` (params, seed, versions, dataset hash, device)."""
        path = self.run_dir / "run.json"
        card = json.loads(path.read_text()) if path.exists() else {}
        card.update(fields)
        path.write_text(json.dumps(card, indent=2, default=str))

    def cached(self, key: str, load: Callable[[], tuple[Any, int]]) -> tuple[Any, bool]:
        """A model from the worker's cache, loading it with `load() -> (obj, bytes)` on a miss; returns (obj, hit)."""
        if self.cache is None:
            return load()[0], False
        return self.cache.get(key, load)


class ModelCache:
    """LRU cache of loaded models in the worker. Each model's size is what loading it took from the device (NVML or
    torch on CUDA, the resident set on the CPU), not what the loader guessed; its bytes count against the budget."""

    def __init__(self, on_evict: Callable[[], None] | None = None, measure: Callable[[], int | None] | None = None):
        self._items: dict[str, list] = {}  # key -> [obj, bytes, last_used]; dict order = LRU order
        self._on_evict = on_evict or (lambda: None)
        self._measure = measure or (lambda: None)

    def get(self, key: str, load: Callable[[], tuple[Any, int]]) -> tuple[Any, bool]:
        if key in self._items:
            item = self._items.pop(key)
            item[2] = time.time()
            self._items[key] = item
            return item[0], True
        before = self._measure()
        obj, declared = load()
        after = self._measure()
        measured = after - before if before is not None and after is not None else None
        # a load that measured nothing (memory already mapped, or no reading) keeps the loader's own figure
        size = measured if measured is not None and measured > 0 else int(declared)
        self._items[key] = [obj, int(size), time.time()]
        return obj, False

    @property
    def bytes(self) -> int:
        return sum(i[1] for i in self._items.values())

    def keys(self) -> list[str]:
        return list(self._items)

    def sizes(self) -> dict[str, int]:
        """key -> measured bytes, least recently used first."""
        return {k: i[1] for k, i in self._items.items()}

    def evict(self, at_least: int, keep: "set[str] | frozenset[str]" = frozenset()) -> int:
        """Drop least recently used models not in `keep` until `at_least` bytes are freed; returns bytes freed."""
        freed = 0
        for key in [k for k in self._items if k not in keep]:
            if freed >= at_least:
                break
            freed += self._items.pop(key)[1]
        if freed:
            self._on_evict()
        return freed

    def evict_keys(self, keys) -> int:
        """Drop these models (the scheduler chose them); returns bytes freed."""
        freed = sum(self._items.pop(k)[1] for k in list(keys) if k in self._items)
        if freed:
            self._on_evict()
        return freed

    def evict_idle(self, idle_s: float) -> int:
        now = time.time()
        stale = [k for k, i in self._items.items() if now - i[2] > idle_s]
        freed = sum(self._items.pop(k)[1] for k in stale)
        if stale:
            self._on_evict()
        return freed

    def clear(self) -> int:
        return self.evict(self.bytes + 1) if self._items else 0
