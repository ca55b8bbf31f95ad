"""HTTP serving on one `Engine`: the OpenAI API (`/v1/...`), the original ChatGLM-6B `api.py`
endpoint (`POST /`), `/health`, Prometheus `/metrics` and the web chat page (`GET /`).

Every error is an OpenAI error object `{"error": {"message", "type", "param", "code"}}`.
ChatGLM-6B has no system role: system messages at the start of a chat are joined and put in
front of the first user message (a system message anywhere else is a 400).
"""
from __future__ import annotations

import asyncio
import datetime
import hmac
import json
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import replace
from importlib import resources
from typing import AsyncIterator, Literal

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from .chat import ResponseStreamer
from .chat_format import chat_format_for
from .engine import Completion, Engine, EngineClosedError, Histogram, QueueFullError, RequestHandle
from .errors import ChatGLMError, PromptTooLongError
from .generation_config import CHAT_TEMPERATURE, CHAT_TOP_P, GenerationConfig, check_temperature

# The original chat's sampling defaults (SPEC.md section 5), used when a request leaves them out.
DEFAULT_TEMPERATURE = CHAT_TEMPERATURE
DEFAULT_TOP_P = CHAT_TOP_P
MAX_STOP_STRINGS = 4
PUBLIC_PATHS = {("GET", "/health"), ("GET", "/"), ("HEAD", "/")}  # the page is static; its API calls carry the key
JSON_ROUTES = {"/", "/v1/chat/completions", "/v1/completions"}  # POST bodies
LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1")  # the Host names accepted by default (DNS rebinding defence)


# -- errors ---------------------------------------------------------------------------------------
class ApiError(Exception):
    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code, self.headers = status, message, type, param, code, headers


