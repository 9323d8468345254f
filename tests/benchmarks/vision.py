"""Vision chat benchmark: what the studio costs over the model it drives, and (with --gpu) the LLaVA-1.5-7B shape's two
paths and its QLoRA step.

Run inside the project's .venv:

    python tests/benchmarks/vision.py [--runs 5] [--tokens 128]            # CPU: studio vs the same model called directly
    python tests/benchmarks/vision.py --gpu [--gguf F --mmproj F]         # CUDA: LLaVA-1.5-7B shape, random weights

CPU: a small LLaVA built here (a 4-layer, 256-wide Llama behind a 4-layer CLIP tower at 64 px, 64 image tokens;
`--model FOLDER` for another) answers the same image and question greedily with a fixed number of new tokens, as a
`vision_chat` job through the studio (queue, worker process, its cached model, a `token` event per piece) and with
the same backend called directly in this process (workers.vision.backends: load_hf_vision + stream), runs
interleaved. `speed_ratio` = studio tokens/s / direct tokens/s over the stream (first piece to last, the same pieces
on both sides; goal >= 0.95), the median of each back-to-back pair's ratio (`median_ratio`: the ratio of the two
medians); `e2e_ratio` also counts the image encoding and prefill.

--gpu: a random-weight model with the config of assets/presets/vision.json's llava-1.5-7b-hf (nothing downloaded;
fp16 on disk, a CLIPImageProcessor at 336 px, the tests' byte-level tokenizer with an `<image>` token), under a
per-process cap of --cap-gib: transformers + bitsandbytes NF4 tokens/s generating --gpu-tokens after a 336 px image;
with --gguf/--mmproj llama.cpp's tokens/s on the same GPU (`fast_path_ratio` = llama.cpp / transformers, goal >= 5;
null without a GGUF); the vision_finetune QLoRA step at seq 1024 (576 image tokens + text), r 16, micro-batch 1:
s/step, the torch and NVML peaks and the gate's estimate (`qlora_peak_gib` goal <= 8, `estimate_error` within +-10%).

The last line printed is one JSON object.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from studio.config import GiB  # noqa: E402

PROMPT = "Describe this picture in detail."
WORDS = ("the red lighthouse stands on a grey rock above the harbour where green boats wait for the morning tide while "
         "a blue bus crosses the old stone bridge and the market opens under yellow lamps").split()

# the CPU benchmark's model: big enough that a token costs real work, small enough to build in seconds
CPU_TEXT = dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=8,
                num_key_value_heads=4, max_position_embeddings=2048)
CPU_VISION = dict(hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4, image_size=64,
                  patch_size=8, projection_dim=128)


# ---- models built here --------------------------------------------------------------------------------------------
def make_llava(folder: Path, text: dict, vision: dict, dtype: str = "float32", seed: int = 0,
               top: dict | None = None) -> Path:
    """A transformers LLaVA folder with random weights: a Llama `text` config behind a CLIP `vision` config (as dicts),
    the tests' byte-level tokenizer with an `<image>` token, a LlavaProcessor with the tests' chat template.

    The LM head can only say whole words of the tokenizer (the other rows are zero, so a random model's greedy pick
    is always one of them) and the generation config has no end token: every answer is exactly max_tokens long, it
    streams word by word, and re-tokenizing it gives back the same count, as with a real model."""
    import torch
    from transformers import (AutoModelForImageTextToText, CLIPImageProcessor, CLIPVisionConfig, LlamaConfig,
                              LlavaConfig, LlavaProcessor)
    from finetune_fixtures import make_tokenizer
    from vision_fixtures import CHAT_TEMPLATE

    folder = Path(folder)
    if (folder / "config.json").exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    tok = make_tokenizer(folder, extra_text=" ".join(WORDS), extra_specials=("<image>",))
    image_id = tok.convert_tokens_to_ids("<image>")
    drop = ("architectures", "model_type", "torch_dtype")
    t = {k: v for k, v in text.items() if k not in drop}
    t.setdefault("vocab_size", len(tok))
    if t["vocab_size"] < len(tok):
        raise ValueError(f"vocab_size {t['vocab_size']} is smaller than the tokenizer's {len(tok)}")
    t.update(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    v = {k: val for k, val in vision.items() if k not in drop}
    top = {k: val for k, val in (top or {}).items() if k not in drop + ("text_config", "vision_config",
                                                                          "image_token_index", "pad_token_id")}
    top = {"projector_hidden_act": "gelu", "vision_feature_layer": -2, "vision_feature_select_strategy": "default",
           **top}
    n_img = (v["image_size"] // v["patch_size"]) ** 2
    cfg = LlavaConfig(vision_config=CLIPVisionConfig(**v), text_config=LlamaConfig(**t), image_token_id=image_id,
                      **{**top, "image_seq_length": n_img, "tie_word_embeddings": False})
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(cfg, dtype=getattr(torch, dtype))
    vocab = tok.get_vocab()
    words = [i for s, i in vocab.items() if s.startswith("Ġ") and s[1:].isalpha() and len(s) > 2]
    with torch.no_grad():
        head = model.get_output_embeddings().weight
        keep = torch.zeros(head.shape[0], dtype=torch.bool)
        keep[words] = True
        head[~keep] = 0
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(str(folder), max_shard_size="4GB")
    del model
    gc.collect()
    side = v["image_size"]
    images = CLIPImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side})
    LlavaProcessor(image_processor=images, tokenizer=tok, patch_size=v["patch_size"],
                   vision_feature_select_strategy=top["vision_feature_select_strategy"], num_additional_image_tokens=1,
                   chat_template=CHAT_TEMPLATE).save_pretrained(str(folder))
    return folder


def cpu_llava(folder: Path) -> Path:
    return make_llava(folder, CPU_TEXT, CPU_VISION)


def random_llava_7b(folder: Path) -> Path:
    """LLaVA-1.5-7B's shape (assets/presets/vision.json's llava-1.5-7b-hf config: the 32-layer Llama-2-7B with its
    32,064-token head, the CLIP ViT-L/14 tower at 336 px, the two-layer projector) with random fp16 weights, built in
    RAM (~14 GB) and saved in shards; the tokenizer is the tests' small one (the real one is a download)."""
    from workers.vision.model import table

    cfg = table()["llava-1.5-7b-hf"]["config"]
    return make_llava(folder, cfg["text_config"], cfg["vision_config"], dtype="float16", top=cfg)


