"""The `vision_chat` kind: the transformers path streams an answer about an image, keeps a multi-turn conversation
with its images, stops on Stop, and captions a folder (batch) into files Paint's LoRA training reads; bad images and
images that do not fit the context are refused plainly; the llama.cpp path's offline parts (presets, the projector
file, the handler per model); the gate sizes a LLaVA-1.5-7B on a 12 GB card from its preset. A tiny LLaVA built in the
test (tests/vision_fixtures.py); CPU, offline."""
import json
import shutil

import pytest
from conftest import FakeNvml, wait_for_event
from vision_fixtures import QUESTION, make_tiny_llava, write_images

from studio import GiB, JobStatus
from studio.gate import Refused, full_estimate, gate
from studio.params import build
from workers.vision import chat, model

pytestmark = pytest.mark.timeout(600)
GPU = FakeNvml().read()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_llava(tmp_path_factory.mktemp("vlm") / "tiny-llava")


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return write_images(tmp_path_factory.mktemp("vlm-images"))


def _tokens(studio, job_id):
    return [e["text"] for e in studio.events(job_id)[0] if e["type"] == "token"]


def test_answers_about_an_image_and_keeps_the_conversation_with_its_images(studio, tiny, images):
    from studio.conversations import Conversations

    job = studio.wait(studio.submit("vision_chat", {"model": str(tiny), "image": str(images["red"]),
                                                    "prompt": QUESTION, "conversation": "new", "max_tokens": 12,
                                                    "temperature": 0}).id, 300)
    assert job.status is JobStatus.DONE, job.error
    r = job.result
    assert r["backend"] == "hf" and r["answer"] and "".join(_tokens(studio, job.id)) == r["answer"]
    kept = studio.run_dir(job.id) / r["images"][0]
    assert kept.read_bytes() == images["red"].read_bytes()  # the conversation refers to the run's own copy
    cid = r["conversation"]
    convs = Conversations(studio.config.data_dir / "chat.db")
    msgs = convs.get(cid)["messages"]
    assert [m["role"] for m in msgs] == ["user", "assistant"] and msgs[0]["meta"]["images"] == [str(kept)]
    # greedy and the same image: the same answer (the image reached the model: another image answers otherwise)
    again = studio.wait(studio.submit("vision_chat", {"model": str(tiny), "image": str(images["red"]),
                                                      "prompt": QUESTION, "max_tokens": 12,
                                                      "temperature": 0}).id, 120)
    assert again.result["answer"] == r["answer"] and again.result["model_cached"]
    blue = studio.wait(studio.submit("vision_chat", {"model": str(tiny), "image": str(images["blue"]),
                                                     "prompt": QUESTION, "max_tokens": 12, "temperature": 0}).id, 120)
    assert blue.result["answer"] != r["answer"]
    # a follow-up without an image: the conversation's image is still in view, and the turn is kept
    follow = studio.wait(studio.submit("vision_chat", {"model": str(tiny), "prompt": "And the corner?",
                                                       "conversation": cid, "max_tokens": 6}).id, 120)
    assert follow.status is JobStatus.DONE, follow.error
    assert [m["role"] for m in convs.get(cid)["messages"]] == ["user", "assistant"] * 2


def test_stop_really_stops_and_keeps_the_partial_answer(studio, tiny, images, tmp_path):
    from studio.conversations import Conversations

    endless = tmp_path / "endless"
    shutil.copytree(tiny, endless)  # the same model that never samples an end-of-turn: only Stop or max_tokens end it
    gen = json.loads((endless / "generation_config.json").read_text())
    gen["eos_token_id"] = None
    (endless / "generation_config.json").write_text(json.dumps(gen))
    job = studio.submit("vision_chat", {"model": str(endless), "image": str(images["green"]), "prompt": "Talk.",
                                        "max_tokens": 450, "temperature": 1.0, "conversation": "new", "n_ctx": 512})
    wait_for_event(studio, job.id, "token")
    studio.cancel(job.id)
    done = studio.wait(job.id, 60)
    assert done.status is JobStatus.CANCELLED
    streamed = "".join(_tokens(studio, job.id))
    assert len(_tokens(studio, job.id)) < 450
    convs = Conversations(studio.config.data_dir / "chat.db")
    mine = [c for c in convs.list() if c["title"] == "Talk."]
    last = convs.get(mine[0]["id"])["messages"][-1]
    assert last["role"] == "assistant" and last["meta"]["stopped"] and last["content"].startswith(streamed)


