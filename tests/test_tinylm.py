"""Tiny LM: the model, KV cache, position schemes, tokenizers, checkpoints and bad inputs."""
import json

import pytest
import torch
from conftest import TINY

from studio import JobStatus
from workers.tinylm.train import load_checkpoint, save_checkpoint
from workers.tinylm.data import BpeTokenizer, CharTokenizer
from workers.tinylm.model import GPT, GPTConfig, generate


@pytest.mark.parametrize("pos", ["learned", "rope", "alibi"])
@pytest.mark.parametrize("new_tokens", [20, 60])  # inside, then well past, the 32-token context
def test_kv_cache_matches_no_cache_token_for_token(pos, new_tokens):
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=50, block_size=32, n_layer=2, n_head=4, n_embd=32, pos=pos)).double()
    prompt = torch.randint(0, 50, (1, 7))
    greedy = [generate(model, prompt, new_tokens, temperature=0, use_cache=c) for c in (True, False)]
    assert torch.equal(greedy[0], greedy[1])
    sampled = [generate(model, prompt, new_tokens, temperature=1.0, top_k=10, use_cache=c,
                        generator=torch.Generator().manual_seed(3)) for c in (True, False)]
    assert torch.equal(sampled[0], sampled[1])


def test_alibi_and_rope_use_no_learned_positions():
    for pos in ("rope", "alibi"):
        m = GPT(GPTConfig(vocab_size=20, block_size=16, n_layer=1, n_head=2, n_embd=16, pos=pos))
        assert m.wpe is None
        assert m.head.weight is m.tok.weight  # tied


