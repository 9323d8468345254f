"""Chat (RAG) tab: a local LLM answering over your notes and code, streaming, with citations, tools and Stop."""
import html
import time

from studio.conversations import Conversations
from studio.presets import presets
from workers.rag.index import list_collections

from .common import progress_html, user_of


def model_choices() -> list[str]:
    return list(presets()["llm"])


def collection_choices(studio) -> list[tuple[str, str]]:
    return [("(none: plain chat)", "")] + [(f"{c['name']} · {c['files']} files, {c['chunks']} chunks", c["name"])
                                           for c in list_collections(studio.config.data_dir)]


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


def build(studio, auth: bool = False) -> dict:
    import gradio as gr

    convs = Conversations(studio.config.data_dir / "chat.db")
    with gr.Row():
        with gr.Column(scale=1, min_width=220):
            conversation = gr.Dropdown(conversation_choices(convs), label="Conversation", value=None)
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
                send = gr.Button("Send", variant="primary")
                stop = gr.Button("Stop", variant="stop")
            stats = gr.Markdown()
        with gr.Column(scale=2, min_width=260):
            model = gr.Dropdown(model_choices(), value=model_choices()[0],
                                label="Model (a preset, a .gguf file or a transformers folder)",
                                allow_custom_value=True)
            collection = gr.Dropdown(collection_choices(studio), value="", label="Answer over collection",
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

    def owner(request):
        return user_of(request, auth)

    def on_send(message, conversation, model, collection, system, temperature, top_p, max_tokens, n_ctx, top_k,
                reranker, tools, load_in_4bit, request: gr.Request):
        if not (message or "").strip():
            raise gr.Error("Type a message first.")
        cid = conversation or convs.create(message.strip()[:60], owner(request),
                                           {"model": model, "collection": collection})
        shown = to_chatbot(convs.get(cid)) + [{"role": "user", "content": message}]
        try:
            job = studio.submit("chat", dict(prompt=message, model=model, collection=collection or "",
                                             conversation=cid, system=system, temperature=temperature, top_p=top_p,
                                             max_tokens=int(max_tokens), n_ctx=int(n_ctx), top_k=int(top_k),
                                             reranker=reranker or "", tools=bool(tools),
                                             load_in_4bit=bool(load_in_4bit)), owner=owner(request))
        except ValueError as e:
            if not conversation:
                convs.delete(cid)  # the new conversation would stay empty
            raise gr.Error(str(e))
        choices = gr.update(choices=conversation_choices(convs, owner(request)), value=cid)
        if job.status.value == "REFUSED":
            yield shown, "", progress_html(job), "", job.id, choices
            return
        offset, answer, steps, srcs = 0, "", [], []
        while True:
            evs, offset = studio.events(job.id, offset)
            for e in evs:
                if e["type"] == "token":
                    answer += e["text"]
                elif e["type"] == "sources":
                    srcs = e["sources"]
                elif e["type"] == "tool_call":
                    steps.append({"role": "assistant", "content": str(e["arguments"]),
                                  "metadata": {"title": f"🔧 {e['name']}"}})
                elif e["type"] == "tool_result":
                    steps[-1]["content"] += f"\n→ {e['result'][:500]}"
            current = studio.job(job.id)
            if current.status.final:
                break
            status = progress_html(current) if not answer else ""
            yield shown + steps + [{"role": "assistant", "content": answer or "…"}], "", status, \
                sources_md(srcs), job.id, choices
            time.sleep(0.05)
        final = studio.job(job.id)
        if final.status.value == "DONE":
            r = final.result
            tps = f"{r['tokens_per_s']:.1f} tok/s · " if r.get("tokens_per_s") else ""
            info = (f"{tps}first token {r['ttft_ms']:.0f} ms · {r['tokens']} tokens · model "
                    f"{'from cache' if r['model_cached'] else 'loaded'} ({r['n_gpu_layers']} GPU layers) · "
                    f"job `{final.id}`")
            if r.get("citations"):
                info += " · cites " + ", ".join(f"[{c['n']}] {c['where']}" for c in r["citations"])
        else:
            info = progress_html(final)
        yield to_chatbot(convs.get(cid)), "", info, sources_md(srcs), job.id, choices

    outputs = [chatbot, prompt, stats, sources, job_id, conversation]
    inputs = [prompt, conversation, model, collection, system, temperature, top_p, max_tokens, n_ctx, top_k,
              reranker, tools, load_in_4bit]
    send.click(on_send, inputs, outputs, api_name="chat", show_progress="hidden")
    prompt.submit(on_send, inputs, outputs, api_name="chat_submit", show_progress="hidden")

    def on_stop(current):
        if current:
            studio.cancel(current)
        return "Stopping …" if current else "Nothing to stop."

    stop.click(on_stop, job_id, stats, api_name="chat_stop")

    def on_open(cid):
        if not cid:
            return [], "", ""
        conv = convs.get(cid)
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
            convs.rename(cid, new_title)
        except ValueError as e:
            raise gr.Error(str(e))
        return gr.update(choices=conversation_choices(convs, owner(request)), value=cid)

    rename.click(on_rename, [conversation, title], conversation, api_name="chat_rename")

    def on_delete(cid, request: gr.Request):
        if cid:
            convs.delete(cid)
        return gr.update(choices=conversation_choices(convs, owner(request)), value=None), [], "", ""

    delete.click(on_delete, conversation, [conversation, chatbot, title, sources], api_name="chat_delete")

    def on_export(cid):
        if not cid:
            raise gr.Error("Open a conversation first.")
        out = studio.config.uploads_dir / "exports" / f"chat-{cid}.md"  # a studio folder, so Gradio may serve it
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(convs.to_markdown(cid))
        return gr.update(value=str(out), visible=True)

    export.click(on_export, conversation, export_file, api_name="chat_export")

    def on_refresh():
        return gr.update(choices=collection_choices(studio))

    collection.focus(on_refresh, None, collection, api_name="chat_collections", show_progress="hidden")
    return dict(conversation=conversation, new=new, delete=delete, title=title, rename=rename, export=export,
                export_file=export_file, chatbot=chatbot, prompt=prompt, send=send, stop=stop, stats=stats,
                model=model, collection=collection, system=system, temperature=temperature, top_p=top_p,
                max_tokens=max_tokens, n_ctx=n_ctx, top_k=top_k, reranker=reranker, tools=tools,
                load_in_4bit=load_in_4bit, sources=sources,
                job_id=job_id)
