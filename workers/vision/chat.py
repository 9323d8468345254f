"""Job kind `vision_chat`: ask a vision-language model about one or several images, in a conversation kept with the
Chat tab's (chat.db), or caption a whole folder of images with one prompt (batch).

The fast path is llama.cpp (a GGUF preset with its mmproj projector; the default); a transformers LLaVA folder in
4-bit serves fine-tuned adapters (`adapter=`, a vision_finetune job). Tokens stream as `token` events, each a cancel
point, so Stop really stops; a stopped answer is kept, marked stopped.

Batch (`image` names a folder): every image gets the prompt on its own; the answers land in the run folder as
answers.jsonl and answers.csv, and as captions/ in kohya's layout (each image beside a .txt holding its answer),
which the Paint tab's LoRA training reads as captions (images=<this job's run folder>/captions).
"""
from __future__ import annotations

import csv
import json
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path

from studio.gate import Estimate

PACKAGES = ("llama-cpp-python", "transformers", "bitsandbytes", "peft")  # versions for the run card
PATHS = ("model", "mmproj", "image", "adapter")  # params that name a server path or a job (studio.access)
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
MAX_IMAGES = 8  # per turn; each costs image_tokens of context (576 for LLaVA-1.5)
MAX_BATCH = 10_000
WORKSPACE = 64 * 2**20  # one turn's own memory: decoded images, the prompt, sampling


@dataclass(frozen=True)
class Params:
    prompt: str = ""  # the question about the image(s); in batch mode, asked of every image
    image: str = ""  # an image file, several (one per line or comma-separated), or a folder (batch: each answered)
    model: str = ""  # a vision preset (llava-1.5-7b-q4k, …), a .gguf with its mmproj beside it, or a LLaVA folder
    mmproj: str = ""  # the projector .gguf of a local GGUF model; empty: the mmproj*.gguf beside the model
    conversation: str = ""  # keep the exchange in this conversation id; "new" starts one; empty: not saved
    system: str = ""  # a system prompt; empty: the model's own
    max_tokens: int = 256  # longest answer, in tokens
    temperature: float = 0.2  # 0: always the likeliest token (captions: keep it low)
    top_p: float = 0.95  # sample from the smallest set of tokens whose probabilities add up to this
    adapter: str = ""  # a LoRA from vision_finetune: its job id or adapter folder (model empty: its base)
    n_ctx: int = 4096  # context window: the conversation, every image's tokens and the answer
    n_gpu_layers: int = -1  # llama.cpp: -1 as many layers as fit the budget (the gate decides); 0: CPU only
    load_in_4bit: bool = True  # transformers models: the language model in NF4 through bitsandbytes
    seed: int = 0  # 0: random
    threads: int = 0  # CPU threads; 0: all cores

    def __post_init__(self):
        for name, lo, hi in [("max_tokens", 1, 8192), ("temperature", 0.0, 5.0), ("top_p", 0.01, 1.0),
                             ("n_ctx", 256, 131072), ("n_gpu_layers", -1, 1000), ("seed", 0, 2**32 - 2),
                             ("threads", 0, 1024)]:
            v = getattr(self, name)
            if not lo <= v <= hi:
                raise ValueError(f"{name} must be between {lo} and {hi}; got {v}")
        if not self.prompt.strip():
            raise ValueError("the prompt is empty: ask something about the image")


def path_items(name: str, value: str) -> list[str]:
    """The paths a param names (studio.access checks each): `image` may list several."""
    return image_list(value) if name == "image" else value.splitlines()


def image_list(value: str) -> list[str]:
    v = value.strip()
    if not v:
        return []
    out = []
    for line in (x.strip() for x in v.splitlines()):
        if Path(line).expanduser().exists():  # a file name with a comma in it stays whole
            out.append(line)
        else:
            out += [s.strip() for s in line.split(",") if s.strip()]
    return out


