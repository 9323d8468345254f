"""The two ways a vision model answers, behind one `stream(turns, ...)`: llama.cpp (GGUF language model + mmproj
projector through llama-cpp-python's multimodal chat handlers: the fast path) and transformers (a LLaVA-style folder,
optionally in 4-bit through bitsandbytes, optionally with a LoRA adapter from vision_finetune).

A turn is {"role": "user"|"assistant"|"system", "content": str, "images": [paths]}; a user turn's images come
before its text, as LLaVA was trained.
"""
from __future__ import annotations

import base64
import io
import os
from pathlib import Path
from typing import Any, Iterator

MAX_SIDE = 2048  # an image larger than this is scaled down before it is sent (the encoders read 336-1024 px)


def open_image(path: str | Path):
    """The image as RGB (EXIF rotation applied, huge ones scaled down); ValueError naming the file otherwise."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    name = Path(path).name
    try:
        with Image.open(path) as im:
            im.load()
            img = ImageOps.exif_transpose(im).convert("RGB")
    except FileNotFoundError:
        raise ValueError(f"image {path} does not exist") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ModuleNotFoundError, Image.DecompressionBombError) as e:
        # Ultralytics (Detect) patches Image.open to try a HEIF plugin, which raises ModuleNotFoundError
        raise ValueError(f"{name} is not a readable image ({type(e).__name__}): use a PNG, JPEG or WebP file") from None
    if max(img.size) > MAX_SIDE:
        img.thumbnail((MAX_SIDE, MAX_SIDE))
    return img


def data_uri(path: str | Path) -> str:
    """The image as a PNG data URI, the form llama-cpp-python's handlers read without touching the network."""
    buf = io.BytesIO()
    open_image(path).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


class GGUFVision:
    """llama.cpp: the language model with the handler that runs the projector (CLIP) on each image."""

    backend = "gguf"

    def __init__(self, llm, handler: str):
        self.llm, self.handler = llm, handler

    def count_tokens(self, text: str) -> int:
        return len(self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=False))

    def messages(self, turns: list[dict]) -> list[dict]:
        out = []
        for t in turns:
            if t.get("images") and t["role"] == "user":
                parts: list[dict] = [{"type": "image_url", "image_url": {"url": data_uri(p)}} for p in t["images"]]
                out.append({"role": "user", "content": parts + [{"type": "text", "text": t["content"]}]})
            else:
                out.append({"role": t["role"], "content": t["content"]})
        return out

    def stream(self, turns: list[dict], *, max_tokens: int, temperature: float, top_p: float, seed: int | None = None,
               top_k: int = 40, repeat_penalty: float = 1.0) -> Iterator[str]:
        it = self.llm.create_chat_completion(messages=self.messages(turns), stream=True, max_tokens=max_tokens,
                                             temperature=temperature, top_p=top_p, top_k=top_k,
                                             repeat_penalty=repeat_penalty, seed=seed)
        try:
            for chunk in it:
                piece = chunk["choices"][0]["delta"].get("content")
                if piece:
                    yield piece
        finally:
            it.close()


def load_gguf_vision(ref, n_ctx: int, n_gpu_layers: int, threads: int | None = None, flash_attn: bool = False):
    """(GGUFVision, bytes) for a resolved gguf VisionRef whose files are on disk."""
    from llama_cpp import Llama
    from llama_cpp import llama_chat_format as lcf

    from workers.vision.model import HANDLERS

    handler_cls = getattr(lcf, HANDLERS[ref.handler])
    handler = handler_cls(clip_model_path=str(ref.mmproj), verbose=False)
    llm = Llama(model_path=str(ref.path), chat_handler=handler, n_ctx=n_ctx, n_gpu_layers=n_gpu_layers,
                n_threads=threads or max(1, os.cpu_count() or 2), flash_attn=flash_attn, verbose=False)
    return GGUFVision(llm, ref.handler), ref.path.stat().st_size + ref.mmproj.stat().st_size


