#!/usr/bin/env python3
"""Studio: a local AI workbench for one GPU.

    python3 app.py                          serve the UI on http://127.0.0.1:7860
    python3 app.py run KIND --param k=v     run one job through the same gate, queue and worker
    python3 app.py jobs list|show|cancel|resume|retry [ID]
    python3 app.py queue pause|resume
    python3 app.py transcript ID [--rename S1=Alice] [--accept all|IDS] [--reject IDS]
    python3 app.py doctor                   device, drivers, packages, folders, and a self-test job
    python3 app.py test [pytest args]       the test suite

On first use it creates .venv beside this file and installs requirements.txt into it (again when that file
changes), then re-runs itself inside it. Set STUDIO_NO_BOOTSTRAP=1 to use the current environment as it is.
"""
from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"


def bootstrap() -> None:
    """Create or refresh .venv from requirements.txt and re-run this command inside it (stdlib only)."""
    if os.environ.get("STUDIO_NO_BOOTSTRAP") == "1":
        return
    if sys.version_info < (3, 10):
        sys.exit(f"Studio needs Python 3.10 or newer; this is {sys.version.split()[0]}")
    py = VENV / "bin" / "python"
    in_venv = Path(sys.prefix).resolve() == VENV.resolve()
    req = (ROOT / "requirements.txt").read_bytes()
    digest = hashlib.sha256(req + sys.version.encode()).hexdigest()
    stamp = VENV / ".requirements.sha256"
    if in_venv and stamp.exists() and stamp.read_text() == digest:
        return
    if not py.exists():
        print(f"[studio] creating {VENV} …", flush=True)
        subprocess.check_call([sys.executable, "-m", "venv", str(VENV)])
    if not stamp.exists() or stamp.read_text() != digest:
        print("[studio] installing requirements.txt into .venv (first run, or it changed) …", flush=True)
        subprocess.check_call([str(py), "-m", "pip", "install", "--upgrade", "pip"], stdout=subprocess.DEVNULL)
        _install_llama_cpp(py, req.decode())
        subprocess.check_call([str(py), "-m", "pip", "install", "-r", str(ROOT / "requirements.txt")])
        stamp.write_text(digest)
    if not in_venv:
        os.execv(str(py), [str(py), str(Path(__file__).resolve()), *sys.argv[1:]])


def _install_llama_cpp(py: Path, requirements: str) -> None:
    """llama-cpp-python compiles on install (about 8 minutes on 2 cores). Build it for AVX2 rather than
    -march=native: ggml's AMX kernels, which a native build enables on recent Xeons, crash in some VMs. On a
    machine with an NVIDIA driver and the CUDA toolkit, build it with CUDA offload."""
    import shutil

    line = next((ln.strip() for ln in requirements.splitlines() if ln.startswith("llama-cpp-python")), None)
    if line is None:
        return
    args = os.environ.get("CMAKE_ARGS") or ("-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON "
                                            "-DGGML_F16C=ON -DGGML_BMI2=ON")
    has_gpu = shutil.which("nvidia-smi") and subprocess.run(["nvidia-smi", "-L"], capture_output=True).returncode == 0
    if has_gpu and "GGML_CUDA" not in args:
        if shutil.which("nvcc") or Path("/usr/local/cuda/bin/nvcc").exists():
            args += " -DGGML_CUDA=on"
            print("[studio] NVIDIA GPU and CUDA toolkit found: building llama.cpp with GPU offload", flush=True)
        else:
            print("[studio] NVIDIA GPU found but no CUDA toolkit (nvcc): llama.cpp will run GGUF models on the CPU. "
                  "Install the toolkit (e.g. `sudo apt-get install nvidia-cuda-toolkit`), then delete "
                  ".venv/.requirements.sha256 and start again to rebuild with offload.", flush=True)
    print(f"[studio] building {line} (CMAKE_ARGS={args}) …", flush=True)
    # --no-cache-dir: pip's wheel cache ignores CMAKE_ARGS and would hand back a build made with other flags
    subprocess.check_call([str(py), "-m", "pip", "install", "--no-cache-dir", "--no-deps", line],
                          env={**os.environ, "CMAKE_ARGS": args})


# ---------------------------------------------------------------------------------------------------------------
def _quiet_env() -> None:
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


