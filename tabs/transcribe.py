"""Transcribe tab: faster-whisper on uploaded files or the microphone, segments streaming in as they decode."""
import time

from workers.llm import presets

from .common import progress_html, user_of


def _ts(t: float) -> str:
    return f"{int(t) // 60:02d}:{t % 60:05.2f}"


def build(studio, auth: bool = False) -> dict:
    import gradio as gr

    gr.Markdown("Transcribe or translate speech with faster-whisper. Silero VAD skips silence; word timestamps "
                "go into the JSON. Outputs: TXT, SRT, VTT and JSON in the job's run folder.")
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
            with gr.Row():
                go = gr.Button("Transcribe", variant="primary")
                cancel = gr.Button("Cancel", variant="stop")
        with gr.Column(scale=3):
            status = gr.HTML()
            transcript = gr.Textbox(label="Transcript", lines=16, interactive=False)
            outputs = gr.File(label="Outputs", file_count="multiple", interactive=False)
    job_ids = gr.State([])

    def on_go(files, mic, model, language, task, vad, vad_threshold, min_silence_ms, word_timestamps, beam_size,
              batched, initial_prompt, hotwords, request: gr.Request):
        paths = [f if isinstance(f, str) else f.name for f in files or []] + ([mic] if mic else [])
        if not paths:
            raise gr.Error("Upload a file or record something first.")
        jobs = []
        for path in paths:
            try:
                jobs.append(studio.submit("transcribe", dict(
                    audio=path, model=model, language=(language or "").strip(), task=task, vad=vad,
                    vad_threshold=vad_threshold, min_silence_ms=int(min_silence_ms), word_timestamps=word_timestamps,
                    beam_size=int(beam_size), batched=batched, initial_prompt=initial_prompt or "",
                    hotwords=hotwords or ""), owner=user_of(request, auth)))
            except ValueError as e:
                raise gr.Error(f"{path.rsplit('/', 1)[-1]}: {e}")
        ids = [j.id for j in jobs]
        texts: dict[str, list[str]] = {j: [] for j in ids}
        offsets = {j: 0 for j in ids}
        while True:
            for jid in ids:
                evs, offsets[jid] = studio.events(jid, offsets[jid])
                for e in evs:
                    if e["type"] == "segment":
                        texts[jid].append(f"[{_ts(e['start'])} → {_ts(e['end'])}] {e['text'].strip()}")
                    elif e["type"] == "info":
                        texts[jid].append(f"— {e['language']} ({100 * e['language_probability']:.0f}%), "
                                          f"{e['duration']:.1f} s, {e['model']} {e['compute_type']} on {e['device']}")
            current = [studio.job(j) for j in ids]
            body = "\n\n".join("\n".join(texts[j]) for j in ids)
            done = all(j.status.final for j in current)
            files_out = [str(studio.run_dir(j.id) / f) for j in current if j.result for f in j.result["outputs"]]
            files_out += [str(p) for j in current if j.status.value == "CANCELLED"
                          for p in sorted(studio.run_dir(j.id).glob("transcript.*"))]
            yield "<br>".join(progress_html(j) for j in current), body, files_out or None, ids
            if done:
                return
            time.sleep(0.3)

    go.click(on_go, [files, mic, model, language, task, vad, vad_threshold, min_silence_ms, word_timestamps,
                     beam_size, batched, initial_prompt, hotwords], [status, transcript, outputs, job_ids],
             api_name="transcribe", show_progress="hidden")

    def on_cancel(ids):
        for j in ids or []:
            studio.cancel(j)
        return "Cancelling: what was transcribed so far is kept." if ids else "Nothing to cancel."

    cancel.click(on_cancel, job_ids, status, api_name="transcribe_cancel")
    return dict(files=files, mic=mic, model=model, language=language, task=task, vad=vad,
                vad_threshold=vad_threshold, min_silence_ms=min_silence_ms, word_timestamps=word_timestamps,
                beam_size=beam_size, batched=batched, initial_prompt=initial_prompt, hotwords=hotwords, go=go,
                cancel=cancel, status=status, transcript=transcript, outputs=outputs, job_ids=job_ids)
