"""An OpenAI-compatible endpoint beside the UI: `GET /v1/models` and `POST /v1/chat/completions` (streamed as
server-sent events, or not), for editors, open-webui and scripts (`openai.OpenAI(base_url=".../v1")`).

Off unless the studio is served with `--openai-api`. A request becomes an ordinary `chat` job: it goes through the
gate and the queue, shows in the Jobs tab, and uses the device worker's model cache like a Chat-tab turn. With a
login (`--auth`), a request carries the same user:password as the UI, as the API key (`Authorization: Bearer
user:password`) or as HTTP Basic; the job is that user's, so users stay apart as they do in the UI.

What maps onto the chat job: model (a chat preset that is on disk, or for the admin a local .gguf path), messages
(system messages become the system prompt; earlier turns the history; the last message must be the user's),
temperature, top_p, max_tokens / max_completion_tokens, seed, response_format json_object (a JSON grammar), stream
and stream_options.include_usage. `stop` is applied here: the answer ends before the first stop sequence and the job
is cancelled there, so the device is not kept busy (it shows as CANCELLED in Jobs). Parameters that would change what
comes back and that the studio cannot honour (n > 1, tools, logprobs, json_schema, image content) are refused with a
400; the rest (penalties, user, metadata, …) are ignored.

No gradio and no torch here: only starlette, which the UI's server runs on.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import json
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

import anyio
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from .access import Forbidden
from .conversations import Conversations
from .jobs import Job, JobStatus

log = logging.getLogger(__name__)

POLL_S = 0.05  # how often a request reads its job's new tokens; they are sent in one chunk per read
KEEPALIVE_S = 10.0  # an SSE comment this often while the job waits or loads, so proxies keep the stream open
CLEANUP_WAIT_S = 3600.0  # a cancelled job's scratch conversation is deleted once the job has ended, within this


class ApiError(Exception):
    """An OpenAI-style error: HTTP status, message, type and code (what the official client shows)."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type, code, param

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        headers = {"x-should-retry": "false"}  # the official client retries 408/409/429/5xx: none of ours is transient
        if self.status == 401:
            headers["WWW-Authenticate"] = 'Bearer realm="studio"'
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


