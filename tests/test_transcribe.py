"""Transcribe: faster-whisper tiny.en (shipped on PyPI) on speech made here with espeak-ng and sox; diarization of
two espeak voices taking turns; the post-editor with the packaged gemma GGUF (a base model: the plumbing)."""
import json
import re
import shutil
import subprocess
import wave

import pytest
from conftest import wait_for_event

from studio import JobStatus

pytestmark = pytest.mark.skipif(not (shutil.which("espeak-ng") and shutil.which("sox")),
                                reason="espeak-ng and sox make the test speech (python app.py test installs them)")
MODEL = {"model": "tiny.en-packaged", "threads": 2}
FOX = "The quick brown fox jumps over the lazy dog. Please call Stella and ask her to bring these things from the store."
SECOND = "Tomorrow the weather will be sunny with a light breeze from the west."
LINES = [FOX, SECOND, "Our library opens at nine in the morning and closes at six in the evening.",
         "The train to the coast leaves from platform four every half hour on weekdays.",
         "Please remember to water the tomatoes in the garden before you go to bed.",
         "The committee will vote on the new playground design at the end of the month.",
         "My grandmother bakes bread with honey, walnuts and a pinch of sea salt.",
         "After the storm the fishermen repaired their nets on the old wooden pier."]
# two voices taking turns: (voice, pitch, text)
TURNS = [("en-us", 35, "Good morning everyone, thank you for joining the planning meeting today."),
         ("en-us+f3", 80, "Thanks for having me, I have prepared the budget numbers for the next quarter."),
         ("en-us", 35, "Great, please walk us through the main changes since the last report."),
         ("en-us+f3", 80, "Sure, the hardware costs went down while the travel costs went up a little.")]


def speak(path, text, voice="en-us", pitch=50):
    raw = path.with_suffix(".raw.wav")
    subprocess.run(["espeak-ng", "-v", voice, "-p", str(pitch), "-s", "150", "-w", str(raw), text], check=True)
    subprocess.run(["sox", str(raw), "-r", "16000", "-c", "1", str(path)], check=True)
    raw.unlink()
    return path


def duration(path) -> float:
    with wave.open(str(path)) as w:
        return w.getnframes() / w.getframerate()


def wer(ref: str, hyp: str) -> float:
    r, h = (re.findall(r"[a-z']+", s.lower()) for s in (ref, hyp))
    d = list(range(len(h) + 1))
    for i in range(1, len(r) + 1):
        prev, d[0] = d[0], i
        for j in range(1, len(h) + 1):
            cur = min(d[j] + 1, d[j - 1] + 1, prev + (r[i - 1] != h[j - 1]))
            prev, d[j] = d[j], cur
    return d[len(h)] / len(r)


@pytest.fixture(scope="module")
def speech(tmp_path_factory):
    d = tmp_path_factory.mktemp("speech")
    fox = speak(d / "fox.wav", FOX)
    second = speak(d / "second.wav", SECOND)
    gap = d / "gap.wav"  # speech, 6 s of silence, speech
    subprocess.run(["sox", "-n", "-r", "16000", "-c", "1", str(d / "silence.wav"), "trim", "0", "6"], check=True)
    subprocess.run(["sox", str(fox), str(d / "silence.wav"), str(second), str(gap)], check=True)
    long = d / "long.wav"  # about two minutes of different sentences (a repeated one makes whisper skip windows)
    varied = [speak(d / f"line{i}.wav", text) for i, text in enumerate(LINES)]
    subprocess.run(["sox", *[str(x) for x in varied * 2], str(long)], check=True)
    parts, bounds, t = [], [], 0.0
    for i, (voice, pitch, text) in enumerate(TURNS):
        parts.append(speak(d / f"turn{i}.wav", text, voice, pitch))
        bounds.append((t, t + duration(parts[-1])))
        t = bounds[-1][1] + 0.8
    subprocess.run(["sox", "-n", "-r", "16000", "-c", "1", str(d / "pause.wav"), "trim", "0", "0.8"], check=True)
    turns = d / "turns.wav"
    joined = [str(x) for p in parts for x in (p, d / "pause.wav")][:-1]
    subprocess.run(["sox", *joined, str(turns)], check=True)
    return {"fox": fox, "second": second, "gap": gap, "long": long, "turns": turns, "turn_bounds": bounds}


