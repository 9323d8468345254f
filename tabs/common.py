"""What the tabs share: the one loop that follows jobs, re-attaching a tab to its job on page load, handlers that
take named inputs, formatting, reading a job's events into plot rows, the request's user."""
from __future__ import annotations

import html
import inspect
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import gradio as gr

from studio import Job, JobStatus


def own_uploads(studio, files, owner: str | None) -> list[str]:
    """Uploaded files as paths. With auth they are copied into the uploader's own folder first: the only files a
    remote user may name (studio.access), and outside the folder Gradio serves."""
    import secrets
    import shutil
    from pathlib import Path

    from studio.access import user_dir

    paths = [Path(f if isinstance(f, str) else f.name) for f in files or []]
    if owner is None or not paths:
        return [str(p) for p in paths]
    dest = user_dir(studio.config.users_dir, owner) / f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(4)}"
    dest.mkdir(mode=0o700, parents=True)
    for p in paths:
        shutil.copy(p, dest / p.name)
    return [str(dest / p.name) for p in paths]


def stash_uploads(studio, files, prefix: str, owner: str | None = None) -> str:
    """Uploaded files as one path: the file itself, or a new folder of them (in the uploader's own folder)."""
    import shutil
    from pathlib import Path

    paths = [Path(p) for p in own_uploads(studio, files, owner)]
    if len(paths) == 1:
        return str(paths[0])
    if owner is not None:
        return str(paths[0].parent)  # own_uploads put them in a folder of their own
    dest = studio.config.uploads_dir / f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}"
    dest.mkdir(parents=True, exist_ok=True)
    for p in paths:
        shutil.copy(p, dest / p.name)
    return str(dest)


def owned_job(studio, job_id: str, owner: str | None):
    """The job, when it exists and (with auth) belongs to `owner`; otherwise a gr.Error that says why."""
    job_id = (job_id or "").strip()
    if not job_id:
        raise gr.Error("Pick or enter a job first.")
    try:
        job = studio.job(job_id)
    except KeyError:
        raise gr.Error(f"No job {job_id}.") from None
    if owner is not None and job.owner != owner:
        raise gr.Error(f"Job {job_id} belongs to another user.")
    return job


def watch_all(studio, jobs: list[Job], every: float = 0.2) -> Iterator[list[tuple[Job, list[dict]]]]:
    """The one loop that follows jobs: yield [(job row, its events so far), …] until every job is final (the last
    list yielded is). Tabs turn these into what they show, so a Run button and a page reload stream alike."""
    events: dict[str, list[dict]] = {j.id: [] for j in jobs}
    offsets = dict.fromkeys(events, 0)
    while True:
        rows = [studio.job(j.id) for j in jobs]  # status before events: a final job has written all its events
        for j in rows:
            new, offsets[j.id] = studio.events(j.id, offsets[j.id])
            events[j.id].extend(new)
        yield [(j, events[j.id]) for j in rows]
        if all(j.status.final for j in rows):
            return
        time.sleep(every)


def watch(studio, job: Job, every: float = 0.2) -> Iterator[tuple[Job, list[dict]]]:
    """Yield (job row, its events so far) until the job is final (the last pair yielded is)."""
    for [(row, events)] in watch_all(studio, [job], every):
        yield row, events


@dataclass(frozen=True)
class Follow:
    """How a tab shows one job kind: the generator its own Run button streams with, and the components (names in
    the tab's build() dict) that each row it yields fills, in order."""

    stream: Callable[[Any, Job, str | None], Iterator[tuple]]  # stream(studio, job, owner)
    outputs: tuple[str, ...]
    form: tuple[str, ...] = ()  # the inputs a re-attached job's params fill (a param fills the input of its name)
    to_form: Callable[[Job], dict] | None = None  # inputs whose value is derived from the params, not named by them


def live_job(studio, kinds: tuple[str, ...], owner: str | None) -> Job | None:
    """The newest RUNNING or QUEUED job of these kinds that `owner` may see (every job when there is no auth)."""
    live = [j for status in (JobStatus.RUNNING, JobStatus.QUEUED) for j in studio.store.with_status(status)
            if j.kind in kinds and (owner is None or j.owner == owner)]
    return max(live, key=lambda j: j.created, default=None)