def write_image(path: Path, side: int = 336) -> Path:
    """A picture with some structure (a gradient, a disc, bars) rather than a flat colour."""
    from PIL import Image, ImageDraw

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.new("RGB", (side, side))
    px = img.load()
    for y in range(side):
        for x in range(side):
            px[x, y] = (x * 255 // side, y * 255 // side, 128)
    d = ImageDraw.Draw(img)
    d.ellipse((side // 4, side // 4, 3 * side // 4, 3 * side // 4), fill=(230, 40, 30))
    for k in range(0, side, side // 8):
        d.rectangle((k, side - side // 10, k + side // 16, side), fill=(20, 20, 200))
    img.save(path)
    return path


def long_pairs(folder: Path, n: int = 16, words: int = 500, side: int = 336, seed: int = 0) -> Path:
    """`n` {image, question, answer} pairs (JSONL beside their images) whose answers are long enough that image +
    text passes 1,024 tokens: every training sequence is max_seq_len long, the memory's worst case."""
    import random

    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        name = f"img{i:03d}.png"
        Image.new("RGB", (side, side), (rng.randrange(256), rng.randrange(256), rng.randrange(256))).save(folder / name)
        rows.append({"image": name, "question": f"What is in picture {i}?",
                     "answer": " ".join(rng.choice(WORDS) for _ in range(words))})
    path = folder / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ---- measuring a stream ------------------------------------------------------------------------------------------
def rates(t_start: float, stamps: list[float], n_tokens: int) -> dict:
    """tokens/s over the stream (first piece to last: decoding) and from the start (image encoding and prefill too)."""
    return {"tok_s": (n_tokens - 1) / max(stamps[-1] - stamps[0], 1e-9),
            "e2e_tok_s": n_tokens / max(stamps[-1] - t_start, 1e-9), "ttft_ms": (stamps[0] - t_start) * 1000}


def timed_stream(vis, image: Path, tokens: int) -> tuple[list[float], str, float]:
    """One greedy answer through a backend's own stream(): (each piece's wall-clock time, as the events stamp them,
    the text, the start)."""
    turns = [{"role": "user", "content": PROMPT, "images": [str(image)]}]
    t0, stamps, text = time.time(), [], []
    for piece in vis.stream(turns, max_tokens=tokens, temperature=0.0, top_p=1.0):
        stamps.append(time.time())
        text.append(piece)
    return stamps, "".join(text), t0


# ---- CPU: the studio vs the same backend called directly -----------------------------------------------------------
def cpu_benchmark(args) -> dict:
    from studio import Config, Studio
    from workers.vision.backends import load_hf_vision

    import torch

    threads = args.threads or os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = str(Path(args.model).expanduser()) if args.model else str(cpu_llava(tmp / "llava-small"))
        if args.model:  # a copy without an end token, so every answer has the same length
            import shutil

            copy = tmp / "model"
            shutil.copytree(model, copy)
            gen_path = copy / "generation_config.json"
            gen = json.loads(gen_path.read_text()) if gen_path.exists() else {}
            gen["eos_token_id"] = None
            gen_path.write_text(json.dumps(gen))
            model = str(copy)
        image = write_image(tmp / "picture.png")
        params = {"model": model, "image": str(image), "prompt": PROMPT, "max_tokens": args.tokens,
                  "temperature": 0.0, "top_p": 1.0, "load_in_4bit": args.four_bit, "threads": threads}
        studio = Studio(Config.load(tmp / "data")).start()
        s_runs, d_runs, answers = [], [], set()
        try:
            def through_studio() -> dict:
                job = studio.wait(studio.submit("vision_chat", params).id, 900)
                if job.status.value != "DONE":
                    raise SystemExit(f"the studio's vision_chat job {job.status.value}: {job.error}")
                if not job.result["model_cached"]:
                    raise SystemExit("the studio's job loaded the model again: the comparison needs its cached copy")
                ev = studio.events(job.id)[0]
                turn = next(e["t"] for e in ev if e["type"] == "turn")  # emitted before the (cached) model is fetched
                stamps = [e["t"] for e in ev if e["type"] == "token"]
                answers.add(job.result["answer"])
                return {**rates(turn, stamps, args.tokens), "job_tok_s": job.result["tokens_per_s"]}

            warm = studio.wait(studio.submit("vision_chat", {**params, "max_tokens": 4}).id, 900)  # loads the model
            if warm.status.value != "DONE":
                raise SystemExit(f"the warm-up vision_chat job {warm.status.value}: {warm.error}")
            torch.set_num_threads(threads)
            vis, _ = load_hf_vision(model, "cpu", args.four_bit)
            timed_stream(vis, image, 4)  # warm-up

            def direct() -> dict:
                stamps, text, t0 = timed_stream(vis, image, args.tokens)
                answers.add(text)
                return rates(t0, stamps, args.tokens)

            for i in range(args.runs):  # interleaved, the order alternating, so drift on a shared machine hits both
                first, second = (through_studio, direct) if i % 2 == 0 else (direct, through_studio)
                for f in (first, second):
                    time.sleep(0.5)  # the other side's idle threads stop spinning first
                    (s_runs if f is through_studio else d_runs).append(f())
                print(f"run {i + 1}: studio {s_runs[-1]['tok_s']:.1f} tok/s, direct {d_runs[-1]['tok_s']:.1f} tok/s",
                      flush=True)
        finally:
            studio.shutdown()
    med = lambda runs, k: statistics.median(r[k] for r in runs)  # noqa: E731
    s, d = med(s_runs, "tok_s"), med(d_runs, "tok_s")
    print(f"through the studio: {s:.1f} tok/s ({med(s_runs, 'e2e_tok_s'):.1f} with the image and prefill); called "
          f"directly: {d:.1f} tok/s ({med(d_runs, 'e2e_tok_s'):.1f})", flush=True)
    return {"device": "cpu", "model": args.model or "llava-small (built here: Llama 256x4, CLIP 128x4 at 64 px)",
            "load_in_4bit": args.four_bit, "tokens": args.tokens, "runs": args.runs, "threads": threads,
            "studio_tok_s": s, "direct_tok_s": d, "speed_ratio": paired(s_runs, d_runs, "tok_s"),
            "median_ratio": s / d,
            "studio_e2e_tok_s": med(s_runs, "e2e_tok_s"), "direct_e2e_tok_s": med(d_runs, "e2e_tok_s"),
            "e2e_ratio": paired(s_runs, d_runs, "e2e_tok_s"),
            "studio_ttft_ms": med(s_runs, "ttft_ms"), "direct_ttft_ms": med(d_runs, "ttft_ms"),
            "studio_job_tok_s": med(s_runs, "job_tok_s"), "same_answer": len(answers) == 1}


def paired(a: list[dict], b: list[dict], key: str) -> float:
    """The median of the run-by-run ratios a/b: each pair ran back to back, so the machine's drift (which swings a
    2-core VM's speed by 2x from one second to the next) cancels within a pair instead of landing on one side."""
    return statistics.median(x[key] / y[key] for x, y in zip(a, b))


# ---- GPU: the LLaVA-1.5-7B shape --------------------------------------------------------------------------------
def _stream_runs(vis, image: Path, tokens: int, runs: int, count_pieces: bool) -> dict:
    """Median tokens/s of `runs` answers after a warm-up; transformers answers are exactly `tokens` long (no end
    token), llama.cpp's a piece per token, so it counts them (a real model may stop early)."""
    timed_stream(vis, image, 8)
    out = []
    for _ in range(runs):
        stamps, _, t0 = timed_stream(vis, image, tokens)
        out.append({**rates(t0, stamps, len(stamps) if count_pieces else tokens), "tokens": len(stamps)})
    return {k: statistics.median(r[k] for r in out) for k in out[0]}


def _free() -> None:
    import torch

    gc.collect()
    torch.cuda.empty_cache()


def gpu_benchmark(args) -> dict:
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("--gpu needs CUDA (this machine has none); run without --gpu for the CPU benchmark")
    from studio.context import JobContext
    from studio.device import detect
    from studio.gate import full_estimate
    from studio.params import build
    from studio.worker import PeakSampler, memory_reader
    from workers.vision import chat, train
    from workers.vision.backends import load_gguf_vision, load_hf_vision

    if bool(args.gguf) != bool(args.mmproj):
        raise SystemExit("give --gguf and --mmproj together (the language model and its projector file)")
    reading = detect().read()
    torch.cuda.set_per_process_memory_fraction(min(1.0, args.cap_gib * GiB / reading.total))
    read = memory_reader("cuda")
    out: dict = {"device": reading.name, "cap_gib": args.cap_gib, "tokens": args.gpu_tokens}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t0 = time.time()
        base = random_llava_7b(tmp / "llava-7b-random")
        print(f"random LLaVA-1.5-7B-shape model written in {time.time() - t0:.0f} s", flush=True)
        image = write_image(tmp / "picture.png", 336)

        # transformers + bitsandbytes NF4: what vision_chat runs for a LLaVA folder (and for adapters)
        p = build(chat.Params, {"model": str(base), "image": str(image), "prompt": PROMPT,
                                "max_tokens": args.gpu_tokens, "temperature": 0.0})
        est = full_estimate(p, chat.estimate, reading).total
        torch.cuda.reset_peak_memory_stats()
        with PeakSampler(read) as s:
            vis, _ = load_hf_vision(base, "cuda", True)
            hf = _stream_runs(vis, image, args.gpu_tokens, args.runs, count_pieces=False)
        hf.update(peak_gib=s.peak / GiB, estimate_gib=est / GiB,
                  torch_peak_gib=torch.cuda.max_memory_allocated() / GiB)
        print("transformers nf4", json.dumps(hf), flush=True)
        del vis
        _free()
        out.update(hf_tok_s=hf["tok_s"], hf=hf)

        gg = None
        if args.gguf:
            from workers.vision.model import resolve

            ref = resolve(args.gguf, None, args.mmproj)
            with PeakSampler(read) as s:
                vis, _ = load_gguf_vision(ref, 4096, -1, flash_attn=True)
                gg = _stream_runs(vis, image, args.gpu_tokens, args.runs, count_pieces=True)
            gg["peak_gib"] = s.peak / GiB
            print("llama.cpp", json.dumps(gg), flush=True)
            del vis
            _free()
            out.update(gguf_tok_s=gg["tok_s"], gguf=gg)
        out["fast_path_ratio"] = gg["tok_s"] / hf["tok_s"] if gg else None

        # the vision_finetune QLoRA step at seq 1024 (576 image tokens + text), r 16, micro-batch 1
        data = long_pairs(tmp / "pairs", n=16, words=500)
        p = build(train.Params, {"base": str(base), "data": str(data), "max_seq_len": 1024, "micro_batch": 1,
                                 "grad_accum": 1, "lora_r": 16, "max_steps": args.gpu_steps, "eval_every": 0,
                                 "save_every": 10_000, "eval_prompts": 0, "lr": 1e-4})
        est = full_estimate(p, train.estimate, reading).total
        run_dir = tmp / "runs" / "qlora"
        run_dir.mkdir(parents=True)
        torch.cuda.reset_peak_memory_stats()
        ctx = JobContext(run_dir.name, "vision_finetune", run_dir, tmp, "cuda", threading.Event())
        with PeakSampler(read) as s:
            r = train.run(p, ctx)
        q = {"steps": r["steps"], "s_per_step": r["seconds"] / max(1, r["steps"]), "tokens_per_s": r["tokens_per_s"],
             "peak_gib": s.peak / GiB, "torch_peak_gib": torch.cuda.max_memory_allocated() / GiB,
             "estimate_gib": est / GiB}
        print("vision_finetune qlora", json.dumps(q), flush=True)
        out.update(qlora=q, qlora_s_per_step=q["s_per_step"], qlora_peak_gib=q["peak_gib"],
                   qlora_estimate_gib=q["estimate_gib"],
                   estimate_error=(q["estimate_gib"] - q["peak_gib"]) / q["peak_gib"])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpu", action="store_true", help="the LLaVA-1.5-7B shape on CUDA instead of the CPU comparison")
    ap.add_argument("--model", default=None, help="CPU: a transformers LLaVA folder (default: a small one built here)")
    ap.add_argument("--runs", type=int, default=5, help="timed answers per path")
    ap.add_argument("--tokens", type=int, default=128, help="CPU: new tokens per answer")
    ap.add_argument("--four-bit", action=argparse.BooleanOptionalAction, default=True,
                    help="CPU: the language model in NF4 (vision_chat's default) or fp32")
    ap.add_argument("--threads", type=int, default=0, help="CPU threads for both paths (0: all cores)")
    ap.add_argument("--gguf", default=None, help="--gpu: a LLaVA-1.5-7B GGUF for the llama.cpp path")
    ap.add_argument("--mmproj", default=None, help="--gpu: its projector (mmproj) GGUF")
    ap.add_argument("--gpu-tokens", type=int, default=128, help="--gpu: new tokens per answer")
    ap.add_argument("--gpu-steps", type=int, default=5, help="--gpu: QLoRA optimizer steps")
    ap.add_argument("--cap-gib", type=float, default=12.0, help="--gpu: per-process CUDA memory cap")
    args = ap.parse_args()
    summary = gpu_benchmark(args) if args.gpu else cpu_benchmark(args)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
