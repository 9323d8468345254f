"""CUDA libraries for CTranslate2 (faster-whisper), found in the NVIDIA pip wheels.

ctranslate2 4.8.5 loads `libcublas.so.12` (CUDA 12) and `libcudnn.so.9`, while torch 2.14 brings CUDA 13's cuBLAS.
requirements.txt installs `nvidia-cublas-cu12` (its own folder, no clash). cuDNN is different: the cu12 and cu13
wheels both write nvidia/cudnn/lib/libcudnn.so.9, and a process can hold only one library of that name, so the
worker (which imports torch first) shares torch's cuDNN 9. The dynamic loader reads LD_LIBRARY_PATH when a
process starts, so the studio puts these folders there before it spawns the worker.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

WANTED = {"libcublas.so.12": "nvidia-cublas-cu12", "libcudnn.so.9": "nvidia-cudnn-cu13 (torch's)"}


def lib_dirs() -> dict[str, Path]:
    """Library file name → the folder that holds it, for the libraries ctranslate2 needs that are installed."""
    spec = importlib.util.find_spec("nvidia")
    found: dict[str, Path] = {}
    for root in (spec.submodule_search_locations or []) if spec else []:
        for lib in Path(root).glob("*/lib"):
            for name in WANTED:
                if name not in found and (lib / name).exists():
                    found[name] = lib
    return found


def missing() -> list[str]:
    """pip packages to install for faster-whisper on CUDA (empty when all are there)."""
    have = lib_dirs()
    return [pkg for name, pkg in WANTED.items() if name not in have]


def export_library_path() -> str:
    """Prepend the folders of ctranslate2's CUDA libraries to LD_LIBRARY_PATH (for processes started after this)."""
    dirs = [str(d) for d in dict.fromkeys(lib_dirs().values())]
    old = [p for p in os.environ.get("LD_LIBRARY_PATH", "").split(os.pathsep) if p]
    value = os.pathsep.join(dirs + [p for p in old if p not in dirs])
    if value:
        os.environ["LD_LIBRARY_PATH"] = value
    return value
