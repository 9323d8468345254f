"""What a vision `model` (or `base`) param names, resolved without downloads or CUDA: a preset of the `vlm` table
(assets/presets/vision.json), a local GGUF language model with its projector (`mmproj`) file, or a local transformers
LLaVA-style folder. Also the llama.cpp chat handler each GGUF model needs, and the memory a loaded model holds.

Two backends behind one `stream()` (workers.vision.backends): `gguf`, llama.cpp's multimodal handlers (the fast path,
the default for plain chat) and `hf`, transformers with bitsandbytes 4-bit (serves fine-tuned adapters; the base of
vision_finetune).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from studio.presets import presets

GiB = 2**30
# llama-cpp-python's multimodal chat handlers (llama_cpp.llama_chat_format), by the name a preset gives
HANDLERS = {
    "llava-1.5": "Llava15ChatHandler",
    "llava-1.6": "Llava16ChatHandler",
    "moondream": "MoondreamChatHandler",
    "nanollava": "NanoLlavaChatHandler",
    "llama-3-vision-alpha": "Llama3VisionAlphaChatHandler",
    "minicpm-v-2.6": "MiniCPMv26ChatHandler",
    "qwen2.5-vl": "Qwen25VLChatHandler",
}
# a local GGUF's handler, from words in its name/architecture (first match); else LLaVA-1.5's
HANDLER_HINTS = (("qwen2vl", "qwen2.5-vl"), ("qwen2.5-vl", "qwen2.5-vl"), ("qwen2-vl", "qwen2.5-vl"),
                 ("minicpm", "minicpm-v-2.6"), ("moondream", "moondream"), ("nanollava", "nanollava"),
                 ("llama-3-vision", "llama-3-vision-alpha"), ("llava-v1.6", "llava-1.6"), ("llava-1.6", "llava-1.6"),
                 ("llava1.6", "llava-1.6"))
DEFAULT_IMAGE_TOKENS = 576  # LLaVA-1.5 at 336 px: (336 / 14)^2
# modules bitsandbytes must leave unquantized in a LLaVA-style model (BitsAndBytesConfig.llm_int8_skip_modules):
# transformers 5 matches full module names ("model.vision_tower"); a bare "vision_tower" quantizes the tower
SKIP_4BIT = ["model.vision_tower", "model.multi_modal_projector", "lm_head", "vision_tower", "multi_modal_projector"]


@dataclass(frozen=True)
class VisionRef:
    """A resolved vision model: where its files are (None while a preset is not downloaded) and its shape."""

    name: str
    backend: str  # "gguf" (llama.cpp + projector) or "hf" (a transformers LLaVA-style folder)
    path: Path | None  # the GGUF language model, or the transformers folder
    mmproj: Path | None  # the GGUF projector (vision tower + projector), backend gguf only
    preset: dict | None
    handler: str = ""  # a HANDLERS key (gguf)
    shape: dict = field(default_factory=dict)  # n_layer, n_head, n_kv_head, head_dim, n_embd, vocab, size, ctx_train
    image_tokens: int = DEFAULT_IMAGE_TOKENS  # what one image takes in the context
    vision_bytes: int = 0  # the vision tower and projector as loaded (fp16 / the mmproj file)

    @property
    def repo(self) -> str | None:
        return (self.preset or {}).get("repo")


def table() -> dict[str, dict]:
    return presets()["vlm"]


def default(data_dir: Path | None, backend: str | None = None) -> str:
    """The preset a first click uses: one already downloaded (fast path first), else the table's first."""
    from studio.presets import DOWNLOADED, availability

    names = [n for n, p in table().items() if backend is None or p["backend"] == backend]
    if data_dir is not None:
        for n in names:
            if availability("vlm", n, data_dir) == DOWNLOADED:
                return n
    return names[0]


def resolve(model: str, data_dir: Path | None = None, mmproj: str = "") -> VisionRef:
    """Name -> VisionRef, without downloading. ValueError says what to do when it cannot be used."""
    model = model.strip()
    if not model:
        model = default(data_dir)
    if model in table():
        return _preset_ref(model, table()[model])
    path = Path(model).expanduser()
    if not path.exists():
        raise ValueError(f"vision model {model!r} is neither a preset ({', '.join(table())}) nor an existing file "
                         "or folder")
    if path.is_dir():
        return hf_ref(path)
    return gguf_ref(path, mmproj)