def _config(args):
    from studio import Config

    return Config.load(args.data_dir, budget_gb=getattr(args, "budget_gb", None),
                       ray_address=getattr(args, "ray", None))


def _gib(b) -> str:
    return "—" if b is None else f"{b / 2**30:.2f} GiB"


def _print_event(studio, job_id: str, ev: dict, quiet: bool) -> None:
    t = ev["type"]
    if t == "artifact":
        print(f"  artifact: {studio.run_dir(job_id) / ev['path']}", flush=True)
    elif quiet:
        return
    elif t == "progress":
        frac = ev.get("fraction")
        print(f"  {f'{100 * frac:5.1f}% ' if frac is not None else ''}{ev.get('message', '')}", flush=True)
    elif t == "metric":
        vals = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in ev.items()
                        if k not in ("t", "type"))
        print(f"  metric {vals}", flush=True)
    elif t == "log":
        print(f"  {ev['message']}", flush=True)
    elif t == "started":
        print(f"  started on {ev.get('device')} (worker pid {ev.get('worker_pid')})", flush=True)
    elif t == "sample" and "text" in ev:  # Tiny LM's text samples
        first = (ev["text"].strip().splitlines() or [""])[0]
        print(f"  sample: {first[:100]}", flush=True)
    elif t == "sample" and "path" in ev:  # Detect's sample predictions
        print(f"  sample: {studio.run_dir(job_id) / ev['path']}", flush=True)
    elif t == "dataset":
        print("  " + ev["summary"].replace("\n", "\n  ").replace("**", ""), flush=True)
    elif t == "latency":
        for r in ev["table"]:
            ms = f"{r['ms_per_image']:.2f} ms/image, {r['fps']:.1f} FPS" if r["ms_per_image"] else r.get("note", "")
            print(f"  latency {r['backend']:13} {ms}", flush=True)


def _follow(studio, job, quiet: bool = False) -> int:
    """Print a job's events until it ends; Ctrl-C cancels it. Exit code: 0 done, 2 refused, 1 otherwise."""
    import json
    import time

    from studio import JobStatus

    if job.status is JobStatus.REFUSED:
        print(job.error)
        return 2
    print(f"job {job.id} ({job.kind}) queued; estimate {_gib(job.estimate_bytes)}"
          f" of {_gib(job.budget_bytes)} budget — run folder {studio.run_dir(job.id)}", flush=True)
    offset, last_progress, wait_shown = 0, 0.0, None
    cancelling = False
    while True:
        try:
            evs, offset = studio.events(job.id, offset)
            current = studio.job(job.id)
            for ev in evs:
                if ev["type"] == "progress" and time.time() - last_progress < 1.0:
                    continue  # one progress line a second is plenty in a terminal
                last_progress = time.time() if ev["type"] == "progress" else last_progress
                _print_event(studio, job.id, ev, quiet)
            if current.wait_reason and current.wait_reason != wait_shown and current.status is JobStatus.QUEUED:
                print(f"  {current.wait_reason}", flush=True)
                wait_shown = current.wait_reason
            if current.status.final:
                break
            time.sleep(0.2)
        except KeyboardInterrupt:
            if cancelling:
                raise
            print("\ncancelling … (Ctrl-C again to leave it running)", flush=True)
            studio.cancel(job.id)
            cancelling = True
    final = studio.job(job.id)
    print(f"{final.status.value}: job {final.id} — run folder {studio.run_dir(final.id)}")
    if final.error:
        print(final.error)
    if final.result:
        print(json.dumps(final.result, indent=2))
    return 0 if final.status is JobStatus.DONE else 1


def _open_studio(args, need_worker: bool = True):
    """A Studio on the data folder: the device owner if none is running, else a client of the running server."""
    from studio import Studio

    studio = Studio(_config(args))
    if need_worker and not studio.try_start():
        print(f"[studio] a studio server owns {studio.config.data_dir}: submitting to its queue", flush=True)
    return studio


def _submit_and_follow(studio, submit, quiet: bool = False) -> int:
    """Submit unless the queue is paused (the job would never start), then follow it to the end."""
    if studio.store.paused:
        print(f"The queue is paused: {studio.store.get_meta('pause_reason') or ''}\n"
              "Resume it with: python app.py queue resume")
        return 1
    try:
        job = submit()
    except ValueError as e:
        print(f"error: {e}")
        return 1
    return _follow(studio, job, quiet=quiet)


