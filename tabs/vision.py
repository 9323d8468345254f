"""Vision chat tab: ask a vision-language model about your images (upload, webcam or clipboard; several at once), in
conversations kept with the Chat tab's, streaming with Stop and the image beside the answer; caption a whole set of
images into a CSV/JSONL (and captions Paint's LoRA training reads); and, in Fine-tune, teach it your own image-text
pairs (tabs.vision_finetune: build_train inside its sub-tab, wire_use for Chat with it, KINDS / FORMS merged here)."""
from __future__ import annotations

import secrets
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gradio as gr

from studio import Job
from studio.conversations import Conversations

from . import vision_finetune
from .common import Follow, bind, own_uploads, progress_html, save_form, user_of, watch

# the Send button's inputs (names in build()'s dict and the endpoint's parameters)
SEND_INPUTS = ("prompt", "image", "more_images", "conversation", "model", "adapter", "system", "max_tokens",
               "temperature", "top_p", "n_ctx", "load_in_4bit")
OUTPUTS = ("chatbot", "prompt", "stats", "job_id", "conversation", "shown")
SETTINGS = ("model", "adapter", "system", "max_tokens", "temperature", "top_p", "n_ctx", "load_in_4bit")
BATCH_INPUTS = ("b_files", "b_folder", "b_prompt", "model", "adapter", "max_tokens", "temperature", "load_in_4bit")
BATCH_OUTPUTS = ("b_status", "b_table", "b_files_out", "b_job_id")
MAX_UPDATES_PER_S = 8


def conversations(studio) -> Conversations:
    return Conversations(studio.config.data_dir / "chat.db")


def is_vision(conv: dict) -> bool:
    import json

    try:
        return json.loads(conv.get("settings") or "{}").get("kind") == "vision_chat"
    except (TypeError, ValueError):
        return False


def conversation_choices(studio, owner: str | None) -> list[tuple[str, str]]:
    return [(f"{c['title'][:50]} · {time.strftime('%m-%d %H:%M', time.localtime(c['updated']))}", c["id"])
            for c in conversations(studio).list(owner) if is_vision(c)]


def model_choices(studio) -> list[tuple[str, str]]:
    from studio.presets import choices

    return choices("vlm", studio.config.data_dir)


def to_chatbot(messages: list[dict]) -> list[dict]:
    """Stored messages -> gr.Chatbot messages: a user turn's images shown above its text."""
    out = []
    for m in messages:
        for img in (m.get("meta") or {}).get("images") or []:
            if Path(img).exists():
                out.append({"role": "user", "content": {"path": img}})
        stopped = " ⏹ *(stopped)*" if (m.get("meta") or {}).get("stopped") else ""
        out.append({"role": m["role"], "content": m["content"] + stopped})
    return out


def _stored(studio, cid: str) -> list[dict]:
    try:
        return conversations(studio).get(cid)["messages"] if cid else []
    except KeyError:
        return []


def _last_image(messages: list[dict]) -> str | None:
    for m in reversed(messages):
        imgs = [i for i in (m.get("meta") or {}).get("images") or [] if Path(i).exists()]
        if imgs:
            return imgs[-1]
    return None


def _info(job: Job, tokens: int) -> str:
    if job.status.value == "CANCELLED":
        return (f"⏹ stopped after {tokens} tokens; the answer so far is kept" if tokens else
                "⏹ stopped before the answer began; the question is back in the box") + f" · job `{job.id}`"
    if job.status.value != "DONE":
        return progress_html(job)
    r = job.result
    tps = f"{r['tokens_per_s']:.1f} tok/s · " if r.get("tokens_per_s") else ""
    return (f"{tps}first token {r['ttft_ms']:.0f} ms · {r['tokens']} tokens · {r['backend']} · model "
            f"{'from cache' if r['model_cached'] else 'loaded'}" + (" + adapter" if r.get("adapter") else "")
            + f" · job `{job.id}`")


def _is_batch(job: Job) -> bool:
    from workers.vision.chat import image_list

    items = image_list(str(job.params.get("image") or ""))
    return len(items) == 1 and Path(items[0]).is_dir()


