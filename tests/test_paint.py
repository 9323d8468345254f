"""Paint's Generate side (kind `paint`) on a tiny SD-1.5-shaped pipeline built offline (tests/paint_fixtures.py):
deterministic for a seed with the settings in the PNG, every sampler, img2img, inpainting, LoRAs, the live preview
and cancel, bad inputs, the gate's SDXL refusal from the preset config alone, and the tab through gradio_client."""
import threading
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from paint_fixtures import SIZE, make_image, make_mask, make_tiny_sd
from studio import JobCancelled, JobContext, JobStatus
from studio.config import GiB
from studio.params import build
from workers.paint import generate as G
from workers.paint import pipeline as P
from workers.paint.pngmeta import format_parameters, parse_parameters, read_png_parameters


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_tiny_sd(tmp_path_factory.mktemp("paint") / "tiny-sd")


@pytest.fixture(scope="module")
def pics(tmp_path_factory):
    d = tmp_path_factory.mktemp("paint-pics")
    bad = d / "notes.png"
    bad.write_text("this is not an image")
    Image.new("RGB", (1, 1)).save(d / "dot.png")
    import torch
    from safetensors.torch import save_file

    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 32)},
              str(d / "a-lora.safetensors"))
    return {"lora_file": d / "a-lora.safetensors", "init": make_image(d / "init.png", colour=(200, 40, 40)), "mask": make_mask(d / "mask.png"),
            "not_image": bad, "one_px": d / "dot.png"}


class Dirs:
    def __init__(self, data_dir):
        self.data_dir = data_dir


def run(tiny, tmp_path, name="run", cancel_on=None, **params):
    """Validate and run a paint job in this process; returns (result, run folder, events seen)."""
    p = G.validate(build(G.Params, {"model": str(tiny), "prompt": "a red square", "width": SIZE, "height": SIZE,
                                    "steps": 3, "seed": 7, **params}), Dirs(tmp_path))
    flag, seen = threading.Event(), []
    rd = tmp_path / name
    rd.mkdir()

    class Ctx(JobContext):
        def emit(self, type, **data):
            seen.append((type, data))
            super().emit(type, **data)
            if type == cancel_on:
                flag.set()  # the user presses Cancel as the first preview shows

    ctx = Ctx(job_id=name, kind="paint", run_dir=rd, data_dir=tmp_path, device="cpu", cancel_flag=flag)
    return G.run(p, ctx), rd, seen


def pixels(rd, result, i=0):
    return np.asarray(Image.open(rd / result["images"][i]).convert("RGB"), dtype=np.int16)


def test_a_seed_gives_the_same_image_and_the_png_carries_its_settings(tiny, tmp_path):
    a, rda, _ = run(tiny, tmp_path, "a", negative_prompt="blurry, dark", cfg=5.5, sampler="Euler")
    b, rdb, _ = run(tiny, tmp_path, "b", negative_prompt="blurry, dark", cfg=5.5, sampler="Euler")
    c, rdc, _ = run(tiny, tmp_path, "c", negative_prompt="blurry, dark", cfg=5.5, sampler="Euler", seed=8)
    assert (pixels(rda, a) == pixels(rdb, b)).all()
    assert np.abs(pixels(rda, a) - pixels(rdc, c)).mean() > 1  # another seed, another image
    got = parse_parameters(read_png_parameters(rda / a["images"][0]))
    assert {k: got[k] for k in ("prompt", "negative_prompt", "steps", "sampler", "cfg", "seed", "width", "height")} \
        == {"prompt": "a red square", "negative_prompt": "blurry, dark", "steps": 3, "sampler": "Euler", "cfg": 5.5,
            "seed": 7, "width": SIZE, "height": SIZE}
    assert got["model_name"] == "tiny-sd" and len(got["model_hash"]) == 10
    # the parsed settings, given back as params, paint the same image
    again, rdd, _ = run(tiny, tmp_path, "d", **{k: got[k] for k in ("prompt", "negative_prompt", "steps", "sampler",
                                                                   "cfg", "seed", "width", "height")})
    assert (pixels(rdd, again) == pixels(rda, a)).all()