def cmd_run(args) -> int:
    from studio.params import parse_cli

    try:
        params = parse_cli(args.param)
    except ValueError as e:
        print(f"error: {e}")
        return 1
    studio = _open_studio(args)
    budget = int(args.budget_gb * 2**30) if args.budget_gb else None
    try:
        return _submit_and_follow(studio, lambda: studio.submit(args.kind, params, budget_bytes=budget), args.quiet)
    finally:
        studio.shutdown()


def cmd_jobs(args) -> int:
    import json
    import time

    from studio import JobStatus

    studio = _open_studio(args, need_worker=args.action in ("resume", "retry"))
    try:
        if args.action == "list":
            running = studio.server_running()
            print(f"{'id':16} {'kind':16} {'status':11} {'created':19} {'estimate':>10} {'peak':>10}  note")
            for j in studio.jobs(limit=args.limit):
                created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(j.created))
                text = j.error or j.wait_reason or j.message or ""
                if not running and not j.status.final:  # nothing runs it now: say what will happen
                    text = ("the studio stopped while it ran: INTERRUPTED on next start"
                            if j.status is JobStatus.RUNNING else "waits for the studio to start")
                note = text.splitlines()[0][:60] if text else ""
                print(f"{j.id:16} {j.kind:16} {j.status.value:11} {created:19} {_gib(j.estimate_bytes):>10} "
                      f"{_gib(j.peak_bytes):>10}  {note}")
            if not running:
                print("studio: not running (start it with `python app.py`, or `python app.py run KIND …`)")
            elif studio.store.paused:
                print(f"queue: paused — {studio.store.get_meta('pause_reason') or ''}")
            else:
                print("queue: running")
            return 0
        if not args.id:
            print(f"error: jobs {args.action} needs a job id (see: python app.py jobs list)")
            return 1
        try:
            job = studio.job(args.id)
        except KeyError as e:
            print(f"error: {e.args[0]}")
            return 1
        if args.action == "show":
            d = {k: v for k, v in vars(job).items() if k not in ("traceback", "extra")}
            d["status"] = job.status.value
            print(json.dumps(d, indent=2, default=str))
            evs, _ = studio.events(job.id)
            for e in evs[-args.tail:]:
                print(json.dumps(e, default=str))
            return 0
        if args.action == "cancel":
            job = studio.cancel(job.id)
            print(f"job {job.id}: {job.status.value}{' (cancel requested)' if not job.status.final else ''}")
            return 0
        return _submit_and_follow(studio, lambda: studio.resume(job.id) if args.action == "resume"
                                  else studio.retry(job.id))
    finally:
        studio.shutdown()


def cmd_transcript(args) -> int:
    """Show a transcribe job's transcript; rename its speakers; accept or reject the post-editor's changes; correct
    segments by hand."""
    import json

    from workers.speech import transcript as tr

    studio = _open_studio(args, need_worker=False)
    try:
        job = studio.job(args.id)
    except KeyError as e:
        print(f"error: {e.args[0]}")
        return 1
    run_dir = studio.run_dir(job.id)
    try:
        if args.rename:
            names = {}
            for item in args.rename:
                label, sep, name = item.partition("=")
                if not sep:
                    print(f"error: --rename takes LABEL=Name (e.g. S1=Alice); got {item!r}")
                    return 1
                names[label.strip()] = name
            tr.rename_speakers(run_dir, names)
        if args.accept is not None or args.reject is not None:
            edits = json.loads((run_dir / "edits.json").read_text()) if (run_dir / "edits.json").exists() else None
            if edits is None:
                raise FileNotFoundError("this transcript has no post-editor changes (run it with post_edit=true)")
            ids = {c["id"] for c in edits["changes"] if c["accepted"]}

            def parse(spec):
                return {c["id"] for c in edits["changes"]} if spec == "all" else {int(x) for x in spec.split(",") if x}

            ids = (ids | parse(args.accept or "")) - parse(args.reject or "")
            tr.apply_edits(run_dir, sorted(ids))
        if args.correct:
            texts = {}
            for item in args.correct:
                sid, sep, text = item.partition("=")
                if not sep or not sid.strip().isdigit():
                    print(f"error: --correct takes SEGMENT_ID=text (e.g. 3=\"the right words\"); got {item!r}")
                    return 1
                texts[int(sid)] = text
            kept = tr.correct(run_dir, texts)
            print(f"{len(kept)} segment(s) corrected by hand (transcript.edited.*)", file=sys.stderr)
        data = tr.load(run_dir)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}")
        return 1
    edited = run_dir / "transcript.edited.txt"
    print((edited if args.edited and edited.exists() else run_dir / "transcript.txt").read_text(), end="")
    if (run_dir / "edits.json").exists():
        edits = json.loads((run_dir / "edits.json").read_text())
        for c in edits["changes"]:
            print(f"  change #{c['id']} {'accepted' if c['accepted'] else 'rejected'}: {tr.diff_text(c['diff'])}",
                  file=sys.stderr)
    spk = tr.speakers(data)
    if spk:
        names = data.get("speaker_names") or {}
        print("  speakers: " + ", ".join(f"{s}={names.get(s, s)}" for s in spk), file=sys.stderr)
    print(f"  files: {run_dir}", file=sys.stderr)
    return 0