def follow(studio, job: Job, owner: str | None) -> Iterator[tuple]:
    """Stream a vision_chat job into the tab (OUTPUTS): the conversation so far, the question with its images and the
    answer as it grows, the image beside it; then the conversation as stored. A batch job streams into the Caption
    panel instead (follow_batch), so here it only shows its status."""
    if _is_batch(job):
        for current, _ in watch(studio, job, every=0.5):
            yield gr.skip(), gr.skip(), progress_html(current), job.id, gr.skip(), gr.skip()
        return
    cid = job.params.get("conversation") or ""
    before = _stored(studio, cid)
    choices = gr.update(choices=conversation_choices(studio, owner), value=cid or None)
    seen, current, evs = None, job, []
    asked: list[dict] = []
    for current, evs in watch(studio, job, every=1 / MAX_UPDATES_PER_S):
        turn = next((e for e in evs if e["type"] == "turn"), None)
        run = studio.run_dir(job.id)
        images = [str(run / i) for i in (turn or {}).get("images", [])]
        asked = to_chatbot([{"role": "user", "content": job.params.get("prompt") or "", "meta": {"images": images}}])
        shown = images[-1] if images else _last_image(before)
        if current.status.final:
            break
        if (len(evs), current.status, current.message) == seen:
            continue
        seen = (len(evs), current.status, current.message)
        answer = "".join(e["text"] for e in evs if e["type"] == "token")
        yield (to_chatbot(before) + asked + [{"role": "assistant", "content": answer or "…"}], "",
               progress_html(current) if not answer else "", job.id, choices, shown)
    answer = "".join(e["text"] for e in evs if e["type"] == "token")
    tokens = sum(e["type"] == "token" for e in evs)
    after = _stored(studio, cid)
    taken = tokens > 0 or current.status.value == "DONE"
    if taken:
        final = to_chatbot(after) if after else to_chatbot(before) + asked + [{"role": "assistant",
                                                                                "content": answer}]
        shown = _last_image(after) or next((m["content"]["path"] for m in reversed(asked)
                                            if isinstance(m["content"], dict)), None)
        yield final, "", _info(current, tokens), job.id, choices, shown
        return
    if cid and not after:  # the new conversation Send made for it would stay empty
        conversations(studio).delete(cid)
        choices = gr.update(choices=conversation_choices(studio, owner), value=None)
        cid = ""
    yield to_chatbot(after), job.params.get("prompt") or "", _info(current, tokens), job.id, choices, \
        _last_image(after)


def send(studio, owner: str | None, v: dict[str, Any]) -> Iterator[tuple]:
    """Send: the question (with the image and any more images) in the open conversation, or a new one."""
    if not (v["prompt"] or "").strip():
        raise gr.Error("Type a question about the image first.")
    files = ([v["image"]] if v["image"] else []) + list(v["more_images"] or [])
    paths = own_uploads(studio, files, owner)
    convs = conversations(studio)
    cid = v["conversation"] or convs.create(v["prompt"].strip()[:60], owner, {"model": v["model"],
                                                                            "kind": "vision_chat"})
    params = dict(prompt=v["prompt"], image="\n".join(paths), conversation=cid, model=v["model"] or "",
                  adapter=(v["adapter"] or "").strip(), system=v["system"] or "", max_tokens=int(v["max_tokens"]),
                  temperature=float(v["temperature"]), top_p=float(v["top_p"]), n_ctx=int(v["n_ctx"]),
                  load_in_4bit=bool(v["load_in_4bit"]))
    try:
        job = studio.submit("vision_chat", params, owner=owner)
    except ValueError as e:  # nothing was sent: the question stays in the box
        if not v["conversation"]:
            convs.delete(cid)
        raise gr.Error(str(e))
    save_form(studio, owner, "vision_chat", {n: v[n] for n in SETTINGS})
    yield from follow(studio, job, owner)


def batch_table(job: Job, studio) -> list[list[str]]:
    import json

    path = studio.run_dir(job.id) / "answers.jsonl"
    if not path.exists():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines()[:500]:
        try:
            r = json.loads(line)
        except ValueError:  # the line being written
            continue
        rows.append([r["image"], r["answer"]])
    return rows


def follow_batch(studio, job: Job, owner: str | None) -> Iterator[tuple]:
    """Stream a caption batch into the Caption panel (BATCH_OUTPUTS): progress and the answers so far, then the CSV
    and JSONL to download."""
    for current, _ in watch(studio, job, every=0.5):
        files = gr.skip()
        status = progress_html(current)
        if current.status.value == "DONE":
            r = current.result
            files = [r["answers_csv"], r["answers_jsonl"]]
            failed = "".join(f"<br>skipped `{f['image']}`: {f['error']}" for f in r["failed"][:10])
            status = (f"{r['answered']} images captioned in {r['seconds']:.1f} s · captions for Paint's LoRA "
                      f"training: <code>{r['captions_dir']}</code>{failed}")
        yield status, batch_table(current, studio), files, job.id