def _preset_ref(name: str, p: dict) -> VisionRef:
    if p["backend"] == "hf":
        from workers.chat.llm import hub_cached_snapshot

        local = hub_cached_snapshot(p["repo"])
        ref = hf_ref(local, name=name, preset=p) if local is not None else None
        if ref is not None:
            return ref
        cfg = p["config"]
        return VisionRef(name, "hf", None, None, p, shape=_text_shape(cfg, int(p["size_gb"] * 1e9)),
                         image_tokens=p.get("image_tokens", DEFAULT_IMAGE_TOKENS),
                         vision_bytes=2 * vision_params(cfg))
    local = mm = None
    try:
        from huggingface_hub import try_to_load_from_cache

        hit = try_to_load_from_cache(p["repo"], p["file"])
        local = Path(hit) if isinstance(hit, str) else None
        hit = try_to_load_from_cache(p["repo"], p["mmproj"])
        mm = Path(hit) if isinstance(hit, str) else None
    except ImportError:
        pass
    shape = {k: p[k] for k in ("n_layer", "n_head", "n_kv_head", "head_dim", "n_embd", "vocab")}
    shape |= {"size": int(p["size_gb"] * 1e9), "ctx_train": p["ctx"]}
    return VisionRef(name, "gguf", local, mm, p, handler=p["handler"], shape=shape,
                     image_tokens=p.get("image_tokens", DEFAULT_IMAGE_TOKENS),
                     vision_bytes=int(p.get("mmproj_gb", 0.6) * 1e9))


def gguf_ref(path: Path, mmproj: str = "") -> VisionRef:
    """A local GGUF language model and its projector: `mmproj` when given, else the one mmproj*.gguf beside it."""
    from workers.chat.llm import gguf_shape, is_gguf, read_gguf_metadata

    if not is_gguf(path):
        raise ValueError(f"{path.name} is not a GGUF file (it does not start with the GGUF magic bytes): give a .gguf "
                         "language model with its mmproj file, or a transformers LLaVA folder")
    meta = read_gguf_metadata(path)
    if str(meta.get("general.architecture", "")) == "clip" or "mmproj" in path.name.lower():
        raise ValueError(f"{path.name} is a projector (mmproj) file, not the language model: give the model's .gguf "
                         f"as model and put {path.name} beside it (or pass it as mmproj)")
    proj = find_mmproj(path, mmproj)
    shape = gguf_shape(path)
    words = " ".join(str(meta.get(k, "")) for k in ("general.architecture", "general.name", "general.basename"))
    return VisionRef(str(path), "gguf", path, proj, None, handler=handler_for(words + " " + path.name),
                     shape=shape, image_tokens=DEFAULT_IMAGE_TOKENS, vision_bytes=proj.stat().st_size)


def find_mmproj(path: Path, mmproj: str = "") -> Path:
    if mmproj.strip():
        proj = Path(mmproj).expanduser()
        if not proj.is_file():
            raise ValueError(f"mmproj {mmproj} does not exist: give the projector .gguf that belongs to {path.name}")
        return proj
    found = sorted(f for f in path.parent.glob("*.gguf") if "mmproj" in f.name.lower())
    if len(found) == 1:
        return found[0]
    if not found:
        raise ValueError(f"{path.name} needs its projector file to see images (an mmproj-*.gguf from the same repo as "
                         f"the model, e.g. mmproj-model-f16.gguf): download it into {path.parent} or give it as "
                         "mmproj")
    raise ValueError(f"{path.parent} holds {len(found)} projector files ({', '.join(f.name for f in found)}): name "
                     "the one that belongs to the model as mmproj")


def handler_for(words: str) -> str:
    """The llama.cpp chat handler for a GGUF vision model, from its name and architecture; LLaVA-1.5's otherwise."""
    w = words.lower()
    for hint, handler in HANDLER_HINTS:
        if hint in w:
            return handler
    return "llava-1.5"


def hf_ref(folder: Path, name: str | None = None, preset: dict | None = None) -> VisionRef:
    """A transformers LLaVA-style folder (a config.json with a vision_config)."""
    cfg = folder_config(folder)
    size = sum(f.stat().st_size for f in Path(folder).glob("*.safetensors"))
    return VisionRef(name or str(folder), "hf", Path(folder), None, preset, shape=_text_shape(cfg, size),
                     image_tokens=image_tokens(cfg), vision_bytes=2 * vision_params(cfg))