def cmd_models(args) -> int:
    """`models list`: every preset and whether it is on disk; `models check PATH`: what a model on disk is."""
    if args.action == "check":
        from workers.system.inspect_model import describe

        if not args.path:
            print("error: models check needs a PATH")
            return 2
        try:
            info = describe(args.path)
        except (ValueError, OSError) as e:
            print(f"error: {e}")
            return 1
        print(f"{info.kind}: {' · '.join(info.facts)}\n{info.use}")
        return 0
    from studio.presets import availability, presets

    cfg = _config(args)
    for table in ("llm", "embedder", "reranker", "whisper", "yolo"):
        for name, p in presets()[table].items():
            print(f"{table:9} {name:32} {availability(table, name, cfg.data_dir):11} {p['size_gb']:>6} GB")
    return 0


def cmd_queue(args) -> int:
    studio = _open_studio(args, need_worker=False)
    if args.action == "pause":
        studio.pause()
    else:
        studio.resume_queue()
    print(f"queue {'paused' if studio.store.paused else 'running'}; {len(studio.store.queued())} job(s) queued")
    return 0


def _whisper_cuda(kind: str) -> str:
    """Whether faster-whisper (CTranslate2) can run on CUDA, asked of a fresh process with the worker's library path."""
    from studio.cudalibs import export_library_path, missing

    try:
        from importlib import metadata

        version = f"faster-whisper {metadata.version('faster-whisper')}, ctranslate2 {metadata.version('ctranslate2')}"
    except metadata.PackageNotFoundError as e:
        return f"not installed ({e})"
    lacking = missing()
    env = {**os.environ, "LD_LIBRARY_PATH": export_library_path()}
    probe = ("import ctranslate2; n = ctranslate2.get_cuda_device_count(); "
             "print(n, sorted(ctranslate2.get_supported_compute_types('cuda')) if n else [])")
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120)
    if out.returncode != 0:
        return f"{version}; CUDA check failed: {(out.stderr.strip().splitlines() or ['?'])[-1][:160]}"
    n, types = out.stdout.strip().split(" ", 1)
    if int(n) == 0:
        why = "no CUDA device" if kind != "cuda" else "the GPU is not visible to CTranslate2"
        return f"{version}; CUDA: no ({why}); runs on the CPU (int8)"
    libs = "CUDA 12 libraries found" if not lacking else f"MISSING {', '.join(lacking)} (pip install them)"
    return f"{version}; CUDA: yes ({n} device(s), compute types {types}); {libs}"


