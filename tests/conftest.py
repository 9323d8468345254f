"""Shared fixtures: offline environment, a fake NVML device, a small corpus, one device-owning Studio per session."""
import os
import random
import socket
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

os.environ.update({"HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "GRADIO_ANALYTICS_ENABLED": "False",
                   "YOLO_OFFLINE": "1", "YOLO_AUTOINSTALL": "false",
                   "STUDIO_NO_BOOTSTRAP": "1"})
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pytest  # noqa: E402

from studio import Config, DeviceReading, Studio  # noqa: E402
from studio.config import GiB  # noqa: E402


@dataclass
class FakeNvml:
    """Stands in for NVML readings of a GPU (the only thing tests fake); `free` can be changed mid-test."""

    total: int = 12 * GiB
    free: int = 11 * GiB

    def read(self, pids=()):
        return DeviceReading(kind="cuda", name="Fake RTX 4070 Ti", total=self.total, used=self.total - self.free,
                             free=self.free, studio_used=0, utilization=0, temperature=40, power_w=30.0,
                             driver="fake", cuda="13.0")


WORDS = ("the king and queen walk to the castle . a dog runs in the green field . "
         "she reads a book by the river . they sing songs at night . he writes letters to his friend .").split()


def make_corpus(path: Path, n_chars: int = 60_000, seed: int = 0) -> Path:
    """Sentences from a small fixed vocabulary: quick for a tiny model to learn, so loss falls in few steps."""
    rng = random.Random(seed)
    sentences = [" ".join(WORDS[i:i + 7]) for i in range(0, len(WORDS) - 7, 3)]
    out = []
    while sum(map(len, out)) < n_chars:
        out.append(rng.choice(sentences).capitalize() + "\n")
    path.write_text("".join(out))
    return path


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    return make_corpus(tmp_path_factory.mktemp("corpus") / "corpus.txt")


# a tiny model that trains in a few seconds on the CPU
TINY = dict(n_layer=2, n_head=2, n_embd=32, block_size=32, batch_size=8, eval_every=20, eval_iters=2, threads=1)


@pytest.fixture(scope="session")
def studio(tmp_path_factory):
    """One device-owning Studio (real CPU device, real worker process) for the session."""
    cfg = replace(Config.load(tmp_path_factory.mktemp("studio-data")), cancel_grace_s=3.0)
    s = Studio(cfg).start()
    yield s
    s.shutdown()


@pytest.fixture
def fresh_config(tmp_path):
    return Config.load(tmp_path / "data")


def wait_for(pred, timeout: float = 60.0, what: str = "condition") -> None:
    """Block until `pred()` is true; fail naming what did not happen."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        if pred():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def wait_for_event(studio, job_id: str, type: str, timeout: float = 120.0) -> None:
    """Block until the job has written an event of this type (a token, a segment, …)."""
    t0 = time.time()
    while not any(e["type"] == type for e in studio.events(job_id)[0]):
        if time.time() - t0 > timeout:
            raise AssertionError(f"job {job_id} wrote no {type!r} event in {timeout:.0f} s")
        time.sleep(0.02)


def left_running(data_dir: Path) -> tuple[Config, str]:
    """A data folder as a killed studio leaves it: a job still RUNNING and no clean stop recorded; (config, job id)."""
    from studio import JobStatus
    from studio.store import Store

    cfg = Config.load(data_dir)
    cfg.ensure_dirs()
    store = Store(cfg.db_path)
    job = store.add("selftest", {"mib": 1}, JobStatus.QUEUED)
    store.transition(job.id, (JobStatus.QUEUED,), JobStatus.RUNNING)
    store.set_meta("clean_shutdown", "0")
    return cfg, job.id


def serve(studio, **launch):
    """Serve the studio's UI on a free local port: (url, the Blocks to close)."""
    import app

    demo = app.build_ui(studio, auth=bool(launch.get("auth")))
    port = free_port()
    app.launch(demo, studio, server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True,
               **launch)
    return f"http://127.0.0.1:{port}/", demo


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
