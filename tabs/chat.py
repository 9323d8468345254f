"""Chat (RAG) tab: a local LLM answering over your notes and code, streaming, with citations, tools and Stop."""
import html
import time
from collections.abc import Iterator
from typing import Any

import gradio as gr

from studio import Job
from studio.conversations import Conversations
from studio.presets import presets

from .common import Follow, bind, progress_html, save_form, user_of, visible_collections, watch

# the Send button's inputs: the /chat endpoint's parameter names, in this order, each with the component (its name
# in build()'s dict) it comes from; Regenerate, Continue and Edit last take the same
SEND_INPUTS = dict(message="prompt", conversation="conversation", model="model", collection="collection",
                   system="system", temperature="temperature", top_p="top_p", max_tokens="max_tokens", n_ctx="n_ctx",
                   top_k="top_k", reranker="reranker", tools="tools", load_in_4bit="load_in_4bit",
                   chat_format="chat_format", top_k_tokens="top_k_tokens", repeat_penalty="repeat_penalty",
                   adapter="adapter")
OUTPUTS = ("chatbot", "prompt", "stats", "sources", "job_id", "conversation")  # what a chat job streams into
SAMPLING = ("temperature", "top_p", "top_k_tokens", "repeat_penalty")
# named sampler settings, as text-generation-webui's presets: picking one sets the four sliders
SAMPLERS = {
    "Deterministic": dict(temperature=0.0, top_p=1.0, top_k_tokens=1, repeat_penalty=1.0),  # greedy: same answer
    "Precise": dict(temperature=0.3, top_p=0.9, top_k_tokens=20, repeat_penalty=1.1),
    "Balanced": dict(temperature=0.7, top_p=0.95, top_k_tokens=40, repeat_penalty=1.0),  # llama.cpp's defaults
    "Creative": dict(temperature=1.0, top_p=0.98, top_k_tokens=100, repeat_penalty=1.05),
}
SETTINGS = ("model", "collection", "system", "sampler", *SAMPLING, "max_tokens", "n_ctx", "top_k", "reranker", "tools",
            "load_in_4bit", "chat_format", "adapter")
# the form whose last-used settings come back on page load; saved by start() (tabs.common.save_form): the settings
# only, as bind(..., remember=) would keep the message too
FORMS = {"chat": SETTINGS}
MAX_UPDATES_PER_S = 8  # a streaming answer reaches the page in batches: several tokens per update, not one each


def model_choices(data_dir) -> list[tuple[str, str]]:
    """The LLM presets, on-disk ones first, each marked on disk or with the download it needs first."""
    from studio.presets import choices

    return choices("llm", data_dir)


def collection_choices(studio, owner: str | None = None) -> list[tuple[str, str]]:
    return [("(none: plain chat)", "")] + [(f"{c['name']} · {c['files']} files, {c['chunks']} chunks", c["name"])
                                           for c in visible_collections(studio, owner)]


def fill(studio, owner: str | None) -> dict:
    """The user's conversations and collections, on page load."""
    convs = conversations(studio)
    return {"conversation": gr.update(choices=conversation_choices(convs, owner)),
            "collection": gr.update(choices=collection_choices(studio, owner)),
            "model": gr.update(choices=model_choices(studio.config.data_dir))}  # a download since is on disk now


def conversation_choices(convs: Conversations, owner=None) -> list[tuple[str, str]]:
    return [(f"{c['title'][:50]} · {time.strftime('%m-%d %H:%M', time.localtime(c['updated']))}", c["id"])
            for c in convs.list(owner)]


def to_chatbot(conv: dict) -> list[dict]:
    """Stored messages -> gr.Chatbot messages, tool calls shown as collapsible steps."""
    out = []
    for m in conv["messages"]:
        for call in m["meta"].get("tools") or []:
            out.append({"role": "assistant", "content": f"{call['arguments']}\n→ {call['result'][:500]}",
                        "metadata": {"title": f"🔧 {call['name']}"}})
        content = m["content"] + (" ⏹ *(stopped)*" if m["meta"].get("stopped") else "")
        out.append({"role": m["role"], "content": content})
    return out


