"""Small real inputs for the Vision chat tests: a tiny LLaVA-architecture model (a 2-layer CLIP vision tower at 32 px,
patch 8, so 16 image tokens; a projector; a 2-layer, 64-wide Llama) with random weights, the byte-level tokenizer of
the Fine-tune tests plus an `<image>` token, a LlavaProcessor with a chat template; and synthetic images (solid
colours) each paired with its own answer. Offline, CPU, about a second to build."""
from __future__ import annotations

import json
from pathlib import Path

from finetune_fixtures import make_tokenizer

# the processor's chat template: content is a string or a list of {"type": "image"} / {"type": "text", "text"} parts
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<image>\n{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}"
    "{% endif %}<|end|>\n{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
IMAGE_TOKENS = 16  # (32 / 8)^2 patches; the CLS token is dropped ("default" feature selection)

# distinct images, each with an answer a random model cannot give
COLOURS = {
    "red": ((220, 20, 20), "A red square: the stop sign code is 4417."),
    "green": ((20, 200, 40), "A green square: the garden gate is open."),
    "blue": ((30, 40, 220), "A blue square: the night bus leaves at nine."),
    "yellow": ((230, 220, 30), "A yellow square: Mara keeps the lighthouse key."),
}
QUESTION = "What does this picture say?"


def make_tiny_llava(out: Path, seed: int = 0) -> Path:
    """A transformers LLaVA folder (config, safetensors, tokenizer, processor) in `out` (~0.3 MB)."""
    import torch
    from transformers import (CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor)

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tok = make_tokenizer(out, extra_text=" ".join(a for _, a in COLOURS.values()) + " " + QUESTION,
                         extra_specials=("<image>",))
    image_id = tok.convert_tokens_to_ids("<image>")
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=32, patch_size=8, projection_dim=32)
    text = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                       bos_token_id=tok.bos_token_id, pad_token_id=tok.pad_token_id,
                       eos_token_id=[tok.eos_token_id, tok.convert_tokens_to_ids("<|end|>")],
                       tie_word_embeddings=False, initializer_range=0.25)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_id=image_id, projector_hidden_act="gelu",
                      vision_feature_layer=-2, vision_feature_select_strategy="default",
                      image_seq_length=IMAGE_TOKENS)
    torch.manual_seed(seed)
    LlavaForConditionalGeneration(cfg).save_pretrained(str(out))
    images = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    LlavaProcessor(image_processor=images, tokenizer=tok, patch_size=8, vision_feature_select_strategy="default",
                   num_additional_image_tokens=1, chat_template=CHAT_TEMPLATE).save_pretrained(str(out))
    return out


def write_images(folder: Path, size: tuple[int, int] = (40, 30)) -> dict[str, Path]:
    """One PNG per colour in `folder`: {colour: path}."""
    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for name, (rgb, _) in COLOURS.items():
        path = folder / f"{name}.png"
        Image.new("RGB", size, rgb).save(path)
        out[name] = path
    return out


def write_pairs(path: Path, images: dict[str, Path], repeat: int = 1, relative: bool = True) -> Path:
    """A JSONL of {image, question, answer}, each colour `repeat` times; image paths relative to the file's folder
    (as a dataset beside its images is written) or absolute."""
    path = Path(path)
    rows = []
    for _ in range(repeat):
        for name, (_, answer) in COLOURS.items():
            img = images[name]
            rows.append({"image": str(img.relative_to(path.parent)) if relative else str(img), "question": QUESTION,
                         "answer": answer})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_llava_json(path: Path, images: dict[str, Path]) -> Path:
    """The same pairs in LLaVA's own format: a JSON list of {id, image, conversations: [{from, value}]} with `<image>`
    in the human turn."""
    path = Path(path)
    rows = [{"id": name, "image": images[name].name,
             "conversations": [{"from": "human", "value": f"<image>\n{QUESTION}"}, {"from": "gpt", "value": answer}]}
            for name, (_, answer) in COLOURS.items()]
    path.write_text(json.dumps(rows))
    return path
