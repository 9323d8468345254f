"""paint_lora: a LoRA trained on a handful of images changes what the base paints (and weight 0 does not), is saved in
kohya's key layout with ss_ metadata and loads back through diffusers' load_lora_weights; a kohya-format file made
here loads too; prior-preservation class images are generated once and reused; Resume after a cancel continues on
the same loss curve; the image-set report; bad image sets get a clear error; the gate's suggestion fits."""
import json
import re

import pytest
from conftest import wait_for
from paint_fixtures import SIZE, make_image, make_tiny_sd

from studio import DeviceReading, JobStatus
from studio.config import GiB
from studio.gate import Refused, full_estimate, gate
from studio.params import build
from workers.paint import images, kohya
from workers.paint import lora_train as train

KOHYA_KEY = re.compile(r"^lora_(unet|te)_[a-z0-9_]+\.(lora_down\.weight|lora_up\.weight|alpha)$")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return make_tiny_sd(tmp_path_factory.mktemp("lora-sd") / "tiny-sd")


@pytest.fixture(scope="module")
def shots(tmp_path_factory):
    """Five red-tinted images with per-image captions (one left without: instance_prompt covers it)."""
    d = tmp_path_factory.mktemp("shots")
    for n in range(5):
        make_image(d / f"shot{n}.png", seed=n, colour=(220, 30, 30))
        if n:
            (d / f"shot{n}.txt").write_text(f"a photo of sks, red, shot {n}")
    return d


def params(base, shots, **kw):
    return {"base": str(base), "images": str(shots), "instance_prompt": "a photo of sks", "resolution": SIZE,
            "sample_every": 0, "threads": 2, **kw}


def pipe_of(base):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(base), safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def paint(pipe):
    import torch

    return pipe("a photo of sks", num_inference_steps=3, height=SIZE, width=SIZE, output_type="np",
                generator=torch.Generator().manual_seed(7)).images[0]


def losses(studio, job_id):
    return {e["step"]: e["loss"] for e in studio.events(job_id)[0] if e["type"] == "metric" and "loss" in e}


@pytest.fixture(scope="module")
def trained(studio, base, shots):
    job = studio.wait(studio.submit("paint_lora", params(base, shots, steps=30, lr=1e-3, train_text_encoder=True,
                                                         name="sks-style", sample_every=15, sample_steps=2,
                                                         checkpoint_every=10)).id, 600)
    assert job.status is JobStatus.DONE, job.error
    return job


def test_a_trained_lora_changes_the_output_and_weight_0_does_not(studio, base, trained):
    import numpy as np

    file = studio.run_dir(trained.id) / "sks-style.safetensors"
    assert trained.result["file"] == "sks-style.safetensors" and file.exists()
    pipe = pipe_of(base)
    without = paint(pipe)
    pipe.load_lora_weights(str(file), adapter_name="sks")
    # every module in the file became a LoRA layer in the UNet or the text encoder
    loaded = [n for m in (pipe.unet, pipe.text_encoder) for n, _ in m.named_modules() if n.endswith("lora_A.sks")]
    assert len(loaded) == trained.result["modules"] > 0
    with_lora = paint(pipe)
    assert np.abs(with_lora - without).max() > 1e-3
    pipe.set_adapters(["sks"], [0.0])
    assert np.abs(paint(pipe) - without).max() < 1e-6
    # the run showed its loss every step and fixed-seed samples at sample_every
    assert sorted(losses(studio, trained.id)) == list(range(1, 31))
    samples = [e for e in studio.events(trained.id)[0] if e["type"] == "sample"]
    assert [s["step"] for s in samples] == [15, 30]
    assert all((studio.run_dir(trained.id) / p).exists() for s in samples for p in s["paths"])