def sources_md(sources: list[dict]) -> str:
    if not sources:
        return ""
    lines = ["**Sources**"]
    for i, s in enumerate(sources, start=1):
        snippet = html.escape(s["text"][:300]).replace("\n", " ")
        lines.append(f"<details><summary>[{i}] <code>{html.escape(s['where'])}</code> · score {s['score']:.3f}"
                     f"</summary>{snippet}…</details>")
    return "\n".join(lines)


def conversations(studio) -> Conversations:
    return Conversations(studio.config.data_dir / "chat.db")


def _messages(convs: Conversations, cid: str) -> list[dict]:
    """A conversation as chatbot messages; none for a job that keeps no conversation (or one deleted since)."""
    try:
        return to_chatbot(convs.get(cid)) if cid else []
    except KeyError:
        return []


def _answer(events: list[dict]) -> tuple[str, list[dict], list[dict]]:
    """(answer so far, tool steps as chatbot messages, sources) from a chat job's events."""
    answer, steps, sources = "", [], []
    for e in events:
        if e["type"] == "token":
            answer += e["text"]
        elif e["type"] == "sources":
            sources = e["sources"]
        elif e["type"] == "tool_call":
            steps.append({"role": "assistant", "content": str(e["arguments"]),
                          "metadata": {"title": f"🔧 {e['name']}"}})
        elif e["type"] == "tool_result":
            steps[-1]["content"] += f"\n→ {e['result'][:500]}"
    return answer, steps, sources


def _shown(convs: Conversations, job: Job, events: list[dict]) -> tuple[list[dict], str]:
    """(the conversation as the job's answer streams under it, the start of that answer): the stored messages the job
    keeps, then its question. The worker replaces the last exchange only once the model takes the prompt, and the
    cut reads the same before and after it does: regenerate keeps the last question, edit puts its new one in place
    of the last, continue streams on after the answer it extends (the worker names it in its `turn` event)."""
    from workers.chat.chat import last_exchange

    cid, mode = job.params.get("conversation") or "", job.params.get("mode") or ""
    try:
        stored = convs.get(cid)["messages"] if cid else []
    except KeyError:
        stored = []
    turn = next((e for e in events if e["type"] == "turn"), {})
    question = {"role": "user", "content": job.params.get("prompt") or ""}
    prefix = turn.get("prefix", "")
    if mode == "regenerate":
        keep = stored[:last_exchange(stored, mode) + 1] if stored else []
    elif mode == "edit":
        keep = (stored[:last_exchange(stored, mode)] if stored else []) + [question]
    elif mode == "continue":
        if stored and stored[-1]["role"] == "assistant" and not turn:  # not taken yet: the answer is still there
            keep, prefix = stored[:-1], stored[-1]["content"]
        else:
            keep = stored
    else:
        plain = [{"role": m["role"], "content": m["content"]} for m in stored]
        keep = stored if plain[-1:] == [question] else stored + [question]
    return to_chatbot({"messages": [{"meta": {}, **m} for m in keep]}), prefix


def stopped_line(job: Job, tokens: int) -> str:
    """How a cancelled chat ended, said the same by Stop and by the stream that was following it (both write the
    status line; whichever arrives last must not undo the other)."""
    return ("⏹ stopped after {} tokens; the answer so far is kept".format(tokens) if tokens else
            "⏹ stopped before the answer began; the question is back in the box") + f" · job `{job.id}`"


def _info(job: Job, tokens: int = 0) -> str:
    """The status line under the chat once the job is final: speed, the model and its chat format, citations."""
    if job.status.value == "CANCELLED":
        return stopped_line(job, tokens)
    if job.status.value != "DONE":
        return progress_html(job)
    r = job.result
    tps = f"{r['tokens_per_s']:.1f} tok/s · " if r.get("tokens_per_s") else ""
    fmt = f" · format {r['chat_format']} ({r['chat_format_how']})" if r.get("chat_format_how") else ""
    info = (f"{tps}first token {r['ttft_ms']:.0f} ms · {r['tokens']} tokens · model "
            f"{'from cache' if r['model_cached'] else 'loaded'} ({r['n_gpu_layers']} GPU layers){fmt} · "
            f"job `{job.id}`")
    if r.get("citations"):
        info += " · cites " + ", ".join(f"[{c['n']}] {c['where']}" for c in r["citations"])
    return info


