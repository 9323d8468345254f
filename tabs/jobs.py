"""Jobs tab: history, a job's live detail pane (status, log, metrics, artifacts); cancel, retry, resume; pause and
resume the queue."""

import html
import json
import time

from .common import PLOT_COLORS, admin_only, duration, gib, loss_frame, owned_job, progress_html, require_admin, user_of
from .header import size_text

# The key columns come first: on a narrow screen they stay in view (pinned) while the rest scrolls.
HEADERS = ["id", "kind", "status", "progress", "ran for", "created", "estimate", "peak", "peak/est", "note"]
KEY_COLUMNS = 4
# px; they fill a 1400 px window (assets/studio.css narrows the key columns on a small screen)
COLUMN_WIDTHS = ["170px", "130px", "100px", "90px", "76px", "130px", "96px", "96px", "80px", "300px"]
PEAK_NOTE = ("peak: the most memory the job itself used on its device: what the worker grew by while the job ran "
             "(the models it loaded, its working memory) plus the cached models it reused; the worker's own idle "
             "memory is not counted. peak/est: that peak over the estimate less the runtime context (above 1.00 the "
             "estimate was too low).")


def own_estimate(job) -> int | None:
    """The estimate less the runtime context the worker holds anyway: what the job's own peak is measured against."""
    from studio.gate import Estimate

    if not job.estimate:
        return job.estimate_bytes
    est = Estimate.from_dict(job.estimate)
    return est.total - est.context


def ratio(job) -> str:
    """Measured peak over the job's own estimate: above 1.00 the estimate was too low for this job."""
    own = own_estimate(job)
    if not job.peak_bytes or not own:
        return "—"
    return f"{job.peak_bytes / own:.2f}"


def note_of(job) -> str:
    """The table's note: the error of a job that ended badly, why a queued job waits, a running job's step. A final
    job never shows a note from while it ran."""
    if job.error:
        return job.error
    if job.status.value == "QUEUED":
        return job.wait_reason or ""
    if job.status.value == "RUNNING":
        return job.message or ""
    return ""


def peak_text(job) -> str:
    return "—" if job.peak_bytes is None else size_text(job.peak_bytes)


def progress_cell(job) -> str:
    if job.status.value == "DONE":
        return "100%"
    return f"{100 * job.progress:.0f}%" if job.progress is not None and job.status.value == "RUNNING" else ""


def table(studio, owner: str | None = None) -> list[list]:
    rows = []
    for j in studio.jobs(limit=200, owner=owner):
        ran = (j.finished or time.time()) - j.started if j.started else None
        note = note_of(j)
        rows.append([j.id, j.kind, j.status.value, progress_cell(j), duration(ran),
                     time.strftime("%m-%d %H:%M:%S", time.localtime(j.created)), gib(j.estimate_bytes),
                     peak_text(j), ratio(j), note.splitlines()[0][:90] if note else ""])
    return rows


def fill(studio, owner: str | None) -> dict:
    """The user's jobs, on page load."""
    return {"jobs": table(studio, owner), **admin_only(studio, owner, "pause", "resume_queue")}


def queue_md(studio) -> str:
    if studio.store.paused:
        return f"**Queue paused.** {studio.store.get_meta('pause_reason') or ''}"
    return f"Queue running · {len(studio.store.queued())} waiting"


# ---- the event log, as a person reads it -------------------------------------------------------------------------
def value_text(v, limit: int = 120) -> str:
    """One value of an event, readable: numbers rounded, lists and dicts as `k=v` text (never a Python repr)."""
    if isinstance(v, bool) or v is None:
        return str(v).lower() if v is not None else "—"
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, int):
        return f"{v:,}" if abs(v) >= 10_000 else str(v)
    if isinstance(v, dict):
        text = ", ".join(f"{k}={value_text(x, 40)}" for k, x in v.items())
    elif isinstance(v, (list, tuple)):
        if len(v) > 6 or any(isinstance(x, (dict, list)) for x in v):
            return f"{len(v)} items"
        text = ", ".join(value_text(x, 40) for x in v)
    else:
        text = " ".join(str(v).split())  # newlines and runs of spaces: one line per event
    return text if len(text) <= limit else text[:limit - 1] + "…"


def fields_text(d: dict) -> str:
    return " · ".join(f"{k} {value_text(v)}" for k, v in d.items() if v not in (None, "", [], {}))