def test_a_folder_is_captioned_image_by_image_into_files_paint_lora_reads(studio, tiny, images, tmp_path):
    from workers.paint.images import read_set

    folder = tmp_path / "set"
    (folder / "sub").mkdir(parents=True)
    write_images(folder, size=(80, 64))  # LoRA training wants at least 64 px a side
    for name in ("green", "blue"):
        (folder / f"{name}.png").unlink()
    (folder / "yellow.png").rename(folder / "sub" / "yellow.png")
    (folder / "broken.png").write_bytes(b"not an image at all")
    job = studio.wait(studio.submit("vision_chat", {"model": str(tiny), "image": str(folder), "prompt": "Caption it.",
                                                    "max_tokens": 8, "temperature": 0}).id, 300)
    assert job.status is JobStatus.DONE, job.error
    r = job.result
    assert r["answered"] == 2 and [f["image"] for f in r["failed"]] == ["broken.png"]
    assert "not a readable image" in r["failed"][0]["error"]
    rows = [json.loads(line) for line in open(r["answers_jsonl"])]
    assert [x["image"] for x in rows] == ["red.png", "sub/yellow.png"] and all(x["answer"] for x in rows)
    assert open(r["answers_csv"]).read().splitlines()[0] == "image,answer"
    got = read_set(r["captions_dir"], "", 64, False, tmp_path / "cache")
    assert sorted(i.caption for i in got.items) == sorted(x["answer"] for x in rows)


