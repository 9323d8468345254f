"""What a model file or folder on disk really is, and where the studio can use it (the Models tab's Check).

Every answer is read from the files themselves (GGUF header, config.json, CTranslate2's config, safetensors
header, the studio's own run cards); nothing is guessed, and a file that is none of these says what it is not.
Nothing here loads weights or unpickles anything."""
from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class ModelInfo:
    kind: str  # gguf-llm, hf-llm, whisper-ct2, whisper-hf, embedder, reranker, vision-llm, yolo-weights, …
    facts: list[str] = field(default_factory=list)
    use: str = ""  # where in the studio it can be used, or what to do to use it

    def markdown(self, name: str) -> str:
        facts = " · ".join(self.facts)
        return f"✅ `{name}` — **{self.kind}**" + (f" · {facts}" if facts else "") + f"\n\n{self.use}"


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def _json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path.parent.name}/{path.name} is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path.parent.name}/{path.name} holds no config (a JSON object)")
    return data


def _gguf(path: Path) -> ModelInfo:
    from workers.chat.llm import gguf_shape, read_gguf_metadata

    meta = read_gguf_metadata(path)
    s = gguf_shape(path)
    arch = meta.get("general.architecture", "?")
    facts = [f"{arch}", f"{s['n_layer']} layers", f"KV heads {s['n_kv_head']} × {s['head_dim']}",
             f"vocab {s['vocab']:,}", f"trained context {s['ctx_train']:,}", _gb(s["size"])]
    if meta.get("general.name"):
        facts.insert(0, str(meta["general.name"]))
    template = "has a chat template" if meta.get("tokenizer.chat_template") else "no chat template (pick a chat format)"
    if arch == "clip" or "clip.has_vision_encoder" in meta:
        return ModelInfo("vision projector (GGUF mmproj)", facts[:1] + [_gb(s["size"])],
                         "A vision model's projector file: it is used together with its language model, not alone.")
    return ModelInfo("LLM (GGUF, llama.cpp)", facts + [template],
                     "Use this path as the model in the Chat tab, as the RAG evaluation's judge, or as Transcribe's "
                     "post-editor.")


def _hf_folder(path: Path, cfg: dict) -> ModelInfo:
    arch = (cfg.get("architectures") or ["?"])[0]
    mtype = cfg.get("model_type", "?")
    size = _size(path)
    if (path / "modules.json").exists() or (path / "config_sentence_transformers.json").exists():
        dim = cfg.get("hidden_size", "?")
        return ModelInfo("embedder (sentence-transformers)", [mtype, f"{cfg.get('num_hidden_layers', '?')} layers",
                                                               f"dimension {dim}", _gb(size)],
                         "Use this path as the embedder when you create a collection (Chat → Collections).")
    if arch.endswith("ForSequenceClassification") and cfg.get("num_labels", len(cfg.get("id2label", {}) or {})) in (1, None):
        return ModelInfo("reranker (cross-encoder)", [mtype, arch, _gb(size)],
                         "Use this path as the reranker in the Chat tab's retrieval settings.")
    if mtype == "whisper":
        return ModelInfo("Whisper (transformers)", [arch, f"{cfg.get('encoder_layers', '?')}+"
                                                    f"{cfg.get('decoder_layers', '?')} layers",
                                                    f"d_model {cfg.get('d_model', '?')}", _gb(size)],
                         "Transcribe uses faster-whisper (CTranslate2) models: convert this folder with "
                         "`ct2-transformers-converter --model FOLDER --output_dir OUT --quantization int8` and use OUT "
                         "as the Transcribe model.")
    if "vision_config" in cfg:
        return ModelInfo("vision-language model (transformers)", [mtype, arch, _gb(size)],
                         "A vision-language model: the Vision chat tab will use it; the Chat tab does not take images.")
    if arch.endswith("ForCausalLM") or arch.endswith("LMHeadModel"):
        text = cfg.get("text_config", cfg)
        facts = [mtype, arch, f"{text.get('num_hidden_layers', '?')} layers", f"vocab {text.get('vocab_size', '?'):,}"
                 if isinstance(text.get("vocab_size"), int) else "vocab ?",
                 f"trained context {text.get('max_position_embeddings', '?'):,}"
                 if isinstance(text.get("max_position_embeddings"), int) else "", _gb(size)]
        return ModelInfo("LLM (transformers)", [f for f in facts if f],
                         "Use this path as the model in the Chat tab (transformers backend, optionally 4-bit).")
    return ModelInfo(f"transformers model ({mtype})", [arch, _gb(size)],
                     "The studio has no job kind that uses this architecture.")