def cmd_doctor(args) -> int:
    import platform
    import time
    import urllib.request
    from importlib import metadata

    from studio import JobStatus
    from studio.device import detect_all

    cfg = _config(args)
    print(f"Studio doctor — Python {platform.python_version()} on {platform.platform()}")
    devices = detect_all()
    for i, dev in enumerate(devices):
        r = dev.read()
        label = "device:  " if len(devices) == 1 else f"device {i}:"
        print(f"{label} {r.kind} · {r.name} · total {_gib(r.total)} · free {_gib(r.free)} · budget "
              f"{_gib(cfg.budget_bytes(r.total, i))}" + ("" if cfg.device_used(i) else " · not used (Settings)"))
    r = devices[0].read()
    if r.kind == "cuda":
        print(f"driver:   {r.driver} (CUDA {r.cuda}) · util {r.utilization}% · {r.temperature} °C · {r.power_w} W")
    else:
        print(f"note:     {r.note}")
    try:
        import torch

        print(f"torch:    {torch.__version__} (CUDA build {torch.version.cuda}); CUDA available: "
              f"{torch.cuda.is_available()}")
    except ImportError as e:
        print(f"torch:    not importable ({e})")
    try:
        import llama_cpp

        offload = llama_cpp.llama_supports_gpu_offload()
        print(f"llama.cpp: llama-cpp-python {llama_cpp.__version__}; GPU offload: {'yes' if offload else 'no'}"
              + ("" if offload or r.kind != "cuda" else " (rebuild with the CUDA toolkit: see README)"))
    except ImportError as e:
        print(f"llama.cpp: not importable ({e})")
    print(f"whisper:  {_whisper_cuda(r.kind)}")
    versions = []
    for name in ("gradio", "gradio-client", "nvidia-ml-py", "numpy", "safetensors", "tokenizers", "psutil",
                 "chromadb", "sentence-transformers", "transformers", "huggingface-hub"):
        try:
            versions.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            versions.append(f"{name} MISSING")
    print(f"packages: {', '.join(versions)}")
    print(f"data:     {cfg.data_dir} (runs {cfg.runs_dir}, uploads {cfg.uploads_dir}, datasets {cfg.datasets_dir})")
    try:
        urllib.request.urlopen("https://huggingface.co", timeout=3)
        print("hub:      huggingface.co reachable")
    except OSError as e:
        print(f"hub:      huggingface.co NOT reachable ({getattr(e, 'reason', e)}); models must be local paths")
    studio = _open_studio(args)
    try:
        if studio.owner:
            t0 = time.time()
            while not studio.worker_info.ready and time.time() - t0 < 120:
                time.sleep(0.05)
            print(f"worker:   started in {time.time() - t0:.1f} s (pid {studio.worker_info.pid}, "
                  f"{studio.worker_info.device})")
        if studio.store.paused:
            print(f"queue:    PAUSED — {studio.store.get_meta('pause_reason')}; self-test skipped "
                  "(python app.py queue resume)")
            return 1
        job = studio.submit("selftest", {"mib": 64})
        job = studio.wait(job.id, timeout=300)
        if job.status is not JobStatus.DONE:
            print(f"selftest: {job.status.value} — {job.error}")
            return 1
        res = job.result
        print(f"selftest: OK on {res['device']} ({res['device_name']}): allocated and freed "
              f"{res['allocated_bytes'] / 2**20:.0f} MiB; submit→start {(job.started - job.created) * 1000:.1f} ms")
        return 0
    finally:
        studio.shutdown()


def cmd_serve(args) -> int:
    from studio import Studio

    auth = None
    if args.auth:
        if ":" not in args.auth:
            print("error: --auth takes user:password")
            return 2
        auth = [tuple(args.auth.split(":", 1))]
    elif args.auth_file:
        lines = [ln.strip() for ln in Path(args.auth_file).read_text().splitlines() if ln.strip() and ":" in ln]
        auth = [tuple(ln.split(":", 1)) for ln in lines]
        if not auth:
            print(f"error: {args.auth_file} holds no user:password lines")
            return 2
    if (args.listen or args.share) and not auth:
        what = "--listen (every machine on your network)" if args.listen else "--share (a public link)"
        print(f"Refusing to start: {what} would expose the studio, its files and your GPU without a login.\n"
              "Add --auth user:password or --auth-file FILE (one user:password per line).")
        return 2
    cfg = _config(args)
    cfg.ensure_dirs()
    studio = Studio(cfg)
    if auth:  # the admin may do everything; every other login works only with what it uploaded and owns
        studio.admin = args.admin or auth[0][0]
        if studio.admin not in {u for u, _ in auth}:
            print(f"error: --admin {studio.admin} is not a user of the auth list")
            return 2

    def on_term(signum, frame):  # `kill` (SIGTERM) is a clean stop: shut the worker down and keep the queue
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second one (a supervisor repeating it) must not cut that short
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    if not studio.try_start():
        print(f"Another studio already serves {cfg.data_dir}. Stop it first, or use --data-dir for a second one.")
        return 1
    try:
        if args.openai_api:
            print(f"[studio] OpenAI-compatible API: http://{'<this machine>' if args.listen else '127.0.0.1'}:"
                  f"{args.port}/v1 (api_key: {'your user:password' if auth else 'anything'})", flush=True)
        launch(build_ui(studio, auth=bool(auth)), studio, server_name="0.0.0.0" if args.listen else "127.0.0.1",
               server_port=args.port, auth=auth, share=args.share, openai_api=args.openai_api)
    finally:
        studio.shutdown()
    return 0