def error_response(status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                   code: str | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": type, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def _param_of(loc: tuple) -> str | None:
    """('messages', 0, 'role') -> 'messages[0].role'."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or None


def _validation_error(errors: list[dict]) -> ApiError:
    first = errors[0]
    loc = tuple(first.get("loc", ()))
    # a union (str | list[...]) reports one error per member, each ending in the member's name: keep the shared path
    for other in errors[1:]:
        if other.get("loc", ())[:1] == loc[:1]:
            shared = next((i for i, (x, y) in enumerate(zip(loc, other["loc"])) if x != y), min(len(loc), len(other["loc"])))
            loc = loc[:shared]
    param = _param_of(loc)
    return ApiError(400, f"{param or 'body'}: {first['msg']}", param=param, code=f"invalid_{first.get('type', 'value')}")


def _no_constant(name: str):
    raise ValueError(f"{name} is not JSON")


async def parse_body(request: Request, model: type[BaseModel]) -> BaseModel:
    """The JSON body, validated. Every malformed body is a 400: invalid UTF-8 or JSON, NaN/Infinity, nesting too
    deep for the parser, or a lone surrogate escape (\\ud800, which no tokenizer can encode)."""
    raw = await request.body()
    if not raw.strip():
        raise ApiError(400, "the request needs a JSON body", code="missing_body")
    try:
        data = json.loads(raw, parse_constant=_no_constant)
        json.dumps(data, ensure_ascii=False).encode("utf-8")  # lone surrogates fail here, not in the tokenizer
    except (UnicodeDecodeError, UnicodeEncodeError, ValueError) as e:
        raise ApiError(400, f"the request body is not valid JSON ({str(e)[:200]})", code="invalid_json")
    except RecursionError:
        raise ApiError(400, "the request body is nested too deeply", code="invalid_json")
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object", code="invalid_json")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise _validation_error(e.errors())


# -- request bodies -------------------------------------------------------------------------------
class _Body(BaseModel):
    # strict: JSON types only ("1" is not a number, 1.0 is not an integer); unknown fields are ignored
    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)

    @field_validator("temperature", check_fields=False)
    @classmethod
    def _temperature(cls, value: float | None) -> float | None:
        if value is not None:
            try:
                check_temperature(value, "")
            except ChatGLMError as e:
                raise ValueError(str(e).strip())
        return value


class TextPart(_Body):
    type: Literal["text"]
    text: str


class Message(_Body):
    role: str
    content: str | list[TextPart] | None = None
    tool_calls: list[dict] | None = None  # an assistant's earlier tool calls (ChatGLM3)
    tool_call_id: str | None = None  # role "tool": which call this result answers


class StreamOptions(_Body):
    include_usage: bool = False


class _Sampling(_Body):
    model: str | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)  # not in the OpenAI API; 0 = off
    min_p: float | None = Field(None, ge=0, le=1)  # not in the OpenAI API; 0 = off
    repetition_penalty: float | None = Field(None, gt=0)  # not in the OpenAI API: transformers' rule; 1 = off
    frequency_penalty: float | None = None  # OpenAI's additive penalties: only 0 (off) is accepted
    presence_penalty: float | None = None
    max_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None


class ChatCompletionRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
    tools: list[dict] | None = None  # OpenAI function tools (ChatGLM3)
    max_completion_tokens: int | None = Field(None, ge=1)  # the newer OpenAI name of max_tokens


class CompletionRequest(_Sampling):
    prompt: str | list[str]
    echo: bool = False
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None


class OriginalRequest(_Body):
    """The original api.py body; `do_sample` is our addition (false: greedy, for reproducible answers)."""

    prompt: str
    history: list[list[str]] | None = None
    max_length: int | None = Field(None, ge=1)
    top_p: float | None = Field(None, gt=0, le=1)
    temperature: float | None = Field(None, ge=0, le=2)  # bounded like the OpenAI routes
    do_sample: bool | None = None


def message_text(message: Message, index: int) -> str:
    if message.content is None:
        raise ApiError(400, f"messages[{index}] has no content", param=f"messages[{index}].content")
    if isinstance(message.content, str):
        return message.content
    return "".join(part.text for part in message.content)


def chat_turns(messages: list[Message]) -> tuple[str, list[tuple[str, str]]]:
    """OpenAI messages -> (query, history) of the ChatGLM chat format."""
    system, i = [], 0
    while i < len(messages) and messages[i].role == "system":
        system.append(message_text(messages[i], i))
        i += 1
    turns = messages[i:]
    for k, m in enumerate(turns, start=i):
        if m.role not in ("user", "assistant", "system"):
            raise ApiError(400, f"messages[{k}].role {m.role!r} is not supported; use system, user or assistant",
                           param=f"messages[{k}].role", code="invalid_role")
        if m.role == "system":
            raise ApiError(400, f"messages[{k}]: system messages are only accepted at the start of the conversation",
                           param=f"messages[{k}].role", code="invalid_role")
        expected = "user" if (k - i) % 2 == 0 else "assistant"
        if m.role != expected:
            raise ApiError(400, f"messages[{k}] should be a {expected} message: after any system messages, user and"
                           " assistant turns alternate, starting and ending with user", param=f"messages[{k}].role",
                           code="invalid_role")
    if not turns or turns[-1].role != "user":
        raise ApiError(400, "the conversation must end with a user message", param="messages", code="invalid_role")
    texts = [message_text(m, k) for k, m in enumerate(turns, start=i)]
    if system:
        texts[0] = "\n".join(system) + "\n" + texts[0]
    history = [(texts[j], texts[j + 1]) for j in range(0, len(texts) - 1, 2)]
    return texts[-1], history


def generation_config(body: _Sampling, max_tokens: int | None) -> GenerationConfig:
    if body.n != 1:
        raise ApiError(400, "only n=1 is supported", param="n", code="unsupported_value")
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stop) > MAX_STOP_STRINGS:
        raise ApiError(400, f"at most {MAX_STOP_STRINGS} stop strings", param="stop")
    for name in ("frequency_penalty", "presence_penalty"):
        if getattr(body, name):
            raise ApiError(400, f"{name} is not supported (OpenAI's additive penalty has no equivalent here);"
                           " use repetition_penalty (transformers' multiplicative rule, e.g. 1.1) instead",
                           param=name, code="unsupported_parameter")
    temperature = DEFAULT_TEMPERATURE if body.temperature is None else body.temperature
    greedy = temperature == 0
    return GenerationConfig(
        max_new_tokens=max_tokens,
        do_sample=not greedy,
        temperature=1.0 if greedy else temperature,
        top_p=DEFAULT_TOP_P if body.top_p is None else body.top_p,
        top_k=body.top_k or 0,
        min_p=body.min_p or 0.0,
        repetition_penalty=1.0 if body.repetition_penalty is None else body.repetition_penalty,
        seed=body.seed,
        stop_strings=tuple(stop),
    )


# -- middleware -----------------------------------------------------------------------------------
class _Guard:
    """API key check (all routes but the public ones) and the request body size limit, before the app runs."""

    def __init__(self, app, *, api_key: str | None, max_body_bytes: int, allowed_hosts: tuple[str, ...] = LOCAL_HOSTS):
        self.app, self.api_key, self.max_body_bytes = app, api_key, max_body_bytes
        self.allowed_hosts = {h.lower().strip("[]") for h in allowed_hosts}

    def host_allowed(self, host: str) -> bool:
        return "*" in self.allowed_hosts or host_name(host) in self.allowed_hosts

    def refusal(self, scope, headers: dict[str, str]) -> JSONResponse | None:
        """403/415 for what a browser on another site (or a DNS-rebound name) could send."""
        if (scope["method"], scope["path"]) == ("GET", "/health"):
            return None  # probes address the server by whatever name or IP they have
        host = headers.get("host", "")
        if not self.host_allowed(host):
            return error_response(403, f"Host {host!r} is not allowed; start the server with --allow-host"
                                  f" {host_name(host) or 'NAME'} to accept it", code="host_not_allowed")
        origin = headers.get("origin")
        if origin is not None and origin.split("://", 1)[-1].rstrip("/").lower() != host.lower():
            return error_response(403, f"cross-origin requests from {origin} are not allowed", code="origin_not_allowed")
        if scope["method"] == "POST" and scope["path"] in JSON_ROUTES:
            ctype = headers.get("content-type")
            if ctype is not None and ctype.split(";")[0].strip().lower() != "application/json":
                return error_response(415, f"Content-Type must be application/json, not {ctype!r}",
                                      code="unsupported_media_type")
        return None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        refused = self.refusal(scope, headers)
        if refused is not None:
            return await refused(scope, receive, send)
        if self.api_key and (scope["method"], scope["path"]) not in PUBLIC_PATHS:
            given = headers.get("authorization", "")
            token = given[7:].strip() if given[:7].lower() == "bearer " else ""
            # header bytes against the key's UTF-8 bytes: a non-ASCII key matches what clients send
            if not hmac.compare_digest(token.encode("latin-1"), self.api_key.encode("utf-8")):
                message = "invalid API key" if token else "this server needs an API key: send 'Authorization: Bearer KEY'"
                response = error_response(401, message, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
                return await response(scope, receive, send)
        declared = headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_body_bytes):
            return await self._too_large(scope, receive, send)
        body, more = b"", True
        while more:  # read the whole (small) body here, so the limit also holds for chunked uploads
            try:
                message = await receive()
            except asyncio.CancelledError:  # --shutdown-timeout passed while this client was still sending
                response = error_response(503, "the server is shutting down", type="server_error", code="unavailable")
                return await response(scope, receive, send)
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_body_bytes:
                return await self._too_large(scope, receive, send)
        delivered = False

        async def replay():
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # then pass on http.disconnect

        await self.app(scope, replay, send)

    async def _too_large(self, scope, receive, send):
        response = error_response(413, f"request body larger than {self.max_body_bytes} bytes", code="request_too_large")
        await response(scope, receive, send)


def host_name(host: str) -> str:
    """'Example.com:8000' -> 'example.com'; '[::1]:8000' -> '::1'."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:].partition("]")[0]
    return host.rpartition(":")[0] if host.count(":") == 1 else host


