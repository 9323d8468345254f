"""Transcribe tab: faster-whisper on uploaded files or the microphone, segments streaming in as they decode;
speaker labels and renames; the LLM post-editor's changes shown as a word diff to accept or reject."""
import html
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import gradio as gr

from studio import Job
from studio.presets import choices, default
from workers.speech import transcript as tr

from . import transcribe_finetune
from .common import Follow, bind, own_uploads, owned_job, progress_html, user_of, watch_all

# the Transcribe button's inputs: names in build()'s dict, and the /transcribe endpoint's parameters in this order
INPUTS = ("files", "mic", "model", "language", "task", "vad", "vad_threshold", "min_silence_ms", "word_timestamps",
          "beam_size", "batched", "initial_prompt", "hotwords", "diarize", "num_speakers", "post_edit",
          "editor_model", "glossary")
OUTPUTS = ("status", "transcript", "outputs", "job_ids", "job")  # what a transcribe job streams into
FORM = tuple(n for n in INPUTS if n not in ("files", "mic"))  # the settings: each one a job param of its name


def _ts(t: float) -> str:
    return f"{int(t) // 60:02d}:{t % 60:05.2f}"


def transcripts(studio, owner=None) -> list[tuple[str, str]]:
    """Finished transcribe jobs with a transcript, newest first, as dropdown choices."""
    out = []
    for j in studio.jobs(limit=100, owner=owner, kind="transcribe"):
        if (studio.run_dir(j.id) / "transcript.json").exists():
            name = str(j.params.get("audio", "")).rsplit("/", 1)[-1]
            out.append((f"{j.id} · {name} · {j.status.value}", j.id))
    return out


def fill(studio, owner: str | None) -> dict:
    """The user's transcripts, and the models marked as on disk or needing a download as they are now, on page
    load."""
    return {"job": gr.update(choices=transcripts(studio, owner)),
            "model": gr.update(choices=choices("whisper", studio.config.data_dir)),
            "editor_model": gr.update(choices=choices("llm", studio.config.data_dir))} | \
        transcribe_finetune.fill(studio, owner)


def source_name(job: Job) -> str:
    """The name of the file a job transcribed, as the user gave it (an upload keeps its name in its folder)."""
    return Path(str(job.params.get("audio", ""))).name


def named_outputs(studio, job: Job) -> list[str]:
    """A job's transcript files under its source file's name (meeting.srt, meeting.edited.srt, meeting.edits.json),
    for the Outputs panel: eight `transcript.*` from a batch could not be told apart. The run folder keeps its own
    names (the CLI, renames and edits use them), so these are copies, made in a random folder of Gradio's cache
    (only the page that asked gets them) each time the panel is filled, after a rename or a saved edit too."""
    import secrets
    import shutil

    run_dir = studio.run_dir(job.id)
    files = [p for p in sorted(run_dir.glob("transcript*.*")) if p.suffix[1:] in tr.FORMATS]
    files += [run_dir / "edits.json"] if (run_dir / "edits.json").exists() else []
    if not files:
        return []
    stem = Path(source_name(job)).stem or "transcript"
    dest = studio.config.uploads_dir / secrets.token_hex(16)
    dest.mkdir(parents=True)
    out = []
    for f in files:
        name = stem + f.name.removeprefix("transcript") if f.name.startswith("transcript.") else f"{stem}.{f.name}"
        shutil.copyfile(f, dest / name)
        out.append(str(dest / name))
    return out


def segment_rows(run_dir) -> list[list]:
    """The transcript's segments as the review table shows them: id, start, speaker, the text as it reads now."""
    data = tr.load(run_dir)
    names = data.get("speaker_names") or {}
    return [[s["id"], _ts(s["start"]), names.get(s.get("speaker"), s.get("speaker") or ""), s["text"].strip()]
            for s in tr.edited_segments(run_dir)]


