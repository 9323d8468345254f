"""Transcribe tab: faster-whisper on uploaded files or the microphone, segments streaming in as they decode;
speaker labels and renames; the LLM post-editor's changes shown as a word diff to accept or reject."""
from collections.abc import Iterator
from typing import Any

import gradio as gr

from studio import Job
from studio.presets import presets
from workers.speech import transcript as tr

from .common import Follow, bind, own_uploads, owned_job, progress_html, user_of, watch_all

# the Transcribe button's inputs: names in build()'s dict, and the /transcribe endpoint's parameters in this order
INPUTS = ("files", "mic", "model", "language", "task", "vad", "vad_threshold", "min_silence_ms", "word_timestamps",
          "beam_size", "batched", "initial_prompt", "hotwords", "diarize", "num_speakers", "post_edit",
          "editor_model", "glossary")
OUTPUTS = ("status", "transcript", "outputs", "job_ids", "job")  # what a transcribe job streams into


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
    """The user's transcripts, on page load."""
    return {"job": gr.update(choices=transcripts(studio, owner))}


def review(studio, job_id: str | None):
    """(speaker table rows, diff HTML, change choices, accepted ids, output files) of one transcript."""
    if not job_id:
        return [], "", [], [], None
    run_dir = studio.run_dir(job_id)
    data = tr.load(run_dir)
    names = data.get("speaker_names") or {}
    rows = [[s, names.get(s, "")] for s in tr.speakers(data)]
    diff, choices, accepted = "", [], []
    if (run_dir / "edits.json").exists():
        import json

        edits = json.loads((run_dir / "edits.json").read_text())
        items = []
        for c in edits["changes"]:
            who = f"{names.get(c['speaker'], c['speaker'])}: " if c.get("speaker") else ""
            items.append(f"<p><b>#{c['id']}</b> [{_ts(c['start'])}] {who}{tr.diff_html(c['diff'])}</p>")
            choices.append((f"#{c['id']} {c['edited'][:60]}", c["id"]))
            if c["accepted"]:
                accepted.append(c["id"])
        dropped = len(edits.get("discarded", []))
        diff = (f"<div class='diff'><p>{len(edits['changes'])} change(s) by {edits.get('model')}"
                + (f"; {dropped} proposal(s) discarded because they added or dropped words" if dropped else "")
                + "</p>" + "".join(items) + "</div>")
    files = [str(p) for p in sorted(run_dir.glob("transcript*.*")) if p.suffix[1:] in tr.FORMATS]
    files += [str(run_dir / "edits.json")] if (run_dir / "edits.json").exists() else []
    return rows, diff, choices, accepted, files or None


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


def follow_all(studio, jobs: list[Job], owner: str | None) -> Iterator[tuple]:
    """Stream transcribe jobs into the tab (OUTPUTS): segments as they decode, then the files and, once all are
    done, the first transcript opened in the review panel."""
    ids = [j.id for j in jobs]
    for rows in watch_all(studio, jobs, every=0.3):
        current = [job for job, _ in rows]
        body = "\n\n".join("\n".join(_lines(events)) for _, events in rows)
        done = all(j.status.final for j in current)
        files_out = [str(studio.run_dir(j.id) / f) for j in current if j.result for f in j.result["outputs"]]
        files_out += [str(p) for j in current if j.status.value == "CANCELLED"
                      for p in sorted(studio.run_dir(j.id).glob("transcript.*"))]
        picker = gr.update()
        if done:
            choices = transcripts(studio, owner)
            picker = gr.update(choices=choices, value=ids[0] if any(c[1] == ids[0] for c in choices) else None)
        yield "<br>".join(progress_html(j) for j in current), body, files_out or None, ids, picker


def follow(studio, job: Job, owner: str | None) -> Iterator[tuple]:
    """One transcribe job into the tab: what a reloaded page streams."""
    yield from follow_all(studio, [job], owner)


KINDS = {"transcribe": Follow(follow, OUTPUTS)}


