"""Studio core: job store, gate, scheduler and device worker. Imports neither gradio nor torch at import time."""
from .config import Config, DataDirError, GiB
from .context import JobCancelled, JobContext
from .core import Studio
from .device import DeviceReading
from .gate import Estimate, Refused
from .jobs import Job, JobStatus

__all__ = ["Config", "DataDirError", "GiB", "Job", "JobCancelled", "JobContext", "JobStatus", "Studio",
           "DeviceReading", "Estimate", "Refused"]
