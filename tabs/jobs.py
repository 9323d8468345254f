"""Jobs tab: history, a job's log, metrics and artifacts; cancel, retry, resume; pause and resume the queue."""

import html
import json
import time

from .common import admin_only, duration, gib, loss_frame, owned_job, progress_html, require_admin, user_of

HEADERS = ["id", "kind", "status", "created", "ran for", "estimate", "peak", "peak/est", "note"]


def ratio(job) -> str:
    """Measured peak over the estimate: above 1.00 the estimate was too low for this job."""
    if not job.peak_bytes or not job.estimate_bytes:
        return "—"
    return f"{job.peak_bytes / job.estimate_bytes:.2f}"


def table(studio, owner: str | None = None) -> list[list]:
    rows = []
    for j in studio.jobs(limit=200, owner=owner):
        ran = (j.finished or time.time()) - j.started if j.started else None
        note = j.error or j.wait_reason or j.message or ""
        rows.append([j.id, j.kind, j.status.value, time.strftime("%m-%d %H:%M:%S", time.localtime(j.created)),
                     duration(ran), gib(j.estimate_bytes), gib(j.peak_bytes), ratio(j),
                     note.splitlines()[0][:90] if note else ""])
    return rows


def fill(studio, owner: str | None) -> dict:
    """The user's jobs, on page load."""
    return {"jobs": table(studio, owner), **admin_only(studio, owner, "pause", "resume_queue")}


def queue_md(studio) -> str:
    if studio.store.paused:
        return f"**Queue paused.** {studio.store.get_meta('pause_reason') or ''}"
    return f"Queue running · {len(studio.store.queued())} waiting"


def details(studio, job_id: str):
    """(summary markdown, log text, metrics rows, artifact paths) for one job."""
    job = studio.job(job_id)
    evs, _ = studio.events(job_id)
    from studio.gate import Estimate

    est = Estimate.from_dict(job.estimate)
    md = [progress_html(job),
          f"**estimate** {html.escape(est.describe()) if job.estimate else '—'} · **measured peak** "
          f"{gib(job.peak_bytes)} (peak/estimate {ratio(job)}) · **budget** {gib(job.budget_bytes)}"]
    if job.resolved:
        changed = {k: v for k, v in job.resolved.items() if job.params.get(k) != v}
        md.append("**chosen to fit** " + html.escape(", ".join(f"{k}={v}" for k, v in changed.items())))
    if job.resume_of:
        md.append(f"resumes job `{job.resume_of}`")
    md.append("<details><summary>params</summary><pre>" + html.escape(json.dumps(job.params, indent=1)) +
              "</pre></details>")
    if job.result:
        md.append("<details open><summary>result</summary><pre>" + html.escape(json.dumps(job.result, indent=1)) +
                  "</pre></details>")
    if job.traceback:
        md.append("<details><summary>traceback</summary><pre>" + html.escape(job.traceback) + "</pre></details>")
    log = []
    for e in evs:
        t = time.strftime("%H:%M:%S", time.localtime(e["t"]))
        body = {k: v for k, v in e.items() if k not in ("t", "type")}
        if e["type"] == "log":
            body = body.get("message")
        elif e["type"] == "sample":
            body = f"step {body.get('step')}: {body.get('text', '')[:200]!r}"
        log.append(f"{t} {e['type']:9} {body}")
    run_dir = studio.run_dir(job_id)
    files = [str(run_dir / e["path"]) for e in evs if e["type"] == "artifact" and (run_dir / e["path"]).exists()]
    if (run_dir / "run.json").exists():
        files.append(str(run_dir / "run.json"))
    return "<br>".join(md), "\n".join(log[-400:]), loss_frame(evs), files


def build(studio, auth: bool = False) -> dict:
    import gradio as gr

    with gr.Row():
        refresh = gr.Button("Refresh", scale=1)
        pause = gr.Button("Pause queue", scale=1)
        resume_q = gr.Button("Resume queue", scale=1)
        queue_status = gr.Markdown(queue_md(studio))
    jobs = gr.Dataframe([], headers=HEADERS, interactive=False, max_height=360, wrap=True,
                        label="History (newest first) — click a row to see it")
    timer = gr.Timer(3.0)
    with gr.Row():
        job_id = gr.Textbox(label="Job id", scale=3)
        show = gr.Button("Show", scale=1)
        cancel = gr.Button("Cancel", variant="stop", scale=1)
        retry = gr.Button("Retry", scale=1)
        resume = gr.Button("Resume from checkpoint", scale=1)
    summary = gr.HTML()
    with gr.Row():
        with gr.Column():
            plot = gr.LinePlot(x="step", y="loss", color="series", title="Metrics", height=240)
            artifacts = gr.File(label="Artifacts", file_count="multiple", interactive=False)
        log = gr.Code(label="Events", language=None, lines=16, max_lines=30)

    def owner_of(request):
        return user_of(request, auth)

    def guard(jid: str, request) -> str:
        return owned_job(studio, jid, owner_of(request)).id

    def on_refresh(request: gr.Request):
        return table(studio, owner_of(request)), queue_md(studio)

    for trigger, name in ((refresh.click, "jobs_list"), (timer.tick, "jobs_poll")):
        trigger(on_refresh, None, [jobs, queue_status], api_name=name, show_progress="hidden")

    def on_select(evt: gr.SelectData, request: gr.Request):
        row = evt.row_value if evt.row_value else None
        if not row:
            return gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip()
        return (row[0], *details(studio, guard(row[0], request)))

    jobs.select(on_select, None, [job_id, summary, log, plot, artifacts], api_name="jobs_select")

    def on_show(jid, request: gr.Request):
        return details(studio, guard(jid, request))

    show.click(on_show, job_id, [summary, log, plot, artifacts], api_name="job_show")

    def on_cancel(jid, request: gr.Request):
        studio.cancel(guard(jid, request))
        return (*details(studio, jid.strip()), table(studio, owner_of(request)))

    cancel.click(on_cancel, job_id, [summary, log, plot, artifacts, jobs], api_name="job_cancel")

    def relaunch(action):
        def fn(jid, request: gr.Request):
            jid = guard(jid, request)
            try:
                new = studio.resume(jid, owner_of(request)) if action == "resume" else studio.retry(jid, owner_of(request))
            except ValueError as e:
                raise gr.Error(str(e))
            return (new.id, *details(studio, new.id), table(studio, owner_of(request)))

        return fn

    retry.click(relaunch("retry"), job_id, [job_id, summary, log, plot, artifacts, jobs], api_name="job_retry")
    resume.click(relaunch("resume"), job_id, [job_id, summary, log, plot, artifacts, jobs], api_name="job_resume")

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
                timer=timer, job_id=job_id, show=show, cancel=cancel, retry=retry, resume=resume, summary=summary,
                plot=plot, artifacts=artifacts, log=log)