def visible_collections(studio, owner: str | None) -> list[dict]:
    """The RAG collections a user may use: all without auth; with auth her own (and, for the admin, those made
    before collections had owners)."""
    from workers.rag.index import list_collections

    admin = studio.user(owner).admin
    return [c for c in list_collections(studio.config.data_dir)
            if owner is None or c.get("owner") == owner or (admin and c.get("owner") is None)]


def fill_on_load(demo, studio, tab_id: str, ui: dict, fill: Callable | None, auth: bool) -> None:
    """A tab's per-user lists (its jobs, conversations, collections, trained models) are filled when the page loads,
    for the user who loaded it: nothing per-user is built into the page config that every visitor receives. `fill`
    is the tab's `fill(studio, owner) -> {component name: value or gr.update}`."""
    if fill is None:
        return
    names = list(fill(studio, None))  # the same names for every user; only the values differ

    def on_load(request: gr.Request):
        values = fill(studio, user_of(request, auth))
        return values[names[0]] if len(names) == 1 else tuple(values[n] for n in names)

    demo.load(on_load, None, [ui[n] for n in names], api_name=f"{tab_id}_fill", show_progress="hidden")


FILE_LIKE = ("File", "Image", "Audio", "Video", "State", "Gallery", "Dataframe", "Chatbot", "Button")


def _settable(component, value) -> bool:
    """Whether a remembered value may go back into this component: not a file (an upload is not kept), and one of
    its choices when it has fixed ones (a model or job that is gone is not restored)."""
    if type(component).__name__ in FILE_LIKE or value is None:
        return False
    choices = getattr(component, "choices", None)
    if choices and not getattr(component, "allow_custom_value", False):
        values = {c[1] if isinstance(c, (tuple, list)) else c for c in choices}
        items = value if isinstance(value, list) else [value]
        return all(v in values for v in items)
    return True


def _form_file(studio, owner: str | None):
    from studio.access import user_dir

    return (user_dir(studio.config.users_dir, owner) if owner else studio.config.data_dir) / "forms.json"


def saved_forms(studio, owner: str | None) -> dict[str, dict]:
    """The last-used settings of every form, per user: {form key: {input name: value}} (A1111's ui-config, kept for
    each user as they use the studio rather than edited by hand)."""
    import json

    try:
        return json.loads(_form_file(studio, owner).read_text())
    except (OSError, ValueError):
        return {}


def save_form(studio, owner: str | None, key: str, values: dict) -> None:
    """Keep a form's values (those JSON can hold) as its last-used settings."""
    import json
    import os

    cfg = studio.config
    uploads = (str(cfg.uploads_dir), str(cfg.users_dir))

    def upload(v) -> bool:  # an uploaded file's path: uploads are not settings, and they are not kept
        return any(isinstance(x, str) and x.startswith(uploads) for x in (v if isinstance(v, list) else [v]))

    def plain(x) -> bool:  # what JSON and the page's messages hold (orjson refuses ints past 64 bits)
        return isinstance(x, (str, float, bool)) or isinstance(x, int) and -2**63 <= x < 2**63

    keep = {k: v for k, v in values.items() if not upload(v) and (plain(v) or
            (isinstance(v, list) and all(plain(x) for x in v)))}
    path = _form_file(studio, owner)
    forms = saved_forms(studio, owner) | {key: keep}
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(forms, indent=1))
        os.replace(tmp, path)
    except OSError:
        pass  # settings are a convenience: a full disk must not stop the job


def job_form(job: Job, follow: Follow) -> dict:
    """The form values a job was started with: its params under the inputs' names, and what the tab derives."""
    params = job.params or {}
    values = {n: params[n] for n in follow.form if n in params}
    return values | (follow.to_form(job) if follow.to_form else {})