def _tokens(evs: list[dict]) -> int:
    return sum(e["type"] == "token" for e in evs)


def follow(studio, job: Job, owner: str | None) -> Iterator[tuple]:
    """Stream a chat job into the tab (OUTPUTS): the answer, tool steps and sources under the conversation so far,
    then the conversation as stored with speed and citations. Send, Regenerate, Continue and Edit use it, and so
    does a reloaded page. Updates go out at most MAX_UPDATES_PER_S times a second, only when something is new, so a
    fast model on a busy machine does not flood the page. A job that ends before the model took the question (it
    failed, was refused or stopped) gives the question back to the textbox and stores nothing."""
    convs = conversations(studio)
    cid = job.params.get("conversation") or ""
    mode = job.params.get("mode") or ""
    typed = "" if mode in ("", "edit") else gr.skip()  # regenerate and continue leave the textbox alone
    shown, prefix = _shown(convs, job, studio.events(job.id)[0])
    choices = gr.update(choices=conversation_choices(convs, owner), value=cid or None)
    seen, current, evs = None, job, []
    answer, steps, srcs = "", [], []
    for current, evs in watch(studio, job, every=1 / MAX_UPDATES_PER_S):
        if current.status.final:
            break
        if (len(evs), current.status, current.message) == seen:
            continue  # nothing new since the last update
        seen = (len(evs), current.status, current.message)
        answer, steps, srcs = _answer(evs)
        text = prefix + answer
        yield (shown + steps + [{"role": "assistant", "content": text or "…"}], typed,
               progress_html(current) if not answer else "", sources_md(srcs), job.id, choices)
    answer, steps, srcs = _answer(evs)
    taken = any(e["type"] == "token" for e in evs) or current.status.value == "DONE"
    if taken:  # the exchange as the worker stored it (or, kept nowhere, as it streamed)
        final = _messages(convs, cid) or shown + steps + [{"role": "assistant", "content": prefix + answer}]
        yield final, typed, _info(current, _tokens(evs)), sources_md(srcs), job.id, choices
        return
    # nothing was stored: the conversation as it was, the question back in the textbox to send again
    if mode == "" and cid and not _messages(convs, cid):
        convs.delete(cid)  # the new conversation Send made for it would stay empty
        cid, choices = "", gr.update(choices=conversation_choices(convs, owner), value=None)
    back = job.params.get("prompt") or "" if mode in ("", "edit") else gr.skip()
    yield _messages(convs, cid), back, _info(current, _tokens(evs)), sources_md(srcs), job.id, choices


KINDS = {"chat": Follow(follow, OUTPUTS, form=tuple(n for n in SETTINGS if n not in ("model", "sampler")),
                        to_form=lambda job: {"model": job.params.get("model") or (job.resolved or {}).get("model")})}


def owned_conversation(convs: Conversations, cid: str, owner: str | None) -> dict:
    """The conversation, when it is `owner`'s (with auth); otherwise a plain error."""
    try:
        conv = convs.get(cid)
    except KeyError:
        raise gr.Error(f"No conversation {cid}.") from None
    if owner is not None and conv["owner"] != owner:
        raise gr.Error(f"Conversation {cid} belongs to another user.")
    return conv


