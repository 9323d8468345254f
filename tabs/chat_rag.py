"""The Chat (RAG) tab: the chat in a sub-tab of its own, beside the Collections and Evaluate sub-tabs of tabs/rag.py."""
from . import chat, rag

KINDS = {**chat.KINDS, **rag.KINDS}
FORMS = {**chat.FORMS, **getattr(rag, "FORMS", {})}  # each half's remembered forms (tabs.common.bind remember=)


def build(studio, auth: bool = False) -> dict:
    import gradio as gr

    with gr.Tabs():
        with gr.Tab("Chat"):
            ui = chat.build(studio, auth)
        parts = rag.build(studio, auth)
    if shared := ui.keys() & parts.keys():  # one dict names the whole tab: a name may not mean two components
        raise ValueError(f"tabs/chat.py and tabs/rag.py both name {sorted(shared)}")
    return {**ui, **parts}


def fill(studio, owner: str | None) -> dict:
    """Both halves' per-user lists, on page load."""
    return {**chat.fill(studio, owner), **rag.fill(studio, owner)}
