"""The OpenAI-compatible endpoint (`serve --openai-api`): the official `openai` client, streaming and not, against
the packaged gemma GGUF on a studio served with two logins; every request is a chat job in the queue, owned by the
user whose user:password is the API key."""
import httpx
import openai
import pytest
from conftest import free_port, wait_for

import app
from studio import Config, JobStatus, Studio
from studio.conversations import Conversations
from studio.openai_api import StopScanner

GEMMA = "gemma-3-270m-packaged"
QUESTION = "Name three colours of the rainbow."
GREEDY = dict(model=GEMMA, temperature=0, seed=7, max_tokens=8)  # a few tokens: plumbing, not wisdom


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """One studio served with the UI, the API and logins for ann (the admin) and bob: (studio, base url)."""
    s = Studio(Config.load(tmp_path_factory.mktemp("openai-api"))).start()
    s.admin = "ann"
    demo = app.build_ui(s, auth=True)
    port = free_port()
    app.launch(demo, s, server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True,
               auth=[("ann", "pw1"), ("bob", "pw2")], openai_api=True)
    yield s, f"http://127.0.0.1:{port}"
    demo.close()
    s.shutdown()


def client(url: str, key: str = "ann:pw1") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=300)


def job_of(studio, completion_id: str):
    assert completion_id.startswith("chatcmpl-")
    return studio.wait(completion_id.removeprefix("chatcmpl-"), timeout=300)


def test_models_lists_the_chat_models_on_disk(served):
    studio, url = served
    ids = [m.id for m in client(url).models.list()]
    assert GEMMA in ids
    assert "llama-3.1-8b-instruct-q4km" not in ids  # a preset that needs a download is not offered
    with pytest.raises(openai.NotFoundError, match=GEMMA):  # the error names the models there are
        client(url).chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.NotFoundError, match="not downloaded yet"):
        client(url).chat.completions.create(model="llama-3.1-8b-instruct-q4km",
                                            messages=[{"role": "user", "content": "hi"}])


def test_client_gets_an_answer_through_the_queue_as_a_chat_job(served):
    studio, url = served
    r = client(url).chat.completions.create(
        messages=[{"role": "system", "content": "You answer in one word."}, {"role": "user", "content": QUESTION}],
        top_p=0.9, **GREEDY)
    answer = r.choices[0].message.content
    assert isinstance(answer, str) and answer.strip()
    assert r.choices[0].finish_reason in ("stop", "length") and r.model == GEMMA
    job = job_of(studio, r.id)
    assert job.id in [j.id for j in studio.jobs(kind="chat")]  # what the Jobs tab lists
    assert job.status is JobStatus.DONE and job.owner == "ann"
    assert job.result["answer"] == answer and r.usage.completion_tokens == job.result["tokens"]
    if "prompt_tokens" in job.result:  # usage reports what the job counted, never a made-up number
        assert r.usage.total_tokens == job.result["prompt_tokens"] + job.result["tokens"]
    p = job.params  # the OpenAI params became the chat job's own
    assert (p["prompt"], p["system"], p["max_tokens"], p["temperature"], p["top_p"], p["seed"]) == (
        QUESTION, "You answer in one word.", 8, 0.0, 0.9, 7)


def test_streaming_sends_the_answer_in_chunks_then_usage(served):
    studio, url = served
    chunks = list(client(url).chat.completions.create(
        messages=[{"role": "user", "content": QUESTION}], stream=True, stream_options={"include_usage": True},
        **GREEDY))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    job = job_of(studio, chunks[0].id)
    assert job.status is JobStatus.DONE and job.kind == "chat" and job.owner == "ann"
    assert text == job.result["answer"] and text.strip()
    assert chunks[0].choices[0].delta.role == "assistant"
    assert finish in (["stop"], ["length"]) and chunks[-1].usage.completion_tokens == job.result["tokens"]


def test_earlier_turns_reach_the_job_and_leave_no_conversation_behind(served):
    studio, url = served
    convs = Conversations(studio.config.data_dir / "chat.db")
    before = {c["id"] for c in convs.list("ann")}
    r = client(url).chat.completions.create(messages=[
        {"role": "user", "content": "My name is Ann."}, {"role": "assistant", "content": "Hello Ann."},
        {"role": "user", "content": [{"type": "text", "text": "What is my name?"}]}], **GREEDY)
    job = job_of(studio, r.id)
    assert job.status is JobStatus.DONE, job.error  # it read the turns from the conversation named in its params
    assert job.params["prompt"] == "What is my name?" and job.params["conversation"]
    wait_for(lambda: {c["id"] for c in convs.list("ann")} == before, 10, "the scratch conversation to go")