class _HttpCounter:
    """Counts responses by route and status for /metrics."""

    def __init__(self, app, counts: dict[tuple[str, str], int], routes: set[str]):
        self.app, self.counts, self.routes = app, counts, routes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        route = scope["path"] if scope["path"] in self.routes else "other"

        async def counting_send(message):
            if message["type"] == "http.response.start":
                key = (route, str(message["status"]))
                self.counts[key] = self.counts.get(key, 0) + 1
            await send(message)

        await self.app(scope, receive, counting_send)


class _EngineStream(StreamingResponse):
    """An SSE response that cancels its request however it ends (finished, client gone, error)."""

    def __init__(self, content: AsyncIterator[str], handle: RequestHandle):
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.handle = handle

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.handle.cancel()


def _sse(data: dict) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


# -- metrics --------------------------------------------------------------------------------------
def _prometheus(engine: Engine, http_counts: dict[tuple[str, str], int]) -> str:
    s = engine.stats
    lines: list[str] = []

    def metric(name: str, kind: str, help_: str, samples: list[tuple[str, float]]) -> None:
        lines.extend([f"# HELP {name} {help_}", f"# TYPE {name} {kind}"])
        lines.extend(f"{name}{labels} {value}" for labels, value in samples)

    def histogram(name: str, help_: str, h: Histogram) -> None:
        lines.extend([f"# HELP {name} {help_}", f"# TYPE {name} histogram"])
        lines.extend(f'{name}_bucket{{le="{bound}"}} {n}' for bound, n in h.cumulative())
        lines.extend([f"{name}_sum {h.sum}", f"{name}_count {h.count}"])

    metric("chatglm_http_requests_total", "counter", "HTTP responses by route and status code.",
           [(f'{{route="{route}",code="{code}"}}', n) for (route, code), n in sorted(http_counts.items())])
    metric("chatglm_requests_total", "counter", "Generation requests ended, by finish reason.",
           [(f'{{finish_reason="{k}"}}', v) for k, v in s.finished.items()])
    metric("chatglm_requests_rejected_total", "counter", "Requests refused because the queue was full.", [("", s.rejected)])
    metric("chatglm_prompt_tokens_total", "counter", "Prompt tokens prefilled.", [("", s.prompt_tokens)])
    metric("chatglm_generation_tokens_total", "counter", "Tokens generated.", [("", s.generated_tokens)])
    metric("chatglm_queue_depth", "gauge", "Requests waiting for a slot.", [("", engine.queue_depth)])
    metric("chatglm_active_requests", "gauge", "Requests holding a KV-cache slot (the running batch).", [("", engine.active)])
    metric("chatglm_batch_slots", "gauge", "KV-cache slots (--max-batch).", [("", engine.max_batch)])
    metric("chatglm_decode_steps_total", "counter", "Batched decode forwards.", [("", s.decode_steps)])
    metric("chatglm_decode_rows_total", "counter", "Sequences decoded, summed over steps (/ steps = mean batch size).",
           [("", s.decode_rows)])
    histogram("chatglm_request_duration_seconds", "Submit to last token, finished requests.", s.request_seconds)
    histogram("chatglm_time_to_first_token_seconds", "Submit to first token.", s.first_token_seconds)
    histogram("chatglm_time_per_output_token_seconds", "Mean time between tokens of each request.", s.token_seconds)
    return "\n".join(lines) + "\n"