def batch_folder(p: Params) -> Path | None:
    items = image_list(p.image)
    if len(items) == 1 and Path(items[0]).expanduser().is_dir():
        return Path(items[0]).expanduser()
    return None


def folder_images(folder: Path) -> list[Path]:
    return sorted(f for f in folder.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_EXTS)


# ---- checks and the gate ---------------------------------------------------------------------------------------------
def _ref(p: Params, data_dir=None):
    from workers.vision.model import resolve

    return resolve(p.model, data_dir, p.mmproj)


def validate(p: Params, config) -> Params:
    """Every image opens, the model resolves (the projector found), an adapter names its base, and the images fit the
    context."""
    from workers.vision.backends import open_image

    if p.adapter.strip():
        p = _with_adapter(p, config.data_dir)
    if not p.model.strip():
        from workers.vision.model import default

        p = replace(p, model=default(config.data_dir))
    ref = _ref(p, config.data_dir)
    if p.adapter and ref.backend != "hf":
        raise ValueError(f"adapter needs the transformers model it was trained on, and {p.model} is a GGUF model: "
                         "leave model empty (the adapter's base is used)")
    folder = batch_folder(p)
    if folder is not None:
        if p.conversation:
            raise ValueError("a folder of images is answered image by image (batch): leave conversation empty")
        found = folder_images(folder)
        if not found:
            raise ValueError(f"{folder} holds no images ({', '.join(IMAGE_EXTS)})")
        if len(found) > MAX_BATCH:
            raise ValueError(f"{folder} holds {len(found)} images; a batch takes at most {MAX_BATCH}")
        n_images = 1
    else:
        items = image_list(p.image)
        if len(items) > MAX_IMAGES:
            raise ValueError(f"{len(items)} images in one question; at most {MAX_IMAGES} (or give a folder to "
                             "answer each image on its own)")
        for item in items:
            if Path(item).expanduser().is_dir():
                raise ValueError(f"{item} is a folder: give it alone (batch) or list image files")
            open_image(Path(item).expanduser())  # raises naming a missing or unreadable image
        n_images = len(items) + _history_images(p, config.data_dir)
    need = n_images * ref.image_tokens + p.max_tokens + 32
    if need > p.n_ctx:
        raise ValueError(f"{n_images} image(s) take {n_images * ref.image_tokens} tokens of context and the answer "
                         f"up to {p.max_tokens}: more than n_ctx={p.n_ctx}. Raise n_ctx to at least "
                         f"{_round_ctx(need)}, send fewer images, or start a new conversation")
    return p