def test_bad_images_and_images_past_the_context_are_refused_plainly(studio, tiny, images, tmp_path):
    bad = tmp_path / "fake.png"
    bad.write_text("hello")
    cases = [({"image": str(tmp_path / "missing.png")}, "does not exist"),
             ({"image": str(bad)}, "fake.png is not a readable image"),
             ({"image": str(images["red"]), "prompt": " "}, "the prompt is empty"),
             ({"image": ",".join([str(images["red"])] * 9)}, "at most 8"),
             ({"image": str(images["red"]), "model": str(tmp_path)}, "has no config.json"),
             ({"image": str(images["red"]), "n_ctx": 256, "max_tokens": 250}, "Raise n_ctx to at least 512")]
    for extra, words in cases:
        with pytest.raises(ValueError, match=words):
            studio.submit("vision_chat", {"model": str(tiny), "prompt": QUESTION, **extra})
    # a text-only model folder is not a vision model
    text_only = tmp_path / "text"
    text_only.mkdir()
    (text_only / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    with pytest.raises(ValueError, match="not a vision-language model"):
        studio.submit("vision_chat", {"model": str(text_only), "prompt": QUESTION, "image": str(images["red"])})
    assert studio.submit("selftest", {}).status is JobStatus.QUEUED  # the studio keeps serving


# ---- the llama.cpp path, as far as it goes offline ---------------------------------------------------------------
def test_presets_resolve_with_their_projector_and_handler_and_offline_says_what_to_download(studio, images):
    ref = model.resolve("llava-1.5-7b-q4k")
    assert (ref.backend, ref.handler, ref.image_tokens) == ("gguf", "llava-1.5", 576)
    assert ref.preset["mmproj"] == "mmproj-model-f16.gguf" and ref.path is None  # not downloaded here
    assert model.resolve("qwen2-vl-2b-instruct-q4km").handler == "qwen2.5-vl"
    hf = model.resolve("llava-1.5-7b-hf")
    assert hf.backend == "hf" and hf.image_tokens == 576 and 0.5 * GiB < hf.vision_bytes < 0.7 * GiB
    import llama_cpp.llama_chat_format as lcf

    assert all(hasattr(lcf, cls) for cls in model.HANDLERS.values())  # every handler the studio names exists
    job = studio.wait(studio.submit("vision_chat", {"image": str(images["red"]), "prompt": QUESTION,
                                                    "model": "llava-1.5-7b-q4k"}).id, 120)
    assert job.status is JobStatus.FAILED
    assert "mys/ggml_llava-v1.5-7b" in job.error and "model_download --param preset=llava-1.5-7b-q4k" in job.error
    from workers.system.model_download import target

    assert target(build(__import__("workers.system.model_download", fromlist=["Params"]).Params,
                        {"preset": "llava-1.5-7b-q4k"}))[1] == "ggml-model-q4_k.gguf"


def test_a_local_gguf_needs_its_projector_and_gets_its_family_handler(tmp_path, images):
    from workers.chat.llm import ensure_local, resolve as resolve_llm

    gemma = ensure_local(resolve_llm("gemma-3-270m-packaged", tmp_path), tmp_path, lambda *a: None)
    folder = tmp_path / "m"
    folder.mkdir()
    shutil.copy(gemma, folder / "llava-v1.6-mistral-7b.Q4_K_M.gguf")
    with pytest.raises(ValueError, match="needs its projector file .*mmproj"):
        model.resolve(str(folder / "llava-v1.6-mistral-7b.Q4_K_M.gguf"))
    shutil.copy(gemma, folder / "mmproj-model-f16.gguf")
    ref = model.resolve(str(folder / "llava-v1.6-mistral-7b.Q4_K_M.gguf"))
    assert ref.mmproj == folder / "mmproj-model-f16.gguf" and ref.handler == "llava-1.6"
    with pytest.raises(ValueError, match="is a projector .*not the language model"):
        model.resolve(str(folder / "mmproj-model-f16.gguf"))
    with pytest.raises(ValueError, match="mmproj .* does not exist"):
        model.resolve(str(folder / "llava-v1.6-mistral-7b.Q4_K_M.gguf"), mmproj=str(folder / "none.gguf"))
    shutil.copy(gemma, folder / "mmproj-other.gguf")
    with pytest.raises(ValueError, match="2 projector files"):
        model.resolve(str(folder / "llava-v1.6-mistral-7b.Q4_K_M.gguf"))
    assert [model.handler_for(w) for w in ("qwen2vl Qwen2.5-VL-7B", "MiniCPM-V-2_6", "moondream2", "nanoLLaVA",
                                           "llava-v1.5-7b", "")] == \
        ["qwen2.5-vl", "minicpm-v-2.6", "moondream", "nanollava", "llava-1.5", "llava-1.5"]


# ---- the gate ----------------------------------------------------------------------------------------------------
def test_the_gate_counts_tower_projector_and_image_tokens_and_picks_gpu_layers():
    p = build(chat.Params, {"prompt": "hi", "model": "llava-1.5-7b-q4k", "n_ctx": 4096})
    est = full_estimate(p, chat.estimate, GPU)
    (key, held), = est.models.items()
    assert key.startswith("vlm:gguf:llava-1.5-7b-q4k")
    parts = model.memory(model.resolve("llava-1.5-7b-q4k"), 4096, -1, GPU)
    assert parts["vision"] == int(0.62e9) and parts["kv_cache"] == 2 * 32 * 4096 * 32 * 128 * 2
    assert 5.5 * GiB < est.total < 8 * GiB  # 4.1 GB of weights, 0.6 the projector, 2 GiB of KV at 4096 tokens
    fitted = chat.fit(p, GPU, 4 * GiB)  # a small budget: fewer layers on the GPU, as Chat does
    assert 0 < fitted.n_gpu_layers < 32
    # the transformers path in 4-bit: the measured 5.3 GiB NVML peak (incl. the CUDA context) at LLaVA-1.5-7B
    hf = build(chat.Params, {"prompt": "hi", "model": "llava-1.5-7b-hf", "n_ctx": 2048})
    assert 5.0 * GiB < full_estimate(hf, chat.estimate, GPU).total < 7.0 * GiB
    with pytest.raises(Refused) as refused:
        gate(hf, chat.estimate, GPU, 3 * GiB, chat.shrink, True)
    assert "needs" in refused.value.reason and refused.value.suggestion is None  # nothing smaller loads a 7B
    # GGUF with every layer asked for on a 5 GiB budget: refused, with a change that fits
    whole = build(chat.Params, {"prompt": "hi", "model": "llava-1.5-7b-q4k", "n_ctx": 4096, "n_gpu_layers": 32})
    with pytest.raises(Refused) as refused:
        gate(whole, chat.estimate, GPU, 5 * GiB, chat.shrink, True)
    change = refused.value.suggestion
    assert change and full_estimate(build(chat.Params, {**whole.__dict__, **change}), chat.estimate, GPU).total \
        <= 5 * GiB