# ---- auth ------------------------------------------------------------------------------------------------------
def authenticate(header: str | None, users) -> str | None:
    """The request's user from `Authorization` (Bearer user:password, or Basic); None when the studio has no login.
    Raises ApiError 401 when a login is needed and the header does not hold a valid one."""
    if not users:
        return None  # served on localhost without a login, like the UI: whatever key the client sends is fine
    scheme, _, value = (header or "").strip().partition(" ")
    value = value.strip()
    if scheme.lower() == "basic":
        try:
            value = base64.b64decode(value, validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            value = ""
    elif scheme.lower() != "bearer":
        raise ApiError(401, "This studio needs a login: send your studio user:password as the API key "
                       "(Authorization: Bearer user:password), e.g. OpenAI(api_key='user:password').",
                       type="authentication_error", code="invalid_api_key")
    name, sep, password = value.partition(":")
    if callable(users):  # Gradio's auth may be a function of (user, password)
        ok = bool(sep) and bool(users(name, password))
    else:
        ok = False
        for user, pw in users:  # every entry, in constant time: no timing hint of which user exists
            ok |= hmac.compare_digest(name.encode(), user.encode()) & hmac.compare_digest(password.encode(),
                                                                                         pw.encode())
    if not sep or not ok:
        raise ApiError(401, "Wrong API key: it is your studio login as user:password.", type="authentication_error",
                       code="invalid_api_key")
    return name


# ---- models ----------------------------------------------------------------------------------------------------
def chat_models(studio) -> dict[str, str]:
    """Chat presets usable now, without a download: name -> "downloaded" or "packaged"."""
    from .presets import DOWNLOAD, availability, presets

    out = {}
    for name in presets()["llm"]:
        state = availability("llm", name, studio.config.data_dir)
        if state != DOWNLOAD:
            out[name] = state
    return out


def model_object(name: str, state: str) -> dict:
    return {"id": name, "object": "model", "created": 0, "owned_by": f"studio ({state})"}


def check_model(studio, model: Any, user) -> str:
    """The model param as the chat job takes it; ApiError 404 naming the models there are when it is none of them."""
    from .access import looks_like_path
    from .presets import presets

    if not isinstance(model, str) or not model.strip():
        raise ApiError(400, "model is required: one of GET /v1/models", param="model")
    usable = chat_models(studio)
    if model in usable:
        return model
    if model in presets()["llm"]:
        raise ApiError(404, f"model {model!r} is a studio preset that is not downloaded yet: download it in the "
                       f"Models tab (or `python app.py run model_download --param preset={model}`). Models on disk: "
                       f"{', '.join(usable) or 'none'}.", code="model_not_found", param="model")
    if looks_like_path(model) and not user.remote:  # the admin may name a local .gguf or model folder, as in Chat
        return model
    raise ApiError(404, f"model {model!r} does not exist here. Models: {', '.join(usable) or 'none'}"
                   + ("" if user.remote else "; or give the path of a local .gguf file") + ".",
                   code="model_not_found", param="model")


# ---- request -> chat job -----------------------------------------------------------------------------------------
@dataclass
class ChatRequest:
    """A /v1/chat/completions body, mapped onto a chat job's params (history kept apart: it goes in a conversation)."""

    model: str
    params: dict[str, Any]
    history: list[dict] = field(default_factory=list)  # earlier user/assistant turns
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False


def _text(content: Any, where: str) -> str:
    """A message's content as text: a string, or a list of text parts; anything else is refused."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        out = []
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            if kind != "text" or not isinstance(part.get("text"), str):
                raise ApiError(400, f"{where}: only text content is supported here (got a {kind!r} part)",
                               param="messages")
            out.append(part["text"])
        return "".join(out)
    raise ApiError(400, f"{where}: content must be a string or a list of text parts", param="messages")


def parse_request(body: Any) -> ChatRequest:
    """Map the OpenAI body onto chat params; ApiError 400 for what the studio cannot honour."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    refused = {"tools": "tools (function calling) are not supported by this endpoint",
               "functions": "functions (function calling) are not supported by this endpoint",
               "audio": "audio output is not supported", "prediction": "predicted outputs are not supported"}
    for name, why in refused.items():
        if body.get(name):
            raise ApiError(400, why, param=name)
    if body.get("tool_choice") not in (None, "none"):
        raise ApiError(400, "tool_choice is not supported by this endpoint (it has no tools)", param="tool_choice")
    if body.get("n") not in (None, 1):
        raise ApiError(400, "n must be 1: the studio answers with one choice", param="n")
    if body.get("logprobs") or body.get("top_logprobs"):
        raise ApiError(400, "logprobs are not supported by this endpoint", param="logprobs")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty list of {role, content}", param="messages")
    system, turns = [], []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ApiError(400, f"messages[{i}] must be an object with role and content", param="messages")
        role = m.get("role")
        if role in ("tool", "function") or m.get("tool_calls") or m.get("function_call"):
            raise ApiError(400, f"messages[{i}]: tool calls are not supported by this endpoint", param="messages")
        text = _text(m.get("content"), f"messages[{i}]")
        if role in ("system", "developer"):
            system.append(text)
        elif role in ("user", "assistant"):
            turns.append({"role": role, "content": text})
        else:
            raise ApiError(400, f"messages[{i}]: role must be system, developer, user or assistant; got {role!r}",
                           param="messages")
    if not turns or turns[-1]["role"] != "user":
        raise ApiError(400, "the last message must be the user's (continuing an assistant message is not supported)",
                       param="messages")
    params: dict[str, Any] = {"prompt": turns[-1]["content"]}
    if system:
        params["system"] = "\n\n".join(system)
    for ours, theirs in (("temperature", "temperature"), ("top_p", "top_p"), ("seed", "seed")):
        if body.get(theirs) is not None:
            params[ours] = body[theirs]
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is not None:
        params["max_tokens"] = max_tokens
    fmt = body.get("response_format") or {}
    kind = fmt.get("type") if isinstance(fmt, dict) else fmt
    if kind == "json_object":
        params["grammar"] = "json"
    elif kind not in (None, "text"):
        raise ApiError(400, f"response_format {kind!r} is not supported; use json_object (any JSON) or text",
                       param="response_format")
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else stop or []
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > 4:
        raise ApiError(400, "stop must be a non-empty string or a list of up to 4 of them", param="stop")
    options = body.get("stream_options") or {}
    return ChatRequest(model=body.get("model"), params=params, history=turns[:-1], stop=stop,
                       stream=bool(body.get("stream")),
                       include_usage=bool(isinstance(options, dict) and options.get("include_usage")))


