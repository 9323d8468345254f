"""The header: the live device meter (a 1 s gr.Timer) and the queue at a glance."""
import html

from .common import gib, user_of

# Gradio's screen-reader status line says `common.complete` when an event ends: its English strings lack the key, so
# the raw key reached the page (and every screen reader). launch() passes these as the app's strings to fill it in.
GRADIO_STRINGS = {"en": {"common.complete": "Complete"}}


def size_text(b: float) -> str:
    """Bytes as a person reads them: GiB from 1 GiB, MiB below (a Tiny LM's cached model is 0.1 MiB, not 0.00 GiB)."""
    if b >= 2**30:
        return f"{b / 2**30:.2f} GiB"
    return f"{b / 2**20:.0f} MiB" if b >= 2**20 else "<1 MiB"


def _device_items(d: dict, budget: int, label: str | None = None) -> list[tuple[str, bool]]:
    """A device's part of the header: its name, memory bar, the studio's share, the budget, its sensors."""
    total = max(d["total"], 1)
    used_pct, studio_pct = 100 * d["used"] / total, 100 * min(d["studio_used"], d["used"]) / total
    what = "VRAM" if d["kind"] == "cuda" else "RAM"
    bar = (f"<span class='meter-bar' title='grey: all processes, orange: the studio, line: job budget'>"
           f"<span class='used' style='width:{used_pct:.1f}%'></span>"
           f"<span class='studio' style='width:{studio_pct:.1f}%'></span>"
           f"<span class='budget' style='left:{min(100, 100 * budget / total):.1f}%'></span></span>")
    items = [(f"<b>{html.escape(label or d['name'])}</b>", False),
             (f"{what} {bar} {gib(d['used'])} / {gib(d['total'])}", False),
             (f"studio {gib(d['studio_used'])}", True),
             (f"budget {gib(budget)}", True)]
    if d["kind"] == "cuda":
        extra = [f"{d['utilization']}% util" if d["utilization"] is not None else "",
                 f"{d['temperature']} °C" if d["temperature"] is not None else "",
                 f"{d['power_w']:.0f} W" if d["power_w"] else ""]
        items.append((" · ".join(x for x in extra if x), True))
    return items


def _running(r: dict) -> tuple[str, bool]:
    """The header's item for a running job: its kind, its id (optional on a narrow screen) and its progress."""
    pct = f" {100 * r['progress']:.0f}%" if r["progress"] is not None else ""
    return f"running <b>{html.escape(r['kind'])}</b> <code class='meter-opt'>{r['id']}</code>{pct}", False


def _spans(items: list[tuple[str, bool]]) -> str:
    return "".join(f"<span class='meter-opt'>{i}</span>" if opt else f"<span>{i}</span>" for i, opt in items if i)


def meter_html(m: dict) -> str:
    """The header: one line per device (one line in all on a one-device machine). Items marked optional (the
    studio's share, the budget, the card's sensors, the cached models, the running job's id) fold away on a narrow
    screen (assets/studio.css), so the header stays a few lines tall."""
    d = m["device"]
    rows = []
    devices = m.get("devices") or []
    if len(devices) > 1:  # a row per card: what it holds and which job runs on it
        kinds = {r["id"]: r for r in m["running"]}
        for row in devices:
            items = _device_items(row["reading"], row["budget"], row["label"])
            job = row["job"]
            if not row["use"]:
                items.append(("not used (Settings)", False))
            elif job in kinds:
                items.append(_running(kinds[job]))
            else:
                items.append(("busy" if job else "idle", False))
            if row["cache_bytes"]:
                items.append((f"cached models {size_text(row['cache_bytes'])}", True))
            rows.append(items)
        items = []
    else:
        items = _device_items(d, m["budget"])
        items.append(_running(m["running"][0]) if m["running"] else ("idle", False))
    q = f"queue {m['queued']}"
    if m["paused"]:
        q += " · <b style='color:#b91c1c'>paused</b>"
    items.append((q, False))
    if m["cache"] and len(devices) <= 1:
        names = ", ".join(m.get("cache") or [])
        items.append((f"<span title='{html.escape(names)}'>cached models {size_text(m['cache_bytes'])}</span>",
                      True))
    rows.append(items)
    notes = []  # (text, style)
    if m.get("trouble"):
        notes.append((m["trouble"], "color:#b91c1c;font-weight:bold"))
    if d["kind"] != "cuda":
        notes.append((f"No GPU in use: {d['note']}", ""))
    if m["paused"] and m["pause_reason"]:
        notes.append((m["pause_reason"], ""))
    if m["waiting"]:
        notes.append((m["waiting"], ""))
    # the full text is also the tooltip: on a narrow screen each note is one line, cut with an ellipsis
    note = "".join(f"<div class='meter-note' style='{style}' title='{html.escape(text)}'>{html.escape(text)}</div>"
                   for text, style in notes)
    return "".join(f"<div class='meter-row'>{_spans(items)}</div>" for items in rows) + note


def build(studio, auth: bool = False) -> dict:
    import gradio as gr

    gr.Markdown("## Studio", elem_id="studio-title")
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