def run(studio, audio, **params):
    return studio.wait(studio.submit("transcribe", {"audio": str(audio), **MODEL, **params}).id, 300)


def test_transcript_has_the_spoken_words_and_valid_outputs(studio, speech):
    job = run(studio, speech["fox"])
    assert job.status is JobStatus.DONE, job.error
    assert wer(FOX, job.result["text"]) <= 0.3, job.result["text"]
    assert job.result["language"] == "en" and job.result["rtf"] < 1.0
    run_dir, length = studio.run_dir(job.id), duration(speech["fox"])
    data = json.loads((run_dir / "transcript.json").read_text())
    times = [(s["start"], s["end"]) for s in data["segments"]]
    words = [w for s in data["segments"] for w in s["words"]]
    assert words and all(0 <= a <= b <= length + 0.01 for a, b in times)
    assert all(a["start"] <= b["start"] for a, b in zip(words, words[1:]))  # monotonic
    assert all(0 <= w["start"] <= w["end"] <= length + 0.01 for w in words)
    srt = (run_dir / "transcript.srt").read_text()
    assert re.match(r"1\n\d\d:\d\d:\d\d,\d{3} --> \d\d:\d\d:\d\d,\d{3}\n\S", srt)
    vtt = (run_dir / "transcript.vtt").read_text()
    assert vtt.startswith("WEBVTT\n\n") and re.search(r"\d\d:\d\d:\d\d\.\d{3} --> \d\d:\d\d:\d\d\.\d{3}", vtt)
    assert wer(FOX, (run_dir / "transcript.txt").read_text()) <= 0.3
    segs = [e for e in studio.events(job.id)[0] if e["type"] == "segment"]
    assert len(segs) == len(data["segments"])  # streamed one event per segment


def test_vad_drops_the_silence_gap(studio, speech):
    job = run(studio, speech["gap"], vad=True)
    assert job.status is JobStatus.DONE, job.error
    r = job.result
    assert r["duration_after_vad"] < r["duration"] - 4  # most of the 6 s gap was skipped
    fox_end = duration(speech["fox"])
    for s in json.loads((studio.run_dir(job.id) / "transcript.json").read_text())["segments"]:
        for w in s.get("words", []):
            assert not (fox_end + 1.0 < w["start"] < fox_end + 5.0), w  # no words inside the silence
    assert wer(FOX + " " + SECOND, r["text"]) <= 0.35


def test_cancel_keeps_the_partial_transcript(studio, speech):
    job = studio.submit("transcribe", {"audio": str(speech["long"]), **MODEL, "vad": False, "beam_size": 1})
    wait_for_event(studio, job.id, "segment")
    studio.cancel(job.id)
    done = studio.wait(job.id, 60)
    assert done.status is JobStatus.CANCELLED
    data = json.loads((studio.run_dir(job.id) / "transcript.json").read_text())
    assert data["partial"] and data["segments"]
    assert data["segments"][-1]["end"] < duration(speech["long"]) - 5  # stopped well before the end
    assert (studio.run_dir(job.id) / "transcript.srt").read_text().startswith("1\n")


def test_a_cancelled_transcription_stops_its_decoder_with_it(studio, speech, tmp_path):
    """The decode thread must not outlive its job (it would decode beside the next one)."""
    import threading
    import time

    from studio import JobCancelled, JobContext
    from studio.params import build
    from workers.speech import transcribe

    flag = threading.Event()
    ctx = JobContext("t", "transcribe", tmp_path, studio.config.data_dir, "cpu", flag)

    def cancel_at_first_segment():
        while not flag.is_set():
            if (tmp_path / "events.jsonl").exists() and '"segment"' in (tmp_path / "events.jsonl").read_text():
                flag.set()
            time.sleep(0.05)

    threading.Thread(target=cancel_at_first_segment, daemon=True).start()
    p = build(transcribe.Params, {"audio": str(speech["long"]), **MODEL, "vad": False, "beam_size": 1})
    with pytest.raises(JobCancelled):
        transcribe.run(p, ctx)
    assert not [t for t in threading.enumerate() if t.name == "whisper-decode" and t.is_alive()]