def start(studio, owner: str | None, v: dict[str, Any]) -> Iterator[tuple]:
    """The Transcribe button, given its inputs by name (INPUTS): a job per uploaded file (and the recording),
    streamed together."""
    paths = own_uploads(studio, list(v["files"] or []) + ([v["mic"]] if v["mic"] else []), owner)
    if not paths:
        raise gr.Error("Upload a file or record something first.")
    jobs = []
    for path in paths:
        try:
            jobs.append(studio.submit("transcribe", dict(
                audio=path, model=v["model"], language=(v["language"] or "").strip(), task=v["task"], vad=v["vad"],
                vad_threshold=v["vad_threshold"], min_silence_ms=int(v["min_silence_ms"]),
                word_timestamps=v["word_timestamps"], beam_size=int(v["beam_size"]), batched=v["batched"],
                initial_prompt=v["initial_prompt"] or "", hotwords=v["hotwords"] or "", diarize=v["diarize"],
                num_speakers=int(v["num_speakers"] or 0) if v["diarize"] else 0, post_edit=v["post_edit"],
                editor_model=v["editor_model"], glossary=v["glossary"] or ""), owner=owner))
        except ValueError as e:
            raise gr.Error(f"{path.rsplit('/', 1)[-1]}: {e}")
    yield from follow_all(studio, jobs, owner)


def build(studio, auth: bool = False) -> dict:
    gr.Markdown("Transcribe or translate speech with faster-whisper. Silero VAD skips silence; word timestamps "
                "go into the JSON; speakers are labelled on request; an LLM can fix punctuation, casing and names. "
                "Outputs: TXT, SRT, VTT and JSON in the job's run folder.")
    with gr.Row():
        with gr.Column(scale=2):
            files = gr.File(label="Audio or video files (each becomes a job)", file_count="multiple")
            mic = gr.Audio(sources=["microphone", "upload"], type="filepath", label="…or record")
            with gr.Row():
                model = gr.Dropdown(list(presets()["whisper"]), value="large-v3", allow_custom_value=True,
                                    label="Model (a preset or a CTranslate2 folder)")
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
                    editor_model = gr.Dropdown(list(presets()["llm"]), value="llama-3.1-8b-instruct-q4km",
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
        review_note = gr.Markdown()
    job_ids = gr.State([])

    ui = dict(files=files, mic=mic, model=model, language=language, task=task, vad=vad,
              vad_threshold=vad_threshold, min_silence_ms=min_silence_ms, word_timestamps=word_timestamps,
              beam_size=beam_size, batched=batched, initial_prompt=initial_prompt, hotwords=hotwords,
              diarize=diarize, num_speakers=num_speakers, post_edit=post_edit, editor_model=editor_model,
              glossary=glossary, go=go, cancel=cancel, status=status, transcript=transcript, outputs=outputs,
              job=job, speakers=speakers, diff=diff, changes=changes, rename=rename, save_edits=save_edits,
              review_note=review_note, job_ids=job_ids)
    go.click(bind(start, studio, auth), None, [ui[n] for n in OUTPUTS], inputs_kwargs={n: ui[n] for n in INPUTS},
             api_name="transcribe", show_progress="hidden")

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
            rows, html_diff, choices, accepted, files_out = review(studio, mine(job_id, request))
        except FileNotFoundError as e:
            raise gr.Error(str(e))
        note = "" if rows or choices else "This transcript has neither speaker labels nor post-editor changes."
        return rows, html_diff, gr.update(choices=choices, value=accepted), files_out, note

    job.change(on_pick, job, [speakers, diff, changes, outputs, review_note], api_name="transcript_review")

    def on_refresh(request: gr.Request):
        return gr.update(choices=transcripts(studio, user_of(request, auth)))

    refresh.click(on_refresh, None, job)

    def on_rename(job_id, table, request: gr.Request):
        mine(job_id, request)
        rows = table.values.tolist() if hasattr(table, "values") else (table or [])
        try:
            tr.rename_speakers(studio.run_dir(job_id), {str(r[0]): str(r[1] or "") for r in rows if r and r[0]})
        except ValueError as e:
            raise gr.Error(str(e))
        *out, _ = on_pick(job_id, request)
        return (*out, "Names applied to every output.")

    rename.click(on_rename, [job, speakers], [speakers, diff, changes, outputs, review_note],
                 api_name="transcript_rename")

    def on_save(job_id, keep, request: gr.Request):
        mine(job_id, request)
        try:
            tr.apply_edits(studio.run_dir(job_id), [int(k) for k in keep or []])
        except (FileNotFoundError, ValueError) as e:
            raise gr.Error(str(e))
        *out, _ = on_pick(job_id, request)
        return (*out, f"Saved transcript.edited.* with {len(keep or [])} change(s) kept.")

    save_edits.click(on_save, [job, changes], [speakers, diff, changes, outputs, review_note],
                     api_name="transcript_save_edits")
    return ui