def reattach(demo, studio, tab_id: str, ui: dict, kinds: dict[str, Follow], auth: bool,
             forms: dict[str, tuple[str, ...]] | None = None) -> Callable | None:
    """On page load, put the user's last-used settings back into the tab's forms (`forms`: {form key: input names},
    saved by `bind(..., remember=key)`), then stream the newest unfinished job of the tab's kinds into the tab with
    the same code its Run button uses, its own params in the form, so a reload (or a second browser) picks up where
    the first page was. Returns the listener that makes the tab follow a job resumed elsewhere on the page (its
    `outputs` attribute names the components), for the Jobs tab's Resume."""
    forms = forms or {}
    if not kinds and not forms:
        return None
    form_names = [n for names in forms.values() for n in names] + [n for f in kinds.values() for n in f.form]
    names = list(dict.fromkeys([n for f in kinds.values() for n in f.outputs] + form_names))  # each once, in order
    names = [n for n in names if type(ui[n]).__name__ not in FILE_LIKE or n in
             {o for f in kinds.values() for o in f.outputs}]

    def shown(values: dict) -> tuple:
        return tuple(gr.update(value=values[n]) if n in values and n in form_names and _settable(ui[n], values[n])
                     else gr.skip() for n in names)

    def stream(job: Job, owner: str | None):
        """The job's own params into the form, then the job streamed with its tab's code."""
        follow = kinds[job.kind]
        if follow.form or follow.to_form:
            yield shown(job_form(job, follow))
        for row in follow.stream(studio, job, owner):
            out = dict(zip(follow.outputs, row, strict=True))
            yield tuple(out.get(n, gr.skip()) for n in names)  # another kind's components stay as they are

    def on_load(request: gr.Request):
        owner = user_of(request, auth)
        saved = saved_forms(studio, owner)
        last = {n: v for key, inputs in forms.items() for n, v in saved.get(key, {}).items() if n in inputs}
        if last:
            yield shown(last)
        job = live_job(studio, tuple(kinds), owner) if kinds else None
        if job is None:
            if not last:
                yield tuple(gr.skip() for _ in names)
            return
        yield from stream(job, owner)

    demo.load(on_load, None, [ui[n] for n in names], api_name=f"{tab_id}_attach", show_progress="hidden")

    def on_resumed(job_id: str, request: gr.Request):
        """A job resumed elsewhere on the page (the Jobs tab): this tab follows it when it is one of its kinds."""
        owner = user_of(request, auth)
        try:
            job = studio.job((job_id or "").strip())
        except KeyError:
            job = None
        if job is None or job.kind not in kinds or not job.resume_of or job.status.final or \
                (owner is not None and job.owner != owner):
            yield tuple(gr.skip() for _ in names)
            return
        yield from stream(job, owner)

    on_resumed.outputs = [ui[n] for n in names]
    return on_resumed


def resume_run(studio, owner: str | None, current: str, kind: str, nothing: str) -> Job:
    """A tab's Resume button: its run (or, with none on the page, the user's newest `kind` run that stopped before
    its end and left a checkpoint) continued from that checkpoint as a new job through the studio's resume. `nothing`
    says what to do when there is none."""
    if (current or "").strip():
        job = owned_job(studio, current, owner)
    else:
        job = next((j for j in studio.jobs(limit=50, owner=owner, kind=kind) if j.status in
                    (JobStatus.CANCELLED, JobStatus.INTERRUPTED, JobStatus.FAILED) and studio.checkpoint_of(j.id)), None)
    if job is None:
        raise gr.Error(nothing)
    try:
        return studio.resume(job.id, owner)
    except (ValueError, KeyError) as e:
        raise gr.Error(str(e)) from None


def bind(handler: Callable, studio, auth: bool, remember: str | None = None) -> Callable:
    """`handler(studio, owner, values)`, a generator that starts a job and streams it, as a Gradio listener for
    `inputs_kwargs={name: component}`: `values` maps each input's name to its value, and those names are the
    endpoint's parameter names for gradio_client, in that order. With `remember`, the values are kept as that form's
    last-used settings for the user, put back when the page loads (the tab's FORMS names the form's inputs)."""
    if not inspect.isgeneratorfunction(handler):
        raise TypeError(f"{handler.__name__} must be a generator: it streams the job it starts")
    def listener(request: gr.Request, **values):
        owner = user_of(request, auth)
        kept = not remember
        for out in handler(studio, owner, values):
            if not kept:  # the job was taken (a refused submit raised before this): the form is worth keeping
                save_form(studio, owner, remember, values)
                kept = True
            yield out

    return listener


def gib(b: float | None) -> str:
    return "—" if b is None else f"{b / 2**30:.2f} GiB"


def user_of(request: Any, auth: bool) -> str | None:
    """The logged-in user when the studio runs with auth (jobs are then scoped to their owner)."""
    return getattr(request, "username", None) if auth and request is not None else None


def admin_only(studio, owner: str | None, *names: str) -> dict:
    """Updates that show these components to the admin only (a remote user could not use them: studio.access)."""
    shown = studio.user(owner).admin
    return {n: gr.update(visible=shown) for n in names}