def test_bad_inputs_give_clear_errors(studio, tmp_path):
    fake = tmp_path / "song.mp3"
    fake.write_text("this is a text file, not an mp3\n" * 50)
    job = run(studio, fake)
    assert job.status is JobStatus.FAILED and "could not read song.mp3 as audio or video" in job.error
    video = tmp_path / "clip.mp4"
    video.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 40)
    job = run(studio, video)
    assert job.status is JobStatus.FAILED and "could not read clip.mp4" in job.error
    empty = tmp_path / "empty.wav"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match="is empty"):
        studio.submit("transcribe", {"audio": str(empty), **MODEL})
    silent = tmp_path / "zero.wav"
    with wave.open(str(silent), "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(16000)
    job = run(studio, silent)
    assert job.status is JobStatus.FAILED and "too short" in job.error
    with pytest.raises(ValueError, match="neither a preset"):
        studio.submit("transcribe", {"audio": str(fake), "model": "huge-v9"})
    with pytest.raises(ValueError, match="not found"):
        studio.submit("transcribe", {"audio": str(tmp_path / "nope.wav"), **MODEL})


def test_transcribe_tab_through_gradio_client(studio, speech):
    from conftest import free_port
    from gradio_client import Client, handle_file

    import app

    demo = app.build_ui(studio)
    port = free_port()
    app.launch(demo, studio, server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        status, transcript, files, picked = client.predict(
            files=[handle_file(str(speech["fox"]))], mic=None, model="tiny.en-packaged", language="en",
            task="transcribe", vad=True, vad_threshold=0.5, min_silence_ms=500, word_timestamps=True, beam_size=5,
            batched=False, initial_prompt="", hotwords="", diarize=False, num_speakers=0, post_edit=False,
            editor_model="", glossary="", api_name="/transcribe")
        assert "DONE" in status and wer(FOX, re.sub(r"\[[^\]]*\]|—.*", "", transcript)) <= 0.3
        assert sorted(f.rsplit("/", 1)[-1] for f in files) == ["fox.json", "fox.srt", "fox.txt", "fox.vtt"]
        status, transcript, files, picked = client.predict(
            files=[handle_file(str(speech["turns"]))], mic=None, model="tiny.en-packaged", language="en",
            task="transcribe", vad=True, vad_threshold=0.5, min_silence_ms=500, word_timestamps=True, beam_size=5,
            batched=False, initial_prompt="", hotwords="", diarize=True, num_speakers=2, post_edit=True,
            editor_model="gemma-3-270m-packaged", glossary="Quarter", api_name="/transcribe")
        assert "DONE" in status and "S1: " in transcript and "S2: " in transcript and "post-editor" in transcript
        job_id = studio.jobs(kind="transcribe")[0].id
        assert picked["value"] == job_id  # the review panel opens the new transcript
        speakers, diff, changes, files, note = client.predict(job_id, api_name="/transcript_review")
        assert [r[0] for r in speakers["data"]] == ["S1", "S2"] and "change(s) by gemma-3-270m-packaged" in diff
        assert sorted(f.rsplit("/", 1)[-1] for f in files) == [  # the review panel's files too
            "turns.edited.json", "turns.edited.srt", "turns.edited.txt", "turns.edited.vtt", "turns.edits.json",
            "turns.json", "turns.srt", "turns.txt", "turns.vtt"]
        *_, note = client.predict(job_id, {"headers": ["Speaker", "Name"], "data": [["S1", ""], ["S2", ""]]},
                                  api_name="/transcript_rename")  # Apply names with none typed
        assert "Names applied" not in note and "No names typed" in note
        speakers, diff, changes, files, note = client.predict(
            job_id, {"headers": ["Speaker", "Name"], "data": [["S1", "Ann"], ["S2", "Bo"]]},
            api_name="/transcript_rename")
        assert note == "Names applied to every output: S1 → Ann, S2 → Bo." and [r[1] for r in speakers["data"]] == [
            "Ann", "Bo"]
        assert open(next(f for f in files if f.endswith("/turns.txt"))).read().startswith("Ann: ")  # what it offers
        assert (studio.run_dir(job_id) / "transcript.txt").read_text().startswith("Ann: ")
        *_, note = client.predict(job_id, [], api_name="/transcript_save_edits")
        assert "0 change(s) kept" in note and (studio.run_dir(job_id) / "transcript.edited.txt").read_text().startswith("Ann: ")
        # correcting a segment by hand: the table shows it, transcript.edited.* carries it, the raw one does not
        rows = client.predict(job_id, api_name="/transcript_segments")["data"]
        assert [r[0] for r in rows] == list(range(len(rows))) and rows[0][2] in ("Ann", "Bo")
        fixed = [[r[0], r[1], r[2], "Quarter results are final." if r[0] == 0 else r[3]] for r in rows]
        rows, files, note = client.predict(job_id, {"headers": ["#", "start", "speaker", "text"], "data": fixed},
                                           api_name="/transcript_correct")
        assert "1 segment(s) corrected" in note and rows["data"][0][3] == "Quarter results are final."
        run = studio.run_dir(job_id)
        assert "Quarter results are final." in (run / "transcript.edited.txt").read_text().splitlines()[0]
        assert "Quarter results are final." not in (run / "transcript.txt").read_text()
    finally:
        demo.close()


def test_offline_preset_says_what_to_download(studio, speech):
    job = studio.wait(studio.submit("transcribe", {"audio": str(speech["fox"]), "model": "tiny"}).id, 120)
    assert job.status is JobStatus.FAILED
    assert "Systran/faster-whisper-tiny is not downloaded" in job.error and "model_download" in job.error


def speaker_per_turn(segments, bounds) -> list[str]:
    """The label most words inside each turn carry; asserts that nearly all of them carry it."""
    out = []
    for a, b in bounds:
        labels = [w["speaker"] for s in segments for w in s.get("words", []) if a <= (w["start"] + w["end"]) / 2 <= b]
        assert labels, (a, b)
        top = max(set(labels), key=labels.count)
        assert labels.count(top) >= 0.85 * len(labels), (a, b, labels)
        out.append(top)
    return out


@pytest.mark.parametrize("num_speakers", [0, 2])
def test_two_voices_taking_turns_get_two_speakers(studio, speech, num_speakers):
    job = run(studio, speech["turns"], diarize=True, num_speakers=num_speakers)
    assert job.status is JobStatus.DONE, job.error
    assert job.result["speakers"] == ["S1", "S2"]
    run_dir = studio.run_dir(job.id)
    data = json.loads((run_dir / "transcript.json").read_text())
    assert speaker_per_turn(data["segments"], speech["turn_bounds"]) == ["S1", "S2", "S1", "S2"]
    assert all(s["speaker"] in ("S1", "S2") for s in data["segments"])
    assert [s["id"] for s in data["segments"]] == list(range(len(data["segments"])))
    txt = (run_dir / "transcript.txt").read_text()
    assert txt.startswith("S1: ") and "\nS2: " in txt
    assert "\nS2: " in (run_dir / "transcript.srt").read_text() and "\nS1: " in (run_dir / "transcript.vtt").read_text()
    assert any(e["type"] == "speakers" for e in studio.events(job.id)[0])


def test_renaming_speakers_rewrites_every_output(studio, speech):
    from workers.speech import transcript as tr

    job = run(studio, speech["turns"], diarize=True, num_speakers=2, speaker_names="S1=Host")
    run_dir = studio.run_dir(job.id)
    assert (run_dir / "transcript.txt").read_text().startswith("Host: ")
    tr.rename_speakers(run_dir, {"S2": "Guest"})
    for fmt in ("txt", "srt", "vtt"):
        text = (run_dir / f"transcript.{fmt}").read_text()
        assert "Host: " in text and "Guest: " in text and "S1: " not in text and "S2: " not in text, fmt
    data = json.loads((run_dir / "transcript.json").read_text())
    assert data["speaker_names"] == {"S1": "Host", "S2": "Guest"}
    assert {s["speaker"] for s in data["segments"]} == {"S1", "S2"}  # labels stay; names are a mapping
    with pytest.raises(ValueError, match="no speaker S7"):
        tr.rename_speakers(run_dir, {"S7": "Nobody"})
    tr.rename_speakers(run_dir, {"S1": ""})  # an empty name restores the label
    assert (run_dir / "transcript.txt").read_text().startswith("S1: ")
    with pytest.raises(ValueError, match="LABEL=Name"):
        studio.submit("transcribe", {"audio": str(speech["fox"]), **MODEL, "speaker_names": "Alice"})


def test_post_editor_runs_chunkwise_and_saves_beside_the_raw_transcript(studio, speech):
    job = run(studio, speech["fox"], post_edit=True, editor_model="gemma-3-270m-packaged",
              glossary="Stella, Kubernetes")
    assert job.status is JobStatus.DONE, job.error
    run_dir = studio.run_dir(job.id)
    edits = json.loads((run_dir / "edits.json").read_text())
    assert edits["model"] == "gemma-3-270m-packaged" and edits["glossary"] == ["Stella", "Kubernetes"]
    assert edits["chunks"] == job.result["post_edit"]["chunks"] >= 1
    for c in edits["changes"]:  # whatever the base model proposed kept the words (punctuation/casing/names only)
        from workers.speech.transcript import same_content

        assert same_content(c["original"], c["edited"], edits["glossary"]) and c["diff"]
    raw = json.loads((run_dir / "transcript.json").read_text())
    edited = json.loads((run_dir / "transcript.edited.json").read_text())
    assert [(s["start"], s["end"]) for s in raw["segments"]] == [(s["start"], s["end"]) for s in edited["segments"]]
    assert wer(FOX, (run_dir / "transcript.txt").read_text()) <= 0.3  # the raw transcript is untouched
    assert "transcript.edited.srt" in job.result["outputs"] and (run_dir / "transcript.edited.vtt").exists()
    assert any(e["type"] == "post_edit" for e in studio.events(job.id)[0])


def test_accepting_and_rejecting_changes(studio, speech):
    """An edit proposal (as the editor writes it) applied, rejected and re-accepted; the guard and the word diff."""
    from workers.speech import transcript as tr

    job = run(studio, speech["fox"])
    run_dir = studio.run_dir(job.id)
    seg = tr.load(run_dir)["segments"][0]
    original = seg["text"].strip()
    edited = original.replace("Stella", "Stellar").rstrip(".") + "!"
    assert tr.same_content(original, edited, ["Stellar"])
    assert not tr.same_content(original, original + " and also a lot of new words here", [])
    assert not tr.same_content(original, " ".join(original.split()[: len(original.split()) // 2]), [])
    ops = tr.diff("the quick brown fox", "The quick brown fox.")
    assert ops == [["~", "the", "The"], ["=", "quick brown", "quick brown"], ["~", "fox", "fox."]]
    assert "<del>the</del> <ins>The</ins>" in tr.diff_html(ops)
    assert tr.diff_text(ops) == "[-the-]{+The+} quick brown [-fox-]{+fox.+}"
    (run_dir / "edits.json").write_text(json.dumps({"model": "m", "glossary": ["Stellar"], "changes": [
        {"id": seg["id"], "start": seg["start"], "end": seg["end"], "speaker": None, "original": original,
         "edited": edited, "diff": tr.diff(original, edited), "accepted": True}], "discarded": []}))
    tr.apply_edits(run_dir)
    assert (run_dir / "transcript.edited.txt").read_text().splitlines()[0] == edited
    tr.apply_edits(run_dir, [])  # reject it
    assert (run_dir / "transcript.edited.txt").read_text().splitlines()[0] == original
    assert (run_dir / "transcript.txt").read_text().splitlines()[0] == original  # raw never changes
    with pytest.raises(ValueError, match="no change for segment"):
        tr.apply_edits(run_dir, [999])
    from test_cli import app  # the same from the command line, beside the running studio

    r = app("transcript", job.id, "--data-dir", str(studio.config.data_dir), "--accept", "all", "--edited")
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.splitlines()[0] == edited and f"change #{seg['id']} accepted: " in r.stderr
    r = app("transcript", job.id, "--data-dir", str(studio.config.data_dir), "--reject", str(seg["id"]), "--edited")
    assert r.stdout.splitlines()[0] == original and f"change #{seg['id']} rejected" in r.stderr


def test_post_editor_parses_numbered_lines_and_chunks():
    from workers.speech import post_edit as pe

    assert pe.parse("[1] Hello, world.\n[2] How are you?\n[2] again\n[9] out of range\nnoise", 3) == {
        1: "Hello, world.", 2: "How are you?"}
    segs = [{"text": " word" * 50} for _ in range(5)]
    assert [len(c) for c in pe.chunks(segs, max_words=120)] == [2, 2, 1]
    msgs = pe.messages([{"text": " hi alice"}], ["Alice"])
    assert msgs[1]["content"] == "Glossary: Alice\n\n[1] hi alice"


def test_estimate_counts_the_post_editor_and_fit_shares_the_budget(speech):
    from conftest import FakeNvml

    from studio.gate import full_estimate
    from studio.params import build
    from workers.speech import transcribe

    gpu = FakeNvml().read()
    base = dict(audio=str(speech["fox"]), model="large-v3")
    plain = full_estimate(build(transcribe.Params, base), transcribe.estimate, gpu)
    edited = build(transcribe.Params, {**base, "post_edit": True, "editor_model": "gemma-3-270m-packaged"})
    with_editor = full_estimate(edited, transcribe.estimate, gpu)
    assert with_editor.total - plain.total > 200 * 2**20  # the GGUF's weights, KV cache and buffers
    assert with_editor.context == plain.context > 0  # one process, one CUDA context
    assert len(with_editor.models) == 2  # whisper and the editor, each under its cache key
    assert transcribe.fit(edited, gpu, 10 * 2**30).editor_gpu_layers == -1  # all layers fit beside whisper

    def total(layers):
        return full_estimate(build(transcribe.Params, {**base, "post_edit": True, "editor_gpu_layers": layers,
                                                       "editor_model": "gemma-3-270m-packaged"}),
                             transcribe.estimate, gpu).total

    tight = total(0) + (total(-1) - total(0)) // 2  # room for about half the editor's layers
    layers = transcribe.fit(edited, gpu, tight).editor_gpu_layers
    assert 0 < layers < 18 and total(layers) <= tight < total(layers + 1)


@pytest.fixture(scope="module")
def served(studio):
    from conftest import serve

    url, demo = serve(studio, show_error=True)
    yield url, demo
    demo.close()


def test_the_default_model_is_on_disk_and_the_dropdown_says_what_needs_a_download(served):
    from gradio_client import Client

    url, demo = served
    model = demo.studio_ui["transcribe"]["model"]
    assert model.value == "tiny.en-packaged"  # nothing downloaded here: the packaged model, not large-v3
    assert demo.studio_ui["transcribe"]["editor_model"].value == "gemma-3-270m-packaged"
    _, on_load, editor, *_ = Client(url, verbose=False).predict(api_name="/transcribe_fill")  # as of page load (the
    # Fine-tune sub-tab's lists follow)
    labels = {v: label for label, v in on_load["choices"]}
    assert "on disk" in labels["tiny.en-packaged"] and labels["large-v3"].endswith("needs download (3.09 GB)")
    assert on_load["choices"][0][1] == "tiny.en-packaged"  # what works now comes first
    assert "on disk" in dict((v, label) for label, v in editor["choices"])["gemma-3-270m-packaged"]


def test_a_batch_skips_an_empty_file_names_a_corrupt_one_as_given_and_names_outputs_by_source(served, studio,
                                                                                             speech, tmp_path):
    """One empty file no longer blocks the batch, a corrupt .wav is named as the user gave it (not by the upload's
    folder), and the Outputs panel names each file by its source, not eight `transcript.*`."""
    from gradio_client import Client, handle_file

    corrupt = tmp_path / "meeting.wav"  # a RIFF/WAVE header over garbage
    corrupt.write_bytes(b"RIFF\x24\x00\x00\x00WAVEfmt \x10\x00\x00\x00" + b"\xff" * 400)
    empty = tmp_path / "blank.wav"
    empty.write_bytes(b"")
    before = {j.id for j in studio.jobs(kind="transcribe")}
    status, transcript, files, _ = Client(served[0], verbose=False).predict(
        files=[handle_file(str(p)) for p in (empty, corrupt, speech["fox"])], mic=None, model="tiny.en-packaged",
        language="en", initial_prompt="", hotwords="", glossary="", editor_model="",
        api_name="/transcribe")
    assert "Skipped blank.wav is empty (0 bytes)" in status and "Transcribing the other 2 file(s)." in status
    jobs = {studio.run_dir(j.id): j for j in studio.jobs(kind="transcribe") if j.id not in before}
    assert sorted(j.params["audio"].rsplit("/", 1)[-1] for j in jobs.values()) == ["fox.wav", "meeting.wav"]
    bad = next(j for j in jobs.values() if j.params["audio"].endswith("meeting.wav"))
    assert bad.status is JobStatus.FAILED and bad.error.startswith("could not read meeting.wav as audio or video")
    assert "/" not in bad.error and str(studio.config.uploads_dir) not in status  # no upload folder named
    assert status.count("<b>DONE</b>") == 1 and wer(FOX, re.sub(r"\[[^\]]*\]|—.*", "", transcript)) <= 0.3
    assert sorted(f.rsplit("/", 1)[-1] for f in files) == ["fox.json", "fox.srt", "fox.txt", "fox.vtt"]
    assert re.match(r"1\n00:00:0", open(next(f for f in files if f.endswith("fox.srt"))).read())
    with pytest.raises(Exception, match="blank.wav is empty"):  # nothing left to run: one clear error
        Client(served[0], verbose=False).predict(files=[handle_file(str(empty))], mic=None, initial_prompt="",
                                                 hotwords="", glossary="", api_name="/transcribe")


def test_a_reloaded_page_gets_the_running_jobs_own_settings_and_the_last_used_ones(served, studio, speech):
    """/transcribe_attach, what a reloaded page runs, puts the running job's own params in the form (not the
    defaults), and the form's last-used settings come back once nothing runs."""
    import time

    from gradio_client import Client, handle_file

    url, _ = served
    forms = studio.config.data_dir / "forms.json"
    settings = dict(model="tiny.en-packaged", language="en", task="translate", vad=False, vad_threshold=0.35,
                    min_silence_ms=750, beam_size=3, initial_prompt="Stella", hotwords="brown fox", glossary="")
    before = {j.id for j in studio.jobs(kind="transcribe")}
    studio.pause("attach test: the job stays queued")
    try:
        Client(url, verbose=False).submit(files=[handle_file(str(speech["fox"]))], mic=None, **settings,
                                          api_name="/transcribe")
        t0 = time.time()
        while not (new := [j for j in studio.jobs(kind="transcribe") if j.id not in before]):
            assert time.time() - t0 < 60, "the Transcribe button submitted no job"
            time.sleep(0.1)
        job = new[0]

        def remembered() -> str:  # the form is kept once its job was taken, a moment after the submit
            try:
                return json.loads(forms.read_text())["transcribe"]["hotwords"]
            except (OSError, ValueError, KeyError):
                return ""

        t0 = time.time()
        while remembered() != "brown fox":  # remembered ...
            assert time.time() - t0 < 30, f"the form was not remembered: {remembered()!r}"
            time.sleep(0.1)
        forms.unlink()  # ... but here only the job's own params may fill the form
        reloaded = Client(url, verbose=False).submit(api_name="/transcribe_attach")
        t0 = time.time()
        while not any(job.id in str(out) for out in reloaded.outputs()):
            assert time.time() - t0 < 60, "the fresh page did not re-attach to the queued job"
            time.sleep(0.1)
        form = _form_values(reloaded.outputs())
        assert {k: form.get(k) for k in settings} == settings, form
    finally:
        studio.cancel(new[0].id) if new else None
        studio.resume_queue()
    reloaded.result(timeout=120)  # the stream ends with the job
    Client(url, verbose=False).predict(files=[handle_file(str(speech["second"]))], mic=None, **settings,
                                       api_name="/transcribe")
    form = _form_values([Client(url, verbose=False).predict(api_name="/transcribe_attach")])  # nothing runs
    assert {k: form.get(k) for k in settings} == settings, form
    forms.unlink()


def _form_values(outputs) -> dict:
    """The form inputs' values in /transcribe_attach's outputs: the outputs the jobs stream come first
    (status, transcript, outputs, review picker, then the Fine-tune sub-tab's), the Transcribe settings last, in the
    form's order."""
    from tabs.transcribe import FORM

    for out in outputs:
        values = [o.get("value") if isinstance(o, dict) else o for o in out[-len(FORM):]]
        if any(v is not None for v in values):
            return dict(zip(FORM, values))
    return {}
