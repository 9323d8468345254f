"""Studio settings: where data lives and how much of the device jobs may use."""
from __future__ import annotations

import errno
import json
import os
import shutil
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

GiB = 1024**3


class DataDirError(RuntimeError):
    """The data folder cannot be used (full, read-only, missing): its message is one line that says what to do."""

    @staticmethod
    def explain(data_dir: Path, e: BaseException) -> str:
        text = str(e).strip() or type(e).__name__
        code = getattr(e, "errno", None)
        try:
            free = f"{shutil.disk_usage(data_dir).free / 2**20:.0f} MiB free"
        except OSError:
            free = "free space unknown"
        if code in (errno.ENOSPC, errno.EDQUOT) or "disk is full" in text or "No space left" in text:
            return (f"the data folder {data_dir} is full ({free}): free space there, or start with "
                    "--data-dir (or STUDIO_DATA_DIR) on another disk")
        if code in (errno.EROFS, errno.EACCES, errno.EPERM) or "readonly" in text or "read-only" in text \
                or "unable to open database" in text:
            return (f"the data folder {data_dir} cannot be written ({text}): make it writable, or start with "
                    "--data-dir (or STUDIO_DATA_DIR) pointing to a writable folder")
        return f"the data folder {data_dir} cannot be used ({type(e).__name__}: {text})"


def default_data_dir() -> Path:
    env = os.environ.get("STUDIO_DATA_DIR")
    return Path(env) if env else Path(__file__).resolve().parent.parent / "data"


@dataclass(frozen=True)
class Config:
    data_dir: Path
    budget_gb: float = 0.0  # 0: the device's total minus `reserve_gb`
    reserve_gb: float = 1.0  # left for the desktop and other programs (the CUDA context is in each estimate)
    idle_unload_s: float = 600.0  # cached models unused this long are unloaded
    cancel_grace_s: float = 10.0  # a job that ignores cancel this long is killed with its worker
    max_upload_gb: float = 20.0  # the largest file one upload may be (a dataset zip, a long recording)
    # per CUDA device, by index: {"1": {"budget_gb": 10, "reserve_gb": 1, "use": false}}; a key left out takes the
    # values above, and "use": false keeps the studio off that card (the one that drives the desktop)
    devices: dict = field(default_factory=dict)
    # a Ray cluster ("auto", "ray://host:10001", "local"): device jobs run there as Ray tasks; from --ray only, never
    # saved, so a later plain start stays on this machine
    ray_address: str = ""

    @property
    def runs_dir(self) -> Path:
        return self.data_dir / "runs"

    @property
    def uploads_dir(self) -> Path:
        return self.data_dir / "uploads"

    @property
    def users_dir(self) -> Path:
        """Each remote user's own uploads, one folder a user (not served by Gradio: files leave through handlers)."""
        return self.data_dir / "users"

    @property
    def datasets_dir(self) -> Path:
        return self.data_dir / "datasets"

    @property
    def db_path(self) -> Path:
        return self.data_dir / "studio.db"

    @property
    def settings_path(self) -> Path:
        return self.data_dir / "settings.json"

    def budget_bytes(self, device_total: int, index: int | None = None) -> int:
        """What jobs may use of a device of `device_total` bytes: its own budget or reserve when `index` has settings
        of its own, else the studio-wide ones."""
        own = self.device_settings(index)
        budget, reserve = float(own.get("budget_gb", self.budget_gb)), float(own.get("reserve_gb", self.reserve_gb))
        if budget > 0:
            return int(budget * GiB)
        return max(0, device_total - int(reserve * GiB))

    def device_settings(self, index: int | None) -> dict:
        return dict(self.devices.get(str(index), {})) if index is not None else {}

    def device_used(self, index: int) -> bool:
        """False for a card marked "do not use"."""
        return bool(self.device_settings(index).get("use", True))

    @classmethod
    def load(cls, data_dir: Path | str | None = None, **overrides) -> "Config":
        """Settings from `<data_dir>/settings.json`, then explicit overrides (CLI flags)."""
        data_dir = Path(data_dir) if data_dir else default_data_dir()
        cfg = cls(data_dir=data_dir.resolve())
        path = cfg.settings_path
        if path.exists():
            saved = json.loads(path.read_text())
            known = {f.name for f in fields(cls)} - {"data_dir", "ray_address"}
            types = {f.name: f.type for f in fields(cls)}
            cfg = replace(cfg, **{k: (float(v) if types[k] == "float" else v) for k, v in saved.items() if k in known})
        overrides = {k: v for k, v in overrides.items() if v is not None}
        return replace(cfg, **overrides) if overrides else cfg

    def save(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        data = {k: v for k, v in asdict(self).items() if k not in ("data_dir", "ray_address")}
        self.settings_path.write_text(json.dumps(data, indent=2))

    def ensure_dirs(self) -> None:
        try:
            for d in (self.data_dir, self.runs_dir, self.uploads_dir, self.datasets_dir, self.users_dir):
                d.mkdir(mode=0o700, parents=True, exist_ok=True)
                d.chmod(0o700)  # a folder made by an older version, or under another umask: the studio's alone
        except OSError as e:
            raise DataDirError(DataDirError.explain(self.data_dir, e)) from None
