"""Job kind `tinylm_generate`: sample text from a trained Tiny LM, with or without the KV cache."""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from dataclasses import replace

from studio.gate import Estimate


PACKAGES = ("tokenizers",)  # versions for the run card
PATHS = ("checkpoint",)  # params that name a server path or a job (studio.access)


@dataclass(frozen=True)
class Params:
    checkpoint: str  # a tinylm job id, or the path of its run folder / checkpoint folder
    prompt: str = "\n"  # text to continue; must use characters the model saw (char tokenizer)
    max_new_tokens: int = 200  # tokens to generate
    temperature: float = 0.8  # 0 = greedy
    top_k: int = 40  # sample among the k most likely tokens; 0 = all
    kv_cache: bool = True  # reuse keys/values of earlier tokens instead of re-running the whole context
    seed: int = 0  # 0: a fresh random seed each run

    def __post_init__(self):
        if not self.checkpoint.strip():
            raise ValueError("checkpoint is empty: pick a finished Tiny LM training job")
        if not 1 <= self.max_new_tokens <= 100_000:
            raise ValueError(f"max_new_tokens must be between 1 and 100000; got {self.max_new_tokens}")
        if not 0 <= self.temperature <= 5:
            raise ValueError(f"temperature must be between 0 and 5; got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be 0 or more; got {self.top_k}")
        if not 0 <= self.seed <= 2**32 - 1:  # as tinylm training takes it (torch)
            raise ValueError(f"seed must be between 0 and {2**32 - 1}; got {self.seed}")


def checkpoint_dir(checkpoint: str, data_dir: Path) -> Path:
    """Resolve a job id or a path to the folder holding state.json."""
    for cand in (Path(data_dir) / "runs" / checkpoint / "checkpoint", Path(checkpoint).expanduser() / "checkpoint",
                 Path(checkpoint).expanduser()):
        if (cand / "state.json").exists():
            return cand
    raise ValueError(f"no Tiny LM checkpoint found for {checkpoint!r}: give a tinylm job id or its run folder")


CONFIG_KEYS = ("vocab_size", "block_size", "n_layer", "n_head", "n_embd")  # GPTConfig's fields without a default


def check_checkpoint(ckpt: Path) -> dict:
    """state.json and the files it names, checked cheaply (no torch): a spoiled checkpoint is refused by name at
    submit instead of failing the job with a KeyError or a safetensors header error."""
    where = ckpt / "state.json"
    try:
        state = json.loads(where.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{where} is not a readable Tiny LM state ({e}); pick another checkpoint or train "
                         "again") from None
    cfg = state.get("config") if isinstance(state, dict) else None
    if not (isinstance(cfg, dict) and all(isinstance(cfg.get(k), int) and not isinstance(cfg.get(k), bool)
                                          and cfg[k] > 0 for k in CONFIG_KEYS)
            and isinstance(state.get("n_params"), int) and isinstance(state.get("model_file"), str)
            and Path(state["model_file"]).name == state["model_file"]):
        raise ValueError(f"{where} lacks the model's config ({', '.join(CONFIG_KEYS)}), n_params or model_file: "
                         "it was not written by a Tiny LM training job; pick another checkpoint")
    for needed in (ckpt / state["model_file"], ckpt / "tokenizer.json"):
        if not needed.is_file():
            raise ValueError(f"the checkpoint in {ckpt} is incomplete: {needed.name} is missing")
    try:
        from safetensors import safe_open

        with safe_open(str(ckpt / state["model_file"]), framework="numpy") as f:  # reads the header only
            f.keys()
    except Exception as e:  # noqa: BLE001 (safetensors raises its own SafetensorError, or OSError)
        raise ValueError(f"{state['model_file']} in {ckpt} is not a readable safetensors file ({e}); the checkpoint "
                         "is truncated or damaged: pick another one or train again") from None
    return state


def validate(p: Params, config) -> Params:
    """The checkpoint as its folder, so the estimate reads the real model's size; its files checked."""
    ckpt = checkpoint_dir(p.checkpoint, config.data_dir).resolve()
    check_checkpoint(ckpt)
    return replace(p, checkpoint=str(ckpt))


def model_key(ckpt: Path, state: dict) -> str:
    return f"tinylm:{ckpt}:{state['model_file']}"


def estimate(p: Params, device) -> Estimate:
    """fp32 weights (kept in the cache), the KV cache over the model's context, and the logits per step."""
    from workers.tinylm.train import load_state

    ckpt = checkpoint_dir(p.checkpoint, Path("/nonexistent"))  # validate made it a folder
    state = load_state(ckpt)
    c, n = state["config"], state["n_params"]
    kv = 2 * c["n_layer"] * c["block_size"] * c["n_embd"] * 4
    logits = c.get("vocab_size", 256) * 4 * 4
    return Estimate(parts={"kv_cache": kv, "workspace": 32 * 2**20 + logits},
                    models={model_key(ckpt, state): 4 * n}, note=f"{n / 1e6:.2f} M parameters")


def run(p: Params, ctx) -> dict:
    import torch

    from workers.tinylm.train import load_checkpoint, load_state
    from workers.tinylm.data import load_tokenizer
    from workers.tinylm.model import GPT, GPTConfig, generate

    ckpt = checkpoint_dir(p.checkpoint, ctx.data_dir)
    state = load_state(ckpt)

    def load():
        model = GPT(GPTConfig(**state["config"])).to(ctx.device)
        load_checkpoint(ckpt, model)
        model.eval()
        return (model, load_tokenizer(ckpt / "tokenizer.json")), 4 * model.num_params()

    (model, tok), hit = ctx.cached(model_key(ckpt.resolve(), state), load)
    try:
        ids = tok.encode(p.prompt) if p.prompt else []
    except ValueError as e:  # the char tokenizer knows only the training text's characters
        raise ValueError(f"prompt: {e}; use characters from the training text") from None
    if not ids:
        ids = [0]
    gen = torch.Generator().manual_seed(p.seed or int(time.time_ns() % 2**31))
    done = [0]

    def on_token():
        done[0] += 1
        ctx.progress(done[0], p.max_new_tokens, "generating")

    x = torch.tensor([ids], dtype=torch.long, device=ctx.device)
    t0 = time.perf_counter()
    out = generate(model, x, p.max_new_tokens, temperature=p.temperature, top_k=p.top_k or None,
                   use_cache=p.kv_cache, generator=gen, on_token=on_token)
    seconds = time.perf_counter() - t0
    completion = tok.decode(out[0, len(ids):].tolist())
    (ctx.run_dir / "sample.txt").write_text(p.prompt + completion)
    ctx.artifact(ctx.run_dir / "sample.txt", "generated text")
    return {"text": p.prompt + completion, "completion": completion, "tokens": p.max_new_tokens,
            "seconds": seconds, "tokens_per_s": p.max_new_tokens / seconds, "kv_cache": p.kv_cache,
            "model_cached": hit}