def event_text(e: dict) -> str:
    """What one event says, without its time and type."""
    from studio.gate import Estimate

    t = e.get("type")
    body = {k: v for k, v in e.items() if k not in ("t", "type")}
    if t == "log":
        return value_text(body.get("message", ""), 400)
    if t == "progress":
        frac, msg = body.get("fraction"), body.get("message") or ""
        if frac is not None:
            return f"{100 * frac:.0f}% {value_text(msg)}".rstrip()
        done, total = body.get("done"), body.get("total")
        return f"{value_text(done)}{'/' + value_text(total) if total else ''} {value_text(msg)}".rstrip()
    if t == "metric":
        step = body.pop("step", None)
        return f"step {step} · {fields_text(body)}" if step is not None else fields_text(body)
    if t == "sample":
        where = f"step {body['step']}" if "step" in body else f"epoch {body.get('epoch')}"
        shown = body.get("text", body.get("path", ""))
        return f"{where}: «{value_text(shown, 200)}»"
    if t == "queued":
        est = body.get("estimate")
        return f"estimate {Estimate.from_dict(est).describe()}" if est else "queued"
    if t == "started":
        return f"worker pid {body.get('worker_pid')} on {body.get('device') or '?'}"
    if t == "artifact":
        label, path = body.get("label") or "", body.get("path") or ""
        return f"{label}: {path}" if label and label != path.rsplit("/", 1)[-1] else path
    if t == "end":
        head = body.get("status", "")
        if body.get("error"):
            head += f": {value_text(body['error'].splitlines()[0], 300)}"
        if body.get("result"):
            head += f" · {fields_text(body['result'])}"
        if body.get("suggestion"):
            head += f" · fits with {value_text(body['suggestion'])}"
        return head
    return fields_text(body)


def log_lines(evs: list[dict], limit: int = 400) -> list[str]:
    """The event log, one line per event: `HH:MM:SS type  what it says`. A chat's streamed tokens are one line."""
    lines: list[str] = []
    tokens: list[str] = []
    token_t = 0.0

    def flush():
        if tokens:
            text = value_text("".join(tokens), 200)
            lines.append(f"{time.strftime('%H:%M:%S', time.localtime(token_t))} {'text':9} «{text}» "
                         f"({len(tokens)} pieces)")
            tokens.clear()

    for e in evs:
        if e.get("type") == "token":
            if not tokens:
                token_t = e.get("t", 0)
            tokens.append(str(e.get("text", "")))
            continue
        flush()
        lines.append(f"{time.strftime('%H:%M:%S', time.localtime(e.get('t', 0)))} {e.get('type', '?'):9} "
                     f"{event_text(e)}")
    flush()
    if len(lines) <= limit:
        return lines
    head = 20  # how the job began (its estimate, worker, data) stays in view however long it runs
    return lines[:head] + [f"… {len(lines) - limit} lines …"] + lines[-(limit - head):]


# ---- the detail pane ----------------------------------------------------------------------------------------------
def kv_block(d: dict) -> str:
    """A dict as `key  value` lines in a <pre> (nested values as compact JSON)."""
    width = max((len(k) for k in d), default=0)
    rows = [f"{k:<{width}}  {json.dumps(v) if isinstance(v, (dict, list)) else v}" for k, v in d.items()]
    return "<pre>" + html.escape("\n".join(rows)) + "</pre>"


def summary_html(job) -> str:
    """The pane's head, as HTML: status and progress, estimate against the measured peak, params, result."""
    from studio.gate import Estimate

    est = Estimate.from_dict(job.estimate)
    parts = [progress_html(job),
             f"<b>estimate</b> {html.escape(est.describe()) if job.estimate else '—'} · "
             f"<span title='the most memory the job itself used, above the worker&#39;s idle memory'><b>peak</b> "
             f"{peak_text(job)}</span> (peak/estimate {ratio(job)}) · <b>budget</b> {gib(job.budget_bytes)}"]
    if job.resolved:
        changed = {k: v for k, v in job.resolved.items() if job.params.get(k) != v}
        if changed:
            parts.append("<b>chosen to fit</b> " + html.escape(", ".join(f"{k}={v}" for k, v in changed.items())))
    if job.device is not None and (job.device_pin is not None or job.device > 0):  # a box with several cards
        parts.append(f"<b>device</b> {job.device}" + (" (pinned)" if job.device_pin is not None else ""))
    if job.resume_of:
        parts.append(f"resumes job <code>{html.escape(job.resume_of)}</code>")
    parts.append(f"<details><summary>params</summary>{kv_block(job.params or {})}</details>")
    if job.result:
        parts.append(f"<details open><summary>result</summary>{kv_block(job.result)}</details>")
    if job.traceback:
        parts.append("<details><summary>traceback</summary><pre>" + html.escape(job.traceback) + "</pre></details>")
    return "<br>".join(parts)