def _round_ctx(n: int) -> int:
    return ((n + 511) // 512) * 512


def _history_images(p: Params, data_dir) -> int:
    if p.conversation in ("", "new"):
        return 0
    from studio.conversations import Conversations

    try:
        messages = Conversations(Path(data_dir) / "chat.db").get(p.conversation)["messages"]
    except KeyError:
        raise ValueError(f"no conversation {p.conversation!r}") from None
    return sum(len((m.get("meta") or {}).get("images") or []) for m in messages)


def _with_adapter(p: Params, data_dir) -> Params:
    """The adapter as its folder (a job id resolved), checked; model empty -> the base it was trained on."""
    from workers.finetune.adapter import adapter_base, adapter_dir, read_adapter, same_base

    folder = adapter_dir(p.adapter, data_dir)
    base = adapter_base(folder, read_adapter(folder))
    if not p.model.strip():
        return replace(p, adapter=str(folder), model=base)
    if not same_base(p.model, base):
        raise ValueError(f"the adapter was trained on {base}, not {p.model}: leave model empty to use its base")
    return replace(p, adapter=str(folder))


def fit(p: Params, device, budget: int) -> Params:
    """llama.cpp: as many GPU layers as fit beside the projector, the KV cache and the runtime context."""
    from studio.gate import runtime_context_bytes
    from workers.vision.model import fit_layers

    if p.n_gpu_layers != -1:
        return p
    ref = _ref(p)
    if ref.backend == "hf":
        return p
    return replace(p, n_gpu_layers=fit_layers(ref, p.n_ctx, device, budget - runtime_context_bytes(device) - WORKSPACE))


def model_key(p: Params) -> str:
    """The worker-cache key of the loaded model, from the (resolved) params alone: the estimate and the run agree."""
    ref = _ref(p)
    where = str(ref.path.resolve()) if ref.path is not None else ref.name
    if ref.backend == "hf":
        key = f"vlm:hf:{where}:{p.load_in_4bit}"
        if p.adapter:
            from workers.finetune.adapter import adapter_key

            key += f":adapter={adapter_key(Path(p.adapter))}"
        return key
    return f"vlm:gguf:{where}:{ref.mmproj}:{p.n_ctx}:{p.n_gpu_layers}"


def estimate(p: Params, device) -> Estimate:
    """The model as it sits in the worker's cache: language-model weights (offloaded layers), the vision tower and
    projector, the KV cache for n_ctx tokens (each image's tokens among them), the compute buffers; and one turn's
    working memory."""
    from workers.vision.model import memory

    ref = _ref(p)
    kind = getattr(device, "kind", "cpu")
    parts = memory(ref, p.n_ctx, p.n_gpu_layers, device, p.load_in_4bit)
    if p.adapter:  # PEFT keeps LoRA weights in fp32 beside the base
        from workers.finetune.adapter import read_adapter

        parts["adapter"] = 4 * read_adapter(Path(p.adapter))["n_params"]
    if ref.backend == "gguf":
        layers = ref.shape["n_layer"] if p.n_gpu_layers < 0 else p.n_gpu_layers
        where = f"{layers} of {ref.shape['n_layer']} layers on the GPU" if kind == "cuda" else "on the CPU"
    else:
        where = ("4-bit" if p.load_in_4bit else "16-bit") + (" on the GPU" if kind == "cuda" else " on the CPU")
    inside = ", ".join(f"{k} {v / 2**30:.2f}" for k, v in parts.items() if v)
    return Estimate(parts={"workspace": WORKSPACE}, models={model_key(p): sum(parts.values())},
                    note=f"{Path(ref.name).name}{' + adapter' if p.adapter else ''} ({ref.backend}): {where}, context "
                         f"{p.n_ctx}, {ref.image_tokens} tokens per image ({inside})")


def shrink(p: Params):
    """Smaller contexts first (the images must still fit), then fewer GPU layers."""
    ctx = p.n_ctx
    while ctx > 2048:
        ctx //= 2
        yield {"n_ctx": ctx}
    if not p.load_in_4bit:
        yield {"load_in_4bit": True}
    for layers in (24, 16, 8, 0):
        yield {"n_gpu_layers": layers, "n_ctx": min(p.n_ctx, 2048)}


# ---- run ------------------------------------------------------------------------------------------------------------
def load(ctx, p: Params):
    """The model behind one `stream()` (GGUFVision or HFVision), from the worker's cache when it is there."""
    from workers.chat.llm import download, hub_snapshot
    from workers.vision.backends import load_gguf_vision, load_hf_vision
    from workers.vision.model import resolve

    ref = _ref(p, ctx.data_dir)
    key = model_key(p)
    if ref.backend == "hf":
        source = ref.path
        if source is None:  # the preset's repo, downloaded when online
            ctx.progress(0, None, f"downloading {ref.repo}")
            source = Path(hub_snapshot(ref.repo))
        adapter = Path(p.adapter) if p.adapter else None
        return ctx.cached(key, lambda: load_hf_vision(source, ctx.device, p.load_in_4bit, adapter))
    if ref.path is None or ref.mmproj is None:  # a preset not downloaded yet: the model and its projector
        progress = lambda d, t, m: ctx.progress(d, t, m)  # noqa: E731  (each call is a cancel point)
        preset = ref.preset or {}
        try:
            if ref.path is None:
                download(preset["repo"], preset["file"], progress)
            if ref.mmproj is None:
                download(preset["repo"], preset["mmproj"], progress)
        except RuntimeError as e:
            raise RuntimeError(f"{ref.name} ({preset['repo']}: {preset['file']} and its projector {preset['mmproj']}) "
                               "is not downloaded and the hub cannot be reached. Download it when online (Models tab, "
                               f"or `python app.py run model_download --param preset={ref.name}`), or give a local "
                               f".gguf with its mmproj file as model. ({str(e).split('(')[0].strip()})") from None
        ref = resolve(p.model, ctx.data_dir, p.mmproj)
    layers = p.n_gpu_layers if ctx.device == "cuda" else 0
    return ctx.cached(key, lambda: load_gguf_vision(ref, p.n_ctx, layers, p.threads or None,
                                                    flash_attn=ctx.device == "cuda"))


def run(p: Params, ctx) -> dict:
    import os

    if ctx.device != "cuda":
        import torch

        torch.set_num_threads(p.threads or os.cpu_count() or 1)
    try:
        if batch_folder(p) is not None:
            return _batch(p, ctx)
        return _chat(p, ctx)
    except ValueError as e:
        if "exceed context window" in str(e):  # llama.cpp's words for a prompt + answer longer than n_ctx
            raise ValueError(f"the conversation, its images and the answer do not fit the context window "
                             f"(n_ctx={p.n_ctx}); the question was not stored: start a new conversation, send fewer "
                             "images or raise n_ctx") from None
        raise


def _keep_images(ctx, items: list[str]) -> list[str]:
    """Copies of the turn's images in the run folder (the conversation refers to these: uploads come and go)."""
    out = []
    folder = ctx.run_dir / "images"
    for i, item in enumerate(items):
        src = Path(item).expanduser()
        folder.mkdir(parents=True, exist_ok=True)
        dest = folder / f"{i:02d}-{src.name}"
        shutil.copyfile(src, dest)
        out.append(str(dest))
    return out


def _chat(p: Params, ctx) -> dict:
    from studio.context import JobCancelled
    from studio.conversations import Conversations

    t_start = time.perf_counter()
    convs = Conversations(ctx.data_dir / "chat.db")
    cid = "" if p.conversation == "new" else p.conversation
    stored = convs.get(cid)["messages"] if cid else []
    images = _keep_images(ctx, image_list(p.image))
    ctx.emit("turn", question=p.prompt, images=[str(Path(i).relative_to(ctx.run_dir)) for i in images])
    history = [{"role": m["role"], "content": m["content"],
                "images": [i for i in (m.get("meta") or {}).get("images") or [] if Path(i).exists()]}
               for m in stored if m["role"] in ("user", "assistant")]
    turns = ([{"role": "system", "content": p.system}] if p.system.strip() else []) + history + \
        [{"role": "user", "content": p.prompt, "images": images}]
    took = False

    def keep(role: str, content: str, meta: dict | None = None) -> None:
        """Store the question once the model has taken it (a refused one would break the conversation)."""
        nonlocal cid, took
        if not p.conversation:
            return
        if not cid:
            cid = convs.create(p.prompt.strip()[:60] or "Image chat", owner=ctx.owner,
                               settings={"model": p.model, "kind": "vision_chat"})
        if not took:
            took = True
            convs.add(cid, "user", p.prompt, {"images": images, "kind": "vision_chat"})
        if role == "assistant":
            convs.add(cid, role, content, meta)

    llm, cached = load(ctx, p)
    t_loaded = time.perf_counter()
    answer, t_first = [], None
    t_gen = time.perf_counter()
    try:
        for piece in llm.stream(turns, max_tokens=p.max_tokens, temperature=p.temperature, top_p=p.top_p,
                                seed=p.seed or None):
            if t_first is None:
                t_first = time.perf_counter()
                keep("user", p.prompt)
            answer.append(piece)
            ctx.emit("token", text=piece)  # a cancel point: Stop ends generation here
    except JobCancelled:
        if t_first is not None:
            keep("assistant", "".join(answer), {"stopped": True, "model": p.model, "kind": "vision_chat"})
        raise
    t_end = time.perf_counter()
    text = "".join(answer)
    keep("assistant", text, {"model": p.model, "adapter": p.adapter or None, "kind": "vision_chat"})
    n_tokens = llm.count_tokens(text) if text else 0
    gen_s = max(t_end - (t_first or t_end), 1e-9)
    return {
        "answer": text,
        "images": [str(Path(i).relative_to(ctx.run_dir)) for i in images],
        "conversation": cid or None,
        "tokens": n_tokens,
        "tokens_per_s": (n_tokens - 1) / gen_s if n_tokens > 1 else None,
        "ttft_ms": ((t_first or t_end) - t_gen) * 1000,
        "load_s": t_loaded - t_start,
        "model_cached": cached,
        "model": p.model,
        "adapter": p.adapter or None,
        "backend": llm.backend,
        "n_gpu_layers": p.n_gpu_layers if ctx.device == "cuda" and llm.backend == "gguf" else 0,
    }


def _batch(p: Params, ctx) -> dict:
    """Every image of the folder answered on its own; answers.jsonl, answers.csv and captions/ (kohya's layout)."""
    folder = batch_folder(p)
    files = folder_images(folder)
    llm, cached = load(ctx, p)
    captions = ctx.run_dir / "captions"
    captions.mkdir(parents=True, exist_ok=True)
    rows, failed, n_tokens, t0 = [], [], 0, time.perf_counter()
    out_jsonl = ctx.run_dir / "answers.jsonl"
    with open(out_jsonl, "w", encoding="utf-8") as f:
        for i, img in enumerate(files):
            rel = str(img.relative_to(folder))
            ctx.progress(i, len(files), f"image {i + 1}/{len(files)}: {rel}")
            turns = ([{"role": "system", "content": p.system}] if p.system.strip() else []) + \
                [{"role": "user", "content": p.prompt, "images": [str(img)]}]
            try:
                text = "".join(llm.stream(turns, max_tokens=p.max_tokens, temperature=p.temperature, top_p=p.top_p,
                                          seed=p.seed or None)).strip()
            except ValueError as e:  # an unreadable image: named, and the batch goes on
                failed.append({"image": rel, "error": str(e)})
                ctx.log(f"skipped {rel}: {e}")
                continue
            n_tokens += llm.count_tokens(text) if text else 0
            row = {"image": rel, "answer": text}
            rows.append(row)
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            f.flush()
            ctx.emit("answer", image=rel, answer=text)
            flat = rel.replace("/", "__")
            shutil.copyfile(img, captions / flat)
            (captions / Path(flat).with_suffix(".txt")).write_text(text + "\n", encoding="utf-8")
    with open(ctx.run_dir / "answers.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=["image", "answer"])
        w.writeheader()
        w.writerows(rows)
    ctx.progress(len(files), len(files), f"{len(rows)} images answered")
    ctx.artifact(out_jsonl, "answers (JSONL)")
    ctx.artifact(ctx.run_dir / "answers.csv", "answers (CSV)")
    seconds = time.perf_counter() - t0
    return {
        "batch": True,
        "answered": len(rows),
        "failed": failed,
        "answers": rows[:50],  # the first ones; all of them are in answers.jsonl
        "answers_jsonl": str(out_jsonl),
        "answers_csv": str(ctx.run_dir / "answers.csv"),
        "captions_dir": str(captions),
        "tokens": n_tokens,
        "seconds": round(seconds, 2),
        "images_per_s": len(rows) / seconds if seconds > 0 else None,
        "model_cached": cached,
        "model": p.model,
        "backend": llm.backend,
    }