class StopScanner:
    """Cuts streamed text at the first stop sequence, holding back a tail that may be the start of one."""

    def __init__(self, stops: list[str]):
        self.stops, self.pending, self.hit = stops, "", False

    def feed(self, text: str) -> str:
        """The text that is safe to send now."""
        if self.hit:
            return ""
        self.pending += text
        found = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if found:
            out, self.pending, self.hit = self.pending[:min(found)], "", True
            return out
        keep = max((k for s in self.stops for k in range(1, len(s)) if self.pending.endswith(s[:k])), default=0)
        out = self.pending[:len(self.pending) - keep]
        self.pending = self.pending[len(out):]
        return out

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return "" if self.hit else out


# ---- running it as a job --------------------------------------------------------------------------------------------
def submit(studio, req: ChatRequest, owner: str | None) -> tuple[Job, str]:
    """Queue the chat job (history in a scratch conversation of the user's); (job, conversation id or "")."""
    user = studio.user(owner)
    params = {**req.params, "model": check_model(studio, req.model, user)}
    if studio.store.paused:  # queued, it would wait for good
        raise ApiError(503, f"The studio's queue is paused ({studio.store.get_meta('pause_reason') or 'by the user'}); "
                       "resume it in the Jobs tab or with `python app.py queue resume`.", type="server_error",
                       code="queue_paused")
    cid = ""
    if req.history:  # the chat job reads earlier turns from a conversation: one made for this request, then deleted
        convs = Conversations(studio.config.data_dir / "chat.db")
        cid = convs.create(f"API: {req.params['prompt'].strip()[:50]}", owner, {"model": params["model"], "api": True})
        for turn in req.history:
            convs.add(cid, turn["role"], turn["content"])
        params["conversation"] = cid
    try:
        job = studio.submit("chat", params, owner=owner)
    except Forbidden as e:
        _drop(studio, cid)
        raise ApiError(403, str(e), type="permission_error") from None
    except ValueError as e:
        _drop(studio, cid)
        raise ApiError(400, str(e)) from None
    if job.status is JobStatus.REFUSED:
        _drop(studio, cid)
        raise ApiError(400, f"Refused by the memory gate (job {job.id}): {job.error}", code="refused")
    return job, cid


def _drop(studio, cid: str) -> None:
    if cid:
        Conversations(studio.config.data_dir / "chat.db").delete(cid)


def release(studio, job_id: str, cid: str) -> None:
    """The request is over: cancel the job if it still runs (the client left, or a stop sequence came), and delete
    the scratch conversation once the job no longer writes to it."""
    if studio.job(job_id).status.final:
        _drop(studio, cid)
        return
    studio.cancel(job_id)
    if cid:
        def later():
            try:
                studio.wait(job_id, timeout=CLEANUP_WAIT_S)
            finally:
                _drop(studio, cid)

        threading.Thread(target=later, name=f"openai-cleanup-{job_id}", daemon=True).start()


async def end_request(studio, job_id: str, cid: str) -> None:
    """`release`, run to the end even when the request's task is being cancelled (the client went away)."""
    with anyio.CancelScope(shield=True):
        await run_in_threadpool(release, studio, job_id, cid)


async def follow(studio, job_id: str) -> AsyncIterator[tuple[Job, str]]:
    """(job row, new answer text) until the job is final (the last pair yielded is)."""
    offset = 0
    while True:
        row = await run_in_threadpool(studio.job, job_id)  # status before events: a final job wrote all of them
        evs, offset = await run_in_threadpool(studio.events, job_id, offset)
        yield row, "".join(e["text"] for e in evs if e["type"] == "token")
        if row.status.final:
            return
        await asyncio.sleep(POLL_S)


def job_error(row: Job) -> ApiError:
    """Why a job that ended without an answer ended so."""
    if row.status is JobStatus.CANCELLED:
        return ApiError(500, f"job {row.id} was cancelled before it finished (Stop, or the Jobs tab)",
                        type="server_error", code="job_cancelled")
    return ApiError(500, f"job {row.id} {row.status.value}: {row.error or 'no reason recorded'}", type="server_error",
                    code=f"job_{row.status.value.lower()}")


def finish_reason(row: Job, max_tokens: int, stopped: bool) -> str:
    if stopped:
        return "stop"
    tokens = (row.result or {}).get("tokens") or 0
    return "length" if tokens >= max_tokens else "stop"


def usage(row: Job) -> dict | None:
    r = row.result or {}
    if r.get("tokens") is None:
        return None
    out = {"completion_tokens": r["tokens"]}
    if r.get("prompt_tokens") is not None:  # the chat job may report it; never made up here
        out |= {"prompt_tokens": r["prompt_tokens"], "total_tokens": r["prompt_tokens"] + r["tokens"]}
    return out