def require_admin(studio, request: Any, auth: bool, what: str) -> None:
    """Settings, the queue and the model cache are shared by everyone: only the admin changes them."""
    if not studio.user(user_of(request, auth)).admin:
        raise gr.Error(f"{what} is for the studio's admin; ask them.")


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else \
        f"{seconds // 60}:{seconds % 60:02d}"


def progress_html(job, eta_s: float | None = None) -> str:
    """A job's status line with a progress bar, the wait reason or the error."""
    frac = job.progress or 0.0
    head = f"<b>{html.escape(job.kind)}</b> job <code>{job.id}</code> — <b>{job.status.value}</b>"
    parts = [head]
    if job.status.value == "RUNNING":
        eta = f" · ETA {duration(eta_s)}" if eta_s else ""
        parts.append(f"<div class='job-progress'><div style='width:{100 * frac:.1f}%'></div></div>"
                     f"{100 * frac:.0f}% · {html.escape(job.message or '')}{eta}")
    if job.wait_reason and job.status.value == "QUEUED":
        parts.append(html.escape(job.wait_reason))
    if job.error:
        parts.append(f"<span style='color:#b91c1c'>{html.escape(job.error)}</span>")
    return "<br>".join(parts)


def eta(job) -> float | None:
    if job.status.value != "RUNNING" or not job.started or not job.progress or job.progress <= 0:
        return None
    elapsed = time.time() - job.started
    return elapsed * (1 - job.progress) / job.progress


def loss_frame(events: list[dict], keys: tuple[str, ...] = ("train_loss", "val_loss")):
    """Long-format (step, loss, series) rows of a job's metric events, for a gr.LinePlot."""
    import pandas as pd

    rows = [{"step": e["step"], "loss": e[k], "series": k}
            for e in events if e["type"] == "metric" for k in keys if e.get(k) is not None]
    # explicit dtypes: an empty frame must still read as numbers, or the plot draws its axes as categories
    return pd.DataFrame(rows, columns=["step", "loss", "series"]).astype({"step": "int64", "loss": "float64"})


# Tableau 10, Vega's own category colours, so a series keeps its colour whichever others are present
PLOT_COLORS = ("#4c78a8", "#f58518", "#e45756", "#72b7b2", "#54a24b", "#eeca3b", "#b279a2", "#ff9da6", "#9d755d")


class LivePlot:
    """The values one stream sends a gr.LinePlot(x="step", y="loss", color="series") as a job's metrics arrive:
    `plot(events)` is None until there are points, then the frame of loss_frame.

    Why: Gradio's plot builds its Vega spec, and with it the colour scale's domain (the series found in the data),
    only when it mounts or one of its settings changes; a new value later only swaps the data. A first empty frame
    fixed that domain empty, so every line was drawn without a stroke (axes and an empty legend) until something
    re-rendered the plot. None keeps the plot unmounted until the first points, so it mounts with every series they
    hold. A series that appears only later (validation after training loss) comes with a colour map, a setting
    whose change rebuilds the spec; that one value is a gr.update, the others plain frames (what API clients get)."""

    def __init__(self, keys: tuple[str, ...] = ("train_loss", "val_loss")):
        self.keys = keys
        self.shown: tuple[str, ...] | None = None  # the series the plot was built with; None: not mounted

    def __call__(self, events: list[dict]):
        frame = loss_frame(events, self.keys)
        if frame.empty:
            self.shown = None
            return None
        series = tuple(k for k in self.keys if k in set(frame["series"]))
        grew, self.shown = self.shown is not None and series != self.shown, series
        if not grew:
            return frame
        return gr.update(value=frame, color_map={k: PLOT_COLORS[self.keys.index(k) % len(PLOT_COLORS)]
                                                 for k in series})


def suggested_change(studio, job: Job) -> dict:
    """The gate's change that fits, for a REFUSED job: {param: value} from its end event (Refused.suggestion), or
    {} when it was not refused or nothing smaller fits."""
    if job.status is not JobStatus.REFUSED:
        return {}
    evs, _ = studio.events(job.id)
    return next((e.get("suggestion") or {} for e in evs if e["type"] == "end"), {})


def offer_fix(studio, job_id: str, owner: str | None, inputs: dict[str, tuple[str, str]]) -> tuple:
    """What a tab's Apply button shows after a job was started: (the button's update, {input name: value}). A
    refused job whose refusal suggests a change that fits gets the button, labelled with that change in the form's
    words; `inputs` maps each param the gate may change to (its input's name in build(), the input's label)."""
    if not (job_id or "").strip():
        return gr.update(visible=False), {}
    change = {p: v for p, v in suggested_change(studio, owned_job(studio, job_id, owner)).items() if p in inputs}
    if not change:
        return gr.update(visible=False), {}
    words = ", ".join(f"{inputs[p][1]} {v}" for p, v in change.items())
    return gr.update(visible=True, value=f"Apply: {words}"), {inputs[p][0]: v for p, v in change.items()}


