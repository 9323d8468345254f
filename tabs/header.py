"""The header: the live device meter (a 1 s gr.Timer) and the queue at a glance."""
import html

from .common import gib, user_of


def meter_html(m: dict) -> str:
    d = m["device"]
    total = max(d["total"], 1)
    budget = m["budget"]
    used_pct, studio_pct = 100 * d["used"] / total, 100 * min(d["studio_used"], d["used"]) / total
    what = "VRAM" if d["kind"] == "cuda" else "RAM"
    bar = (f"<span class='meter-bar' title='grey: all processes, orange: the studio, line: job budget'>"
           f"<span class='used' style='width:{used_pct:.1f}%'></span>"
           f"<span class='studio' style='width:{studio_pct:.1f}%'></span>"
           f"<span class='budget' style='left:{min(100, 100 * budget / total):.1f}%'></span></span>")
    items = [f"<b>{html.escape(d['name'])}</b>",
             f"{what} {bar} {gib(d['used'])} / {gib(d['total'])}",
             f"studio {gib(d['studio_used'])}",
             f"budget {gib(budget)}"]
    if d["kind"] == "cuda":
        extra = [f"{d['utilization']}% util" if d["utilization"] is not None else "",
                 f"{d['temperature']} °C" if d["temperature"] is not None else "",
                 f"{d['power_w']:.0f} W" if d["power_w"] else ""]
        items.append(" · ".join(x for x in extra if x))
    if m["running"]:
        r = m["running"][0]
        pct = f" {100 * r['progress']:.0f}%" if r["progress"] is not None else ""
        items.append(f"running <b>{html.escape(r['kind'])}</b> <code>{r['id']}</code>{pct}")
    else:
        items.append("idle")
    q = f"queue {m['queued']}"
    if m["paused"]:
        q += " · <b style='color:#b91c1c'>paused</b>"
    items.append(q)
    if m["cache_bytes"]:
        names = ", ".join(m.get("cache") or [])
        items.append(f"<span title='{html.escape(names)}'>cached models {gib(m['cache_bytes'])}</span>")
    notes = []
    if m.get("trouble"):
        notes.append(f"<b style='color:#b91c1c'>{html.escape(m['trouble'])}</b>")
    if d["kind"] != "cuda":
        notes.append(f"No GPU in use: {html.escape(d['note'])}")
    if m["paused"] and m["pause_reason"]:
        notes.append(html.escape(m["pause_reason"]))
    if m["waiting"]:
        notes.append(html.escape(m["waiting"]))
    note = "".join(f"<div class='meter-note'>{n}</div>" for n in notes)
    return f"<div class='meter-row'>{''.join(f'<span>{i}</span>' for i in items if i)}</div>{note}"


def build(studio, auth: bool = False) -> dict:
    import gradio as gr

    with gr.Row():
        gr.Markdown("## Studio")
    meter = gr.HTML(meter_html(studio.meter(owner="")), elem_id="studio-meter")  # no one's jobs in the page config
    timer = gr.Timer(1.0)

    def tick(request: gr.Request):
        return meter_html(studio.meter(owner=user_of(request, auth)))

    timer.tick(tick, outputs=meter, api_name="meter", show_progress="hidden",
               queue=False)
    return dict(meter=meter, timer=timer)


def deep_link(demo, tabs, ids) -> None:
    """Open the tab named in the URL, e.g. http://127.0.0.1:7860/?tab=tinylm."""
    import gradio as gr

    def open_tab(request: gr.Request):
        wanted = request.query_params.get("tab") if request else None
        return gr.Tabs(selected=wanted) if wanted in ids else gr.skip()

    demo.load(open_tab, None, tabs, api_name="open_tab", show_progress="hidden")