def start(studio, owner: str | None, v: dict[str, Any], mode: str = "") -> Iterator[tuple]:
    """A chat job from the tab's inputs by name (SEND_INPUTS), streamed: a new question (in the open conversation,
    or in a new one named after it), or `mode` on the open conversation's last exchange."""
    message = v["message"] or ""
    if mode in ("", "edit") and not message.strip():
        raise gr.Error("Type a message first.")
    if mode and not v["conversation"]:
        raise gr.Error(f"Open a conversation first: {mode} works on its last exchange.")
    convs = conversations(studio)
    cid = v["conversation"] or convs.create(message.strip()[:60], owner,
                                            {"model": v["model"], "collection": v["collection"]})
    params = dict(prompt=message if mode in ("", "edit") else "", mode=mode, model=v["model"],
                  collection=v["collection"] or "", conversation=cid, system=v["system"],
                  temperature=v["temperature"], top_p=v["top_p"], max_tokens=int(v["max_tokens"]),
                  n_ctx=int(v["n_ctx"]), top_k=int(v["top_k"]), reranker=v["reranker"] or "", tools=bool(v["tools"]),
                  load_in_4bit=bool(v["load_in_4bit"]), chat_format=v.get("chat_format") or "auto",
                  top_k_tokens=int(v.get("top_k_tokens", 40)), repeat_penalty=float(v.get("repeat_penalty", 1.0)),
                  adapter=(v.get("adapter") or "").strip())
    try:
        job = studio.submit("chat", params, owner=owner)
    except ValueError as e:  # nothing was sent: the question stays in the textbox (Gradio leaves it on an error)
        if not v["conversation"]:
            convs.delete(cid)  # the new conversation would stay empty
        raise gr.Error(str(e))
    save_form(studio, owner, "chat", {n: v[n] for n in SETTINGS if n in v})  # settings it took, not the message
    yield from follow(studio, job, owner)


def send(studio, owner: str | None, v: dict[str, Any]) -> Iterator[tuple]:
    """Send (or Enter): the question, answered in the open conversation or a new one."""
    yield from start(studio, owner, v)


def regenerate(studio, owner: str | None, v: dict[str, Any]) -> Iterator[tuple]:
    """↻ Regenerate: the last answer again (the message box is not used)."""
    yield from start(studio, owner, v, "regenerate")


def extend(studio, owner: str | None, v: dict[str, Any]) -> Iterator[tuple]:
    """➜ Continue: the model goes on from the end of the last answer."""
    yield from start(studio, owner, v, "continue")


def edit_last(studio, owner: str | None, v: dict[str, Any]) -> Iterator[tuple]:
    """✎ Edit last: with an empty message box, put the last question in it to edit; with text, send that text in
    place of the last question (its answer goes too)."""
    if not v["conversation"]:
        raise gr.Error("Open a conversation first: Edit last changes its last question.")
    if (v["message"] or "").strip():
        yield from start(studio, owner, v, "edit")
        return
    conv = owned_conversation(conversations(studio), v["conversation"], owner)
    last = next((m["content"] for m in reversed(conv["messages"]) if m["role"] == "user"), None)
    if last is None:
        raise gr.Error("This conversation has no question yet: type one and press Send.")
    yield (gr.skip(), last, "✎ Edit the question in the box, then press **✎ Edit last** again: it replaces the last "
           "question and its answer.", gr.skip(), gr.skip(), gr.skip())


