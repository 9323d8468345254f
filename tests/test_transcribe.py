"""Transcribe: faster-whisper tiny.en (shipped on PyPI) on speech made here with espeak-ng and sox."""
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


def speak(path, text, voice="en-us"):
    raw = path.with_suffix(".raw.wav")
    subprocess.run(["espeak-ng", "-v", voice, "-s", "150", "-w", str(raw), text], check=True)
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
    long = d / "long.wav"
    subprocess.run(["sox", *[str(fox)] * 12, str(long)], check=True)
    return {"fox": fox, "second": second, "gap": gap, "long": long}


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
        status, transcript, files = client.predict(
            files=[handle_file(str(speech["fox"]))], mic=None, model="tiny.en-packaged", language="en",
            task="transcribe", vad=True, vad_threshold=0.5, min_silence_ms=500, word_timestamps=True, beam_size=5,
            batched=False, initial_prompt="", hotwords="", api_name="/transcribe")
        assert "DONE" in status and wer(FOX, re.sub(r"\[[^\]]*\]|—.*", "", transcript)) <= 0.3
        assert sorted(f.rsplit(".", 1)[-1] for f in files) == ["json", "srt", "txt", "vtt"]
    finally:
        demo.close()


def test_offline_preset_says_what_to_download(studio, speech):
    job = studio.wait(studio.submit("transcribe", {"audio": str(speech["fox"]), "model": "tiny"}).id, 120)
    assert job.status is JobStatus.FAILED
    assert "Systran/faster-whisper-tiny is not downloaded" in job.error and "model_download" in job.error