def launch(demo, studio, openai_api: bool = False, **kwargs):
    """Serve the Blocks. A file leaves the studio only when a handler returns it, after its owner check: Gradio copies
    it into its cache under a name no one can guess. The file route serves that cache and nothing else (tabs.guard
    refuses a run folder's path even though handlers may return files from there), and a request may hand a
    component only a file that was uploaded. With `openai_api`, the same server answers /v1/models and
    /v1/chat/completions (studio.openai_api) behind the same logins."""
    from starlette.middleware import Middleware

    from tabs.guard import UploadsOnly

    cfg = studio.config
    app_kwargs = {"middleware": [Middleware(UploadsOnly, upload_dir=cfg.uploads_dir)]}
    if openai_api:  # FastAPI's own routes list: they come before Gradio's, which the app adds after
        from studio.openai_api import routes

        auth = kwargs.get("auth")
        app_kwargs["routes"] = routes(studio, [auth] if isinstance(auth, tuple) else auth)
    import gradio as gr

    from tabs.header import GRADIO_STRINGS

    # Gradio's queue re-summarises its past events with pandas (for its monitoring page) after every N events; at
    # its default of 1 a long-running server pays ~20 ms an event for a page the studio does not use
    os.environ.setdefault("GRADIO_ANALYTICS_CACHE_FREQUENCY", "100")
    return demo.queue(default_concurrency_limit=16).launch(
        i18n=gr.I18n(**GRADIO_STRINGS),
        allowed_paths=[str(cfg.runs_dir)],  # so a handler may return a run's file (Gradio copies it to its cache)
        blocked_paths=[str(cfg.users_dir), str(cfg.datasets_dir), str(cfg.db_path), str(cfg.data_dir / "rag"),
                       str(cfg.data_dir / "chat.db")],
        css_paths=[ROOT / "assets" / "studio.css"], footer_links=["api"],
        max_file_size=int(cfg.max_upload_gb * 2**30),  # Gradio refuses a bigger upload before writing it
        app_kwargs=app_kwargs, **kwargs)


# The tabs, in order: (id, label, module). Adding a tab is one row here. The id names the tab in a deep link
# (?tab=<id>) and in studio_ui; the module has build(studio, auth=False) -> dict of named components, and a tab that
# starts jobs declares KINDS = {kind: Follow(...)}, so a reloaded page re-attaches to its newest unfinished job
# (endpoint /<id>_attach); a tab with per-user lists defines fill(studio, owner), run on page load (/<id>_fill); a tab
# whose forms are remembered per user declares FORMS = {form key: input names} and binds its buttons with
# bind(..., remember=key).
TABS = (
    ("chat", "Chat (RAG)", "tabs.chat_rag"),
    ("transcribe", "Transcribe", "tabs.transcribe"),
    ("detect", "Detect", "tabs.detect"),
    ("finetune", "Fine-tune", "tabs.finetune"),
    ("paint", "Paint", "tabs.paint"),
    ("vision", "Vision chat", "tabs.vision"),
    ("tinylm", "Tiny LM", "tabs.tinylm"),
    ("jobs", "Jobs", "tabs.jobs"),
    ("models", "Models", "tabs.models"),
    ("settings", "Settings", "tabs.settings"),
)
TAB_IDS = tuple(tab_id for tab_id, _, _ in TABS)