def build(studio, auth: bool = False) -> dict:
    from studio.presets import default
    from workers.chat.llm import CHAT_FORMATS

    convs = conversations(studio)
    balanced = SAMPLERS["Balanced"]
    with gr.Row():
        with gr.Column(scale=1, min_width=220):
            conversation = gr.Dropdown([], label="Conversation", value=None)
            with gr.Row():
                new = gr.Button("New", size="sm")
                delete = gr.Button("Delete", size="sm", variant="stop")
            title = gr.Textbox(label="Title", placeholder="rename the conversation")
            with gr.Row():
                rename = gr.Button("Rename", size="sm")
                export = gr.Button("Export .md", size="sm")
            export_file = gr.File(label="Markdown export", interactive=False, visible=False, elem_id="chat-export")
        with gr.Column(scale=3, min_width=300):
            with gr.Row(equal_height=True):  # above the chat: on a narrow screen too, the model is picked first
                model = gr.Dropdown(model_choices(studio.config.data_dir),
                                    value=default("llm", studio.config.data_dir) or
                                    model_choices(studio.config.data_dir)[0][1], min_width=200,
                                    label="Model (a preset, a .gguf file or a transformers folder)",
                                    allow_custom_value=True)
                collection = gr.Dropdown(collection_choices(studio, ""), value="", label="Answer over collection",
                                         allow_custom_value=True, min_width=200)  # refreshed on focus
            chatbot = gr.Chatbot(label="Chat", height=460, buttons=["copy"])
            prompt = gr.Textbox(placeholder="Ask about your notes and code …", show_label=False, lines=2)
            with gr.Row():
                send_button = gr.Button("Send", variant="primary", min_width=80)
                stop = gr.Button("Stop", variant="stop", min_width=80)
                regen = gr.Button("↻ Regenerate", size="sm", min_width=80)
                cont = gr.Button("➜ Continue", size="sm", min_width=80)
                edit = gr.Button("✎ Edit last", size="sm", min_width=80)
            stats = gr.Markdown()
        with gr.Column(scale=2, min_width=260):
            sampler = gr.Dropdown(list(SAMPLERS), value="Balanced", label="Sampler preset",
                                  info="sets temperature, top-p, top-k and the repeat penalty below")
            with gr.Accordion("Settings", open=False):
                system = gr.Textbox("You are a helpful assistant running locally. Answer concisely.",
                                    label="System prompt", lines=2)
                temperature = gr.Slider(0, 2, balanced["temperature"], step=0.05, label="Temperature")
                top_p = gr.Slider(0.05, 1, balanced["top_p"], step=0.01, label="Top-p")
                top_k_tokens = gr.Slider(0, 200, balanced["top_k_tokens"], step=1, label="Top-k (tokens; 0 = all)")
                repeat_penalty = gr.Slider(0.8, 1.5, balanced["repeat_penalty"], step=0.01, label="Repeat penalty")
                max_tokens = gr.Slider(16, 4096, 512, step=16, label="Max tokens")
                n_ctx = gr.Dropdown([2048, 4096, 8192, 16384], value=4096, label="Context length")
                chat_format = gr.Dropdown(["auto", *CHAT_FORMATS], value="auto", label="Chat format",
                                          info="auto: the preset's, else the template in the GGUF, else the model "
                                               "family's (gemma → gemma)")
                top_k = gr.Slider(1, 12, 4, step=1, label="Chunks retrieved")
                reranker = gr.Dropdown(["", *presets()["reranker"]], value="", label="Reranker",
                                       allow_custom_value=True)
                tools = gr.Checkbox(False, label="Tools (search, open file, calculator, date)")
                load_in_4bit = gr.Checkbox(False, label="Load transformers models in 4-bit (bitsandbytes NF4)")
                adapter = gr.Textbox("", label="LoRA adapter (a fine-tune job id or an adapter folder; empty: none)",
                                     info="the Fine-tune tab's Chat with it sets it, with its base as the model")
            sources = gr.Markdown()
    job_id = gr.State("")

    ui = dict(conversation=conversation, new=new, delete=delete, title=title, rename=rename, export=export,
              export_file=export_file, chatbot=chatbot, prompt=prompt, send=send_button, stop=stop, stats=stats,
              regenerate=regen, cont=cont, edit=edit, sampler=sampler, top_k_tokens=top_k_tokens,
              repeat_penalty=repeat_penalty, chat_format=chat_format,
              model=model, collection=collection, system=system, temperature=temperature, top_p=top_p,
              max_tokens=max_tokens, n_ctx=n_ctx, top_k=top_k, reranker=reranker, tools=tools,
              load_in_4bit=load_in_4bit, adapter=adapter, sources=sources, job_id=job_id)

    def owner(request):
        return user_of(request, auth)

    inputs = {name: ui[component] for name, component in SEND_INPUTS.items()}
    outputs = [ui[n] for n in OUTPUTS]
    remembered = {name: ui[name] for name in ("sampler",)}  # saved with the form, not a job param
    for trigger, handler, api in ((send_button.click, send, "chat"), (prompt.submit, send, "chat_submit"),
                                  (regen.click, regenerate, "chat_regenerate"), (cont.click, extend, "chat_continue"),
                                  (edit.click, edit_last, "chat_edit")):
        trigger(bind(handler, studio, auth), None, outputs, inputs_kwargs=inputs | remembered,
                api_name=api, show_progress="hidden")

    def on_sampler(name):
        values = SAMPLERS.get(name)
        if values is None:
            raise gr.Error(f"No sampler preset {name!r}; pick one of {', '.join(SAMPLERS)}.")
        return tuple(values[n] for n in SAMPLING)

    sampler.input(on_sampler, sampler, [ui[n] for n in SAMPLING], api_name="chat_sampler", show_progress="hidden")

    def on_stop(current):
        """Stop the chat job and wait for it to end, so the line always ends final: stopped (what streamed is kept)
        or finished (Stop came after the last token)."""
        if not current:
            yield "Nothing to stop."
            return
        job = studio.cancel(current)
        if not job.status.final:
            yield "Stopping …"
        deadline = time.time() + 60
        for job, evs in watch(studio, job, every=0.1):
            if time.time() > deadline:
                yield (f"Stop requested: job `{job.id}` is still {job.status.value}; it stops at its next token "
                       "(a model load or a long prompt can take a while).")
                return
        n = _tokens(evs)
        if job.status.value == "CANCELLED":
            yield stopped_line(job, n)
        else:
            yield f"finished before Stop ({job.status.value}, {n} tokens) · job `{job.id}`"

    stop.click(on_stop, job_id, stats, api_name="chat_stop", show_progress="hidden")

    def mine(cid: str, request) -> str:
        """The conversation id, when it is the request's user's (with auth); otherwise a plain error."""
        return owned_conversation(convs, cid, owner(request))["id"]

    def on_open(cid, request: gr.Request):
        if not cid:
            return [], "", ""
        conv = convs.get(mine(cid, request))
        last = next((m for m in reversed(conv["messages"]) if m["role"] == "assistant"), None)
        return to_chatbot(conv), conv["title"], sources_md(last["meta"].get("sources") or []) if last else ""

    conversation.change(on_open, conversation, [chatbot, title, sources], api_name="chat_open")

    def on_new(request: gr.Request):
        return gr.update(choices=conversation_choices(convs, owner(request)), value=None), [], "", ""

    new.click(on_new, None, [conversation, chatbot, title, sources], api_name="chat_new")

    def on_rename(cid, new_title, request: gr.Request):
        if not cid:
            raise gr.Error("Open a conversation first.")
        try:
            convs.rename(mine(cid, request), new_title)
        except ValueError as e:
            raise gr.Error(str(e))
        return gr.update(choices=conversation_choices(convs, owner(request)), value=cid)

    rename.click(on_rename, [conversation, title], conversation, api_name="chat_rename")

    def on_delete(cid, request: gr.Request):
        if cid:
            convs.delete(mine(cid, request))
        return gr.update(choices=conversation_choices(convs, owner(request)), value=None), [], "", ""

    delete.click(on_delete, conversation, [conversation, chatbot, title, sources], api_name="chat_delete")

    def on_export(cid, request: gr.Request):
        if not cid:
            raise gr.Error("Open a conversation first.")
        import secrets

        text = convs.to_markdown(mine(cid, request))
        # under a random folder of Gradio's cache: only the page that asked gets the link
        out = studio.config.uploads_dir / secrets.token_hex(16) / f"chat-{cid}.md"
        out.parent.mkdir(parents=True)
        out.write_text(text)
        return gr.update(value=str(out), visible=True)

    # the click downloads at once: the file's own link is clicked for the user (it stays as a fallback)
    export.click(on_export, conversation, export_file, api_name="chat_export").success(
        None, None, None, js="""async () => {
            for (let i = 0; i < 40; i++) {  // the link appears once the File has rendered its new value
                const a = document.querySelector('#chat-export a[download]');
                if (a) { a.click(); return; }
                await new Promise(r => setTimeout(r, 50));
            }
        }""")

    def on_refresh(request: gr.Request):
        return gr.update(choices=collection_choices(studio, owner(request)))

    collection.focus(on_refresh, None, collection, api_name="chat_collections", show_progress="hidden")
    return ui