def artifact_files(studio, job_id: str, evs: list[dict]) -> list[str]:
    run_dir = studio.run_dir(job_id)
    files = [str(run_dir / e["path"]) for e in evs if e["type"] == "artifact" and (run_dir / e["path"]).exists()]
    if (run_dir / "run.json").exists():
        files.append(str(run_dir / "run.json"))
    return list(dict.fromkeys(files))


def settled(job, evs: list[dict]) -> bool:
    """Whether the pane has all a job will show: it is final and its end event is written (the status is recorded a
    moment before the event; an event that could not be written is not waited for past a few seconds)."""
    if not job.status.final:
        return False
    return any(e["type"] == "end" for e in evs) or time.time() - (job.finished or job.created) > 5


def build(studio, auth: bool = False) -> dict:
    import gradio as gr

    with gr.Row():
        refresh = gr.Button("Refresh", scale=1, min_width=90)
        pause = gr.Button("Pause queue", scale=1, min_width=110)
        resume_q = gr.Button("Resume queue", scale=1, min_width=110)
        queue_status = gr.Markdown(queue_md(studio))
    jobs = gr.Dataframe([], headers=HEADERS, interactive=False, max_height=360, wrap=True,
                        pinned_columns=KEY_COLUMNS, column_widths=COLUMN_WIDTHS,
                        label="History (newest first) — click a row to see it", elem_id="jobs-table")
    gr.Markdown(PEAK_NOTE, elem_classes="jobs-note")
    timer = gr.Timer(3.0)
    with gr.Row(equal_height=True):
        job_id = gr.Textbox(label="Job id", scale=3, min_width=160)
        show = gr.Button("Show", scale=1, min_width=70)
        cancel = gr.Button("Cancel", variant="stop", scale=1, min_width=80)
        retry = gr.Button("Retry", scale=1, min_width=70)
        resume = gr.Button("Resume from checkpoint", scale=1, min_width=120)
    notice = gr.Markdown("", elem_classes="job-notice")  # an expected refusal, said once (not an error on every panel)
    summary = gr.HTML(elem_id="job-summary")
    with gr.Row():
        with gr.Column():
            plot = gr.LinePlot(x="step", y="loss", color="series", title="Metrics", height=240)
            artifacts = gr.File(label="Artifacts", file_count="multiple", interactive=False)
        log = gr.Code(label="Events", language=None, lines=16, max_lines=30)
    shown = gr.State(None)  # the job the pane shows and what it last drew: {"id", "sig", "files", "metrics"}
    live = gr.Timer(1.0, active=False)  # ticks only while the shown job is unfinished
    pane = [summary, log, plot, artifacts, shown]

    def owner_of(request):
        return user_of(request, auth)

    def lookup(jid: str, request):
        """(job id, None) when the user may see the job, else (None, why not)."""
        try:
            return owned_job(studio, jid, owner_of(request)).id, None
        except gr.Error as e:
            return None, e.message

    def draw(jid: str, state: dict | None = None) -> tuple:
        """The pane's outputs for a job; with the state it last drew, only what changed (gr.skip() for the rest)."""
        job = studio.job(jid)
        evs, size = studio.events(jid)
        files = artifact_files(studio, jid, evs)
        metrics = sum(e["type"] == "metric" for e in evs)
        sig = [job.status.value, job.progress, job.message, job.error, job.peak_bytes, size]
        frame = loss_frame(evs)
        series = sorted(set(frame["series"]))
        new = {"id": jid, "sig": sig, "files": files, "metrics": metrics, "final": settled(job, evs), "series": series}
        same = state is not None and state.get("id") == jid
        if same and state["sig"] == sig:
            return (gr.skip(),) * 4 + (new,)
        if same and state["metrics"] == metrics:
            plot = gr.skip()
        elif state is None or state.get("series") != series:  # new series: a colour map rebuilds the plot's spec
            plot = gr.update(value=frame if series else None,  # (tabs.common.LivePlot says why)
                             color_map={k: PLOT_COLORS[i % len(PLOT_COLORS)] for i, k in enumerate(series)})
        else:
            plot = frame
        return (summary_html(job), "\n".join(log_lines(evs)), plot,
                gr.skip() if same and state["files"] == files else files, new)

    def refused(why: str) -> str:
        return f"⚠️ {why}"

    def arm(state):  # the live tick runs while the pane shows an unfinished job
        return gr.Timer(active=bool(state) and not state.get("final", True))

    def then_arm(event):
        event.then(arm, shown, live, show_progress="hidden", api_visibility="private")

    def on_refresh(request: gr.Request):
        return table(studio, owner_of(request)), queue_md(studio)

    for trigger, name in ((refresh.click, "jobs_list"), (timer.tick, "jobs_poll")):
        trigger(on_refresh, None, [jobs, queue_status], api_name=name, show_progress="hidden")

    def on_live(state, request: gr.Request):
        jid = (state or {}).get("id")
        if not jid or lookup(jid, request)[0] is None:
            return (gr.skip(),) * 5 + (gr.Timer(active=False),)
        out = draw(jid, state)
        return (*out, gr.Timer(active=not out[-1]["final"]))

    live.tick(on_live, shown, [*pane, live], show_progress="hidden", queue=False, api_visibility="private")

    def on_select(evt: gr.SelectData, request: gr.Request):
        row = evt.row_value if evt.row_value else None
        jid, why = lookup(row[0] if row else "", request)
        if jid is None:
            return (refused(why),) + (gr.skip(),) * 6
        return ("", jid, *draw(jid))

    then_arm(jobs.select(on_select, None, [notice, job_id, *pane], api_name="jobs_select", show_progress="hidden"))

    def on_show(jid, request: gr.Request):
        jid, why = lookup(jid, request)
        if jid is None:
            return (refused(why),) + (gr.skip(),) * 5
        return ("", *draw(jid))

    then_arm(show.click(on_show, job_id, [notice, *pane], api_name="job_show", show_progress="hidden"))
    then_arm(job_id.submit(on_show, job_id, [notice, *pane], show_progress="hidden", api_visibility="private"))

    def on_cancel(jid, request: gr.Request):
        jid, why = lookup(jid, request)
        if jid is None:
            return (refused(why),) + (gr.skip(),) * 6
        job = studio.cancel(jid)
        # a running job stops at its next progress call and may write a checkpoint first: wait a little so the pane
        # shows how it ended; the live tick takes over when it takes longer
        t0 = time.time()
        wait = min(10.0, studio.config.cancel_grace_s + 2)
        while not settled(job, studio.events(jid)[0]) and time.time() - t0 < wait:
            time.sleep(0.1)
            job = studio.job(jid)
        note = "" if job.status.final else "Cancel requested: the job stops at its next step; this pane follows it."
        return (note, *draw(jid), table(studio, owner_of(request)))

    then_arm(cancel.click(on_cancel, job_id, [notice, *pane, jobs], api_name="job_cancel", show_progress="hidden"))

    def relaunch(action):
        def fn(jid, request: gr.Request):
            jid, why = lookup(jid, request)
            if jid is None:
                return (refused(why),) + (gr.skip(),) * 7
            try:
                new = studio.resume(jid, owner_of(request)) if action == "resume" else \
                    studio.retry(jid, owner_of(request))
            except ValueError as e:  # not resumable, no checkpoint, bad params: expected, said once
                return (refused(str(e)),) + (gr.skip(),) * 7
            verb = "Resumed" if action == "resume" else "Retried"
            note = refused(new.error) if new.status.value == "REFUSED" else \
                f"{verb} job `{jid}` as job `{new.id}`; this pane follows it."
            return (note, new.id, *draw(new.id), table(studio, owner_of(request)))

        return fn

    outs = [notice, job_id, *pane, jobs]
    then_arm(retry.click(relaunch("retry"), job_id, outs, api_name="job_retry", show_progress="hidden"))
    then_arm(resume.click(relaunch("resume"), job_id, outs, api_name="job_resume", show_progress="hidden"))

    def on_pause(request: gr.Request):
        require_admin(studio, request, auth, "Pausing the queue")
        studio.pause()
        return queue_md(studio)

    def on_resume_queue(request: gr.Request):
        require_admin(studio, request, auth, "Resuming the queue")
        studio.resume_queue()
        return queue_md(studio)

    pause.click(on_pause, None, queue_status, api_name="queue_pause")
    resume_q.click(on_resume_queue, None, queue_status, api_name="queue_resume")
    return dict(refresh=refresh, pause=pause, resume_queue=resume_q, queue_status=queue_status, jobs=jobs,
                timer=timer, job_id=job_id, show=show, cancel=cancel, retry=retry, resume=resume, notice=notice,
                summary=summary, plot=plot, artifacts=artifacts, log=log, shown=shown, live=live)