def folder_config(folder: Path) -> dict:
    where = Path(folder) / "config.json"
    if not where.is_file():
        raise ValueError(f"{Path(folder).name} has no config.json: give a transformers LLaVA folder (as save_pretrained "
                         "writes it) or a .gguf model with its mmproj file")
    try:
        cfg = json.loads(where.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{Path(folder).name}/config.json is not valid JSON ({e})") from None
    if not isinstance(cfg, dict) or "vision_config" not in cfg or "text_config" not in cfg:
        raise ValueError(f"{Path(folder).name} is not a vision-language model (its config.json has no vision_config "
                         "and text_config): give a LLaVA-style folder such as llava-hf/llava-1.5-7b-hf, or use the "
                         "Chat tab for a text model")
    return cfg


def config_of(base: str) -> dict:
    """A vision base's full config (text_config + vision_config): a preset's from assets/, a folder's config.json."""
    p = table().get(base)
    if p is not None:
        if p["backend"] != "hf":
            raise ValueError(f"{base} is a GGUF model (llama.cpp): training and adapters need a transformers base such "
                             f"as {default(None, 'hf')}")
        return p["config"]
    return folder_config(Path(base).expanduser())


def source_of(base: str) -> str:
    """What from_pretrained loads for a base: a preset's hub repo (the cached snapshot when there), or the folder."""
    p = table().get(base)
    if p is not None:
        from workers.chat.llm import hub_cached_snapshot

        local = hub_cached_snapshot(p["repo"])
        return str(local) if local is not None else p["repo"]
    return str(Path(base).expanduser())


def vision_params(cfg: dict) -> int:
    """Parameters of the CLIP-style vision tower and the two-layer projector, from the config."""
    v, t = cfg["vision_config"], cfg["text_config"]
    h, i, L = v.get("hidden_size", 1024), v.get("intermediate_size", 4096), v.get("num_hidden_layers", 24)
    patches = (v.get("image_size", 336) // v.get("patch_size", 14)) ** 2 + 1
    tower = L * (4 * h * h + 2 * h * i + 4 * h) + patches * h + 3 * v.get("patch_size", 14) ** 2 * h
    th = t.get("hidden_size", 4096)
    return tower + h * th + th * th + 2 * th


def image_tokens(cfg: dict) -> int:
    v = cfg["vision_config"]
    n = (v.get("image_size", 336) // v.get("patch_size", 14)) ** 2
    return n + (1 if cfg.get("vision_feature_select_strategy", "default") == "full" else 0)


def _text_shape(cfg: dict, size: int) -> dict:
    from workers.chat.llm import config_params

    t = cfg["text_config"]
    heads = t.get("num_attention_heads", 32)
    hidden = t.get("hidden_size", 4096)
    return {"n_layer": t.get("num_hidden_layers", 32), "n_head": heads, "n_embd": hidden,
            "n_kv_head": t.get("num_key_value_heads", heads), "head_dim": t.get("head_dim") or hidden // heads,
            "vocab": t.get("vocab_size", 32000), "ctx_train": t.get("max_position_embeddings", 4096),
            "tied": bool(t.get("tie_word_embeddings", False)), "n_params": config_params(t),
            "size": size or 2 * config_params(t)}


# ---- memory ----------------------------------------------------------------------------------------------------------
N_UBATCH = 512


def memory(ref: VisionRef, n_ctx: int, n_gpu_layers: int, device, load_in_4bit: bool = True) -> dict[str, int]:
    """Bytes the loaded model holds on the gated device while cached: the language model's weights (offloaded layers
    for llama.cpp), the vision tower + projector, the KV cache for n_ctx tokens (images included) and the compute
    buffers (the vision encoder's for one image among them)."""
    s = ref.shape
    cuda = getattr(device, "kind", "cpu") == "cuda"
    vision_compute = ref.image_tokens * 4096 * 4 * 4 + 64 * 2**20  # the encoder's activations for one image
    if ref.backend == "hf":
        n_params = s["n_params"]
        embed = s["vocab"] * s["n_embd"] * (1 if s.get("tied") else 2)
        if cuda and load_in_4bit:  # linear layers in nf4; embeddings, LM head, vision tower and projector 16-bit
            weights = int(max(0, n_params - embed) * 0.55 + embed * 2)
        else:
            weights = n_params * (2 if cuda else 4)
        elt = 2 if cuda else 4
        return {"weights": int(weights), "vision": int(ref.vision_bytes * (1 if cuda else 2)),
                "kv_cache": 2 * s["n_layer"] * n_ctx * s["n_kv_head"] * s["head_dim"] * elt,
                "workspace": N_UBATCH * s["vocab"] * 4 + vision_compute + 128 * 2**20}
    layers = s["n_layer"] if n_gpu_layers < 0 else min(n_gpu_layers, s["n_layer"])
    frac = layers / s["n_layer"] if cuda else 1.0
    kv = 2 * s["n_layer"] * n_ctx * s["n_kv_head"] * s["head_dim"] * 2
    return {"weights": int(s["size"] * frac), "vision": int(ref.vision_bytes),
            "kv_cache": int(kv * (frac if cuda else 1.0)),
            "workspace": N_UBATCH * s["vocab"] * 4 + vision_compute + 256 * 2**20}


def fit_layers(ref: VisionRef, n_ctx: int, device, budget: int) -> int:
    """The most language-model layers that fit `budget` on CUDA (-1 = all); 0 on the CPU; -1 for transformers."""
    if getattr(device, "kind", "cpu") != "cuda" or ref.backend == "hf":
        return -1 if ref.backend == "hf" else 0
    n = ref.shape["n_layer"]
    for layers in range(n, -1, -1):
        if sum(memory(ref, n_ctx, layers, device).values()) <= budget:
            return -1 if layers == n else layers
    return 0
