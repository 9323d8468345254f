"""Job kind `chat`: a local LLM answers, optionally over a RAG collection with citations, optionally with tools.

Tokens stream as `token` events (each a cancel point, so Stop really stops generation); the conversation, when
one is named, is kept in `chat.db` with the sources each answer cited.
"""
from __future__ import annotations

import ast
import datetime as dt
import json
import operator
import re
import time
from dataclasses import dataclass, replace
from pathlib import Path

from studio.gate import Estimate

DEFAULT_SYSTEM = "You are a helpful assistant running locally. Answer concisely."
RAG_INSTRUCTIONS = ("Answer the question using the numbered sources below. Cite every claim with the source "
                    "number in brackets, like [1] or [2]. If the sources do not contain the answer, say so.")


PACKAGES = ("llama-cpp-python", "transformers", "chromadb", "sentence-transformers")  # versions for the run card
SEED_MAX = 2**32 - 2  # llama.cpp takes a 32-bit unsigned seed and reads 2**32 - 1 as "random"
PATHS = ("model", "reranker", "embedder", "adapter")  # params that name a server path or a job (studio.access)
MODES = ("", "regenerate", "continue", "edit")


@dataclass(frozen=True)
class Params:
    prompt: str = ""  # the user's message (regenerate and continue take theirs from the conversation)
    model: str = ""  # a preset, a local .gguf file or a transformers model folder; empty: one on disk
    collection: str = ""  # answer over this RAG collection, citing sources; empty: plain chat
    conversation: str = ""  # keep the exchange in this conversation id; "new" starts one; empty: not saved
    system: str = DEFAULT_SYSTEM  # the system prompt
    max_tokens: int = 512  # longest answer, in tokens
    temperature: float = 0.7  # 0: always the likeliest token; higher: more varied
    top_p: float = 0.95  # sample from the smallest set of tokens whose probabilities add up to this
    top_k_tokens: int = 40  # sample from the k likeliest tokens only; 0: no limit
    repeat_penalty: float = 1.0  # above 1: tokens already in the text become less likely; 1: off
    mode: str = ""  # "": a new question; "regenerate" the last answer; "continue" it; "edit" the last question
    n_ctx: int = 4096  # context window; the KV cache grows with it
    n_gpu_layers: int = -1  # -1: as many layers as fit the budget (the gate decides); 0: CPU only
    top_k: int = 4  # chunks retrieved from the collection
    reranker: str = ""  # a cross-encoder preset (bge-reranker-base) or local folder; empty: embedding order
    retrieval: str = "hybrid"  # "hybrid": BM25 keywords fused with the embeddings (finds exact names); "dense"
    tools: bool = False  # let the model search the collection, open its files, calculate, read the date
    tool_choice: str = "auto"  # "auto", or a tool name the first step must call
    max_tool_rounds: int = 3  # tool calls the model may make before it must answer
    grammar: str = ""  # constrain the answer: "json" (any JSON value), or a GBNF grammar
    chat_format: str = ""  # a llama-cpp-python chat format (CHAT_FORMATS); "" or "auto": the preset's, else the
    # GGUF's own template, else a guess from the model's family (gemma -> gemma)
    load_in_4bit: bool = False  # transformers models only: load in NF4 through bitsandbytes
    adapter: str = ""  # a LoRA on the transformers model: a finetune job id or an adapter folder; model empty: its base
    flash_attn: str = "auto"  # llama.cpp flash attention: "auto" (on for CUDA), "on" or "off"
    embedder: str = ""  # the collection's embedder; empty: the one it was built with (the only one that fits it)
    seed: int = 0  # 0: random
    threads: int = 0  # CPU threads; 0: all cores

    def __post_init__(self):
        from workers.chat.llm import CHAT_FORMATS

        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(repr(m) for m in MODES)}; got {self.mode!r}")
        if self.mode in ("", "edit") and not self.prompt.strip():
            raise ValueError("the prompt is empty")
        if self.mode and self.conversation in ("", "new"):
            raise ValueError(f"mode={self.mode} works on a conversation's last exchange: give its id as conversation")
        if self.chat_format not in ("", "auto", *CHAT_FORMATS):
            raise ValueError(f"chat_format {self.chat_format!r} is not a llama-cpp-python format: use auto or one of "
                             f"{', '.join(CHAT_FORMATS)}")
        for name, lo, hi in [("max_tokens", 1, 32768), ("temperature", 0.0, 5.0), ("top_p", 0.01, 1.0),
                             ("top_k_tokens", 0, 100000), ("repeat_penalty", 0.5, 2.0),
                             ("n_ctx", 256, 131072), ("n_gpu_layers", -1, 1000), ("top_k", 1, 50),
                             ("threads", 0, 1024), ("max_tool_rounds", 1, 10),
                             ("seed", 0, SEED_MAX)]:
            v = getattr(self, name)
            if not lo <= v <= hi:
                raise ValueError(f"{name} must be between {lo} and {hi}; got {v}")
        if self.retrieval not in ("dense", "hybrid"):
            raise ValueError(f"retrieval must be dense or hybrid (a reranker, when set, re-scores either); got "
                             f"{self.retrieval!r}")
        if self.flash_attn not in ("auto", "on", "off"):
            raise ValueError(f"flash_attn must be auto, on or off; got {self.flash_attn!r}")
        if self.tool_choice != "auto" and self.tool_choice not in TOOL_NAMES:
            raise ValueError(f"tool_choice must be auto or one of {', '.join(TOOL_NAMES)}")


