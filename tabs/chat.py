"""Chat (RAG) tab: a local LLM answering over your notes and code, streaming, with citations, tools and Stop."""
import html
import time
from collections.abc import Iterator
from typing import Any

import gradio as gr

from studio import Job
from studio.conversations import Conversations
from studio.presets import presets

from .common import Follow, bind, progress_html, user_of, visible_collections, watch

# the Send button's inputs: the /chat endpoint's parameter names, in this order, each with the component (its name
# in build()'s dict) it comes from
SEND_INPUTS = dict(message="prompt", conversation="conversation", model="model", collection="collection",
                   system="system", temperature="temperature", top_p="top_p", max_tokens="max_tokens", n_ctx="n_ctx",
                   top_k="top_k", reranker="reranker", tools="tools", load_in_4bit="load_in_4bit")
OUTPUTS = ("chatbot", "prompt", "stats", "sources", "job_id", "conversation")  # what a chat job streams into


def model_choices() -> list[str]:
    return list(presets()["llm"])


def collection_choices(studio, owner: str | None = None) -> list[tuple[str, str]]:
    return [("(none: plain chat)", "")] + [(f"{c['name']} · {c['files']} files, {c['chunks']} chunks", c["name"])
                                           for c in visible_collections(studio, owner)]


def fill(studio, owner: str | None) -> dict:
    """The user's conversations and collections, on page load."""
    convs = conversations(studio)
    return {"conversation": gr.update(choices=conversation_choices(convs, owner), value=None),
            "collection": gr.update(choices=collection_choices(studio, owner))}


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


def follow(studio, job: Job, owner: str | None) -> Iterator[tuple]:
    """Stream a chat job into the tab (OUTPUTS): the answer, tool steps and sources under the conversation so far,
    then the conversation as stored with speed and citations. Send uses it, and so does a reloaded page."""
    convs = conversations(studio)
    cid = job.params.get("conversation") or ""
    question = {"role": "user", "content": job.params["prompt"]}
    shown = _messages(convs, cid)
    if shown[-1:] != [question]:  # the worker stores the question only once it starts answering
        shown.append(question)
    choices = gr.update(choices=conversation_choices(convs, owner), value=cid or None)
    for current, evs in watch(studio, job, every=0.05):
        answer, steps, srcs = _answer(evs)
        if not current.status.final:
            yield (shown + steps + [{"role": "assistant", "content": answer or "…"}], "",
                   progress_html(current) if not answer else "", sources_md(srcs), job.id, choices)
    if current.status.value == "DONE":
        r = current.result
        tps = f"{r['tokens_per_s']:.1f} tok/s · " if r.get("tokens_per_s") else ""
        info = (f"{tps}first token {r['ttft_ms']:.0f} ms · {r['tokens']} tokens · model "
                f"{'from cache' if r['model_cached'] else 'loaded'} ({r['n_gpu_layers']} GPU layers) · "
                f"job `{current.id}`")
        if r.get("citations"):
            info += " · cites " + ", ".join(f"[{c['n']}] {c['where']}" for c in r["citations"])
    else:
        info = progress_html(current)
    if current.status.value == "REFUSED":  # it never ran: the question stays, the reason below it
        final = shown
    else:  # the exchange as the worker stored it (or, kept nowhere, as it streamed)
        final = _messages(convs, cid) or shown + steps + [{"role": "assistant", "content": answer}]
    yield final, "", info, sources_md(srcs), job.id, choices


KINDS = {"chat": Follow(follow, OUTPUTS)}


def send(studio, owner: str | None, v: dict[str, Any]) -> Iterator[tuple]:
    """Send (or Enter), given its inputs by name (SEND_INPUTS): a chat job in the open conversation, or in a new one
    named after the question; streamed."""
    message = v["message"]
    if not (message or "").strip():
        raise gr.Error("Type a message first.")
    convs = conversations(studio)
    cid = v["conversation"] or convs.create(message.strip()[:60], owner,
                                            {"model": v["model"], "collection": v["collection"]})
    try:
        job = studio.submit("chat", dict(prompt=message, model=v["model"], collection=v["collection"] or "",
                                         conversation=cid, system=v["system"], temperature=v["temperature"],
                                         top_p=v["top_p"], max_tokens=int(v["max_tokens"]), n_ctx=int(v["n_ctx"]),
                                         top_k=int(v["top_k"]), reranker=v["reranker"] or "", tools=bool(v["tools"]),
                                         load_in_4bit=bool(v["load_in_4bit"])), owner=owner)
    except ValueError as e:
        if not v["conversation"]:
            convs.delete(cid)  # the new conversation would stay empty
        raise gr.Error(str(e))
    yield from follow(studio, job, owner)