def review(studio, job_id: str | None):
    """(speaker table rows, diff HTML, change choices, accepted ids, output files) of one transcript."""
    if not job_id:
        return [], "", [], [], None
    run_dir = studio.run_dir(job_id)
    files = named_outputs(studio, studio.job(job_id))
    data = tr.load(run_dir)
    names = data.get("speaker_names") or {}
    rows = [[s, names.get(s, "")] for s in tr.speakers(data)]
    diff, picks, accepted = "", [], []
    if (run_dir / "edits.json").exists():
        import json

        edits = json.loads((run_dir / "edits.json").read_text())
        items = []
        for c in edits["changes"]:
            who = f"{names.get(c['speaker'], c['speaker'])}: " if c.get("speaker") else ""
            items.append(f"<p><b>#{c['id']}</b> [{_ts(c['start'])}] {who}{tr.diff_html(c['diff'])}</p>")
            picks.append((f"#{c['id']} {c['edited'][:60]}", c["id"]))
            if c["accepted"]:
                accepted.append(c["id"])
        dropped = len(edits.get("discarded", []))
        diff = (f"<div class='diff'><p>{len(edits['changes'])} change(s) by {edits.get('model')}"
                + (f"; {dropped} proposal(s) discarded because they added or dropped words" if dropped else "")
                + "</p>" + "".join(items) + "</div>")
    return rows, diff, picks, accepted, files or None


def _lines(events: list[dict]) -> list[str]:
    """A job's transcript so far: what it detected, then a line per segment (with its speaker once labelled)."""
    lines: list[str] = []
    for e in events:
        if e["type"] == "segment":
            lines.append(f"[{_ts(e['start'])} → {_ts(e['end'])}] {e['text'].strip()}")
        elif e["type"] == "info":
            lines.append(f"— {e['language']} ({100 * e['language_probability']:.0f}%), {e['duration']:.1f} s, "
                         f"{e['model']} {e['compute_type']} on {e['device']}")
        elif e["type"] == "speakers":  # the transcript again, now with a speaker on every line
            lines = lines[:1] + [f"[{_ts(s['start'])} → {_ts(s['end'])}] {s['speaker']}: {s['text'].strip()}"
                                 for s in e["segments"]]
        elif e["type"] == "post_edit":
            lines.append(f"— post-editor: {e['changes']} change(s) proposed (review below)")
    return lines


def follow_all(studio, jobs: list[Job], owner: str | None, notes: Sequence[str] = ()) -> Iterator[tuple]:
    """Stream transcribe jobs into the tab (OUTPUTS): segments as they decode, then the files (named by their
    source) and, once all are done, the first transcript opened in the review panel. `notes` (files skipped) stay
    above the jobs' status."""
    ids = [j.id for j in jobs]
    named: dict[str, list[str]] = {}  # a finished job's files, copied once
    head = "".join(f"<p>{html.escape(n)}</p>" for n in notes)
    for rows in watch_all(studio, jobs, every=0.3):
        current = [job for job, _ in rows]
        body = "\n\n".join("\n".join(_lines(events)) for _, events in rows)
        done = all(j.status.final for j in current)
        for j in current:  # a cancelled job keeps what it transcribed so far
            if j.id not in named and j.status.value in ("DONE", "CANCELLED"):
                named[j.id] = named_outputs(studio, j)
        files_out = [f for j in current for f in named.get(j.id, [])]
        picker = gr.update()
        if done:
            picks = transcripts(studio, owner)
            picker = gr.update(choices=picks, value=ids[0] if any(c[1] == ids[0] for c in picks) else None)
        yield head + "<br>".join(progress_html(j) for j in current), body, files_out or None, ids, picker


def follow(studio, job: Job, owner: str | None) -> Iterator[tuple]:
    """What a reloaded page streams: the user's unfinished transcribe jobs (a batch is a job per file), oldest
    first, so Cancel reaches them all again."""
    batch = [j for j in studio.jobs(limit=100, owner=owner, kind="transcribe") if not j.status.final]
    batch = sorted({j.id: j for j in [*batch, job]}.values(), key=lambda j: j.created)
    yield from follow_all(studio, batch, owner)