def _ct2_folder(path: Path) -> ModelInfo:
    cfg = _json(path / "config.json") if (path / "config.json").exists() else {}
    size = _size(path / "model.bin")
    if "alignment_heads" in cfg or "lang_ids" in cfg or (path / "preprocessor_config.json").exists():
        vocab = path / "vocabulary.txt"
        words = sum(1 for _ in vocab.open(encoding="utf-8", errors="replace")) if vocab.exists() else None
        facts = ["CTranslate2", f"vocab {words:,}" if words else "", _gb(size)]
        return ModelInfo("Whisper (faster-whisper)", [f for f in facts if f],
                         "Use this path as the model in the Transcribe tab (`run transcribe --param model=PATH`).")
    return ModelInfo("CTranslate2 model", [_gb(size)],
                     "Not a Whisper model: the studio uses CTranslate2 only for transcription.")


def _safetensors(path: Path) -> ModelInfo:
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{path.name} is too short to be a safetensors file")
        (n,) = struct.unpack("<Q", head)
        if n > 100 * 2**20:
            raise ValueError(f"{path.name} is not a safetensors file (its header length is {n:,} bytes)")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise ValueError(f"{path.name} is not a safetensors file (its header is not JSON)") from None
    keys = [k for k in header if k != "__metadata__"]
    size = _gb(path.stat().st_size)
    if any("lora_" in k or "lora_up" in k or ".lora." in k for k in keys):
        return ModelInfo("LoRA adapter (safetensors)", [f"{len(keys):,} tensors", size],
                         "A LoRA adapter: it is applied on top of the base model it was trained for.")
    return ModelInfo("weights (safetensors)", [f"{len(keys):,} tensors", size],
                     "Bare weights without a config: the studio needs the model folder (config.json beside them).")


def describe(path: str | Path) -> ModelInfo:
    """What the file or folder at `path` is, read from its own metadata. ValueError says why it is not a model."""
    path = Path(str(path).strip()).expanduser()
    if not str(path) or not path.exists():
        raise ValueError(f"{path} does not exist on this machine")
    if path.is_dir():
        if (path / "checkpoint" / "state.json").exists() and (path / "run.json").exists():
            return ModelInfo("Tiny LM checkpoint (a studio run)", [_gb(_size(path / "checkpoint"))],
                             "Use this folder (or its job id) as the trained model in Tiny LM → Generate.")
        if (path / "model.bin").exists():
            return _ct2_folder(path)
        if (path / "config.json").exists():
            return _hf_folder(path, _json(path / "config.json"))
        ggufs = sorted(path.glob("*.gguf"))
        if ggufs:
            return ModelInfo("folder of GGUF files", [p.name for p in ggufs[:4]],
                             "Give one of these .gguf files as the model in the Chat tab.")
        raise ValueError(f"{path} is a folder without config.json, model.bin or .gguf files: not a model folder the "
                         "studio knows")
    suffix = path.suffix.lower()
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic == b"GGUF":
        return _gguf(path)
    if suffix == ".safetensors":
        return _safetensors(path)
    if suffix == ".pt":
        return ModelInfo("PyTorch pickle (.pt)", [_gb(path.stat().st_size)],
                         "YOLO weights for the Detect tab. A .pt is a pickle that can run code when loaded: Detect "
                         "loads it only if a studio run wrote it or you tick \"I trust this file\". Not opened here.")
    if suffix in (".yaml", ".yml"):
        return ModelInfo("model definition (YAML)", [],
                         "A YOLO architecture: Detect → Train builds it with random weights (train it before "
                         "predicting: untrained weights find nothing).")
    if suffix == ".onnx":
        return ModelInfo("ONNX model", [_gb(path.stat().st_size)],
                         "An exported detector: Detect → Predict runs it with ONNX Runtime.")
    raise ValueError(f"{path.name} is not a model file the studio knows (GGUF, safetensors, .pt, .onnx, .yaml) and "
                     "not a model folder")