def apply_fix(change: dict, names: tuple[str, ...], start: str) -> tuple:
    """The Apply button: the suggested values into the form's inputs `names` (the others stay), the button hidden;
    `start` names the button that starts the job."""
    change = {n: v for n, v in (change if isinstance(change, dict) else {}).items() if n in names}
    if change:
        gr.Info(f"Applied the change that fits the memory budget. Press {start} to start.")
    return (*(gr.update(value=change[n]) if n in change else gr.skip() for n in names), gr.update(visible=False))


def wire_training(studio, auth: bool, ui: dict, *, prefix: str, kind: str, api: str, form: str, start: Callable,
                  follow: Callable, inputs: tuple[str, ...], outputs: tuple[str, ...], fix_inputs: dict,
                  nothing_to_resume: str) -> None:
    """The controls every training sub-tab has, wired the same way: Train (`start`, the form remembered as `form`;
    then the gate's fitting change offered), Resume (the tab's run or the newest that stopped, from its checkpoint),
    Apply (the offered change into the form) and Cancel (it stops at the next step, keeping a checkpoint). The
    components are ui[prefix + name] for train, resume, cancel, fix, fix_change, job_id and status; endpoints are
    /<api>_train, _fix_offer, _resume, _apply_fix and _cancel."""
    c = {n: ui[prefix + n] for n in ("train", "resume", "cancel", "fix", "fix_change", "job_id", "status")}
    outs = [ui[n] for n in outputs]

    def on_fix_offer(current, request: gr.Request):
        return offer_fix(studio, current, user_of(request, auth), fix_inputs)

    c["train"].click(bind(start, studio, auth, remember=form), None, outs, inputs_kwargs={n: ui[n] for n in inputs},
                     api_name=f"{api}_train", show_progress="hidden"
                     ).then(on_fix_offer, c["job_id"], [c["fix"], c["fix_change"]], api_name=f"{api}_fix_offer",
                            show_progress="hidden")

    def on_resume(current, request: gr.Request):
        owner = user_of(request, auth)
        yield from follow(studio, resume_run(studio, owner, current, kind, nothing_to_resume), owner)

    c["resume"].click(on_resume, c["job_id"], outs, api_name=f"{api}_resume", show_progress="hidden")
    fix_names = tuple(n for n, _ in fix_inputs.values())
    c["fix"].click(lambda change: apply_fix(change, fix_names, "Train"), c["fix_change"],
                   [*(ui[n] for n in fix_names), c["fix"]], api_name=f"{api}_apply_fix", show_progress="hidden")

    def on_cancel(current, request: gr.Request):
        yield from cancel_and_follow(studio, current, user_of(request, auth))

    c["cancel"].click(on_cancel, c["job_id"], c["status"], api_name=f"{api}_cancel")


def cancel_and_follow(studio, current: str, owner: str | None) -> Iterator[str]:
    """Cancel a training job: the request is shown at once, then its final status (CANCELLED, with Resume's
    checkpoint) when it stops, so the Cancel button's own event ends on it even when no other stream still follows
    the job (one that died with a dropped connection)."""
    if not (current or "").strip():
        yield "No job to cancel."
        return
    job = studio.cancel(owned_job(studio, current, owner).id)
    yield progress_html(job) + ("<br>Cancel requested: it stops at the next step and keeps a checkpoint; "
                                "Resume continues from it." if not job.status.final else "")
    if not job.status.final:
        for row, _ in watch(studio, job, every=0.5):
            if row.status.final:
                yield progress_html(row)


def finished_run(studio, owner: str | None, current: str, kind: str, none_yet: str) -> Job:
    """The picked `kind` job when it finished, else the user's newest finished one; gr.Error(none_yet) otherwise."""
    if (current or "").strip():
        job = owned_job(studio, current, owner)
        if job.kind == kind and job.status is JobStatus.DONE:
            return job
    for j in studio.jobs(limit=50, owner=owner, kind=kind):
        if j.status is JobStatus.DONE:
            return j
    raise gr.Error(none_yet)