# -- the app --------------------------------------------------------------------------------------
def create_app(engine: Engine, *, api_key: str | None = None, model_name: str = "chatglm-6b",
               max_body_bytes: int = 1 << 20, allowed_hosts: tuple[str, ...] = LOCAL_HOSTS) -> FastAPI:
    """The ASGI app; its lifespan starts the engine and, at shutdown, drains it.

    `allowed_hosts`: Host header names answered (\"*\": any); requests with an Origin must come from that host."""
    tokenizer = engine.tokenizer
    if tokenizer is None:
        raise ChatGLMError("the server needs an engine with a tokenizer")
    fmt = chat_format_for(tokenizer)  # the model family's prompt, stop ids and answer post-processing
    created = int(time.time())
    http_counts: dict[tuple[str, str], int] = {}

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        from .http_limits import install_accept_error_log

        install_accept_error_log()
        engine.start()
        yield
        await asyncio.to_thread(engine.stop, drain=True)

    app = FastAPI(title="chatglm-ft", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return error_response(exc.status, exc.message, type=exc.type, param=exc.param, code=exc.code, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        return error_response(exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None),
                              code="not_found" if exc.status_code == 404 else None)

    @app.exception_handler(Exception)
    async def _server_error(request: Request, exc: Exception):
        return error_response(500, f"internal error: {type(exc).__name__}", type="server_error")

    # -- helpers --
    def check_model(name: str | None) -> None:
        if name is not None and name != model_name:
            raise ApiError(404, f"the model {name!r} does not exist; this server serves {model_name!r}",
                           param="model", code="model_not_found")

    def submit(prompt_ids: list[int], gen: GenerationConfig, param: str) -> RequestHandle:
        try:
            return engine.submit(prompt_ids, gen, loop=asyncio.get_running_loop())
        except PromptTooLongError as e:
            raise ApiError(400, str(e), param=param, code="context_length_exceeded")
        except QueueFullError as e:
            raise ApiError(429, str(e), type="rate_limit_error", code="queue_full", headers={"Retry-After": "1"})
        except EngineClosedError as e:
            raise ApiError(503, str(e), type="server_error", code="unavailable", headers={"Retry-After": "5"})
        except ChatGLMError as e:
            raise ApiError(400, str(e))

    async def finished(handle: RequestHandle, request: Request) -> Completion:
        """Wait for a non-streamed request, cancelling it if the client goes away."""
        while (done := await handle.wait(timeout=1.0)) is None:
            if await request.is_disconnected():
                handle.cancel()
        if done.finish_reason == "error":
            raise ApiError(500, f"generation failed: {done.error}", type="server_error")
        return done

    def usage(c: Completion) -> dict:
        return {"prompt_tokens": c.prompt_tokens, "completion_tokens": c.completion_tokens,
                "total_tokens": c.prompt_tokens + c.completion_tokens}

    def stream_error(c: Completion) -> str:
        return _sse({"error": {"message": f"generation failed: {c.error}", "type": "server_error", "param": None, "code": None}})

    def stream_end(done: Completion, finish: str, usage_event: dict | None) -> list[str]:
        """The last events of a stream: its finish chunk and, when asked for, the usage chunk (or the error)."""
        if done.finish_reason == "error":
            return [stream_error(done)]
        return [finish] + ([_sse({**usage_event, "usage": usage(done)})] if usage_event is not None else [])

    # -- routes --
    @app.get("/health")
    async def health():
        if not engine.alive:
            return JSONResponse({"status": "unavailable"}, status_code=503)
        return {"status": "ok", "model": model_name, "active": engine.active, "queued": engine.queue_depth,
                "decode_step": engine.decode_step_state}

    @app.get("/metrics")
    async def metrics():
        return Response(_prometheus(engine, http_counts), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created, "owned_by": "chatglm-ft",
                                            "max_model_len": engine.max_context}]}  # vLLM's name; the page bounds its slider

    @app.get("/v1/models/{name}")
    async def model(name: str):
        check_model(name)
        return {"id": model_name, "object": "model", "created": created, "owned_by": "chatglm-ft",
                "max_model_len": engine.max_context}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await parse_body(request, ChatCompletionRequest)
        check_model(body.model)
        role = "user"
        if fmt.family == "chatglm3":  # roles, tools and tool results map onto ChatGLM3's own turns
            from .chat_glm3 import openai_to_chat

            try:
                query, role, history = openai_to_chat([m.model_dump(exclude_none=True) for m in body.messages],
                                                      body.tools)
            except ChatGLMError as e:
                raise ApiError(400, str(e), param="messages", code="invalid_value")
        elif body.tools:
            raise ApiError(400, f"tools need ChatGLM3-6B; this server runs {fmt.display_name}", param="tools",
                           code="unsupported_value")
        else:
            query, history = chat_turns(body.messages)
        gen = generation_config(body, body.max_completion_tokens or body.max_tokens)
        gen = replace(gen, stop_token_ids=fmt.stop_token_ids)
        handle = submit(fmt.prompt_ids(query, history, role=role), gen, "messages")
        meta = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": model_name}

        def answer(done: Completion) -> tuple[dict, str]:
            """The assistant message (text, or ChatGLM3's tool call) and finish_reason of a finished request."""
            output = fmt.output_text(done.token_ids, done.text, done.finish_reason)
            response, _ = fmt.process_response(output, query, history, role=role)
            if fmt.family != "chatglm3":
                return {"role": "assistant", "content": response}, done.finish_reason
            from .chat_glm3 import openai_message

            message, reason = openai_message(response)
            return message, reason if reason == "tool_calls" else done.finish_reason

        if not body.stream:
            done = await finished(handle, request)
            message, finish_reason = answer(done)
            return {**meta, "object": "chat.completion", "usage": usage(done), "choices": [{
                "index": 0, "message": message, "finish_reason": finish_reason, "logprobs": None}]}
        wants_usage = body.stream_options is not None and body.stream_options.include_usage
        usage_event = {**meta, "object": "chat.completion.chunk", "choices": []} if wants_usage else None

        def chunk(delta: dict, finish_reason: str | None = None) -> str:
            return _sse({**meta, "object": "chat.completion.chunk",
                         "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}]})

        async def events():
            yield chunk({"role": "assistant", "content": ""})
            # the original chat's clean-up, applied as the text grows (a ChatGLM3 tool call shows nothing)
            streamer, raw = ResponseStreamer(fmt.clean), ""
            async for c in handle.chunks():
                raw += c.text
                text = streamer.update(raw) + (streamer.finish() if c.done else "")
                if text:
                    yield chunk({"content": text})
                if c.done is not None:
                    finish_reason = c.done.finish_reason
                    if c.done.finish_reason != "error":
                        message, finish_reason = answer(c.done)
                        rest = streamer.final(message["content"]) if message.get("content") is not None else ""
                        if rest:  # ChatGLM3 text held back while it might have been a tool name
                            yield chunk({"content": rest})
                        if message.get("tool_calls"):  # sent whole, once the call is complete
                            calls = [{"index": k, **call} for k, call in enumerate(message["tool_calls"])]
                            yield chunk({"tool_calls": calls})
                    for event in stream_end(c.done, chunk({}, finish_reason), usage_event):
                        yield event
            yield "data: [DONE]\n\n"

        return _EngineStream(events(), handle)

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await parse_body(request, CompletionRequest)
        check_model(body.model)
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if len(prompts) != 1:
            raise ApiError(400, "send one prompt per request", param="prompt", code="unsupported_value")
        for name, unsupported in (("echo", body.echo), ("logprobs", body.logprobs), ("suffix", body.suffix),
                                  ("best_of", body.best_of not in (None, 1))):
            if unsupported:
                raise ApiError(400, f"{name} is not supported", param=name, code="unsupported_value")
        gen = generation_config(body, body.max_tokens or 16)  # 16: the OpenAI default for completions
        handle = submit(tokenizer.encode(prompts[0]), gen, "prompt")
        meta = {"id": f"cmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": model_name}
        if not body.stream:
            done = await finished(handle, request)
            return {**meta, "object": "text_completion", "usage": usage(done), "choices": [{
                "index": 0, "text": done.text, "finish_reason": done.finish_reason, "logprobs": None}]}
        wants_usage = body.stream_options is not None and body.stream_options.include_usage
        usage_event = {**meta, "object": "text_completion", "choices": []} if wants_usage else None

        def chunk(text: str, finish_reason: str | None = None) -> str:
            return _sse({**meta, "object": "text_completion",
                         "choices": [{"index": 0, "text": text, "finish_reason": finish_reason, "logprobs": None}]})

        async def events():
            async for c in handle.chunks():
                if c.text:
                    yield chunk(c.text)
                if c.done is not None:
                    for event in stream_end(c.done, chunk("", c.done.finish_reason), usage_event):
                        yield event
            yield "data: [DONE]\n\n"

        return _EngineStream(events(), handle)

    @app.post("/")
    async def original_api(request: Request):
        """The original ChatGLM-6B api.py: {prompt, history, max_length, top_p, temperature} -> {response, history, status, time}."""
        body = await parse_body(request, OriginalRequest)
        history = body.history or []
        for k, turn in enumerate(history):
            if len(turn) != 2:
                raise ApiError(400, f"history[{k}] must be a [query, response] pair", param=f"history[{k}]")
        gen = GenerationConfig(  # as api.py: a missing or zero value takes the chat default
            max_length=body.max_length or 2048,
            do_sample=True if body.do_sample is None else body.do_sample,
            top_p=body.top_p or DEFAULT_TOP_P,
            temperature=body.temperature or DEFAULT_TEMPERATURE,
        )
        if fmt.family == "chatglm3":
            raise ApiError(400, "this route speaks the ChatGLM-6B/ChatGLM2-6B api.py; use /v1/chat/completions with"
                           " ChatGLM3-6B", code="unsupported_value")
        gen = replace(gen, stop_token_ids=fmt.stop_token_ids)
        handle = submit(fmt.prompt_ids(body.prompt, [tuple(turn) for turn in history]), gen, "prompt")
        done = await finished(handle, request)
        response = fmt.clean(done.text)
        return {"response": response, "history": [*map(list, history), [body.prompt, response]], "status": 200,
                "time": datetime.datetime.now().strftime("%Y-%m-%d %H:%M:%S")}

    page = resources.files("chatglm_ft").joinpath("static", "chat.html").read_text(encoding="utf-8")

    async def chat_page():
        return HTMLResponse(page)

    app.add_api_route("/", chat_page, methods=["GET", "HEAD"], response_class=HTMLResponse)

    routes = {"/", "/health", "/metrics", "/v1/models", "/v1/chat/completions", "/v1/completions"}
    app.add_middleware(_Guard, api_key=api_key, max_body_bytes=max_body_bytes, allowed_hosts=tuple(allowed_hosts))
    app.add_middleware(_HttpCounter, counts=http_counts, routes=routes)  # outermost: sees 401/413 too
    return app


def loopback_warning(host: str, api_key: str | None) -> str | None:
    if api_key or host in ("127.0.0.1", "localhost", "::1"):
        return None
    return f"serving on {host} without --api-key: anyone who can reach this address can use the model"