def _folder_of(studio, files, owner: str | None) -> str:
    """Uploaded images as one new folder (in the uploader's own folder with auth)."""
    paths = own_uploads(studio, files, owner)
    if owner is not None:
        return str(Path(paths[0]).parent)  # own_uploads made a folder of its own for them
    dest = studio.config.uploads_dir / f"caption-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"
    dest.mkdir(parents=True)
    for p in paths:
        shutil.copy(p, dest / Path(p).name)
    return str(dest)


def caption(studio, owner: str | None, v: dict[str, Any]) -> Iterator[tuple]:
    """Caption all: every uploaded image (or every image of a folder on this machine) answered on its own."""
    if v["b_files"]:
        folder = _folder_of(studio, v["b_files"], owner)
    elif (v["b_folder"] or "").strip():
        folder = v["b_folder"].strip()
    else:
        raise gr.Error("Upload some images (or name a folder on this machine) first.")
    params = dict(prompt=v["b_prompt"], image=folder, model=v["model"] or "", adapter=(v["adapter"] or "").strip(),
                  max_tokens=int(v["max_tokens"]), temperature=float(v["temperature"]),
                  load_in_4bit=bool(v["load_in_4bit"]))
    try:
        job = studio.submit("vision_chat", params, owner=owner)
    except ValueError as e:
        raise gr.Error(str(e))
    yield from follow_batch(studio, job, owner)


def fill(studio, owner: str | None) -> dict:
    """The user's vision conversations and the presets (a download since is on disk now), and Fine-tune's lists."""
    return {"conversation": gr.update(choices=conversation_choices(studio, owner)),
            "model": gr.update(choices=model_choices(studio))} | vision_finetune.fill(studio, owner)


KINDS = {"vision_chat": Follow(follow, OUTPUTS, form=tuple(n for n in SETTINGS if n != "adapter")),
         **vision_finetune.KINDS}
FORMS = {"vision_chat": SETTINGS, **vision_finetune.FORMS}