def build_ui(studio, auth: bool = False):
    """The Blocks: the live meter on top, then the tabs of TABS."""
    import importlib

    import gradio as gr

    from tabs import common, firstrun, header

    # Gradio reads this as each component is built: uploads land in the studio's own folder
    os.environ["GRADIO_TEMP_DIR"] = str(studio.config.uploads_dir)
    with gr.Blocks(title="Studio") as demo:
        ui = {"header": header.build(studio, auth), "first_run": firstrun.build(studio, auth)}
        firstrun.wire(demo, studio, ui["first_run"], auth)
        links, followers = [], []
        with gr.Tabs() as tabs:
            for tab_id, label, name in TABS:
                module = importlib.import_module(name)
                if hasattr(module, "link"):  # wiring that reaches into another tab, done once every tab is built
                    links.append(module.link)
                with gr.Tab(label, id=tab_id):
                    ui[tab_id] = module.build(studio, auth)
                common.fill_on_load(demo, studio, tab_id, ui[tab_id], getattr(module, "fill", None), auth)
                follow = common.reattach(demo, studio, tab_id, ui[tab_id], getattr(module, "KINDS", {}), auth,
                                         getattr(module, "FORMS", {}))
                if follow is not None and tab_id != "jobs":
                    followers.append(follow)
        header.deep_link(demo, tabs, TAB_IDS)
        for link in links:
            link(demo, tabs, ui, studio, auth)
        for follow in followers:  # a job resumed in the Jobs tab streams into its own tab too
            ui["jobs"]["job_id"].change(follow, ui["jobs"]["job_id"], follow.outputs, show_progress="hidden",
                                        api_visibility="private")
    demo.studio_ui = ui  # named components, for tests and scripts
    return demo


