"""A small decoder-only transformer: learned, RoPE or ALiBi positions, SDPA attention, tied weights, KV cache."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass(frozen=True)
class GPTConfig:
    vocab_size: int
    block_size: int  # longest context seen in training
    n_layer: int
    n_head: int
    n_embd: int
    dropout: float = 0.0
    pos: str = "rope"  # "learned" | "rope" | "alibi"

    def to_dict(self) -> dict:
        return asdict(self)


def alibi_slopes(n_head: int) -> torch.Tensor:
    # Press et al.: a geometric sequence starting at 2^(-8/n); for non-powers of two, interleave the next power's.
    def pow2(n):
        start = 2 ** (-8 / n)
        return [start ** (i + 1) for i in range(n)]

    if math.log2(n_head).is_integer():
        return torch.tensor(pow2(n_head))
    closest = 2 ** math.floor(math.log2(n_head))
    extra = pow2(2 * closest)[0::2][: n_head - closest]
    return torch.tensor(pow2(closest) + extra)


class Attention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_head, self.head_dim = cfg.n_head, cfg.n_embd // cfg.n_head
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=False)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=False)
        self.dropout = cfg.dropout

    def forward(self, x, rope=None, bias=None, cache=None):
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_head, self.head_dim).permute(2, 0, 3, 1, 4)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:
            if cache[0] is not None:
                k = torch.cat([cache[0], k], dim=2)
                v = torch.cat([cache[1], v], dim=2)
            new_cache = (k, v)
        else:
            new_cache = None
        drop = self.dropout if self.training else 0.0
        if bias is not None:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=drop)
        else:
            # T == key length: plain causal; a single new token attends to the whole cache: no mask
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=drop, is_causal=T == k.shape[2] and T > 1)
        y = y.transpose(1, 2).reshape(B, T, C)
        return F.dropout(self.proj(y), drop, self.training), new_cache


def apply_rope(x, cos, sin):
    x1, x2 = x[..., ::2], x[..., 1::2]
    return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.n_embd, bias=False)
        self.attn = Attention(cfg)
        self.ln2 = nn.LayerNorm(cfg.n_embd, bias=False)
        self.fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=False)
        self.out = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=False)
        self.dropout = cfg.dropout

    def forward(self, x, rope=None, bias=None, cache=None):
        a, cache = self.attn(self.ln1(x), rope, bias, cache)
        x = x + a
        x = x + F.dropout(self.out(F.gelu(self.fc(self.ln2(x)))), self.dropout, self.training)
        return x, cache


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        if cfg.n_embd % cfg.n_head:
            raise ValueError(f"n_embd ({cfg.n_embd}) must be a multiple of n_head ({cfg.n_head})")
        if cfg.pos not in ("learned", "rope", "alibi"):
            raise ValueError(f"pos must be learned, rope or alibi; got {cfg.pos!r}")
        self.cfg = cfg
        self.tok = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd) if cfg.pos == "learned" else None
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd, bias=False)
        self.head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.head.weight = self.tok.weight  # weight tying: fewer parameters, better small-data loss
        hd = cfg.n_embd // cfg.n_head
        self.register_buffer("inv_freq", 1.0 / (10000 ** (torch.arange(0, hd, 2).float() / hd)), persistent=False)
        self.register_buffer("slopes", alibi_slopes(cfg.n_head), persistent=False)
        self.apply(self._init)
        for name, p in self.named_parameters():
            if name.endswith(("proj.weight", "out.weight")):  # GPT-2's scaled init of residual projections
                nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, 0.0, 0.02)

    def num_params(self) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n  # tied head counted once

    def _positions(self, start: int, T: int, k_len: int, device, dtype):
        """RoPE tables or the ALiBi bias for T queries at absolute positions start.. against k_len keys."""
        if self.cfg.pos == "rope":
            # angles in float64: positions past the context (a sliding cache) keep full precision
            t = torch.arange(start, start + T, device=device, dtype=torch.float64)
            freqs = torch.outer(t, self.inv_freq.double())
            return (freqs.cos().to(dtype), freqs.sin().to(dtype)), None
        if self.cfg.pos == "alibi":
            q = torch.arange(k_len - T, k_len, device=device)[:, None]
            k = torch.arange(k_len, device=device)[None, :]
            dist = (q - k).float()
            bias = -self.slopes.to(device)[:, None, None] * dist
            return None, bias.masked_fill(dist < 0, float("-inf"))
        return None, None

    def forward(self, idx, targets=None, cache=None, start: int = 0):
        """Logits (and loss with targets). With `cache` (a list per layer), returns (logits, new cache)."""
        B, T = idx.shape
        past = 0 if cache is None or cache[0][0] is None else cache[0][0].shape[2]
        x = self.tok(idx)
        if self.wpe is not None:
            if past + T > self.cfg.block_size:
                raise ValueError(f"learned positions stop at {self.cfg.block_size} tokens")
            x = x + self.wpe(torch.arange(past, past + T, device=idx.device))
        rope, bias = self._positions(start, T, past + T, idx.device, x.dtype)
        if bias is not None:
            bias = bias.to(x.dtype)
        new_cache = []
        for i, blk in enumerate(self.blocks):
            x, c = blk(x, rope, bias, cache[i] if cache is not None else None)
            new_cache.append(c)
        x = self.ln_f(x)
        if targets is not None:
            logits = self.head(x)
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.view(-1))
            return logits, loss
        logits = self.head(x[:, -1:, :])
        return (logits, new_cache) if cache is not None else logits

    def flops_per_token(self) -> float:
        """Training FLOPs per token (PaLM appendix B, as in nanoGPT): 6N + 12 L T d."""
        c = self.cfg
        return 6 * self.num_params() + 12 * c.n_layer * c.block_size * c.n_embd


def _sample(logits, temperature: float, top_k: int | None, generator):
    logits = logits[:, -1, :].float()
    if temperature <= 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits / temperature
    if top_k:
        v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
        logits = logits.masked_fill(logits < v[:, [-1]], float("-inf"))
    return torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator)


@torch.no_grad()
def generate(model: GPT, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
             use_cache: bool = True, generator: torch.Generator | None = None, on_token=None) -> torch.Tensor:
    """Extend `idx` by `max_new_tokens`. The cached path gives the same tokens as the uncached one.

    Past the training context the model sees the last `block_size` tokens. A cache cannot slide exactly there,
    even for RoPE and ALiBi: deeper layers' cached keys still carry the dropped tokens. So once the context is
    full, each step re-encodes the window, exactly as the uncached path does; the cache pays off inside it.
    """
    model.eval()
    bs = model.cfg.block_size
    if not use_cache:
        for _ in range(max_new_tokens):
            logits = model(idx[:, -bs:])
            nxt = _sample(logits, temperature, top_k, generator)
            idx = torch.cat([idx, nxt], dim=1)
            if on_token:
                on_token()
        return idx
    cache, pos = None, 0
    pending = idx[:, -bs:]  # tokens not yet in the cache
    for _ in range(max_new_tokens):
        if cache is None:
            cache = [(None, None)] * model.cfg.n_layer
            pos = idx.shape[1] - pending.shape[1]
        logits, cache = model(pending, cache=cache, start=pos)
        pos += pending.shape[1]
        nxt = _sample(logits, temperature, top_k, generator)
        idx = torch.cat([idx, nxt], dim=1)
        if on_token:
            on_token()
        pending = nxt
        if cache[0][0].shape[2] >= bs:  # the next token would exceed the context: re-encode the window
            cache, pending = None, idx[:, -bs:]
    return idx
