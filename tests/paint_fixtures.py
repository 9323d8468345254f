"""A tiny Stable-Diffusion-1.5-shaped pipeline for the Paint tests, built offline from configs in the style of
diffusers' own get_dummy_components: a small UNet2DConditionModel, AutoencoderKL and CLIPTextModel, and a CLIP
tokenizer whose vocabulary is written here (byte-level characters, no merges). Saved as a diffusers folder
(model_index.json + one folder per component), the layout `paint` and `paint_lora` load; a few seconds on the CPU.

    from tests.paint_fixtures import make_tiny_sd
    folder = make_tiny_sd(tmp_path / "tiny-sd")   # returns the folder; 64x64 images work (latents 32x32)
"""
from __future__ import annotations

import json
from pathlib import Path

SIZE = 64  # pixel size the tiny model is meant for (VAE factor 2: latents 32x32, the UNet's sample_size)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's byte -> printable character table (as in transformers' CLIP tokenizer)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def write_clip_tokenizer(folder: Path) -> Path:
    """vocab.json + merges.txt of a character-level CLIP BPE: every byte character alone and as a word end
    ("a</w>"), plus the start/end tokens; no merges, so every word is spelt out character by character."""
    folder.mkdir(parents=True, exist_ok=True)
    chars = list(_bytes_to_unicode().values())
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}  # CLIP's bos/eos; pad is eos as in SD 1.5's tokenizer
    for c in chars:
        vocab.setdefault(c, len(vocab))
    for c in chars:
        vocab.setdefault(c + "</w>", len(vocab))
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    (folder / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
         "pad_token": "<|endoftext|>"}), encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "bos_token": "<|startoftext|>",
         "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
         "do_lower_case": True}), encoding="utf-8")
    return folder


def tiny_components(seed: int = 0) -> dict:
    """The components of a StableDiffusionPipeline, random weights from `seed` (same seed, same weights)."""
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=SIZE // 2, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=32)
    torch.manual_seed(seed)
    vae = AutoencoderKL(block_out_channels=[32, 64], in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
                        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"], sample_size=SIZE, norm_num_groups=32)
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=32, intermediate_size=37, layer_norm_eps=1e-05,
        num_attention_heads=4, num_hidden_layers=2, vocab_size=520, max_position_embeddings=77,
        projection_dim=32))
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       num_train_timesteps=1000, steps_offset=1, timestep_spacing="leading")
    return {"unet": unet, "vae": vae, "text_encoder": text_encoder, "scheduler": scheduler}


def make_tiny_sd(folder: Path, seed: int = 0) -> Path:
    """Save the tiny pipeline as a diffusers folder (fp32 safetensors) and return it. Reuses an existing one."""
    folder = Path(folder)
    if (folder / "model_index.json").exists():
        return folder
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTokenizer

    tok_dir = write_clip_tokenizer(folder.parent / (folder.name + "-tokenizer"))
    tokenizer = CLIPTokenizer.from_pretrained(str(tok_dir))
    pipe = StableDiffusionPipeline(**tiny_components(seed), tokenizer=tokenizer, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(str(folder), safe_serialization=True)
    return folder


def make_image(path: Path, size: int = SIZE, seed: int = 0, colour: tuple[int, int, int] | None = None) -> Path:
    """A small RGB PNG (noise, or a flat colour with noise) for img2img, inpainting and training tests."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
    if colour is not None:
        arr = (0.7 * np.array(colour, dtype=np.float32) + 0.3 * arr).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return path


def make_mask(path: Path, size: int = SIZE) -> Path:
    """A black image with a white square in the middle: the region inpainting repaints."""
    from PIL import Image, ImageDraw

    img = Image.new("L", (size, size), 0)
    ImageDraw.Draw(img).rectangle([size // 4, size // 4, 3 * size // 4, 3 * size // 4], fill=255)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def make_tiny_sdxl(folder: Path, seed: int = 0) -> Path:
    """A tiny SDXL-shaped pipeline (two CLIP text encoders, the second with a projection; a UNet with SDXL's
    text_time embedding), as diffusers' SDXL get_dummy_components; saved as a diffusers folder."""
    folder = Path(folder)
    if (folder / "model_index.json").exists():
        return folder
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=SIZE // 2, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, transformer_layers_per_block=(1, 2), projection_class_embeddings_input_dim=80,
        cross_attention_dim=64, norm_num_groups=32)
    torch.manual_seed(seed)
    vae = AutoencoderKL(block_out_channels=[32, 64], in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
                        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"], sample_size=SIZE, norm_num_groups=32)
    cfg = dict(bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=32, intermediate_size=37,
               layer_norm_eps=1e-05, num_attention_heads=4, num_hidden_layers=2, vocab_size=520,
               max_position_embeddings=77, hidden_act="gelu", projection_dim=32)
    torch.manual_seed(seed)
    te = CLIPTextModel(CLIPTextConfig(**cfg))
    torch.manual_seed(seed + 1)
    te2 = CLIPTextModelWithProjection(CLIPTextConfig(**cfg))
    tok_dir = write_clip_tokenizer(folder.parent / (folder.name + "-tokenizer"))
    tok = CLIPTokenizer.from_pretrained(str(tok_dir))
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       num_train_timesteps=1000, steps_offset=1, timestep_spacing="leading")
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=te, text_encoder_2=te2, tokenizer=tok, tokenizer_2=tok,
                                     unet=unet, scheduler=scheduler)
    pipe.save_pretrained(str(folder), safe_serialization=True)
    return folder
