"""Models tab: presets for a 12 GB card, downloads into the Hugging Face cache with progress, local files."""
from collections.abc import Iterator
from pathlib import Path

import gradio as gr

from studio import Job
from workers.chat.llm import find_local, presets

from .common import Follow, progress_html, user_of, watch

HEADERS = ["kind", "name", "source", "file", "size GB", "licence", "VRAM est. GB", "on disk"]


def table(studio) -> list[list]:
    rows = []
    for kind in ("llm", "embedder", "reranker", "whisper"):
        for name, p in presets()[kind].items():
            if kind == "llm":
                here = find_local(name, p, studio.config.data_dir)
                on_disk = "yes" if here else ("assembled on first use" if p.get("pypi") else "no")
            else:
                on_disk = "packaged" if p.get("pypi") else _snapshot_state(p["repo"])
            rows.append([kind, name, p.get("repo") or f"PyPI {p.get('pypi')}", p.get("file", "(repo)"),
                         p["size_gb"], p["licence"], p.get("vram_gb", "—"), on_disk])
    for name, p in presets()["yolo"].items():
        here = (studio.config.data_dir / "models" / "yolo" / p["file"]).exists()
        rows.append(["yolo", name, "Ultralytics assets", p["file"], p["size_gb"], p["licence"], "< 1",
                     "yes" if here else "no"])
    return rows


def _snapshot_state(repo: str) -> str:
    try:
        from huggingface_hub import snapshot_download

        snapshot_download(repo, local_files_only=True)
        return "yes"
    except Exception:  # not cached (LocalEntryNotFoundError) or no hub library
        return "no"


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
        kinds = ("llm", "embedder", "reranker", "whisper", "yolo")
        preset = gr.Dropdown([n for k in kinds for n, p in presets()[k].items()
                              if not p.get("pypi")], label="Preset")
        download = gr.Button("Download", variant="primary")
    with gr.Row():
        repo = gr.Textbox(label="…or any hub repo", placeholder="Qwen/Qwen2.5-0.5B-Instruct-GGUF")
        file = gr.Textbox(label="file (empty: whole repo)", placeholder="qwen2.5-0.5b-instruct-q4_k_m.gguf")
        download_any = gr.Button("Download")
    status = gr.HTML()
    with gr.Row():
        local = gr.Textbox(label="Check a local model file", placeholder="/models/my-model.gguf")
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

    def on_check(path):
        from workers.chat.llm import resolve

        try:
            ref = resolve((path or "").strip(), studio.config.data_dir)
        except ValueError as e:
            return f"❌ {e}"
        s = ref.shape
        return (f"✅ `{Path(path).name}` · {s.get('arch', '')} · {s['n_layer']} layers · KV heads {s['n_kv_head']} × "
                f"{s['head_dim']} · vocab {s['vocab']:,} · trained context {s['ctx_train']:,} · "
                f"{s['size'] / 1e9:.2f} GB. Use this path as the model in the Chat tab.")

    check.click(on_check, local, local_info, api_name="model_check")
    return dict(models=models, preset=preset, download=download, repo=repo, file=file, download_any=download_any,
                status=status, local=local, check=check, local_info=local_info)