# ---- the routes -----------------------------------------------------------------------------------------------------
def routes(studio, users) -> list[Route]:
    """The /v1 routes, for the UI's app (`app_kwargs={"routes": …}`); `users` is the UI's logins: a list of
    (user, password), a function of (user, password), or None (no login)."""

    async def guarded(request: Request, handler) -> Response:
        try:
            owner = authenticate(request.headers.get("authorization"), users)
            return await handler(request, owner)
        except ApiError as e:
            return e.response()
        except Exception as e:  # a bug here must still answer as the clients expect, and be logged
            log.exception("OpenAI endpoint %s failed", request.url.path)
            return ApiError(500, f"{type(e).__name__}: {e}", type="server_error").response()

    async def list_models(request: Request, owner: str | None) -> Response:
        models = await run_in_threadpool(chat_models, studio)
        return JSONResponse({"object": "list", "data": [model_object(n, s) for n, s in models.items()]})

    async def get_model(request: Request, owner: str | None) -> Response:
        name = request.path_params["model"]
        models = await run_in_threadpool(chat_models, studio)
        if name not in models:
            raise ApiError(404, f"model {name!r} does not exist here. Models: {', '.join(models) or 'none'}.",
                           code="model_not_found", param="model")
        return JSONResponse(model_object(name, models[name]))

    async def completions(request: Request, owner: str | None) -> Response:
        try:
            body = await request.json()
        except (ValueError, UnicodeDecodeError):
            raise ApiError(400, "the request body is not JSON") from None
        req = parse_request(body)
        job, cid = await run_in_threadpool(submit, studio, req, owner)
        max_tokens = job.params["max_tokens"]
        meta = {"id": f"chatcmpl-{job.id}", "created": int(job.created), "model": job.params["model"],
                "system_fingerprint": None}
        headers = {"x-studio-job": job.id}
        if req.stream:
            return StreamingResponse(stream(req, job, cid, meta, max_tokens), media_type="text/event-stream",
                                     headers={**headers, "Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        scanner, text, row = StopScanner(req.stop), [], job
        try:
            async for row, new in follow(studio, job.id):
                text.append(scanner.feed(new))
                if scanner.hit or await request.is_disconnected():
                    break
        finally:
            await end_request(studio, job.id, cid)
        if not scanner.hit and row.status is not JobStatus.DONE:
            raise job_error(row)
        text.append(scanner.flush())
        out = {**meta, "object": "chat.completion",
               "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(text), "refusal": None},
                            "logprobs": None, "finish_reason": finish_reason(row, max_tokens, scanner.hit)}]}
        if usage(row) and not scanner.hit:
            out["usage"] = usage(row)
        return JSONResponse(out, headers=headers)

    async def stream(req: ChatRequest, job: Job, cid: str, meta: dict, max_tokens: int) -> AsyncIterator[str]:
        def chunk(delta: dict, finish: str | None = None) -> str:
            c = {**meta, "object": "chat.completion.chunk",
                 "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
            return f"data: {json.dumps(c)}\n\n"

        scanner, row, last = StopScanner(req.stop), job, time.monotonic()
        try:
            yield chunk({"role": "assistant", "content": ""})
            async for row, new in follow(studio, job.id):
                text = scanner.feed(new)
                if text:
                    yield chunk({"content": text})
                    last = time.monotonic()
                elif time.monotonic() - last > KEEPALIVE_S:
                    note = row.wait_reason or row.message or row.status.value
                    yield f": {' '.join(note.split())}\n\n"  # one comment line: a newline would end it
                    last = time.monotonic()
                if scanner.hit:
                    break
            if not scanner.hit and row.status is not JobStatus.DONE:
                yield f"data: {json.dumps(job_error(row).body())}\n\n"
                return
            tail = scanner.flush()
            if tail:
                yield chunk({"content": tail})
            yield chunk({}, finish_reason(row, max_tokens, scanner.hit))
            if req.include_usage:  # one last chunk with no choices, as OpenAI sends it
                last_chunk = {**meta, "object": "chat.completion.chunk", "choices": [], "usage": usage(row)}
                yield f"data: {json.dumps(last_chunk)}\n\n"
            yield "data: [DONE]\n\n"
        finally:  # also when the client goes away mid-stream (the task is cancelled): the job stops with it
            await end_request(studio, job.id, cid)

    def route(path: str, handler, methods: list[str]) -> Route:
        async def endpoint(request: Request) -> Response:
            return await guarded(request, handler)

        return Route(path, endpoint, methods=methods)

    return [route("/v1/models", list_models, ["GET"]), route("/v1/models/{model:path}", get_model, ["GET"]),
            route("/v1/chat/completions", completions, ["POST"])]