# a reloaded page re-attaches to the running job with its own settings in the form (every setting is the job
# param of its name); the form's last-used settings come back on page load (tabs.common.bind(..., remember=...))
KINDS = {"transcribe": Follow(follow, OUTPUTS, form=FORM), **transcribe_finetune.KINDS}
FORMS = {**transcribe_finetune.FORMS, "transcribe": FORM}  # the Transcribe form last: /transcribe_attach ends with it


def start(studio, owner: str | None, v: dict[str, Any]) -> Iterator[tuple]:
    """The Transcribe button, given its inputs by name (INPUTS): a job per uploaded file (and the recording),
    streamed together. A file the job would refuse (empty, …) is skipped with a note; the others run."""
    paths = own_uploads(studio, list(v["files"] or []) + ([v["mic"]] if v["mic"] else []), owner)
    if not paths:
        raise gr.Error("Upload a file or record something first.")
    jobs, skipped = [], []  # skipped: (file name, why)
    for path in paths:
        name = Path(path).name  # an upload's folder keeps the name the user gave it
        try:
            jobs.append(studio.submit("transcribe", dict(
                audio=path, model=v["model"], language=(v["language"] or "").strip(), task=v["task"], vad=v["vad"],
                vad_threshold=v["vad_threshold"], min_silence_ms=int(v["min_silence_ms"]),
                word_timestamps=v["word_timestamps"], beam_size=int(v["beam_size"]), batched=v["batched"],
                initial_prompt=v["initial_prompt"] or "", hotwords=v["hotwords"] or "", diarize=v["diarize"],
                num_speakers=int(v["num_speakers"] or 0) if v["diarize"] else 0, post_edit=v["post_edit"],
                editor_model=v["editor_model"], glossary=v["glossary"] or ""), owner=owner))
        except ValueError as e:
            skipped.append((name, str(e).replace(path, name)))
    notes = [f"Skipped {why}" if why.startswith(name) else f"Skipped {name}: {why}" for name, why in skipped]
    if not jobs:
        reasons = {why for _, why in skipped}  # one reason for every file (a bad setting) is said once
        raise gr.Error(reasons.pop() if len(reasons) == 1 else " ".join(notes))
    if notes:
        notes.append(f"Transcribing the other {len(jobs)} file(s).")
    yield from follow_all(studio, jobs, owner, notes)


def build(studio, auth: bool = False) -> dict:
    """The Transcribe sub-tab and the Fine-tune sub-tab (tabs.transcribe_finetune, its components all af_…)."""
    with gr.Tabs() as tabs:
        with gr.Tab("Transcribe", id="transcribe_sub"):
            ui = build_transcribe(studio, auth)
        with gr.Tab("Fine-tune", id="transcribe_finetune_sub"):
            ui |= transcribe_finetune.build_train(studio, auth)
    transcribe_finetune.wire_use(studio, ui, tabs, auth)  # Transcribe with it: the run's model into Transcribe
    return ui