def test_the_file_is_in_kohya_layout_with_ss_metadata(studio, trained):
    from safetensors import safe_open

    file = studio.run_dir(trained.id) / "sks-style.safetensors"
    with safe_open(str(file), "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
        alpha = f.get_tensor(next(k for k in keys if k.endswith(".alpha")))
        down = f.get_tensor(next(k for k in keys if k.endswith(".lora_down.weight")))
    assert keys and all(KOHYA_KEY.match(k) for k in keys), [k for k in keys if not KOHYA_KEY.match(k)][:3]
    assert "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight" in keys
    assert "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_out_0.alpha" in keys
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight" in keys
    for k in [k for k in keys if k.endswith(".lora_down.weight")]:  # each module has its three tensors
        stem = k.removesuffix(".lora_down.weight")
        assert {stem + ".lora_up.weight", stem + ".alpha"} <= set(keys)
    assert down.shape[0] == 8 and float(alpha) == 8.0
    assert meta["ss_network_module"] == "networks.lora" and meta["ss_network_dim"] == "8"
    assert meta["ss_network_alpha"] == "8.0" and meta["ss_base_model_version"] == "sd_v1"
    assert meta["ss_steps"] == "30" and meta["ss_resolution"] == f"({SIZE}, {SIZE})"
    assert json.loads(meta["ss_tag_frequency"])  # the dataset's caption tags, as kohya writes them
    d = kohya.describe(file)
    assert d["ranks"] == [8] and d["unet_modules"] > 0 and d["te_modules"] > 0


def test_a_kohya_lora_made_here_loads_and_changes_the_output(base, tmp_path):
    """Named as sd-scripts names it (every Linear inside a Transformer2DModel and CLIP's attention/MLP), not by our
    own converter."""
    import numpy as np
    import torch
    from safetensors.torch import save_file

    pipe = pipe_of(base)
    without = paint(pipe)
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for prefix, root, holders in (("lora_unet", pipe.unet, ("Transformer2DModel",)),
                                  ("lora_te", pipe.text_encoder, ("CLIPAttention", "CLIPSdpaAttention", "CLIPMLP"))):
        for name, module in root.named_modules():
            if type(module).__name__ not in holders:
                continue
            for child, sub in module.named_modules():
                if isinstance(sub, torch.nn.Linear):
                    path = f"{name}.{child}"
                    if prefix == "lora_te" and not path.startswith("text_model."):
                        path = "text_model." + path  # kohya's (transformers 4's) name; transformers 5 drops it
                    stem = f"{prefix}.{path}".replace(".", "_")
                    tensors[stem + ".lora_down.weight"] = torch.randn(4, sub.in_features, generator=g) * 0.3
                    tensors[stem + ".lora_up.weight"] = torch.randn(sub.out_features, 4, generator=g) * 0.3
                    tensors[stem + ".alpha"] = torch.tensor(4.0)
    file = tmp_path / "made-here.safetensors"
    save_file({k: v.half() for k, v in tensors.items()}, str(file), metadata={"ss_network_dim": "4"})
    assert kohya.describe(file)["ranks"] == [4]
    pipe.load_lora_weights(str(file), adapter_name="made")
    loaded = {m: sum(n.endswith("lora_A.made") for n, _ in getattr(pipe, m).named_modules())
              for m in ("unet", "text_encoder")}
    assert loaded["unet"] == sum(k.startswith("lora_unet") and k.endswith(".alpha") for k in tensors)
    assert loaded["text_encoder"] == sum(k.startswith("lora_te") and k.endswith(".alpha") for k in tensors)
    assert np.abs(paint(pipe) - without).max() > 1e-3


def test_class_images_are_generated_once_and_reused(studio, base, shots):
    p = params(base, shots, steps=2, prior_preservation=True, class_prompt="a photo", num_class_images=3,
               sample_steps=2)
    first = studio.wait(studio.submit("paint_lora", p).id, 600)
    assert first.status is JobStatus.DONE, first.error
    folder = next((studio.config.data_dir / "paint" / "class_images").iterdir())
    made = sorted(folder.glob("class-*.png"))
    assert len(made) == 3 and first.result["class_images"] == 3
    stamps = [f.stat().st_mtime_ns for f in made]
    second = studio.wait(studio.submit("paint_lora", {**p, "seed": 5}).id, 600)
    assert second.status is JobStatus.DONE, second.error
    logs = [e["message"] for e in studio.events(second.id)[0] if e["type"] == "log"]
    assert any("reusing 3 class images" in m for m in logs), logs
    assert [f.stat().st_mtime_ns for f in sorted(folder.glob("class-*.png"))] == stamps
    from safetensors import safe_open

    with safe_open(str(studio.run_dir(second.id) / second.result["file"]), "pt") as f:
        assert f.metadata()["ss_num_reg_images"] == "3"


def test_resume_after_cancel_continues_on_the_same_loss_curve(studio, base, shots):
    from safetensors.torch import load_file

    p = params(base, shots, steps=24, checkpoint_every=100)
    straight = studio.wait(studio.submit("paint_lora", p).id, 600)
    assert straight.status is JobStatus.DONE, straight.error
    job = studio.submit("paint_lora", p)
    wait_for(lambda: len(losses(studio, job.id)) >= 5, 300, "five steps")
    studio.cancel(job.id)
    stopped = studio.wait(job.id, 120)
    assert stopped.status is JobStatus.CANCELLED
    saved = json.loads((studio.run_dir(job.id) / "checkpoint" / "state.json").read_text())["step"]
    assert 5 <= saved < 24
    resumed = studio.wait(studio.resume(job.id).id, 600)
    assert resumed.status is JobStatus.DONE, resumed.error
    after, before = losses(studio, resumed.id), losses(studio, straight.id)
    assert min(after) == saved + 1 and max(after) == 24
    for step, loss in after.items():  # same images, noise, timesteps and optimizer state: the same curve
        assert loss == pytest.approx(before[step], rel=1e-4), (step, loss, before[step])
    a = load_file(str(studio.run_dir(resumed.id) / resumed.result["file"]))
    b = load_file(str(studio.run_dir(straight.id) / straight.result["file"]))
    assert a.keys() == b.keys() and all((a[k].float() - b[k].float()).abs().max() < 1e-3 for k in a)


def test_a_changed_checkpoint_is_not_loaded(studio, base, shots):
    job = studio.wait(studio.submit("paint_lora", params(base, shots, steps=3, checkpoint_every=1)).id, 600)
    ckpt = studio.run_dir(job.id) / "checkpoint"
    state = json.loads((ckpt / "state.json").read_text())
    f = ckpt / state["lora"]
    f.write_bytes(f.read_bytes()[:-8] + b"\0" * 8)
    resumed = studio.wait(studio.submit("paint_lora", params(base, shots, steps=6, resume_from=job.id)).id, 300)
    assert resumed.status is JobStatus.FAILED and "changed since the studio wrote it" in resumed.error


# ---- the image set -------------------------------------------------------------------------------------------------
def test_the_report_counts_buckets_captions_repeats_duplicates_and_skips(tmp_path):
    from PIL import Image

    d = tmp_path / "set"
    make_image(d / "3_sks mug" / "square.png", size=512, seed=1)
    Image.new("RGB", (384, 640), (10, 200, 10)).save(d / "3_sks mug" / "portrait.png")
    Image.new("RGB", (768, 448), (10, 10, 200)).save(d / "landscape.jpg")
    (d / "landscape.txt").write_text("a wide shot, blue")
    (d / "empty.txt").write_text("   ")
    Image.new("RGB", (512, 512), (1, 2, 3)).save(d / "empty.png")
    (d / "copy.png").write_bytes((d / "3_sks mug" / "square.png").read_bytes())
    Image.new("RGB", (1, 1)).save(d / "dot.png")
    (d / "broken.png").write_bytes(b"not a png at all")
    (d / "orphan.txt").write_text("a caption whose image is missing")
    s = images.read_set(str(d), "a photo of sks", 512, True, tmp_path / "cache")
    r = s.report
    by_name = {i.path.name: i for i in s.items}
    assert set(by_name) == {"square.png", "portrait.png", "landscape.jpg", "empty.png"}
    assert by_name["square.png"].bucket == (512, 512) and by_name["square.png"].repeats == 3
    assert by_name["square.png"].caption == "sks mug"  # the repeat folder's concept when there is no .txt
    w, h = by_name["portrait.png"].bucket
    assert h > w and w % 64 == 0 and h % 64 == 0 and w * h <= 512 * 512
    w, h = by_name["landscape.jpg"].bucket
    assert w > h and by_name["landscape.jpg"].caption == "a wide shot, blue"
    assert by_name["empty.png"].caption == "a photo of sks"  # an empty .txt falls back to instance_prompt
    assert r["images"] == 4 and r["repeats"] == 3 + 3 + 1 + 1 and len(r["buckets"]) == 3
    assert r["empty_captions"] == ["empty.png"] and "3_sks mug/square.png" in r["missing_captions"]
    assert r["too_small"] == ["dot.png"] and r["captions_without_images"] == ["orphan.txt"]
    assert r["duplicates"] in (
        [["3_sks mug/square.png", "copy.png"]], [["copy.png", "3_sks mug/square.png"]])
    reasons = {x["file"]: x["reason"] for x in r["skipped"]}
    assert reasons["broken.png"].startswith("unreadable") and reasons["dot.png"].startswith("too small")
    assert r["sizes"]["portrait"] == 1 and r["sizes"]["landscape"] == 1
    # without bucketing every image trains square
    assert {i.bucket for i in images.read_set(str(d), "x", 512, False, tmp_path / "cache").items} == {(512, 512)}


def test_a_zip_is_read_like_its_folder(tmp_path, shots):
    import zipfile

    z = tmp_path / "shots.zip"
    with zipfile.ZipFile(z, "w") as f:
        for p in sorted(shots.iterdir()):
            f.write(p, f"10_sks/{p.name}")
    s = images.read_set(str(z), "a photo of sks", SIZE, True, tmp_path / "cache")
    assert s.report["images"] == 5 and s.report["repeats"] == 50


def _bad(tmp_path, name, make):
    d = tmp_path / name
    d.mkdir()
    make(d)
    return str(d)


@pytest.mark.parametrize("case,says", [
    ("not_an_image", "no usable image .*unreadable"),
    ("one_pixel", "no usable image .*too small: 1x1"),
    ("empty", "no images in"),
    ("captions_only", "caption file\\(s\\) but no images"),
])
def test_bad_image_sets_are_refused_at_submit_with_what_to_do(studio, base, tmp_path, case, says):
    from PIL import Image

    makers = {
        "not_an_image": lambda d: (d / "photo.png").write_text("this is text, not a PNG"),
        "one_pixel": lambda d: Image.new("RGB", (1, 1)).save(d / "dot.png"),
        "empty": lambda d: None,
        "captions_only": lambda d: (d / "a.txt").write_text("a photo of sks"),
    }
    before = len(studio.jobs(limit=10_000))
    with pytest.raises(ValueError, match=says):
        studio.submit("paint_lora", params(base, _bad(tmp_path, case, makers[case])))
    assert len(studio.jobs(limit=10_000)) == before


def test_other_bad_params_say_what_to_do(studio, base, shots, tmp_path):
    with pytest.raises(ValueError, match="multiple of 64"):
        studio.submit("paint_lora", params(base, shots, resolution=500))
    with pytest.raises(ValueError, match="needs a class_prompt"):
        studio.submit("paint_lora", params(base, shots, prior_preservation=True))
    with pytest.raises(ValueError, match="neither the .* preset nor a diffusers folder"):
        studio.submit("paint_lora", params(tmp_path, shots))
    with pytest.raises(ValueError, match="has no paint_lora checkpoint"):
        studio.submit("paint_lora", params(base, shots, resume_from="no-such-job"))


# ---- the gate ------------------------------------------------------------------------------------------------------
def cuda(total_gib):
    return DeviceReading(kind="cuda", name="Fake RTX", total=int(total_gib * GiB), used=0, free=int(total_gib * GiB),
                         studio_used=0, utilization=0, temperature=40, power_w=30.0, driver="fake", cuda="13.0")


def test_the_estimate_grows_with_resolution_batch_and_without_checkpointing():
    def total(**kw):
        return train.estimate(build(train.Params, {"images": "x", **kw}), cuda(24)).total

    assert total(resolution=768) > total() > total(resolution=384)
    assert total(gradient_checkpointing=False) > total() and total(batch_size=4) > total()
    assert total(mixed_precision="no") > total() + 1.5 * GiB  # SD 1.5's 1 B frozen params at 4 bytes, not 2
    assert total(train_text_encoder=True) > total()
    assert 2.5 * GiB < full_estimate(build(train.Params, {"images": "x"}), train.estimate, cuda(12)).total < 6 * GiB


def test_the_gate_refuses_a_run_that_does_not_fit_and_suggests_one_that_does():
    big = {"images": "x", "resolution": 1024, "batch_size": 4, "gradient_checkpointing": False,
           "mixed_precision": "no", "train_text_encoder": True}
    with pytest.raises(Refused) as r:
        gate(build(train.Params, big), train.estimate, cuda(8), 6 * GiB, train.shrink)
    s = r.value.suggestion
    assert s and "Fits with" in r.value.reason, r.value.reason
    assert full_estimate(build(train.Params, {**big, **s}), train.estimate, cuda(8)).total <= 6 * GiB
    assert s["mixed_precision"] == "fp16" and s["gradient_checkpointing"] is True


# ---- the Train LoRA sub-tab through gradio_client -----------------------------------------------------------------
@pytest.fixture(scope="module")
def served(studio):
    from conftest import serve

    url, demo = serve(studio, show_error=True)
    yield url
    demo.close()


def test_train_lora_tab_trains_shows_the_report_and_use_in_paint_fills_generate(served, studio, base, shots,
                                                                                tmp_path):
    from gradio_client import Client, handle_file
    from PIL import Image

    client = Client(served, verbose=False)
    files = [handle_file(str(f)) for f in sorted(shots.iterdir())]
    form = dict(t_folder="", t_base=str(base), t_instance_prompt="a photo of sks", t_class_prompt="",
                t_prior_preservation=False, t_num_class_images=10, t_name="tab-lora", t_rank=4, t_alpha=4, t_lr=1e-3,
                t_steps=4, t_batch_size=1, t_resolution=SIZE, t_bucketing=True, t_train_text_encoder=False,
                t_gradient_checkpointing=False, t_mixed_precision="fp16", t_optimizer="adamw", t_sample_every=2,
                t_sample_prompts="a photo of sks", t_seed=3)
    checked = client.predict(t_files=files, t_folder="", t_instance_prompt="a photo of sks", t_resolution=SIZE,
                             t_bucketing=True, api_name="/paint_lora_check")  # the report before any training
    assert "**5 images**" in checked and "no .txt caption: `shot0.png`" in checked
    assert not studio.jobs(limit=1, kind="paint_lora") or studio.jobs(limit=1, kind="paint_lora")[0].params.get(
        "name") != "tab-lora"
    dot = tmp_path / "dot.png"
    Image.new("RGB", (1, 1)).save(dot)
    with pytest.raises(Exception, match="too small: 1x1"):
        client.predict(t_files=[handle_file(str(dot))], t_folder="", t_instance_prompt="x", t_resolution=SIZE,
                       t_bucketing=True, api_name="/paint_lora_check")
    status, plot, samples, report, result, file = client.predict(t_files=files, **form,
                                                                 api_name="/paint_lora_train")
    assert "DONE" in status, status
    assert "**5 images**" in report and f"`{SIZE}x{SIZE}` ×5" in report and "no .txt caption: `shot0.png`" in report
    assert "tab-lora.safetensors" in result and "kohya" in result
    assert file and str(file).endswith("tab-lora.safetensors") and len(samples) == 2
    job = studio.jobs(limit=1, kind="paint_lora")[0]
    assert job.status is JobStatus.DONE and job.params["rank"] == 4 and job.params["resolution"] == SIZE
    loras = client.predict(loras="", api_name="/paint_lora_use")  # the Tabs switch has no value for a client
    assert loras == f"{job.id}:1", loras
    # Generate with what Use in Paint filled in: the paint kind loads the LoRA from the job
    out = client.predict(model=str(base), prompt="a photo of sks", negative_prompt="", width=SIZE, height=SIZE,
                         steps=2, cfg=5, sampler="Euler", seed=1, batch=1, loras=loras, init_image=None, strength=0.75,
                         mask=None, memory="auto", api_name="/paint_generate")
    painted = studio.jobs(limit=1, kind="paint")[0]
    assert painted.status is JobStatus.DONE and job.id in painted.params["loras"], (painted.error, out)


# ---- out of memory ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def oom_kind():
    from studio import registry

    if "test_paint_oom" not in registry.WORKERS:
        registry.register("test_paint_oom", "helpers_paint")
    return "test_paint_oom"


@pytest.fixture(scope="module")
def four(tmp_path_factory):
    """Four same-size images: every step of batch_size 4 holds all four."""
    d = tmp_path_factory.mktemp("four")
    for n in range(4):
        make_image(d / f"img{n}.png", seed=10 + n, colour=(30, 30, 220))
    return d


def test_out_of_memory_saves_halves_the_images_per_pass_and_finishes(studio, base, four, oom_kind):
    from safetensors import safe_open

    p = params(base, four, steps=6, batch_size=4, checkpoint_every=100)
    straight = studio.wait(studio.submit("paint_lora", p).id, 600)
    job = studio.wait(studio.submit(oom_kind, {**p, "oom_at": 3, "oom_from": 4}).id, 600)
    assert job.status is JobStatus.DONE, job.error
    ooms = [e for e in studio.events(job.id)[0] if e["type"] == "oom"]
    assert [(e["step"], e["micro_batch"], e["batch_size"]) for e in ooms] == [(3, 2, 4)]
    assert "saved a checkpoint at step 3, 2 image(s) per pass now" in ooms[0]["message"]
    got, before = losses(studio, job.id), losses(studio, straight.id)
    assert sorted(got) == list(range(1, 7))  # continued: steps 4..6 once each, none repeated, none skipped
    for step in (1, 2, 3):  # the same run until the out-of-memory
        assert got[step] == pytest.approx(before[step], rel=1e-5)
    assert got[4] == pytest.approx(before[4], rel=0.2)  # two passes of 2 accumulated: the same batch's mean loss
    assert job.result["micro_batch"] == 2 and job.result["ooms"] == 1 and job.result["steps"] == 6
    with safe_open(str(studio.run_dir(job.id) / job.result["file"]), "pt") as f:
        meta = f.metadata()
    assert (meta["ss_batch_size_per_device"], meta["ss_gradient_accumulation_steps"], meta["ss_total_batch_size"]) \
        == ("2", "2", "4")
    assert json.loads((studio.run_dir(job.id) / "checkpoint" / "state.json").read_text())["micro_batch"] == 2


def test_out_of_memory_at_one_image_per_pass_stops_with_what_to_lower(studio, base, four, oom_kind):
    job = studio.wait(studio.submit(oom_kind, params(base, four, steps=6, batch_size=2, checkpoint_every=100,
                                                     oom_at=2, oom_from=1)).id, 600)
    assert job.status is JobStatus.FAILED
    assert "Out of memory at step 3 with 1 image per pass" in job.error
    assert "optimizer=adamw8bit" in job.error and "lower resolution (now 64" in job.error
    assert "checkpoint at step 2 is kept" in job.error
    assert [e["micro_batch"] for e in studio.events(job.id)[0] if e["type"] == "oom"] == [1]
    state = json.loads((studio.run_dir(job.id) / "checkpoint" / "state.json").read_text())
    assert state["step"] == 2 and state["micro_batch"] == 1