# ---- tools --------------------------------------------------------------------------------------------------------
TOOLS = [
    {"name": "search_collection", "description": "Search the user's notes and code for passages about a query.",
     "parameters": {"type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]}},
    {"name": "open_file", "description": "Read lines of a file from the collection.",
     "parameters": {"type": "object", "properties": {"path": {"type": "string"}, "start_line": {"type": "integer"},
                                                     "end_line": {"type": "integer"}}, "required": ["path"]}},
    {"name": "calculator", "description": "Evaluate an arithmetic expression, e.g. (3 + 4) * 2 / 7.",
     "parameters": {"type": "object", "properties": {"expression": {"type": "string"}}, "required": ["expression"]}},
    {"name": "today", "description": "Today's date.", "parameters": {"type": "object", "properties": {}}},
]
TOOL_NAMES = [t["name"] for t in TOOLS]
_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
        ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow, ast.USub: operator.neg,
        ast.UAdd: operator.pos}


def calculate(expression: str) -> float:
    """Arithmetic only (numbers and + - * / // % **), never Python's eval."""

    def ev(node):
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            right = ev(node.right)
            if isinstance(node.op, ast.Pow) and abs(right) > 100:
                raise ValueError("exponent too large")
            return _OPS[type(node.op)](ev(node.left), right)
        if isinstance(node, ast.UnaryOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](ev(node.operand))
        raise ValueError(f"not arithmetic: {ast.dump(node)[:60]}")

    return ev(ast.parse(expression.strip(), mode="eval"))


def run_tool(ctx, p: Params, name: str, args: dict) -> str:
    try:
        if name == "calculator":
            return str(calculate(str(args.get("expression", ""))))
        if name == "today":
            return dt.date.today().isoformat()
        if not p.collection:
            return "error: no collection is selected"
        if name == "search_collection":
            from workers.rag.index import retrieve

            hits = retrieve(ctx, p.collection, str(args.get("query", "")), k=p.top_k, reranker=p.reranker,
                            retrieval=p.retrieval, embedder=p.embedder)
            return "\n\n".join(f"[{h.where}]\n{h.text}" for h in hits) or "no results"
        if name == "open_file":
            return open_collection_file(ctx, p.collection, str(args.get("path", "")), args.get("start_line"),
                                        args.get("end_line"))
        return f"error: unknown tool {name}"
    except (ValueError, ZeroDivisionError, OverflowError, SyntaxError, TypeError) as e:
        return f"error: {e}"


def open_collection_file(ctx, collection: str, rel: str, start=None, end=None) -> str:
    """Lines of a file that the collection ingested; nothing outside its root can be read."""
    from workers.rag.index import load_manifest

    m = load_manifest(ctx.data_dir, collection)
    if m is None or rel not in m["files"]:
        raise ValueError(f"{rel!r} is not a file of collection {collection!r}")
    root = Path(m["root"])
    path = (root if root.is_dir() else root.parent) / rel
    lines = path.read_text(errors="replace").splitlines()
    s = max(1, int(start or 1))
    e = min(len(lines), int(end or s + 59))
    return "\n".join(f"{i}: {lines[i - 1]}" for i in range(s, e + 1))


# ---- the gate ------------------------------------------------------------------------------------------------------
def _ref(p: Params, data_dir=None):
    from workers.chat.llm import resolve

    return resolve(p.model, data_dir)


MAX_BYTES_PER_TOKEN = 6  # text averages fewer per token (English 4.5, code 3 with gemma's tokenizer) once runs of
# one character are collapsed: a run of spaces or "=====" is one token of up to 31 bytes


def prompt_clearly_too_long(prompt: str, n_ctx: int) -> bool:
    """True when the prompt alone clearly cannot fit `n_ctx` tokens, by a bound cheap enough for submit time: its
    UTF-8 bytes, with runs of one repeated character counted once, over more bytes than a token holds on average.
    The run counts the real tokens before anything is stored."""
    collapsed = re.sub(r"(.)\1+", r"\1", prompt, flags=re.DOTALL)
    return len(collapsed.encode("utf-8")) > MAX_BYTES_PER_TOKEN * n_ctx


def last_exchange(messages: list[dict], mode: str) -> int:
    """Where `mode` cuts the stored conversation: the index of the last user message (regenerate keeps it and answers
    it again; edit replaces it), or of the last answer (continue extends it). A ValueError says when there is none."""
    users = [i for i, m in enumerate(messages) if m["role"] == "user"]
    if mode == "continue":
        if not messages or messages[-1]["role"] != "assistant":
            raise ValueError("continue extends the conversation's last answer, and it has none: send a question")
        return len(messages) - 1
    if not users:
        raise ValueError(f"{mode} works on the conversation's last question, and it has none: send one first")
    return users[-1]


def validate(p: Params, config) -> Params:
    """The model must resolve, the prompt fit the context and the collection exist; the collection's embedder is
    filled in."""
    from studio.presets import default, presets
    from workers.rag.index import load_manifest

    if p.adapter.strip():
        p = _with_adapter(p, config.data_dir)
    if not p.model.strip():  # the preset on disk: downloaded, else the packaged one
        p = replace(p, model=default("llm", config.data_dir) or next(iter(presets()["llm"])))
    if _ref(p, config.data_dir).backend != "hf" and p.adapter:
        raise ValueError(f"adapter needs the transformers model it was trained on, and {p.model} is a GGUF file: "
                         "leave model empty (the adapter's base), or merge the adapter and export it to GGUF")
    if p.mode:
        from studio.conversations import Conversations

        try:
            messages = Conversations(config.data_dir / "chat.db").get(p.conversation)["messages"]
        except KeyError:
            raise ValueError(f"no conversation {p.conversation!r}") from None
        last_exchange(messages, p.mode)  # raises when there is nothing to regenerate, continue or edit
    if prompt_clearly_too_long(p.prompt, p.n_ctx):  # refused here, it is never stored in a conversation
        raise ValueError(f"the prompt ({len(p.prompt.encode('utf-8')) / 1024:.0f} KiB) does not fit the context "
                         f"window (n_ctx={p.n_ctx} tokens): shorten it, raise n_ctx, or ingest the text into a "
                         "collection and ask about it")
    if not p.collection:
        return p
    manifest = load_manifest(config.data_dir, p.collection)
    if manifest is None:
        raise ValueError(f"collection {p.collection!r} does not exist; ingest some files into it first")
    if p.embedder and p.embedder != manifest["embedder"]:
        raise ValueError(f"collection {p.collection!r} was embedded with {manifest['embedder']}; searching it with "
                         f"{p.embedder} would compare unrelated vectors. Leave embedder empty, or re-ingest.")
    return replace(p, embedder=manifest["embedder"])


def _with_adapter(p: Params, data_dir) -> Params:
    """The adapter as its folder (a job id resolved), checked; model empty -> the base it was trained on, and a model
    that is not that base is refused (its layers would not match the adapter's)."""
    from workers.finetune.adapter import adapter_base, adapter_dir, read_adapter, same_base

    folder = adapter_dir(p.adapter, data_dir)
    base = adapter_base(folder, read_adapter(folder))
    if not p.model.strip():
        return replace(p, adapter=str(folder), model=base)
    if not same_base(p.model, base):
        raise ValueError(f"the adapter was trained on {base}, not {p.model}: leave model empty to use its base, or "
                         f"pick {base}")
    return replace(p, adapter=str(folder))


def _flash(p: Params, device) -> bool:
    from workers.chat.llm import flash_attn_default

    return flash_attn_default(device) if p.flash_attn == "auto" else p.flash_attn == "on"


def fit(p: Params, device, budget: int) -> Params:
    """Choose n_gpu_layers so the model fits the budget beside the context and the RAG models (all of it when it
    can)."""
    from studio.gate import runtime_context_bytes
    from workers.chat.llm import fit_layers

    if p.n_gpu_layers != -1:
        return p
    beside = runtime_context_bytes(device) + sum(_rag_models(p).values()) + WORKSPACE
    return replace(p, n_gpu_layers=fit_layers(_ref(p), p.n_ctx, device, budget - beside))


WORKSPACE = 64 * 2**20  # one turn's own memory: the prompt, sampling, retrieved chunks


def llm_key(p: Params) -> str:
    """The cache key of the job's LLM, from its (resolved) params alone, so the estimate and the run agree."""
    from workers.chat.llm import llm_key as key

    ref = _ref(p)
    out = key(ref, p.n_ctx, p.n_gpu_layers, _format(p, ref), p.load_in_4bit) + f":fa={p.flash_attn}"
    if p.adapter:  # base + adapter is another model than the base alone; a retrained adapter another again
        from workers.finetune.adapter import adapter_key

        out += f":adapter={adapter_key(Path(p.adapter))}"
    return out


def _format(p: Params, ref) -> str:
    """The chat format asked for, or the preset's; empty: the model's own (its template, or its family's format)."""
    return (p.chat_format if p.chat_format != "auto" else "") or (ref.preset or {}).get("chat_format") or ""


def _rag_models(p: Params) -> dict[str, int]:
    from workers.rag.index import model_bytes, model_key

    out = {}
    if p.collection:
        out[model_key("embedder", p.embedder)] = model_bytes("embedder", p.embedder)
    if p.reranker:
        out[model_key("reranker", p.reranker)] = model_bytes("reranker", p.reranker)
    return out


def estimate(p: Params, device) -> Estimate:
    """The LLM as it sits in the worker's cache (weights, KV cache, compute buffers), the collection's embedder and
    the reranker (also cached), and one turn's working memory."""
    from workers.chat.llm import llm_estimate

    ref = _ref(p)
    kind = getattr(device, "kind", "cpu")
    llm = llm_estimate(ref, p.n_ctx, p.n_gpu_layers, device, p.load_in_4bit, _flash(p, device))
    if p.adapter:  # PEFT keeps LoRA weights in fp32 (it upcasts 16-bit ones) beside the base
        from workers.finetune.adapter import read_adapter

        llm["adapter"] = 4 * read_adapter(Path(p.adapter))["n_params"]
    layers = ref.shape["n_layer"] if p.n_gpu_layers < 0 else p.n_gpu_layers
    where = f"{layers} of {ref.shape['n_layer']} layers on the GPU" if kind == "cuda" else "on the CPU"
    inside = ", ".join(f"{k} {v / 2**30:.2f}" for k, v in llm.items() if v)
    return Estimate(parts={"workspace": WORKSPACE}, models={llm_key(p): sum(llm.values()), **_rag_models(p)},
                    note=f"{ref.name}{' + adapter' if p.adapter else ''}: {where}, context {p.n_ctx} ({inside})")


def shrink(p: Params):
    ctx = p.n_ctx
    while ctx > 1024:
        ctx //= 2
        yield {"n_ctx": ctx}
    for layers in (24, 16, 8, 0):
        yield {"n_gpu_layers": layers, "n_ctx": 2048}


# ---- run -------------------------------------------------------------------------------------------------------------
def load_llm(ctx, p: Params):
    """The model behind one `stream()` interface (GGUFChat or HFChat), from the worker's cache when it is there."""
    from workers.chat.llm import GGUFChat, chat_format_for, ensure_local, load_gguf, load_hf

    ref = _ref(p, ctx.data_dir)
    key = llm_key(p)
    path = ensure_local(ref, ctx.data_dir, lambda d, t, m: ctx.progress(d, t, m))
    if ref.backend == "hf":
        adapter = Path(p.adapter) if p.adapter else None
        return ctx.cached(key, lambda: load_hf(path, ctx.device, p.load_in_4bit, adapter))
    layers = p.n_gpu_layers if ctx.device == "cuda" else 0
    flash = p.flash_attn == "on" or (p.flash_attn == "auto" and ctx.device == "cuda")

    def load():
        fmt, how = chat_format_for(path, p.chat_format, (ref.preset or {}).get("chat_format"))  # None: its template
        llm = load_gguf(path, p.n_ctx, layers, fmt, p.threads or None, flash_attn=flash)
        return GGUFChat(llm, fmt, how), path.stat().st_size

    return ctx.cached(key, load)


def _decide_grammar(choices: list[str]) -> str:
    from workers.chat.llm import json_schema_grammar

    options = []
    for t in TOOLS:
        if t["name"] in choices:
            options.append({"type": "object", "properties": {"tool": {"const": t["name"]},
                                                             "arguments": t["parameters"]},
                            "required": ["tool", "arguments"]})
    if "answer" in choices:
        options.append({"type": "object", "properties": {"tool": {"const": "answer"}}, "required": ["tool"]})
    return json_schema_grammar({"oneOf": options})


def _tool_rounds(ctx, p: Params, llm, messages: list[dict], calls: list[dict]) -> list[dict]:
    """Let the model call tools (at most 3 rounds) before it answers; returns the messages to answer from."""
    names = TOOL_NAMES if p.collection else ["calculator", "today"]
    for round_no in range(p.max_tool_rounds):
        forced = p.tool_choice if (round_no == 0 and p.tool_choice != "auto") else None
        if llm.native_tools:
            tools = [{"type": "function", "function": t} for t in TOOLS if t["name"] in names]
            choice = {"type": "function", "function": {"name": forced}} if forced else "auto"
            out = llm.llm.create_chat_completion(messages=messages, tools=tools, tool_choice=choice, max_tokens=128,
                                                 temperature=0.2)
            msg = out["choices"][0]["message"]
            tcs = msg.get("tool_calls") or []
            if not tcs:
                return messages
            messages.append({"role": "assistant", "content": None, "tool_calls": tcs})
            for tc in tcs:
                name = tc["function"]["name"]
                try:
                    args = json.loads(tc["function"]["arguments"] or "{}")
                    result = _call(ctx, p, name, args, calls)
                except json.JSONDecodeError:  # cut off by the token limit, or a weak model: tell it, go on
                    result = "error: the arguments were not complete JSON"
                    ctx.emit("tool_call", name=name, arguments=tc["function"]["arguments"][:200])
                    ctx.emit("tool_result", name=name, result=result)
                    calls.append({"name": name, "arguments": tc["function"]["arguments"][:200], "result": result})
                messages.append({"role": "tool", "tool_call_id": tc["id"], "name": name, "content": result})
            continue
        # the JSON-grammar protocol: any model can follow it, the grammar makes its reply parseable
        listing = "\n".join(f"- {t['name']}: {t['description']} arguments: {json.dumps(t['parameters']['properties'])}"
                            for t in TOOLS if t["name"] in names)
        ask = (f"Tools you can call:\n{listing}\nReply with JSON: {{\"tool\": NAME, \"arguments\": {{...}}}} to call "
               "one, or {\"tool\": \"answer\"} when you can answer.")
        choices = [forced] if forced else names + ["answer"]
        grammar = _decide_grammar(choices) if llm.backend == "gguf" else None  # transformers: parse and hope
        text = "".join(llm.stream(messages + [{"role": "user", "content": ask}], max_tokens=200, temperature=0.2,
                                  top_p=0.95, grammar=grammar, seed=p.seed or None))
        try:
            decision = json.loads(text[text.find("{"):text.rfind("}") + 1] if llm.backend == "hf" else text)
            if decision.get("tool") not in names + ["answer"]:
                raise ValueError(decision.get("tool"))
        except (json.JSONDecodeError, ValueError, AttributeError):
            ctx.log(f"the model's tool choice was not complete JSON ({text[:80]!r}); answering without tools")
            return messages
        if decision.get("tool") == "answer":
            return messages
        result = _call(ctx, p, decision["tool"], decision.get("arguments") or {}, calls)
        messages.append({"role": "assistant", "content": text})
        messages.append({"role": "user", "content": f"Result of {decision['tool']}: {result}"})
    return messages


def _call(ctx, p, name, args, calls) -> str:
    ctx.emit("tool_call", name=name, arguments=args)
    result = run_tool(ctx, p, name, args)
    ctx.emit("tool_result", name=name, result=result[:2000])
    calls.append({"name": name, "arguments": args, "result": result[:2000]})
    return result[:4000]


def run(p: Params, ctx) -> dict:
    try:
        return _run(p, ctx)
    except ValueError as e:
        if "exceed context window" in str(e):  # llama.cpp's words for a prompt + answer longer than n_ctx
            raise ValueError(f"the conversation and the answer do not fit the context window (n_ctx={p.n_ctx}); the "
                             "prompt was not stored: start a new conversation, lower max_tokens or top_k, or raise "
                             "n_ctx") from None
        raise


def input_tokens(llm, messages: list[dict], prefix: str = "") -> int:
    """Tokens of the prompt: exact for a GGUF whose prompt is rendered here; otherwise the messages' text with the
    model's own tokenizer (the chat template adds a few more)."""
    if getattr(llm, "_formatter", None) is not None:
        return len(llm.prompt_tokens(messages, prefix))
    text = "\n".join(str(m.get("content") or "") for m in messages) + prefix
    if llm.backend == "gguf":
        return len(llm.llm.tokenize(text.encode("utf-8"), add_bos=False, special=False))
    return llm.count_tokens(text)


def _run(p: Params, ctx) -> dict:
    from studio.context import JobCancelled
    from studio.conversations import Conversations

    t_start = time.perf_counter()
    convs = Conversations(ctx.data_dir / "chat.db")
    cid = "" if p.conversation == "new" else p.conversation  # "new": created with its first message
    stored = convs.get(cid)["messages"] if cid else []
    question, prefix, meta_before = p.prompt, "", {}
    cut = len(stored)  # the stored messages this turn keeps; the rest it replaces once the model takes the prompt
    if p.mode:
        cut = last_exchange(stored, p.mode)
        if p.mode == "regenerate":  # the question stays, its answer goes
            question, cut = stored[cut]["content"], cut + 1
        elif p.mode == "continue":  # the answer is extended: the model reads it as the start of its reply
            prefix, meta_before = stored[cut]["content"], stored[cut]["meta"]
            question = next(m["content"] for m in reversed(stored[:cut]) if m["role"] == "user")
    history = [{"role": m["role"], "content": m["content"]} for m in stored[:cut]]
    if p.mode in ("regenerate", "continue"):  # the question is in the history: asked below with its sources
        history = history[:max(i for i, m in enumerate(history) if m["role"] == "user")]
    took = False
    ctx.emit("turn", mode=p.mode, question=question, prefix=prefix)  # what the tab shows the answer under

    def keep(role: str, content: str, meta: dict | None = None) -> None:
        """Store a message only once the model has taken the prompt: one it refused would break the conversation.
        The first store replaces what the mode replaces (the last answer, or the last question and its answer)."""
        nonlocal cid, took
        if not p.conversation:
            return
        if not cid:
            cid = convs.create(question.strip()[:60] or "New chat", owner=ctx.owner,
                               settings={"model": p.model, "collection": p.collection})
        if not took:
            took = True
            convs.truncate(cid, cut)
            if p.mode in ("", "edit"):
                convs.add(cid, "user", question)
        if role == "assistant":
            convs.add(cid, role, content, meta)

    llm, cached = load_llm(ctx, p)
    t_loaded = time.perf_counter()
    sources: list[dict] = list(meta_before.get("sources") or [])
    user = question
    if p.collection and not p.tools:
        if not prefix:  # continue answers from the sources the answer began with
            from workers.rag.index import retrieve

            hits = retrieve(ctx, p.collection, question, k=p.top_k, reranker=p.reranker, retrieval=p.retrieval,
                            embedder=p.embedder)
            sources = [h.to_dict() for h in hits]
        ctx.emit("sources", sources=sources)
        blocks = "\n\n".join(f"[{i}] {s['where']}\n{s['text']}" for i, s in enumerate(sources, start=1))
        user = f"{RAG_INSTRUCTIONS}\n\nSources:\n{blocks}\n\nQuestion: {question}"
    messages = [{"role": "system", "content": p.system}] + history + [{"role": "user", "content": user}]
    n_in = input_tokens(llm, messages, prefix)
    if n_in >= p.n_ctx:  # llama.cpp would refuse it too, but only once asked; nothing has been stored yet
        raise ValueError(f"this turn's messages ({n_in} tokens) do not fit the context window (n_ctx={p.n_ctx}); "
                         "the prompt was not stored: shorten it, " + ("start a new conversation, " if history else "")
                         + "or raise n_ctx")
    calls: list[dict] = list(meta_before.get("tools") or [])
    if p.tools and not prefix:
        messages = _tool_rounds(ctx, p, llm, messages, calls)
    grammar = None
    if p.grammar == "json":
        from llama_cpp.llama_grammar import JSON_GBNF

        grammar = JSON_GBNF
    elif p.grammar:
        grammar = p.grammar
    answer, n_tokens, t_first = [], 0, None
    t_gen = time.perf_counter()
    try:
        for piece in llm.stream(messages, max_tokens=p.max_tokens, temperature=p.temperature, top_p=p.top_p,
                                grammar=grammar, seed=p.seed or None, top_k=p.top_k_tokens,
                                repeat_penalty=p.repeat_penalty, prefix=prefix):
            if t_first is None:
                t_first = time.perf_counter()
                keep("user", question)  # the model took the prompt
            answer.append(piece)
            n_tokens += 1
            ctx.emit("token", text=piece)  # a cancel point: Stop ends generation here
    except JobCancelled:
        if t_first is not None:  # Stop after the first token (the cancel point): keep the partial answer
            keep("assistant", prefix + "".join(answer), {"sources": sources, "stopped": True, "tools": calls,
                                                         "model": p.model})
        raise
    t_end = time.perf_counter()
    added = "".join(answer)
    text = prefix + added
    if hasattr(llm, "count_tokens"):  # transformers streams words; llama.cpp streams tokens
        n_tokens = llm.count_tokens(added)
    cited = sorted({int(n) for n in re.findall(r"\[(\d+)\]", text) if 0 < int(n) <= len(sources)})
    keep("assistant", text, {"sources": sources, "tools": calls, "model": p.model})
    gen_s = max(t_end - (t_first or t_end), 1e-9)
    return {
        "answer": text,
        "added": added,  # what this job generated (all of the answer but for continue)
        "mode": p.mode,
        "sources": sources,
        "citations": [{"n": n, "where": sources[n - 1]["where"]} for n in cited],
        "tool_calls": calls,
        "conversation": cid or None,
        "tokens": n_tokens,
        "prompt_tokens": n_in,
        "tokens_per_s": (n_tokens - 1) / gen_s if n_tokens > 1 else None,
        "ttft_ms": ((t_first or t_end) - t_gen) * 1000,
        "load_s": t_loaded - t_start,
        "model_cached": cached,
        "model": p.model,
        "n_gpu_layers": p.n_gpu_layers if ctx.device == "cuda" else 0,
        "backend": llm.backend,
        "chat_format": getattr(llm, "chat_format", None),
        "chat_format_how": getattr(llm, "how", None),
    }