def test_random_seed_is_recorded_and_a_batch_uses_seed_plus_i(tiny, tmp_path):
    r, rd, _ = run(tiny, tmp_path, seed=-1, batch=2)
    assert r["seeds"] == [r["seed"], r["seed"] + 1] and len(r["images"]) == 2
    one, rd1, _ = run(tiny, tmp_path, "one", seed=r["seed"] + 1)
    # image 2 of the batch is seed + 1 painted alone (up to float rounding of a batch of 2 against 1 on the CPU)
    assert np.abs(pixels(rd, r, 1) - pixels(rd1, one)).max() <= 3
    assert np.abs(pixels(rd, r, 0) - pixels(rd1, one)).mean() > 1
    assert parse_parameters(read_png_parameters(rd / r["images"][1]))["seed"] == r["seed"] + 1


def test_a1111_text_round_trips_with_loras_and_quotes():
    text = format_parameters(prompt="a cat, b/w", negative_prompt="ugly", steps=20, sampler="DPM++ 2M Karras",
                             cfg=7, seed=1234, width=512, height=768, model_name="sd15", model_hash="abcdef1234",
                             loras=[("/x/my style.safetensors", "my style", 0.8, "0123456789ab")], strength=0.6)
    assert text.splitlines()[0] == "a cat, b/w <lora:my style:0.8>"
    got = parse_parameters(text)
    assert got["prompt"] == "a cat, b/w" and got["negative_prompt"] == "ugly" and got["sampler"] == "DPM++ 2M Karras"
    assert (got["width"], got["height"], got["seed"], got["strength"]) == (512, 768, 1234, 0.6)
    assert got["loras"] == "/x/my style.safetensors:0.8"
    a1111 = ("masterpiece <lora:add_detail:0.5>\nNegative prompt: lowres\nSteps: 30, Sampler: DPM++ 2M Karras, "
             "Schedule type: Karras, CFG scale: 6.5, Seed: 99, Size: 640x448, Model hash: 1a2b3c4d5e, Model: x, "
             'Lora hashes: "add_detail: 7c6bad76eb54", Version: v1.10.1')
    got = parse_parameters(a1111)
    assert got["prompt"] == "masterpiece" and got["loras"] == "add_detail:0.5" and got["cfg"] == 6.5
    assert got["other"]["Schedule type"] == "Karras" and got["lora_hashes"] == "add_detail: 7c6bad76eb54"
    with pytest.raises(ValueError, match="no generation settings"):
        parse_parameters("just a caption")


@pytest.mark.parametrize("sampler", list(P.SAMPLERS))
def test_each_sampler_runs(tiny, tmp_path, sampler):
    r, rd, _ = run(tiny, tmp_path, sampler=sampler, steps=2)
    img = pixels(rd, r)
    assert img.shape == (SIZE, SIZE, 3) and img.std() > 0
    assert parse_parameters(read_png_parameters(rd / r["images"][0]))["sampler"] == sampler



def test_dpm_sde_karras_is_the_brownian_tree_sampler_and_repeats_for_a_seed(tiny, tmp_path):
    """A1111's DPM++ SDE Karras: diffusers' DPMSolverSDEScheduler (torchsde's Brownian noise, Karras sigmas), the
    noise seeded from the image's seed, not the process's RNG: the same seed paints the same image whatever ran
    before, alone or as image 2 of a batch."""
    import torch

    from workers.paint import generate

    seen = []
    set_sampler = generate.set_sampler

    def spy(pipe, name, seeds=None):
        set_sampler(pipe, name, seeds)
        seen.append((type(pipe.scheduler).__name__, pipe.scheduler.config.use_karras_sigmas))

    generate.set_sampler = spy
    try:
        torch.manual_seed(1)
        a, rda, _ = run(tiny, tmp_path, "a", sampler="DPM++ SDE Karras", steps=4)
        torch.manual_seed(2)  # another global RNG state: the Brownian tree must not draw from it
        b, rdb, _ = run(tiny, tmp_path, "b", sampler="DPM++ SDE Karras", steps=4)
    finally:
        generate.set_sampler = set_sampler
    assert seen == [("DPMSolverSDEScheduler", True)] * 2
    assert (pixels(rda, a) == pixels(rdb, b)).all()
    c, rdc, _ = run(tiny, tmp_path, "c", sampler="DPM++ SDE Karras", steps=4, seed=6, batch=2)
    assert np.abs(pixels(rdc, c, 1) - pixels(rda, a)).max() <= 3  # image 2 of the batch is seed 7 alone
    assert np.abs(pixels(rdc, c, 0) - pixels(rda, a)).mean() > 1
    ode, rdo, _ = run(tiny, tmp_path, "ode", sampler="DPM++ 2M Karras", steps=4)
    assert np.abs(pixels(rdo, ode) - pixels(rda, a)).mean() > 1  # the SDE's injected noise paints another image