def cmd_test(args) -> int:
    import shutil
    from ctypes.util import find_library

    # system packages some tests need: a browser for the screenshot, espeak-ng and sox to make speech, and the
    # libraries OpenCV (Detect) loads, which minimal images lack
    present = {"chromium": lambda: shutil.which("chromium"), "espeak-ng": lambda: shutil.which("espeak-ng"),
               "sox": lambda: shutil.which("sox"), "libgl1": lambda: find_library("GL"),
               "libglib2.0-0": lambda: find_library("glib-2.0")}
    missing = [pkg for pkg, found in present.items() if not found()]
    if missing and os.geteuid() == 0 and shutil.which("apt-get"):
        print(f"[studio] installing {' '.join(missing)} for the tests (apt-get) …", flush=True)
        subprocess.run(["apt-get", "update", "-qq"], check=False)
        subprocess.run(["apt-get", "install", "-y", "-qq", *missing], check=False,
                       env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
        missing = [pkg for pkg in missing if not present[pkg]()]
    if missing:
        print(f"[studio] {' '.join(missing)} missing, so the tests that need them are skipped. Install with: "
              f"sudo apt-get install {' '.join(missing)}", flush=True)
    import importlib.util

    if importlib.util.find_spec("ray") is None:  # optional for users (requirements-ray.txt); the tests cover it
        print("[studio] installing requirements-ray.txt for the Ray tests …", flush=True)
        if subprocess.call([sys.executable, "-m", "pip", "install", "-q", "-r", str(ROOT / "requirements-ray.txt")]):
            print("[studio] Ray could not be installed, so tests/test_ray.py is skipped", flush=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    pytest_args = args.pytest_args or ["-q", "tests"]
    if not any(a.startswith("--timeout") for a in pytest_args):
        pytest_args = ["--timeout=600", *pytest_args]  # a hung test fails instead of stalling CI
    return subprocess.call([sys.executable, "-m", "pytest", *pytest_args], cwd=ROOT, env=env)


def main(argv: list[str] | None = None) -> int:
    import argparse

    argv = sys.argv[1:] if argv is None else argv
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--data-dir", default=None, help="data folder (default: $STUDIO_DATA_DIR or ./data)")
    ap = argparse.ArgumentParser(prog="app.py", description="Studio: a local AI workbench for one GPU.")
    sub = ap.add_subparsers(dest="cmd")

    s = sub.add_parser("serve", parents=[common], help="serve the UI (the default)")
    s.add_argument("--port", type=int, default=7860)
    s.add_argument("--listen", action="store_true", help="bind 0.0.0.0 (needs --auth)")
    s.add_argument("--share", action="store_true", help="a public Gradio link (needs --auth)")
    s.add_argument("--auth", help="user:password")
    s.add_argument("--auth-file", help="a file of user:password lines (the first user is the admin)")
    s.add_argument("--admin", help="the user who may name server paths, trust files and change settings "
                   "(default: the first user)")
    s.add_argument("--budget-gb", type=float, default=None, help="memory budget for jobs (default: total - reserve)")
    s.add_argument("--ray", metavar="ADDRESS", default=None, help="run device jobs on a Ray cluster (auto, "
                   "ray://host:10001, or local); needs `pip install -r requirements-ray.txt`")
    s.add_argument("--openai-api", action="store_true", help="also serve an OpenAI-compatible API at /v1 (chat "
                   "completions and models) through the queue; with --auth its API key is user:password")

    r = sub.add_parser("run", parents=[common], help="run one job and follow it")
    r.add_argument("kind")
    r.add_argument("--param", "-p", action="append", default=[], help="key=value (repeat)")
    r.add_argument("--budget-gb", type=float, default=None, help="budget for this job only")
    r.add_argument("--ray", metavar="ADDRESS", default=None, help="run it on a Ray cluster (see serve --ray)")
    r.add_argument("--quiet", "-q", action="store_true", help="print only the outcome")

    j = sub.add_parser("jobs", parents=[common], help="list, show, cancel, resume or retry jobs")
    j.add_argument("action", choices=["list", "show", "cancel", "resume", "retry"])
    j.add_argument("id", nargs="?")
    j.add_argument("--limit", type=int, default=30)
    j.add_argument("--tail", type=int, default=20, help="events shown by `show`")

    t = sub.add_parser("transcript", parents=[common],
                       help="print a transcript; rename its speakers; accept or reject the post-editor's changes")
    t.add_argument("id", help="a transcribe job's id")
    t.add_argument("--rename", action="append", default=[], metavar="S1=Alice", help="name a speaker (repeat)")
    t.add_argument("--accept", metavar="IDS", help="keep these changes: segment ids (1,4,7) or all")
    t.add_argument("--reject", metavar="IDS", help="drop these changes: segment ids or all")
    t.add_argument("--correct", action="append", default=[], metavar='3="the right text"',
                   help="correct a segment's text by hand (repeat); a fine-tune on this job learns it")
    t.add_argument("--edited", action="store_true", help="print the edited transcript (post-edits, corrections)")

    q = sub.add_parser("queue", parents=[common], help="pause or resume the queue")
    q.add_argument("action", choices=["pause", "resume"])

    m = sub.add_parser("models", parents=[common], help="list the presets (on disk or not), or check a model path")
    m.add_argument("action", choices=["list", "check"])
    m.add_argument("path", nargs="?", help="`check`: a model file or folder on this machine")

    sub.add_parser("doctor", parents=[common], help="check the device, packages and worker")
    sub.add_parser("test", help="run the test suite (arguments after it go to pytest)")

    if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        argv = ["serve", *argv]
    if argv[0] == "test":  # everything after `test` goes to pytest as is
        args = argparse.Namespace(cmd="test", pytest_args=argv[1:])
    else:
        args = ap.parse_args(argv)
    _quiet_env()
    os.umask(0o077)  # the job store, chats, collections, transcripts and run cards: the studio's user's alone
    handler = {"serve": cmd_serve, "run": cmd_run, "jobs": cmd_jobs, "queue": cmd_queue, "doctor": cmd_doctor,
               "test": cmd_test, "transcript": cmd_transcript, "models": cmd_models}[args.cmd]
    if args.cmd == "test":
        return handler(args)
    import sqlite3

    from studio import DataDirError

    try:
        return handler(args)
    except DataDirError as e:  # a full or read-only data folder: one line, not a traceback
        print(f"error: {e}", file=sys.stderr)
        return 1
    except (sqlite3.OperationalError, OSError) as e:
        if not isinstance(e, sqlite3.OperationalError) and getattr(e, "errno", None) not in (28, 30, 13, 1, 122):
            raise
        print(f"error: {DataDirError.explain(_config(args).data_dir, e)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    bootstrap()
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