def test_a_stop_sequence_ends_the_answer_and_the_job(served):
    studio, url = served
    messages = [{"role": "user", "content": "Tell a long story."}]
    full = client(url).chat.completions.create(messages=messages, **{**GREEDY, "max_tokens": 24})
    assert full.choices[0].finish_reason == "length"  # greedy: the same 24 tokens start every longer answer
    text = full.choices[0].message.content
    stop = next(text[i:i + 2] for i in range(len(text) // 2, len(text) - 1) if text[i:i + 2].strip())
    for stream in (False, True):
        cut = client(url).chat.completions.create(messages=messages, stop=[stop], stream=stream,
                                                  **{**GREEDY, "max_tokens": 1000})
        if stream:
            chunks = list(cut)
            answer = "".join(c.choices[0].delta.content or "" for c in chunks)
            finish, cid = chunks[-1].choices[0].finish_reason, chunks[0].id
        else:
            answer, finish, cid = cut.choices[0].message.content, cut.choices[0].finish_reason, cut.id
        assert (answer, finish) == (text[:text.find(stop)], "stop")
        assert job_of(studio, cid).status is JobStatus.CANCELLED  # it stopped there, not 1000 tokens later


def test_a_client_that_goes_away_cancels_its_job(served):
    studio, url = served
    stream = client(url).chat.completions.create(messages=[{"role": "user", "content": "Tell a long story."}],
                                                 model=GEMMA, max_tokens=2000, stream=True)
    first = next(stream)
    stream.close()
    job_id = first.id.removeprefix("chatcmpl-")
    wait_for(lambda: studio.job(job_id).status.final, 60, "the abandoned job to end")
    job = studio.job(job_id)
    assert job.status is JobStatus.CANCELLED or job.result["tokens"] < 2000


def test_without_credentials_or_with_a_wrong_password_it_is_401(served):
    studio, url = served
    n = len(studio.jobs(kind="chat"))
    body = {"model": GEMMA, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    for headers in ({}, {"Authorization": "Bearer ann:wrong"}, {"Authorization": "Bearer ann"},
                    {"Authorization": "Basic !!notbase64"}):
        r = httpx.post(f"{url}/v1/chat/completions", json=body, headers=headers)
        assert r.status_code == 401 and "user:password" in r.json()["error"]["message"], (headers, r.text)
        assert httpx.get(f"{url}/v1/models", headers=headers).status_code == 401
    with pytest.raises(openai.AuthenticationError):
        client(url, "ann:wrong").models.list()
    assert len(studio.jobs(kind="chat")) == n  # nothing was queued
    assert httpx.get(f"{url}/v1/models", auth=("bob", "pw2")).status_code == 200  # HTTP Basic works too


def test_bob_gets_his_own_jobs_and_nothing_of_anns(served):
    studio, url = served
    anns = client(url).chat.completions.create(messages=[{"role": "user", "content": QUESTION}], **GREEDY)
    bobs = client(url, "bob:pw2").chat.completions.create(messages=[{"role": "user", "content": "Hi, I am Bob."}],
                                                          **GREEDY)
    ann_job, bob_job = job_of(studio, anns.id), job_of(studio, bobs.id)
    assert (ann_job.owner, bob_job.owner) == ("ann", "bob")
    assert {j.id for j in studio.jobs(owner="bob")} == {bob_job.id}  # what bob's Jobs tab lists
    r = httpx.get(f"{url}/v1/chat/completions/{anns.id}", auth=("bob", "pw2"))
    assert r.status_code != 200 and anns.choices[0].message.content not in r.text
    gguf = str(studio.config.data_dir / "models")  # bob may not name a server path as his model; ann (admin) may
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client(url, "bob:pw2").chat.completions.create(messages=[{"role": "user", "content": "hi"}],
                                                       model=gguf + "/x.gguf", max_tokens=4)


@pytest.mark.parametrize("extra, match", [
    (dict(n=2), "n must be 1"),
    (dict(tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}]), "tools"),
    (dict(logprobs=True), "logprobs"),
    (dict(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}), "json_object"),
    (dict(messages=[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hel"}]), "last message"),
    (dict(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:,"}}]}]),
     "only text"),
    (dict(temperature=9), "temperature must be between"),
    (dict(messages=[{"role": "user", "content": "  "}]), "prompt is empty"),
])
def test_what_it_cannot_honour_is_a_clear_400(served, extra, match):
    studio, url = served
    n = len(studio.jobs(kind="chat"))
    args = {"model": GEMMA, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **extra}
    with pytest.raises(openai.BadRequestError, match=match):
        client(url).chat.completions.create(**args)
    assert len(studio.jobs(kind="chat")) == n


def test_a_refusal_or_a_paused_queue_says_why(served):
    studio, url = served
    ask = dict(messages=[{"role": "user", "content": "hi"}], **GREEDY)
    budget = studio.config.budget_gb
    studio.update_config(budget_gb=0.05)
    try:
        with pytest.raises(openai.BadRequestError, match="Refused by the memory gate.*budget"):
            client(url).chat.completions.create(**ask)
    finally:
        studio.update_config(budget_gb=budget)
    studio.pause("test")
    try:
        with pytest.raises(openai.InternalServerError, match="queue is paused") as e:
            client(url).chat.completions.create(**ask)
        assert e.value.status_code == 503
    finally:
        studio.resume_queue()


def test_off_unless_asked(tmp_path):
    """Without openai_api the server has no /v1 routes (the flag is --openai-api)."""
    import gradio as gr

    s = Studio(Config.load(tmp_path / "data"))  # no worker: nothing is run
    with gr.Blocks() as demo:
        gr.Markdown("x")
    port = free_port()
    app.launch(demo, s, server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        assert httpx.get(f"http://127.0.0.1:{port}/v1/models").status_code == 404
    finally:
        demo.close()


def test_stop_scanner_holds_back_what_may_start_a_stop_sequence():
    s = StopScanner(["END"])
    assert [s.feed(t) for t in ("ab", "c E", "N", "D tail")] == ["ab", "c ", "", ""] and s.hit
    s = StopScanner(["END"])
    assert [s.feed(t) for t in ("ab E", "Nx")] == ["ab ", "ENx"] and s.flush() == "" and not s.hit