def test_without_torchsde_dpm_sde_karras_is_refused_at_submit_naming_the_fix(tiny, tmp_path, monkeypatch):
    import importlib.util

    find = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torchsde" else find(name, *a))
    with pytest.raises(ValueError, match="needs the torchsde package .*DPM\\+\\+ 2M Karras"):
        run(tiny, tmp_path, sampler="DPM++ SDE Karras")
    run(tiny, tmp_path, sampler="DPM++ 2M Karras", steps=1)  # the others need nothing more


def test_img2img_and_inpainting_run_and_use_their_inputs(tiny, tmp_path, pics):
    txt, rdt, _ = run(tiny, tmp_path, "txt", steps=4)
    i2i, rdi, _ = run(tiny, tmp_path, "i2i", steps=4, init_image=str(pics["init"]), strength=0.5)
    assert i2i["mode"] == "img2img" and i2i["steps"] == 2  # strength 0.5 runs half the steps, as A1111
    assert np.abs(pixels(rdi, i2i) - pixels(rdt, txt)).mean() > 1
    inp, rdp, _ = run(tiny, tmp_path, "inp", steps=4, init_image=str(pics["init"]), mask=str(pics["mask"]),
                      strength=1.0)
    assert inp["mode"] == "inpaint"
    got = parse_parameters(read_png_parameters(rdp / inp["images"][0]))
    assert got["strength"] == 1.0 and got["other"]["Mode"] == "inpaint"
    out = pixels(rdp, inp)
    init = np.asarray(Image.open(pics["init"]).convert("RGB"), dtype=np.int16)
    q = SIZE // 4  # the kept border stays nearer the init image than the repainted middle
    border = np.abs(out - init)[:q].mean()
    middle = np.abs(out - init)[q + 4:3 * q - 4, q + 4:3 * q - 4].mean()
    assert border < middle