def build_chat(studio, auth: bool = False) -> dict:
    from workers.vision.model import default

    with gr.Row():
        with gr.Column(scale=2, min_width=260):
            model = gr.Dropdown(model_choices(studio), value=default(studio.config.data_dir), allow_custom_value=True,
                                label="Model (a preset, a .gguf with its mmproj beside it, or a LLaVA folder)")
            image = gr.Image(type="filepath", label="Image", sources=["upload", "webcam", "clipboard"], height=260)
            more_images = gr.File(label="More images (optional)", file_count="multiple", file_types=["image"],
                                  type="filepath", height=90)
            conversation = gr.Dropdown([], label="Conversation", value=None)
            with gr.Row():
                new = gr.Button("New", size="sm")
                delete = gr.Button("Delete", size="sm", variant="stop")
            with gr.Accordion("Settings", open=False):
                adapter = gr.Textbox("", label="LoRA adapter (a vision fine-tune job id or folder; empty: none)",
                                     info="Fine-tune's Chat with it sets it, with its base as the model")
                system = gr.Textbox("", label="System prompt (empty: the model's own)", lines=2)
                max_tokens = gr.Slider(16, 2048, 256, step=16, label="Max tokens")
                temperature = gr.Slider(0, 2, 0.2, step=0.05, label="Temperature")
                top_p = gr.Slider(0.05, 1, 0.95, step=0.01, label="Top-p")
                n_ctx = gr.Dropdown([2048, 4096, 8192], value=4096, label="Context length",
                                    info="each image takes its tokens of it (576 for LLaVA-1.5)")
                load_in_4bit = gr.Checkbox(True, label="transformers models in 4-bit (bitsandbytes NF4)")
        with gr.Column(scale=3, min_width=320):
            chatbot = gr.Chatbot(label="Vision chat", height=460, buttons=["copy"])
            prompt = gr.Textbox(placeholder="Ask about the image …", show_label=False, lines=2)
            with gr.Row():
                send_button = gr.Button("Send", variant="primary", min_width=80)
                stop = gr.Button("Stop", variant="stop", min_width=80)
            stats = gr.Markdown()
        with gr.Column(scale=2, min_width=220):
            shown = gr.Image(label="The image being discussed", interactive=False, type="filepath", height=300)
    with gr.Accordion("Caption a set of images (one prompt, every image; CSV/JSONL out)", open=False):
        with gr.Row():
            with gr.Column(scale=2):
                b_files = gr.File(label="Images", file_count="multiple", file_types=["image"], type="filepath",
                                  height=120)
                b_folder = gr.Textbox("", label="…or a folder on this machine (the admin's)")
                b_prompt = gr.Textbox("Describe this image in one sentence.", label="Prompt for every image")
                b_go = gr.Button("Caption all", variant="primary")
            with gr.Column(scale=3):
                b_status = gr.HTML()
                b_table = gr.Dataframe(headers=["image", "answer"], interactive=False, wrap=True, max_height=300)
                b_files_out = gr.File(label="answers.csv / answers.jsonl", file_count="multiple", interactive=False)
    job_id, b_job_id = gr.State(""), gr.State("")
    ui = dict(model=model, image=image, more_images=more_images, conversation=conversation, new=new, delete=delete,
              adapter=adapter, system=system, max_tokens=max_tokens, temperature=temperature, top_p=top_p,
              n_ctx=n_ctx, load_in_4bit=load_in_4bit, chatbot=chatbot, prompt=prompt, send=send_button, stop=stop,
              stats=stats, shown=shown, job_id=job_id, b_files=b_files, b_folder=b_folder, b_prompt=b_prompt,
              b_go=b_go, b_status=b_status, b_table=b_table, b_files_out=b_files_out, b_job_id=b_job_id)
    outputs = [ui[n] for n in OUTPUTS]
    inputs = {n: ui[n] for n in SEND_INPUTS}
    for trigger, api in ((send_button.click, "vision_chat"), (prompt.submit, "vision_chat_submit")):
        trigger(bind(send, studio, auth), None, outputs, inputs_kwargs=inputs, api_name=api, show_progress="hidden")
    b_go.click(bind(caption, studio, auth), None, [ui[n] for n in BATCH_OUTPUTS],
               inputs_kwargs={n: ui[n] for n in BATCH_INPUTS}, api_name="vision_caption", show_progress="hidden")

    def on_stop(current):
        if not current:
            yield "Nothing to stop."
            return
        job = studio.cancel(current)
        deadline = time.time() + 60
        for job, evs in watch(studio, job, every=0.1):
            if time.time() > deadline:
                yield f"Stop requested: job `{job.id}` is still {job.status.value}; it stops at its next token."
                return
        yield _info(job, sum(e["type"] == "token" for e in evs)) if job.status.value == "CANCELLED" else \
            f"finished before Stop ({job.status.value}) · job `{job.id}`"

    stop.click(on_stop, job_id, stats, api_name="vision_stop", show_progress="hidden")

    def mine(cid: str, request) -> dict:
        try:
            conv = conversations(studio).get(cid)
        except KeyError:
            raise gr.Error(f"No conversation {cid}.") from None
        if auth and conv["owner"] != user_of(request, auth):
            raise gr.Error(f"Conversation {cid} belongs to another user.")
        return conv

    def on_open(cid, request: gr.Request):
        if not cid:
            return [], None
        msgs = mine(cid, request)["messages"]
        return to_chatbot(msgs), _last_image(msgs)

    conversation.change(on_open, conversation, [chatbot, shown], api_name="vision_open")

    def on_new(request: gr.Request):
        return gr.update(choices=conversation_choices(studio, user_of(request, auth)), value=None), [], None

    new.click(on_new, None, [conversation, chatbot, shown], api_name="vision_new")

    def on_delete(cid, request: gr.Request):
        if cid:
            conversations(studio).delete(mine(cid, request)["id"])
        return gr.update(choices=conversation_choices(studio, user_of(request, auth)), value=None), [], None

    delete.click(on_delete, conversation, [conversation, chatbot, shown], api_name="vision_delete")
    return ui


def build(studio, auth: bool = False) -> dict:
    gr.Markdown("Ask a vision-language model about your images (LLaVA-1.5 and Qwen2-VL through llama.cpp, or a "
                "transformers LLaVA in 4-bit with your adapter), caption a whole set, and teach it your own "
                "image-text pairs with QLoRA.")
    with gr.Tabs() as tabs:
        with gr.Tab("Chat", id="vision_chat_sub"):
            ui = build_chat(studio, auth)
        with gr.Tab("Fine-tune", id="vision_finetune_sub"):
            ui |= vision_finetune.build_train(studio, auth)
    vision_finetune.wire_use(studio, ui, tabs, auth)  # Chat with it: base + adapter into the Chat sub-tab
    return ui