def build(studio, auth: bool = False) -> dict:
    convs = conversations(studio)
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
            export_file = gr.File(label="Markdown export", interactive=False, visible=False)
        with gr.Column(scale=3):
            chatbot = gr.Chatbot(label="Chat", height=460, buttons=["copy"])
            prompt = gr.Textbox(placeholder="Ask about your notes and code …", show_label=False, lines=2)
            with gr.Row():
                send_button = gr.Button("Send", variant="primary")
                stop = gr.Button("Stop", variant="stop")
            stats = gr.Markdown()
        with gr.Column(scale=2, min_width=260):
            model = gr.Dropdown(model_choices(), value=model_choices()[0],
                                label="Model (a preset, a .gguf file or a transformers folder)",
                                allow_custom_value=True)
            collection = gr.Dropdown(collection_choices(studio, ""), value="", label="Answer over collection",
                                     allow_custom_value=True)  # choices refresh on focus; scripts may name one
            with gr.Accordion("Settings", open=False):
                system = gr.Textbox("You are a helpful assistant running locally. Answer concisely.",
                                    label="System prompt", lines=2)
                temperature = gr.Slider(0, 2, 0.7, step=0.05, label="Temperature")
                top_p = gr.Slider(0.05, 1, 0.95, step=0.05, label="Top-p")
                max_tokens = gr.Slider(16, 4096, 512, step=16, label="Max tokens")
                n_ctx = gr.Dropdown([2048, 4096, 8192, 16384], value=4096, label="Context length")
                top_k = gr.Slider(1, 12, 4, step=1, label="Chunks retrieved")
                reranker = gr.Dropdown(["", *presets()["reranker"]], value="", label="Reranker",
                                       allow_custom_value=True)
                tools = gr.Checkbox(False, label="Tools (search, open file, calculator, date)")
                load_in_4bit = gr.Checkbox(False, label="Load transformers models in 4-bit (bitsandbytes NF4)")
            sources = gr.Markdown()
    job_id = gr.State("")

    ui = dict(conversation=conversation, new=new, delete=delete, title=title, rename=rename, export=export,
              export_file=export_file, chatbot=chatbot, prompt=prompt, send=send_button, stop=stop, stats=stats,
              model=model, collection=collection, system=system, temperature=temperature, top_p=top_p,
              max_tokens=max_tokens, n_ctx=n_ctx, top_k=top_k, reranker=reranker, tools=tools,
              load_in_4bit=load_in_4bit, sources=sources, job_id=job_id)

    def owner(request):
        return user_of(request, auth)

    inputs = {name: ui[component] for name, component in SEND_INPUTS.items()}
    outputs = [ui[n] for n in OUTPUTS]
    send_button.click(bind(send, studio, auth), None, outputs, inputs_kwargs=inputs, api_name="chat",
                      show_progress="hidden")
    prompt.submit(bind(send, studio, auth), None, outputs, inputs_kwargs=inputs, api_name="chat_submit",
                  show_progress="hidden")

    def on_stop(current):
        if current:
            studio.cancel(current)
        return "Stopping …" if current else "Nothing to stop."

    stop.click(on_stop, job_id, stats, api_name="chat_stop")

    def mine(cid: str, request) -> str:
        """The conversation id, when it is the request's user's (with auth); otherwise a plain error."""
        try:
            who = convs.get(cid)["owner"]
        except KeyError:
            raise gr.Error(f"No conversation {cid}.") from None
        if owner(request) is not None and who != owner(request):
            raise gr.Error(f"Conversation {cid} belongs to another user.")
        return cid

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

    export.click(on_export, conversation, export_file, api_name="chat_export")

    def on_refresh(request: gr.Request):
        return gr.update(choices=collection_choices(studio, owner(request)))

    collection.focus(on_refresh, None, collection, api_name="chat_collections", show_progress="hidden")
    return ui