def test_preview_events_arrive_and_a_cancel_stops_the_run(tiny, tmp_path):
    r, rd, seen = run(tiny, tmp_path, "full", steps=6, preview_every=2)
    shown = [d for t, d in seen if t == "preview"]
    assert [d["step"] for d in shown] == [2, 4, 6] and all((rd / d["path"]).exists() for d in shown)
    assert Image.open(rd / shown[0]["path"]).size == (SIZE // 2, SIZE // 2)  # latent size: no VAE decode
    assert [t for t, _ in seen][0] == "flags"
    with pytest.raises(JobCancelled):
        run(tiny, tmp_path, "cancelled", steps=20, preview_every=1, cancel_on="preview")
    assert not (tmp_path / "cancelled" / "images").exists()
    assert len(list((tmp_path / "cancelled" / "preview").glob("*.png"))) == 1  # it stopped at the next step


def make_lora(tiny, out: Path) -> Path:
    """A diffusers-format LoRA on the tiny UNet's attention, with random (non-zero) weights."""
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    pipe = StableDiffusionPipeline.from_pretrained(str(tiny))
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                                     target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    StableDiffusionPipeline.save_lora_weights(str(out), unet_lora_layers=get_peft_model_state_dict(pipe.unet),
                                              safe_serialization=True)
    return out / "pytorch_lora_weights.safetensors"


def test_a_lora_changes_the_image_and_weight_zero_does_not(tiny, tmp_path):
    lora = make_lora(tiny, tmp_path / "lora")
    plain, rd0, _ = run(tiny, tmp_path, "plain")
    styled, rd1, _ = run(tiny, tmp_path, "styled", loras=f"{lora}:1")
    zero, rd2, _ = run(tiny, tmp_path, "zero", loras=f"{lora}:0")
    again, rd3, _ = run(tiny, tmp_path, "again")  # the cached pipeline is plain again after a LoRA job
    assert np.abs(pixels(rd1, styled) - pixels(rd0, plain)).mean() > 1
    assert np.abs(pixels(rd2, zero) - pixels(rd0, plain)).max() <= 1
    assert (pixels(rd3, again) == pixels(rd0, plain)).all()
    got = parse_parameters(read_png_parameters(rd1 / styled["images"][0]))
    assert got["loras"] == f"{lora}:1" and "pytorch_lora_weights" in got["lora_hashes"]


@pytest.mark.parametrize("params, says", [
    ({"init_image": "NOT_IMAGE"}, "not an image PIL can read"),
    ({"init_image": "ONE_PX"}, "1x1 pixels, too small"),
    ({"init_image": "/nonexistent/cat.png"}, "not found"),
    ({"mask": "MASK"}, "mask needs init_image"),
    ({"width": 100}, "multiple of 8"),
    ({"sampler": "Heun++"}, "sampler must be one of"),
    ({"loras": "/nonexistent/style.safetensors:0.8"}, "neither a .safetensors file nor a paint_lora job"),
    ({"model": "/nonexistent/model.safetensors"}, "neither a preset"),
    ({"model": "LORA_FILE"}, "holds no Stable Diffusion UNet"),
])
def test_bad_inputs_are_refused_plainly(studio, tiny, pics, params, says):
    names = {"NOT_IMAGE": pics["not_image"], "ONE_PX": pics["one_px"], "MASK": pics["mask"],
             "LORA_FILE": pics["lora_file"]}
    params = {k: str(names.get(v, v)) if isinstance(v, str) else v for k, v in params.items()}
    before = len(studio.jobs(limit=10_000))
    with pytest.raises(ValueError, match=says) as e:
        studio.submit("paint", {"model": str(tiny), "prompt": "x"} | params)
    assert len(str(e.value)) < 400
    assert len(studio.jobs(limit=10_000)) == before


def test_the_gate_refuses_sdxl_at_2048_on_a_small_card_with_a_change_that_fits():
    """From the preset's config alone (nothing downloaded): SDXL 1024 fits a 12 GB card with its flags; 2048² does
    not fit 8 GiB, and the refusal names a change that does."""
    from conftest import FakeNvml

    from studio.gate import Refused, full_estimate, gate

    card = FakeNvml(total=12 * GiB, free=12 * GiB).read()
    sdxl = build(G.Params, {"model": "sdxl-base-1.0"})
    est = gate(sdxl, G.estimate, card, 11 * GiB, G.shrink)
    assert 7.5 * GiB < est.total < 11 * GiB, est.describe()
    assert "VAE tiling" in est.note and "text encoders off the GPU" in est.note and "fp16" in est.note
    sd15 = full_estimate(build(G.Params, {"model": "sd15"}), G.estimate, card)
    assert 3.4 * GiB < sd15.total < 4.6 * GiB, sd15.describe()  # measured ~3.9 GiB at 512 with CFG
    big = build(G.Params, {"model": "sdxl-base-1.0", "width": 2048, "height": 2048})
    with pytest.raises(Refused) as e:
        gate(big, G.estimate, card, 8 * GiB, G.shrink)
    change = e.value.suggestion
    assert change and "Fits with" in e.value.reason
    fitted = full_estimate(replace(big, **change), G.estimate, card)
    assert fitted.total <= 8 * GiB and (change.get("width", 2048) < 2048 or change.get("memory") == "offload")


def test_the_paint_tab_generates_restores_a_png_and_lists_past_images(studio, tiny, pics):
    from conftest import serve
    from gradio_client import Client, handle_file

    url, demo = serve(studio, show_error=True)
    try:
        client = Client(url, verbose=False)
        status, preview, images, info = client.predict(  # the job id is session State, not an API output
            model=str(tiny), prompt="a blue circle", negative_prompt="red", width=SIZE, height=SIZE, steps=4,
            cfg=6, sampler="DDIM", seed=11, batch=1, loras="", init_image=None, strength=0.75, mask=None,
            memory="auto", api_name="/paint_generate")
        assert "DONE" in status and len(images) == 1 and "memory flags" in info and "seed **11**" in info
        job = studio.jobs(kind="paint", limit=1)[0]
        assert job.params["seed"] == 11 and job.params["sampler"] == "DDIM"
        png = studio.run_dir(job.id) / job.result["images"][0]
        assert Path(preview).name == png.name and Path(images[0]["image"]).name == png.name
        restored = client.predict(handle_file(str(png)), api_name="/paint_restore")
        assert tuple(restored[:8]) == ("a blue circle", "red", SIZE, SIZE, 4, 6, "DDIM", 11)
        with pytest.raises(Exception, match="carries no generation settings|not an image"):
            client.predict(handle_file(str(pics["init"])), api_name="/paint_restore")
        past = client.predict(api_name="/paint_history")
        assert any(Path(item["image"]).name == png.name for item in past)
        # a reloaded page gets the form as it was last used (FORMS) and the user's past images (fill)
        attached = [v.get("value") if isinstance(v, dict) else v
                    for v in Client(url, verbose=False).predict(api_name="/paint_attach")]
        assert "a blue circle" in attached and "DDIM" in attached and 11 in attached
        filled = client.predict(api_name="/paint_fill")
        assert any(Path(item["image"]).name == png.name for item in filled[0])
    finally:
        demo.close()


@pytest.fixture(scope="module")
def tiny_xl(tmp_path_factory) -> Path:
    from paint_fixtures import make_tiny_sdxl

    return make_tiny_sdxl(tmp_path_factory.mktemp("paint-xl") / "tiny-sdxl")


def test_an_sdxl_folder_paints_text_to_image_and_img2img_with_its_pooled_embeddings(tiny_xl, tmp_path, pics):
    info = P.model_info(str(tiny_xl))
    assert info["arch"] == "sdxl" and info["text"] > 0  # both text encoders counted
    a, rda, seen = run(tiny_xl, tmp_path, "xl-a", steps=3, negative_prompt="dull")
    b, rdb, _ = run(tiny_xl, tmp_path, "xl-b", steps=3, negative_prompt="dull")
    assert (pixels(rda, a) == pixels(rdb, b)).all() and pixels(rda, a).std() > 0
    assert any(t == "preview" for t, _ in seen)
    i2i, rdi, _ = run(tiny_xl, tmp_path, "xl-i2i", steps=4, init_image=str(pics["init"]), strength=0.5)
    assert i2i["mode"] == "img2img" and np.abs(pixels(rdi, i2i) - pixels(rda, a)).mean() > 1
    unguided, rdu, _ = run(tiny_xl, tmp_path, "xl-cfg1", steps=3, cfg=1.0)  # no negative embeddings at all
    assert np.abs(pixels(rdu, unguided) - pixels(rda, a)).mean() > 0


def test_a_remote_user_names_only_her_own_loras(tiny, tmp_path):
    """Each LoRA of `loras` is checked (studio.access through paint.path_items), weights and commas included: one
    of her uploads next to a server path is refused, and so is another user's paint_lora job id."""
    from studio import Config, Studio
    from studio.access import Forbidden, user_dir

    s = Studio(Config.load(tmp_path / "d"))
    s.admin = "ann"
    s.store.set_paused(True)  # nothing runs
    mine = user_dir(s.config.users_dir, "bob") / "up1" / "style.safetensors"
    mine.parent.mkdir(parents=True)
    mine.write_bytes(b"x")
    model = user_dir(s.config.users_dir, "bob") / "up2" / "tiny-sd"
    import shutil

    shutil.copytree(tiny, model)
    for loras in (f"{mine}:0.8, /etc/hostname:1", f"{mine}:0.8\n../../../etc/hostname"):
        with pytest.raises(Forbidden, match="not in your uploads"):
            s.submit("paint", {"model": str(model), "prompt": "x", "loras": loras}, owner="bob")
    anns = s.submit("paint", {"model": str(tiny), "prompt": "x"}, owner="ann")
    with pytest.raises(Forbidden, match="not one of yours"):
        s.submit("paint", {"model": str(model), "prompt": "x", "loras": f"{mine}:1, {anns.id}:0.5"}, owner="bob")
    assert [j.owner for j in s.jobs()] == ["ann"]


def test_a_refused_paint_offers_its_fitting_change_in_the_form(studio):
    """Over the budget (SDXL at 2048² on a 20 GiB budget — on the CPU: fp32 and no offload —, from the preset config:
    nothing is downloaded), the tab's Apply button offers the gate's change in the form's words."""
    from tabs.common import offer_fix
    from tabs.paint import FIX_INPUTS

    job = studio.submit("paint", {"model": "sdxl-base-1.0", "width": 2048, "height": 2048}, budget_bytes=20 * GiB)
    assert job.status is JobStatus.REFUSED and "Fits with" in job.error
    button, offered = offer_fix(studio, job.id, None, FIX_INPUTS)
    assert button["visible"] and button["value"].startswith("Apply: ")
    assert offered and offered["width"] < 2048 and offered["height"] < 2048
    assert button["value"] == f"Apply: Width {offered['width']}, Height {offered['height']}"


# the file listings of the two preset repos on the Hub: every weight as fp32 and fp16 safetensors and .bin, exports
# (ONNX, Flax, OpenVINO) and the single-file checkpoints beside the diffusers folders
_W = ("{c}/diffusion_pytorch_model{v}.safetensors", "{c}/diffusion_pytorch_model{v}.bin")
_T = ("{c}/model{v}.safetensors", "{c}/pytorch_model{v}.bin")
HUB_FILES = {
    "sd15": ["README.md", "model_index.json", "v1-inference.yaml", "v1-5-pruned.ckpt", "v1-5-pruned.safetensors",
             "v1-5-pruned-emaonly.ckpt", "v1-5-pruned-emaonly.safetensors",
             "feature_extractor/preprocessor_config.json",
             "scheduler/scheduler_config.json", "unet/diffusion_pytorch_model.non_ema.bin",
             "unet/diffusion_pytorch_model.non_ema.safetensors",
             *(f"tokenizer/{n}" for n in ("merges.txt", "special_tokens_map.json", "tokenizer_config.json",
                                          "vocab.json")),
             *(f.format(c=c, v=v) for c in ("unet", "vae") for f in _W for v in ("", ".fp16")),
             *(f.format(c=c, v=v) for c in ("text_encoder", "safety_checker") for f in _T for v in ("", ".fp16")),
             *(f"{c}/config.json" for c in ("unet", "vae", "text_encoder", "safety_checker"))],
    "sdxl-base-1.0": ["README.md", "LICENSE.md", "01.png", "model_index.json", "sd_xl_base_1.0.safetensors",
                      "sd_xl_base_1.0_0.9vae.safetensors", "sd_xl_offset_example-lora_1.0.safetensors",
                      "scheduler/scheduler_config.json",
                      *(f"{t}/{n}" for t in ("tokenizer", "tokenizer_2") for n in (
                          "merges.txt", "special_tokens_map.json", "tokenizer_config.json", "vocab.json")),
                      *(f"{c}/{n}" for c in ("unet", "vae", "vae_1_0") for n in (
                          "config.json", "diffusion_pytorch_model.safetensors",
                          "diffusion_pytorch_model.fp16.safetensors", "diffusion_flax_model.msgpack")),
                      *(f"{c}/{n}" for c in ("text_encoder", "text_encoder_2") for n in (
                          "config.json", "model.safetensors", "model.fp16.safetensors", "flax_model.msgpack")),
                      *(f"{c}/{n}" for c in ("unet", "text_encoder", "text_encoder_2", "vae_decoder", "vae_encoder")
                        for n in ("model.onnx", "openvino_model.bin", "openvino_model.xml")),
                      "unet/model.onnx_data", "text_encoder_2/model.onnx_data", "vae_decoder/config.json",
                      "vae_encoder/config.json"],
}
MODEL_INDEX = {
    "sd15": {"_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.6.0",
             "feature_extractor": ["transformers", "CLIPImageProcessor"],
             "safety_checker": ["stable_diffusion", "StableDiffusionSafetyChecker"],
             "scheduler": ["diffusers", "PNDMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
             "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
             "vae": ["diffusers", "AutoencoderKL"]},
    "sdxl-base-1.0": {"_class_name": "StableDiffusionXLPipeline", "_diffusers_version": "0.19.0.dev0",
                      "force_zeros_for_empty_prompt": True, "add_watermarker": None,
                      "scheduler": ["diffusers", "EulerDiscreteScheduler"],
                      "text_encoder": ["transformers", "CLIPTextModel"],
                      "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
                      "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "CLIPTokenizer"],
                      "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]},
}


@pytest.mark.parametrize("preset", list(HUB_FILES))
def test_a_preset_download_fetches_exactly_the_files_paint_loads(preset, tmp_path, monkeypatch):
    """model_download's allow_patterns for an sd preset against what diffusers' from_pretrained asks the hub for when
    Paint loads that preset (load_pipeline's own call, over the repo's real file listing, hub calls faked): all of it,
    and nothing else (no fp32 copies, .bin, exports or single-file checkpoints)."""
    import json
    from types import SimpleNamespace

    import diffusers.pipelines.pipeline_utils as pu
    from diffusers import DiffusionPipeline
    from huggingface_hub.utils import filter_repo_objects

    from studio.params import build as build_params
    from workers.system import model_download

    listing = HUB_FILES[preset]
    allow, ignore = model_download.patterns(build_params(model_download.Params, {"preset": preset}))
    fetched = sorted(filter_repo_objects(listing, allow_patterns=allow, ignore_patterns=ignore))

    class Asked(Exception):  # stops the load once diffusers has said what it wants
        pass

    def hub_folder(files):
        folder = tmp_path / f"snapshot{len(files)}"
        for f in files:
            (folder / f).parent.mkdir(parents=True, exist_ok=True)
            (folder / f).write_text("")
        (folder / "model_index.json").write_text(json.dumps(MODEL_INDEX[preset]))
        return folder

    def load_with(files, device="cuda"):
        folder = hub_folder(files)
        monkeypatch.setattr(pu, "hf_hub_download", lambda repo, name, **kw: str(folder / name))
        try:
            G.load_pipeline(P.model_info(preset), device, offload=False)
        except Asked as e:
            return e.args[0]
        raise AssertionError("the load went past the download")

    def snapshot(repo, allow_patterns=None, ignore_patterns=None, **kw):
        raise Asked(set(filter_repo_objects(listing, allow_patterns=allow_patterns, ignore_patterns=ignore_patterns)))

    download = DiffusionPipeline.download.__func__

    def found(cls, *a, **kw):
        raise Asked(download(cls, *a, **kw))  # the folder: everything it wanted was there

    monkeypatch.setattr(pu, "_resolve_revision", lambda *a, **kw: None)
    monkeypatch.setattr(pu, "model_info", lambda repo, **kw: SimpleNamespace(
        siblings=[SimpleNamespace(rfilename=f) for f in listing]))
    monkeypatch.setattr(pu, "snapshot_download", snapshot)
    monkeypatch.setattr(DiffusionPipeline, "download", classmethod(found))

    wanted = load_with(["model_index.json"])  # nothing fetched yet: the files it asks the hub for
    assert isinstance(wanted, set) and sorted(wanted) == fetched
    assert load_with(["model_index.json"], "cpu") == wanted  # the CPU loads the same fp16 files, as fp32
    assert isinstance(load_with(fetched), Path)  # with what model_download fetched it asks for nothing more
    assert not [f for f in fetched if f.endswith((".bin", ".ckpt", ".onnx", ".msgpack"))
                or (f.endswith(".safetensors") and ".fp16." not in f)]
    assert {c for c in P.COMPONENTS if c in P.table()[preset]} <= {f.split("/")[0] for f in fetched if ".fp16." in f}
    assert model_download.patterns(build_params(model_download.Params, {"preset": "bge-small-en-v1.5"})) == (None,
                                                                                                             None)
