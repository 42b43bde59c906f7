"""An OpenAI-compatible HTTP server for a loramix model (FastAPI).

    GET  /health                 {"status": "ok", ...}
    GET  /metrics                Prometheus text format (serve/metrics.py)
    GET  /v1/models              the one model, under its id (and GET /v1/models/{id})
    POST /v1/completions         prompt(s): strings or token ids -> one choice each (stream: server-sent events)
    POST /v1/chat/completions    messages -> reply, with the tokenizer's chat template (or the plain fallback:
                                 "role: content" lines, then "assistant:")

Sampling fields map to `generate`: max_tokens (or max_completion_tokens), temperature (0 = greedy), top_p, stop,
seed, n, presence/frequency_penalty, logit_bias, logprobs (+ echo; chat: top_logprobs). Structured output:
`response_format` json_object / json_schema (both endpoints) and `tools` with tool_choice "none", "required" or a
named function (chat; serve/tools.py), enforced by a grammar in the decoder's sampler (grammar.py); tool_choice
"auto" reads the calls in the model's own format (serve/toolparsers.py), strict tools under a lazy grammar. Fields it
cannot honour (best_of > 1, ...) get a 400 naming them (docs/serving.md).
The extension field `loramix` (OpenAI clients: `extra_body={"loramix": {...}}`) selects the speed mode, top_k,
repetition_penalty, and `return_scalings` ("token", "layer" or "expert"), returned in the response's `loramix` field.
Errors are OpenAI-style JSON: {"error": {"message", "type", "param", "code"}} with a 4xx status (5xx: 503 with
Retry-After when the queue is full, 504 when a request runs past its timeout).

Layers: schemas.py and responses.py (the requests and the response bodies, pydantic), handlers.py (the two
generating endpoints: checks, jobs, grammars), openai.py (the OpenAI shaping of answers, errors and streams),
events.py (what the engine sends a handler), and this module (the app: its routes, the ASGI guard, the factory).

Load: requests run in the engine's continuous batch (engine.py). A client that disconnects (streaming or not) has its
jobs cancelled; their slots are free before the next decode step. The request body is read by `_Guard` (an ASGI
middleware) before any parsing: a Content-Length above `max_body` is refused at once (413), a body that grows past
it while streaming too, and a body that stalls for `body_timeout` seconds gets a 408.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import secrets
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..base import resolve_defaults, text_config
from ..blocks import paged_budget
from ..errors import ConfigError, LoramixError
from . import handlers
from .config import check_api_key
from .engine import Engine
from .metrics import Metrics
from .openai import ApiError
from .schemas import ChatRequest, CompletionRequest
from .state import ServerState
from .tools import ToolError, check_parser

__all__ = ["ApiError", "ServerState", "check_api_key", "create_app"]

MAX_BODY_DEPTH = 200
"""The deepest nesting of arrays and objects a request body may have (a 400 beyond, before it is parsed)."""
GRAMMAR_BUDGET_S = 1.0
"""The default time a request's grammar may cost (compile and first mask; then the decoder's waits for its masks)."""
OPEN_PATHS = ("/health", "/metrics")
"""The paths served without the API key; every other one (the API, /openapi.json, unknown paths) needs it."""


_JSON_MARKS = re.compile(rb'\\.|["\[\]{}]')


def json_depth(body: bytes, stop: int | None = None) -> int:
    """How deeply a JSON text nests arrays and objects (brackets inside strings do not count), read without parsing
    it (a parser would recurse); scanning stops past `stop`."""
    depth = deepest = 0
    in_string = False
    for mark in _JSON_MARKS.finditer(body):
        token = mark.group()
        if token == b'"':
            in_string = not in_string
        elif in_string or len(token) == 2:  # inside a string, or an escape
            continue
        elif token in (b"[", b"{"):
            depth += 1
            deepest = max(deepest, depth)
            if stop is not None and deepest > stop:
                break
        else:
            depth -= 1
    return deepest


class _Guard:
    """Pure ASGI middleware, before any parsing: the API key (401), then the body: a Content-Length above
    `max_body` bytes is refused without reading (413), and the body is read here with a cap (413 as soon as it
    grows past it) and a per-chunk timeout (408), then handed on to the app."""

    def __init__(
        self, app: Any, *, api_key: str | None, max_body: int, body_timeout: float | None, metrics: Metrics
    ) -> None:
        self.app, self.api_key, self.max_body, self.body_timeout, self.metrics = (
            app,
            api_key,
            max_body,
            body_timeout,
            metrics,
        )

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        if self.api_key is not None and scope["path"] not in OPEN_PATHS:
            header = headers.get(b"authorization", b"").decode("latin-1")
            token = header[7:] if header.lower().startswith("bearer ") else ""
            if not secrets.compare_digest(token.encode(), self.api_key.encode()):
                response = ApiError(
                    401,
                    "invalid or missing API key (Authorization: Bearer ...)",
                    type_="authentication_error",
                    code="invalid_api_key",
                ).response()
                await response(scope, receive, send)
                return
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        length = headers.get(b"content-length", b"")
        if length.isdigit() and int(length) > self.max_body:
            await self._refuse(scope, receive, send, 413, f"the request body has {int(length)} bytes")
            return
        chunks, size = [], 0
        while True:
            try:
                message = await asyncio.wait_for(receive(), self.body_timeout)
            except asyncio.TimeoutError:
                await self._refuse(scope, receive, send, 408, f"the request body stalled for {self.body_timeout}s")
                return
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                await self._refuse(scope, receive, send, 413, f"the request body passed {size} bytes")
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body, replayed = b"".join(chunks), False
        if json_depth(body, MAX_BODY_DEPTH) > MAX_BODY_DEPTH:
            message = f"the request body is nested too deeply: more than {MAX_BODY_DEPTH} levels of arrays and objects"
            await ApiError(400, message).response()(scope, receive, send)
            return

        async def replay() -> dict[str, Any]:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # then the client's disconnect, if it hangs up

        await self.app(scope, replay, send)

    async def _refuse(self, scope: dict[str, Any], receive: Any, send: Any, status: int, why: str) -> None:
        self.metrics.reject(status)
        if status == 413:
            why += f"; this server accepts at most {self.max_body} bytes"
        await ApiError(status, why, headers={"Connection": "close"}).response()(scope, receive, send)


def model_length(model: Any, max_model_len: int | None) -> int:
    """The longest prompt + max_tokens served: `max_model_len`, at most the model's context unless its config
    scales RoPE (then the user knows better); default the context (4096 when the config does not say)."""
    context = resolve_defaults(model).context
    if max_model_len is None:
        return context or 4096
    if max_model_len < 2:
        raise ConfigError(f"--max-model-len={max_model_len} must be at least 2 (one prompt token and one new one)")
    config = text_config(model.model)
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    scaled = rope.get("rope_type", rope.get("type", "default")) not in ("default", None)
    if context is not None and max_model_len > context and not scaled:
        raise ConfigError(
            f"--max-model-len={max_model_len} is above the model's context of {context} tokens (its config has no "
            f"rope_scaling that would extend it); give at most {context}"
        )
    return max_model_len


def create_app(
    model: Any,
    *,
    model_id: str = "loramix",
    api_key: str | None = None,
    max_prompt_tokens: int | None = None,
    max_tokens_limit: int = 1024,
    default_max_tokens: int = 16,
    batching: bool = True,
    max_batch: int = 8,
    compile: bool = False,
    max_queue: int = 256,
    max_body: int = 1 << 20,
    request_timeout: float | None = 600.0,
    body_timeout: float | None = 30.0,
    max_model_len: int | None = None,
    kv_cache_memory: int | str | None = None,
    gpu_memory_utilization: float | None = None,
    max_num_batched_tokens: int = 512,
    prefix_caching: bool = True,
    grammar_budget: float | None = GRAMMAR_BUDGET_S,
    tool_call_parser: str | None = None,
) -> FastAPI:
    """The FastAPI app serving `model` (a LoraMixModel with a tokenizer); `app.state.server` is its `ServerState`.
    One worker thread runs the model: continuous batching
    over `max_batch` slots (1 without batching), at most `max_queue` jobs waiting, request bodies of at most
    `max_body` bytes, each request ended (504) after `request_timeout` seconds, a stalled body after `body_timeout`.

    A structured-output request's grammar (compile, first mask, then every mask the decoder waits for) gets
    `grammar_budget` seconds in all (None: no limit); past it that request alone fails, 400 naming the field.

    Memory (docs/serving.md, "Memory"): prompt + max_tokens at most `max_model_len` (default: the model's
    context); the KV cache pool, allocated here, holds `kv_cache_memory` bytes ("2GiB" or a number; default 4 GiB
    on a CPU) or on CUDA `gpu_memory_utilization` of the device less what is in use (default 0.9);
    `max_num_batched_tokens` tokens of a long prompt prefill between two decode steps; `prefix_caching` reuses
    the blocks of shared prompt prefixes.

    `tool_call_parser` names the tool-call format tool_choice "auto" reads (serve/toolparsers.py; None: the chat
    template's)."""
    if model.tokenizer is None:
        raise LoramixError("serving needs a tokenizer: the checkpoint has none and its base provides none")
    check_api_key(api_key)
    try:
        check_parser(tool_call_parser)
    except ToolError as exc:
        raise ConfigError(f"tool_call_parser: {exc}") from None
    context = model_length(model, max_model_len)
    prompt_limit = max_prompt_tokens or context - 1
    metrics = Metrics(model.expert_names)
    engine = Engine(
        model,
        batching=batching,
        max_batch=max_batch,
        compile=compile,
        max_queue=max_queue,
        longest=min(context, prompt_limit + max_tokens_limit),
        metrics=metrics,
        kv_cache_memory=paged_budget(kv_cache_memory) if isinstance(kv_cache_memory, str) else kv_cache_memory,
        gpu_memory_utilization=gpu_memory_utilization,
        prefix_caching=prefix_caching,
        max_num_batched_tokens=max_num_batched_tokens,
    )
    metrics.bind(engine)
    state = ServerState(
        model=model,
        engine=engine,
        metrics=metrics,
        model_id=model_id,
        prompt_limit=prompt_limit,
        max_tokens_limit=max_tokens_limit,
        default_max_tokens=default_max_tokens,
        context=context,
        vocab_size=getattr(text_config(model.model), "vocab_size", None),
        request_timeout=request_timeout,
        grammar_budget=grammar_budget,
        special_ids=_special_ids(model.tokenizer),
        tool_parser=tool_call_parser,
    )
    return _assemble(state, api_key=api_key, max_body=max_body, body_timeout=body_timeout)


def _special_ids(tokenizer: Any) -> set[int]:
    """The tokenizer's special token ids but its unknown token's."""
    return set(getattr(tokenizer, "all_special_ids", [])) - {getattr(tokenizer, "unk_token_id", None)}


def _assemble(state: ServerState, *, api_key: str | None, max_body: int, body_timeout: float | None) -> FastAPI:
    """The FastAPI app around a built `ServerState`: its routes, the guard (API key, body limits) outermost, and
    the engine closed when the app shuts down."""

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        state.engine.close()

    app = FastAPI(title="loramix", version="1", docs_url=None, redoc_url=None, lifespan=lifespan)
    app.state.server = state
    app.state.engine = state.engine
    _routes(app, state)
    app.add_middleware(_Guard, api_key=api_key, max_body=max_body, body_timeout=body_timeout, metrics=state.metrics)
    return app


def _routes(app: FastAPI, state: ServerState) -> None:
    """The exception handlers and endpoints, each a thin call into the module's functions."""

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        if first.get("type") == "json_invalid":
            return ApiError(400, "the request body is not valid JSON").response()
        location = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        message = first.get("msg", "invalid request")
        return ApiError(400, f"{location}: {message}" if location else message, param=location or None).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return ApiError(exc.status_code, str(exc.detail), type_=kind).response()

    @app.exception_handler(LoramixError)
    async def _loramix(_: Request, exc: LoramixError) -> JSONResponse:
        return ApiError(400, str(exc)).response()

    @app.get("/health")
    async def health() -> dict[str, Any]:
        engine = state.engine
        return {
            "status": "ok",
            "model": state.model_id,
            "experts": state.model.expert_names,
            "queued": engine.queued,
            "active": engine.active,
            "slots": engine.max_batch,
            "kv_blocks": engine.blocks,
        }

    @app.get("/metrics")
    async def metrics() -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(state.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [state.card]}

    @app.get("/v1/models/{name:path}")
    async def model_card(name: str) -> dict[str, Any]:
        handlers.check_model(state, name)
        return state.card

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Any:
        return await handlers.completions(state, request, body)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request) -> Any:
        return await handlers.chat(state, request, body)