def test_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=30, block_size=16, n_layer=1, n_head=2, n_embd=16)
    model = GPT(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randint(0, 30, (2, 16))
    model(x, x)[1].backward()
    opt.step()
    save_checkpoint(tmp_path, model, opt, {"step": 7})
    other = GPT(cfg)
    opt2 = torch.optim.AdamW(other.parameters(), lr=1e-3)
    state = load_checkpoint(tmp_path, other, opt2)
    assert state["step"] == 7
    for a, b in zip(model.state_dict().values(), other.state_dict().values()):
        assert torch.equal(a, b)
    s1, s2 = opt.state_dict()["state"][0], opt2.state_dict()["state"][0]
    assert torch.equal(s1["exp_avg"], s2["exp_avg"])
    assert not list(tmp_path.glob("*.pt"))  # no pickles


def test_tokenizers(corpus):
    text = corpus.read_text()
    ch = CharTokenizer.train(text)
    assert ch.decode(ch.encode(text[:200])) == text[:200]
    with pytest.raises(ValueError, match="never saw"):
        ch.encode("Zebra ✓")
    bpe = BpeTokenizer.train(text, 300)
    ids = bpe.encode(text[:500])
    assert bpe.decode(ids) == text[:500] and len(ids) < 500  # merges compress


@pytest.mark.parametrize("pos", ["rope", "alibi", "learned"])
def test_loss_falls_for_each_position_scheme(studio, corpus, pos):
    job = studio.wait(studio.submit("tinylm", {"data": str(corpus), "pos": pos, "max_steps": 120, "lr": 3e-3,
                                                **TINY}).id, 300)
    assert job.status is JobStatus.DONE, job.error
    metrics = [e for e in studio.events(job.id)[0] if e["type"] == "metric"]
    assert len(metrics) == 6
    first, last = metrics[0]["val_loss"], metrics[-1]["val_loss"]
    assert last < first - 0.4, (first, last)
    assert last < 2.2  # far below the ~3.3 of a uniform guess over the corpus's characters
    m = metrics[-1]
    assert m["perplexity"] == pytest.approx(2.718281828 ** m["val_loss"], rel=1e-6) and m["tokens_per_s"] > 0
    assert any(e["type"] == "sample" and e["text"] for e in studio.events(job.id)[0])
    card = json.loads((studio.run_dir(job.id) / "run.json").read_text())
    assert card["params"]["pos"] == pos and len(card["data_hash"]) == 64 and "torch" in card["versions"]
    assert job.peak_bytes > 0 and job.result["n_params"] > 0


def test_target_val_loss_stops_early_and_generation_uses_the_cache(studio, corpus):
    job = studio.wait(studio.submit("tinylm", {"data": str(corpus), "max_steps": 2000, "target_val_loss": 2.3,
                                                "lr": 3e-3, **TINY}).id, 300)
    assert job.status is JobStatus.DONE and job.result["reached_target"]
    assert job.result["steps"] < 2000 and job.result["val_loss"] <= 2.3
    gen = [studio.wait(studio.submit("tinylm_generate", {"checkpoint": job.id, "prompt": "The king",
                                                         "max_new_tokens": 40, "seed": 5, "kv_cache": c}).id, 120)
           for c in (True, False)]
    assert all(g.status is JobStatus.DONE for g in gen)
    assert gen[0].result["text"] == gen[1].result["text"]  # same seed, with and without the cache
    assert gen[0].result["text"].startswith("The king") and len(gen[0].result["completion"]) == 40
    assert gen[0].result["model_cached"] is False and gen[1].result["model_cached"] is True  # loaded once
    bad = studio.wait(studio.submit("tinylm_generate", {"checkpoint": job.id, "prompt": "Zebra ✓"}).id, 60)
    assert bad.status is JobStatus.FAILED and "never saw" in bad.error


def test_bpe_tokenizer_trains(studio, corpus):
    job = studio.wait(studio.submit("tinylm", {"data": str(corpus), "tokenizer": "bpe", "vocab_size": 300,
                                                "max_steps": 40, **TINY}).id, 300)
    assert job.status is JobStatus.DONE, job.error
    tok = json.loads((studio.run_dir(job.id) / "checkpoint" / "tokenizer.json").read_text())
    assert tok["type"] == "bpe"


def test_folder_of_code_is_a_corpus(studio, tmp_path, corpus):
    src = tmp_path / "project"
    (src / "pkg").mkdir(parents=True)
    (src / "pkg" / "a.py").write_text(corpus.read_text()[:30000])
    (src / "b.md").write_text(corpus.read_text()[30000:])
    (src / "logo.png").write_bytes(b"\x89PNG\x00\x00binary")
    (src / ".git").mkdir()
    (src / ".git" / "HEAD").write_text("ref: refs/heads/main")
    job = studio.wait(studio.submit("tinylm", {"data": str(src), "max_steps": 20, **TINY}).id, 300)
    assert job.status is JobStatus.DONE, job.error
    card = json.loads((studio.run_dir(job.id) / "run.json").read_text())
    assert "2 files" in card["data"]


def test_bad_inputs_give_clear_errors_and_nothing_breaks(studio, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    binary = tmp_path / "model.bin"
    binary.write_bytes(bytes(range(256)) * 100)
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("café".encode("latin-1") * 10)
    short = tmp_path / "short.txt"
    short.write_text("To be or not to be.\n" * 10)
    before = len(studio.jobs())
    for path, msg in [(empty, "is empty"), (binary, "binary file, not text"), (latin, "not UTF-8"),
                      (tmp_path / "missing.txt", "not found")]:
        with pytest.raises(ValueError, match=msg):
            studio.submit("tinylm", {"data": str(path)})
    assert len(studio.jobs()) == before  # nothing queued
    job = studio.wait(studio.submit("tinylm", {"data": str(short), **TINY}).id, 120)
    assert job.status is JobStatus.FAILED and "too short" in job.error
    with pytest.raises(ValueError, match="no Tiny LM checkpoint"):
        studio.submit("tinylm_generate", {"checkpoint": "no-such-job"})
    assert studio.wait(studio.submit("selftest", {}).id, 60).status is JobStatus.DONE


def test_tinyshakespeare_download_checks_its_sha256_and_explains_offline(tmp_path, monkeypatch):
    """The real download code against local file:// URLs (tests never touch the network)."""
    import hashlib

    from workers.tinylm import data as tinylm_data

    src = tmp_path / "input.txt"
    src.write_text("First Citizen:\nBefore we proceed any further, hear me speak.\n" * 200)
    seen = []
    monkeypatch.setattr(tinylm_data, "TINYSHAKESPEARE_URL", src.as_uri())
    with pytest.raises(RuntimeError, match="corrupt"):  # the pinned checksum is the real corpus's
        tinylm_data.ensure_tinyshakespeare(tmp_path / "ds", lambda *a: seen.append(a))
    assert not (tmp_path / "ds" / "tinyshakespeare.txt").exists()
    monkeypatch.setattr(tinylm_data, "TINYSHAKESPEARE_SHA256", hashlib.sha256(src.read_bytes()).hexdigest())
    path = tinylm_data.ensure_tinyshakespeare(tmp_path / "ds", lambda *a: seen.append(a))
    assert path.read_bytes() == src.read_bytes() and seen[-1][0] == src.stat().st_size
    monkeypatch.setattr(tinylm_data, "TINYSHAKESPEARE_URL", (tmp_path / "nowhere.txt").as_uri())
    assert tinylm_data.ensure_tinyshakespeare(tmp_path / "ds", print) == path  # cached: no second download
    with pytest.raises(RuntimeError, match="Could not download TinyShakespeare.*save input.txt"):
        tinylm_data.ensure_tinyshakespeare(tmp_path / "other", print)


def test_the_default_corpus_is_on_disk(studio):
    """A first click needs no download: the default data is Python code from the standard library."""
    from workers.tinylm.data import load_text

    job = studio.submit("tinylm", {"max_steps": 20, **TINY})
    assert job.params["data"] == "python-stdlib"
    job = studio.wait(job.id, 300)
    assert job.status is JobStatus.DONE, job.error
    card = json.loads((studio.run_dir(job.id) / "run.json").read_text())
    assert card["data"].startswith("Python standard library (31 modules)")
    text, _ = load_text("python-stdlib", studio.config.datasets_dir, print)
    assert 900_000 < len(text) < 1_300_000 and "def " in text  # the size of TinyShakespeare, and code


def test_live_plot_waits_for_points_and_rebuilds_when_a_series_appears():
    """Gradio's LinePlot fixes its colour domain when it mounts: an empty first frame left every line unstroked, so
    the stream sends None until there are points, and a colour map (which rebuilds the plot) when a series is new."""
    from tabs.common import LivePlot

    plot = LivePlot(("train_loss", "val_loss"))
    assert plot([{"type": "log", "message": "x"}]) is None
    first = plot([{"type": "metric", "step": 10, "train_loss": 2.0}])
    assert list(first["series"]) == ["train_loss"]  # a plain frame: the plot mounts with what it holds
    both = [{"type": "metric", "step": 10, "train_loss": 2.0}, {"type": "metric", "step": 20, "train_loss": 1.8,
                                                                  "val_loss": 1.9}]
    grown = plot(both)
    assert grown["__type__"] == "update" and set(grown["color_map"]) == {"train_loss", "val_loss"}
    assert set(grown["value"]["series"]) == {"train_loss", "val_loss"}
    assert list(plot(both)["series"]) == ["train_loss", "train_loss", "val_loss"]  # same series: a plain frame


def _until(pred, what: str, timeout: float = 120):
    import time

    t0 = time.time()
    while not (out := pred()):
        assert time.time() - t0 < timeout, f"timed out waiting for {what}"
        time.sleep(0.1)
    return out


def test_resume_from_the_tab_continues_a_cancelled_run_and_the_tab_follows_it(studio, corpus):
    """The Tiny LM tab's Resume (/tinylm_resume) continues a run its Cancel stopped from the checkpoint, as a new job
    the tab follows: its status streams, and the tab's Cancel then stops that new job. A new page with no job of its
    own resumes the newest stopped run."""
    from conftest import serve
    from gradio_client import Client

    url, demo = serve(studio, show_error=True)
    try:
        client = Client(url, verbose=False)
        before = {j.id for j in studio.jobs(kind="tinylm")}
        train = client.submit(
            data_source="Folder on this machine", files=None, folder=str(corpus), preset="cpu-quick", pos="rope",
            tokenizer="char", max_steps=100_000, target_val_loss=0, batch_size=8, block_size=32, n_layer=2, n_head=2,
            n_embd=32, lr=0.003, api_name="/tinylm_train")
        job = _until(lambda: [j for j in studio.jobs(kind="tinylm") if j.id not in before], "the Train job")[0]
        _until(lambda: (studio.job(job.id).progress or 0) > 0, "the first steps")
        _until(lambda: any(job.id in str(o) for o in train.outputs()), "the tab to stream the job")
        assert "Resume continues" in client.predict(api_name="/tinylm_cancel")  # the tab's own job
        job = studio.wait(job.id, 60)
        assert job.status is JobStatus.CANCELLED, job.error
        stopped_at = json.loads((studio.run_dir(job.id) / "checkpoint" / "state.json").read_text())["step"]

        resumed = client.submit(api_name="/tinylm_resume")
        new = _until(lambda: [j for j in studio.jobs(kind="tinylm") if j.resume_of == job.id], "the resumed job")[0]
        assert new.params["resume_from"] == job.id and new.params["max_steps"] == 100_000  # the run's own params
        _until(lambda: any(f"<code>{new.id}</code> — <b>RUNNING</b>" in str(o) for o in resumed.outputs()),
               "the tab to follow the resumed job")
        _until(lambda: any(e["type"] == "progress" and (e.get("done") or 0) > stopped_at
                           for e in studio.events(new.id)[0]), "steps past the checkpoint")
        logs = " ".join(e.get("message", "") for e in studio.events(new.id)[0] if e["type"] == "log")
        assert f"resuming job {job.id} from step {stopped_at}" in logs
        client.predict(api_name="/tinylm_cancel")  # the tab's job is now the resumed one
        assert studio.wait(new.id, 60).status is JobStatus.CANCELLED
        assert f"<code>{new.id}</code> — <b>CANCELLED</b>" in resumed.result(timeout=60)[0]

        fresh = Client(url, verbose=False).submit(api_name="/tinylm_resume")  # a new page: the newest stopped run
        third = _until(lambda: [j for j in studio.jobs(kind="tinylm") if j.resume_of == new.id], "a second resume")[0]
        studio.cancel(third.id)
        assert studio.wait(third.id, 60).status.final and third.id in fresh.result(timeout=60)[0]
    finally:
        for j in studio.jobs(kind="tinylm", limit=5):
            studio.cancel(j.id)
        demo.close()


def test_a_refusal_offers_its_fitting_change_and_apply_puts_it_in_the_form(studio, corpus):
    """Over the budget, the gate's suggestion comes with the refusal (structured, in its end event); the tab offers
    "Apply: Batch N" and Apply sets Batch to N in the form."""
    from conftest import serve
    from gradio_client import Client

    from tabs.common import offer_fix
    from tabs.tinylm import FIX_INPUTS

    url, demo = serve(studio, show_error=True)
    try:
        client = Client(url, verbose=False)
        status, *_ = client.predict(
            data_source="Folder on this machine", files=None, folder=str(corpus), preset="cpu-quick", pos="rope",
            tokenizer="char", max_steps=10, target_val_loss=0, batch_size=4096, block_size=2048, n_layer=4,
            n_head=4, n_embd=256, lr=0, api_name="/tinylm_train")
        assert "REFUSED" in status and "Fits with batch_size=" in status
        job = studio.jobs(kind="tinylm", limit=1)[0]
        change = next(e["suggestion"] for e in studio.events(job.id)[0] if e["type"] == "end")
        assert set(change) == {"batch_size"} and change["batch_size"] < 4096
        button, offered = offer_fix(studio, job.id, None, FIX_INPUTS)  # what /tinylm_fix_offer shows
        assert button["visible"] and button["value"] == f"Apply: Batch {change['batch_size']}"
        assert offered == {"batch_size": change["batch_size"]}
        client.predict(api_name="/tinylm_fix_offer")  # the page runs it after Train (a Button is not an API output)
        batch, context, width = client.predict(api_name="/tinylm_apply_fix")
        assert batch["value"] == change["batch_size"]
        assert context == width == {"__type__": "update"}  # the rest of the form stays as it was
    finally:
        demo.close()