class HFVision:
    """A transformers image-text-to-text model (LLaVA-style) streaming through TextIteratorStreamer."""

    backend = "hf"

    def __init__(self, model, processor):
        self.model, self.processor = model, processor
        self.tok = getattr(processor, "tokenizer", processor)

    def count_tokens(self, text: str) -> int:
        return len(self.tok(text, add_special_tokens=False).input_ids)

    def inputs(self, turns: list[dict]):
        """The processor's tensors for the conversation: its chat template with an image placeholder per image
        (expanded to the image tokens), and the pixel values of every image in order."""
        msgs, images = [], []
        for t in turns:
            if t["role"] == "user" and t.get("images"):
                images += [open_image(p) for p in t["images"]]
                content: Any = [{"type": "image"} for _ in t["images"]] + [{"type": "text", "text": t["content"]}]
            else:
                content = [{"type": "text", "text": t["content"]}]
            msgs.append({"role": t["role"], "content": content})
        if getattr(self.processor, "chat_template", None):
            prompt = self.processor.apply_chat_template(msgs, add_generation_prompt=True)
        else:  # LLaVA-1.5's own plain format
            prompt = "".join(("USER: " + "<image>\n" * sum(c["type"] == "image" for c in m["content"])
                              + "".join(c.get("text", "") for c in m["content"]) + " ") if m["role"] == "user"
                             else f"ASSISTANT: {m['content'][0]['text']} " for m in msgs) + "ASSISTANT:"
        return self.processor(images=images or None, text=prompt, return_tensors="pt")

    def stream(self, turns: list[dict], *, max_tokens: int, temperature: float, top_p: float, seed: int | None = None,
               top_k: int = 40, repeat_penalty: float = 1.0) -> Iterator[str]:
        import torch

        from workers.chat.llm import stream_generate

        inputs = self.inputs(turns).to(self.model.device)
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype if self.model.dtype.is_floating_point
                                                               else torch.float16)
        pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else self.tok.eos_token_id
        try:
            yield from stream_generate(self.model, self.tok, dict(inputs), max_tokens=max_tokens,
                                       temperature=temperature, top_p=top_p, top_k=top_k,
                                       repeat_penalty=repeat_penalty, seed=seed, pad_token_id=pad)
        except AssertionError as e:
            if "divisible" in str(e):
                raise RuntimeError(f"bitsandbytes' CPU 4-bit kernels cannot run this model's layer sizes ({e}): set "
                                   "load_in_4bit=false on the CPU (4-bit is for the GPU)") from None
            raise


def load_hf_vision(source: str | Path, device: str, load_in_4bit: bool = True,
                   adapter: Path | None = None) -> tuple[HFVision, int]:
    """A LLaVA-style transformers model: the language model in NF4 when load_in_4bit (vision tower, projector and LM
    head kept 16-bit), fp16 on CUDA otherwise, fp32 on the CPU; a PEFT LoRA on top when given (its processor from the
    adapter folder when the fine-tune saved one there)."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from workers.vision.model import SKIP_4BIT

    cuda = device == "cuda"
    kwargs: dict[str, Any] = {"dtype": torch.float16 if cuda else torch.float32}
    if load_in_4bit:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float16 if cuda else torch.float32,
            llm_int8_skip_modules=SKIP_4BIT)
        kwargs["device_map"] = {"": 0 if cuda else "cpu"}
    try:
        model = AutoModelForImageTextToText.from_pretrained(str(source), **kwargs)
    except OSError as e:
        raise RuntimeError(f"cannot load {source}: {str(e).splitlines()[0][:200]}. Download it in the Models tab "
                           "when online, or give a local LLaVA folder") from None
    if not load_in_4bit:
        model.to(device)
    proc_from = source
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter), is_trainable=False)
        if (Path(adapter) / "processor_config.json").exists() or (Path(adapter) / "preprocessor_config.json").exists():
            proc_from = adapter
    model.eval()
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    return HFVision(model, AutoProcessor.from_pretrained(str(proc_from))), size