def build_transcribe(studio, auth: bool = False) -> dict:
    data_dir = studio.config.data_dir
    gr.Markdown("Transcribe or translate speech with faster-whisper. Silero VAD skips silence; word timestamps "
                "go into the JSON; speakers are labelled on request; an LLM can fix punctuation, casing and names. "
                "Outputs: TXT, SRT, VTT and JSON in the job's run folder.")
    with gr.Row():
        with gr.Column(scale=2):
            files = gr.File(label="Audio or video files (each becomes a job)", file_count="multiple")
            mic = gr.Audio(sources=["microphone", "upload"], type="filepath", label="…or record")
            with gr.Row():
                # the first click works offline: a downloaded preset, else the packaged tiny.en
                model = gr.Dropdown(choices("whisper", data_dir), value=default("whisper", data_dir),
                                    allow_custom_value=True,
                                    label="Model (a preset, a CTranslate2 folder or a Whisper fine-tune's job id)")
                language = gr.Textbox("", label="Language (empty: detect)", placeholder="en")
                task = gr.Radio(["transcribe", "translate"], value="transcribe", label="Task")
            with gr.Accordion("Options", open=False):
                with gr.Row():
                    vad = gr.Checkbox(True, label="VAD (skip silence)")
                    vad_threshold = gr.Slider(0.05, 0.95, 0.5, step=0.05, label="VAD threshold")
                    min_silence_ms = gr.Slider(100, 3000, 500, step=50, label="Min silence (ms)")
                with gr.Row():
                    word_timestamps = gr.Checkbox(True, label="Word timestamps")
                    beam_size = gr.Slider(1, 10, 5, step=1, label="Beam size")
                    batched = gr.Checkbox(False, label="Batched (long files)")
                initial_prompt = gr.Textbox(label="Initial prompt / glossary",
                                            placeholder="Names: Anneliese, Kubernetes…")
                hotwords = gr.Textbox(label="Hotwords")
            with gr.Accordion("Speakers and post-editor", open=False):
                with gr.Row():
                    diarize = gr.Checkbox(False, label="Label speakers")
                    num_speakers = gr.Number(0, precision=0, minimum=0, maximum=20,
                                             label="Number of speakers (0: find out)")
                with gr.Row():
                    post_edit = gr.Checkbox(False, label="LLM post-editor")
                    editor_model = gr.Dropdown(choices("llm", data_dir), value=default("llm", data_dir),
                                               allow_custom_value=True, label="Editor model (preset, .gguf, folder)")
                glossary = gr.Textbox(label="Glossary for the editor (names and terms, comma-separated)",
                                      placeholder="Alice Nakamura, PostgreSQL, Reykjavík")
            with gr.Row():
                go = gr.Button("Transcribe", variant="primary")
                cancel = gr.Button("Cancel", variant="stop")
        with gr.Column(scale=3):
            status = gr.HTML()
            transcript = gr.Textbox(label="Transcript", lines=16, interactive=False)
            outputs = gr.File(label="Outputs", file_count="multiple", interactive=False)
    with gr.Accordion("Review: speakers and the editor's changes", open=True):
        with gr.Row():
            job = gr.Dropdown([], label="Transcript", allow_custom_value=True)
            refresh = gr.Button("↻", scale=0, min_width=40)
        with gr.Row():
            with gr.Column(scale=1):
                speakers = gr.Dataframe(headers=["Speaker", "Name"], column_count=2, interactive=True,
                                        label="Speakers: type a name, then Apply names", value=[])
                rename = gr.Button("Apply names")
            with gr.Column(scale=2):
                diff = gr.HTML()
                changes = gr.CheckboxGroup(label="Changes to keep (untick to reject)", choices=[])
                save_edits = gr.Button("Save edited transcript")
        segments = gr.Dataframe(headers=["#", "start", "speaker", "text"], column_count=4, interactive=True,
                                wrap=True, max_height=360, value=[],
                                label="Segments: correct the text where it is wrong, then Save corrections (a "
                                      "fine-tune on this transcript learns the corrected words)")
        save_corrections = gr.Button("Save corrections")
        review_note = gr.Markdown()
    job_ids = gr.State([])

    ui = dict(files=files, mic=mic, model=model, language=language, task=task, vad=vad,
              vad_threshold=vad_threshold, min_silence_ms=min_silence_ms, word_timestamps=word_timestamps,
              beam_size=beam_size, batched=batched, initial_prompt=initial_prompt, hotwords=hotwords,
              diarize=diarize, num_speakers=num_speakers, post_edit=post_edit, editor_model=editor_model,
              glossary=glossary, go=go, cancel=cancel, status=status, transcript=transcript, outputs=outputs,
              job=job, speakers=speakers, diff=diff, changes=changes, rename=rename, save_edits=save_edits,
              segments=segments, save_corrections=save_corrections, review_note=review_note, job_ids=job_ids)
    go.click(bind(start, studio, auth, remember="transcribe"), None, [ui[n] for n in OUTPUTS],
             inputs_kwargs={n: ui[n] for n in INPUTS}, api_name="transcribe", show_progress="hidden")

    def on_cancel(ids):
        for j in ids or []:
            studio.cancel(j)
        return "Cancelling: what was transcribed so far is kept." if ids else "Nothing to cancel."

    cancel.click(on_cancel, job_ids, status, api_name="transcribe_cancel")

    def mine(job_id, request):
        job = owned_job(studio, job_id, user_of(request, auth))
        if job.kind != "transcribe":
            raise gr.Error(f"{job.id} is a {job.kind} job, not a transcript")
        return job.id

    def on_pick(job_id, request: gr.Request):
        if not job_id:
            return [], "", gr.update(choices=[], value=[]), None, ""
        try:
            rows, html_diff, picks, accepted, files_out = review(studio, mine(job_id, request))
        except FileNotFoundError as e:
            raise gr.Error(str(e))
        note = "" if rows or picks else "This transcript has neither speaker labels nor post-editor changes."
        return rows, html_diff, gr.update(choices=picks, value=accepted), files_out, note

    job.change(on_pick, job, [speakers, diff, changes, outputs, review_note], api_name="transcript_review")

    def on_refresh(request: gr.Request):
        return gr.update(choices=transcripts(studio, user_of(request, auth)))

    refresh.click(on_refresh, None, job)

    def on_rename(job_id, table, request: gr.Request):
        mine(job_id, request)
        rows = table.values.tolist() if hasattr(table, "values") else (table or [])
        typed = {str(r[0]): str(r[1] or "").strip() for r in rows if r and r[0]}
        run_dir = studio.run_dir(job_id)
        try:
            before = tr.load(run_dir).get("speaker_names") or {}
            after = tr.rename_speakers(run_dir, typed)["speaker_names"] if typed else before
        except (FileNotFoundError, ValueError) as e:
            raise gr.Error(str(e))
        *out, _ = on_pick(job_id, request)
        if not typed:
            note = "This transcript has no speakers to name: transcribe it with Label speakers ticked."
        elif after == before:
            note = ("No names typed: type a name next to a speaker, then press Apply names." if not after else
                    "The names are as they were; nothing changed.")
        elif after:
            note = "Names applied to every output: " + ", ".join(f"{k} → {v}" for k, v in after.items()) + "."
        else:
            note = "Names removed: every output shows the speaker labels again."
        return (*out, note)

    rename.click(on_rename, [job, speakers], [speakers, diff, changes, outputs, review_note],
                 api_name="transcript_rename")

    def on_segments(job_id, request: gr.Request):
        if not job_id:
            return []
        try:
            return segment_rows(studio.run_dir(mine(job_id, request)))
        except FileNotFoundError:
            return []

    def on_save(job_id, keep, request: gr.Request):
        mine(job_id, request)
        try:
            tr.apply_edits(studio.run_dir(job_id), [int(k) for k in keep or []])
        except (FileNotFoundError, ValueError) as e:
            raise gr.Error(str(e))
        *out, _ = on_pick(job_id, request)
        return (*out, f"Saved transcript.edited.* with {len(keep or [])} change(s) kept.")

    save_edits.click(on_save, [job, changes], [speakers, diff, changes, outputs, review_note],
                     api_name="transcript_save_edits").then(on_segments, job, segments, show_progress="hidden")

    job.change(on_segments, job, segments, api_name="transcript_segments", show_progress="hidden")

    def on_correct(job_id, table, request: gr.Request):
        if not job_id:
            raise gr.Error("Pick a transcript first.")
        run_dir = studio.run_dir(mine(job_id, request))
        rows = table.values.tolist() if hasattr(table, "values") else (table or [])
        try:
            texts = {int(r[0]): str(r[3] or "") for r in rows if r and str(r[0]).strip()}
            kept = tr.correct(run_dir, texts)
        except (FileNotFoundError, ValueError, TypeError) as e:
            raise gr.Error(str(e))
        files_out = named_outputs(studio, studio.job(job_id)) or None
        return segment_rows(run_dir), files_out, (f"Saved: {len(kept)} segment(s) corrected by hand, in "
                                                  "transcript.edited.* (a fine-tune on this job reads them)."
                                                  if kept else "No corrections: the text is as transcribed.")

    save_corrections.click(on_correct, [job, segments], [segments, outputs, review_note],
                           api_name="transcript_correct", show_progress="hidden")
    return ui
