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

Load: requests run in the engine's continuous batch (engine.py). A client that disconnects (streaming or not) has its
jobs cancelled; their slots are free before the next decode step. The request body is read by `_Guard` (an ASGI
middleware) before any parsing: a Content-Length above `max_body` is refused at once (413), a body that grows past
it while streaming too, and a body that stalls for `body_timeout` seconds gets a 408.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import re
import secrets
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..base import resolve_defaults, text_config
from ..blocks import paged_budget
from ..errors import ConfigError, LoramixError
from ..grammar import ANY_OBJECT, OVER_BUDGET, Grammar, GrammarError, token_bytes
from ..sampling import SamplingSettings
from ..text import render_chat
from .config import check_api_key
from .engine import Engine, Job, QueueFull, TokenLogprob
from .metrics import Metrics
from .schemas import MAX_CHOICES, ChatRequest, CompletionRequest
from .toolparsers import CallReader
from .tools import (
    ToolError,
    ToolPlan,
    auto_message,
    call_id,
    chat_messages,
    check_parser,
    entry,
    plan_tools,
    template_reads_tools,
    tool_calls,
)

__all__ = ["ApiError", "ServerState", "check_api_key", "create_app"]

RETRY_AFTER_S = 1
"""What a 503 (queue full) tells the client to wait, in seconds."""
MAX_BODY_DEPTH = 200
"""The deepest nesting of arrays and objects a request body may have (a 400 beyond, before it is parsed)."""
GRAMMAR_BUDGET_S = 1.0
"""The default time a request's grammar may cost (compile and first mask; then the decoder's waits for its masks)."""
OPEN_PATHS = ("/health", "/metrics")
"""The paths served without the API key; every other one (the API, /openapi.json, unknown paths) needs it."""


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        type_: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers

    def response(self) -> JSONResponse:
        """The error as OpenAI's API answers it: {"error": {message, type, param, code}} with the status."""
        message = self.message.encode("utf-8", "backslashreplace").decode("utf-8")  # a lone surrogate cannot be sent
        return JSONResponse(
            status_code=self.status,
            content={"error": {"message": message, "type": self.type, "param": self.param, "code": self.code}},
            headers=self.headers,
        )


@dataclass
class ServerState:
    """What the endpoints share: the model, its engine and metrics, and the server's limits."""

    model: Any
    engine: Engine
    metrics: Metrics
    model_id: str
    prompt_limit: int
    max_tokens_limit: int
    default_max_tokens: int
    context: int  # max_model_len: the longest prompt + max_tokens
    vocab_size: int | None
    request_timeout: float | None
    grammar_budget: float | None = None
    special_ids: set[int] = field(default_factory=set)
    tool_parser: str | None = None
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def tokenizer(self) -> Any:
        return self.model.tokenizer

    @property
    def card(self) -> dict[str, Any]:
        return {"id": self.model_id, "object": "model", "created": self.created, "owned_by": "loramix"}


# ---------------------------------------------------------------------- request checks and jobs


def _check_model(state: ServerState, name: str) -> None:
    if name != state.model_id:
        raise ApiError(
            404,
            f"model '{name}' does not exist; this server has '{state.model_id}'",
            param="model",
            code="model_not_found",
        )


def _check_fields(state: ServerState, body: CompletionRequest | ChatRequest, choices: int) -> None:
    _check_model(state, body.model)
    refused = body.unsupported()
    if refused is not None:
        raise ApiError(400, f"{refused[0]}: {refused[1]}", param=refused[0], code="unsupported_parameter")
    if choices > MAX_CHOICES:
        raise ApiError(400, f"prompts x n = {choices} choices; at most {MAX_CHOICES} per request", param="n")
    if body.stream and body.logprobs:
        raise ApiError(400, "logprobs: not supported with stream=true", param="logprobs")
    for key in body.logit_bias or {}:
        if state.vocab_size is not None and int(key) >= state.vocab_size:
            raise ApiError(
                400,
                f"logit_bias: token id {key} is not below the vocabulary size {state.vocab_size}",
                param="logit_bias",
            )


def _encode(state: ServerState, text: str, param: str, add_special_tokens: bool = True) -> list[int]:
    """Token ids of a text; a character the tokenizer has no token for is an error, not a silent pad or unk."""
    tokenizer = state.tokenizer
    if not getattr(tokenizer, "is_fast", False):
        return tokenizer(text, add_special_tokens=add_special_tokens).input_ids
    enc = tokenizer(text, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
    for token, (start, end) in zip(enc.input_ids, enc.offset_mapping):
        if token in state.special_ids and start < end and text[start:end] != tokenizer.convert_ids_to_tokens(token):
            char = text[start]
            raise ApiError(
                400,
                f"{param}: the character {char!r} (U+{ord(char):04X}) at position {start} is not in the "
                "tokenizer's vocabulary",
                param=param,
            )
    return list(enc.input_ids)


def _check_ids(state: ServerState, ids: list[int]) -> list[int]:
    if state.vocab_size is not None and any(i >= state.vocab_size for i in ids):
        bad = next(i for i in ids if i >= state.vocab_size)
        raise ApiError(
            400, f"prompt: token id {bad} is not below the vocabulary size {state.vocab_size}", param="prompt"
        )
    return ids


def _job(state: ServerState, body: CompletionRequest | ChatRequest, ids: list[int], **extra: Any) -> Job:
    """The job of one choice (emit, group and index are set by `_submit`)."""
    asked = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"  # the field given
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    max_tokens = state.default_max_tokens if max_tokens is None else max_tokens
    if len(ids) == 0:
        raise ApiError(400, "the prompt is empty", param="prompt")
    if len(ids) > state.prompt_limit:
        raise ApiError(
            400,
            f"the prompt has {len(ids)} tokens; this server accepts at most {state.prompt_limit}",
            param="prompt",
            code="context_length_exceeded",
        )
    if max_tokens > state.max_tokens_limit:
        raise ApiError(
            400,
            f"{asked}={max_tokens} is above this server's limit of {state.max_tokens_limit}",
            param=asked,
        )
    if len(ids) + max_tokens > state.context:
        raise ApiError(
            400,
            f"prompt ({len(ids)} tokens) + {asked} ({max_tokens}) exceeds this server's max_model_len "
            f"of {state.context} tokens",
            param=asked,
            code="context_length_exceeded",
        )
    if body.loramix.mode == "truncated" and state.model.config.scaling_layer is None:
        raise ApiError(400, "mode 'truncated' needs a gate trained on a truncated scaling pass", param="loramix.mode")
    return Job(
        ids=ids,
        max_tokens=max_tokens,
        emit=lambda _: None,
        mode=body.loramix.mode,
        sampling=_sampling(body),
        stops=body.stop or [],
        return_scalings=body.loramix.return_scalings,
        stream=body.stream,
        **extra,
    )


_SAMPLING_PARAMS = {"top_k": "loramix.top_k", "repetition_penalty": "loramix.repetition_penalty"}


async def _grammar(
    state: ServerState, body: CompletionRequest | ChatRequest, plan: ToolPlan | None = None
) -> Grammar | None:
    """The grammar of the request's response_format or forced tool call (None: unconstrained), compiled off the
    event loop; a 400 naming the field when it cannot be."""
    fmt = body.response_format
    json_format = fmt is not None and fmt.type != "text"
    if json_format and plan is not None and plan.choice != "none":
        raise ApiError(
            400,
            f"response_format {fmt.type!r} and tool_choice {plan.choice!r} both shape the answer; use one",
            param="response_format",
        )
    if plan is not None and plan.choice == "auto" and plan.strict:
        try:
            text = plan.lazy_grammar(lambda trigger: _special_token(state, trigger))
            return await asyncio.to_thread(Grammar.lark_for_model, state.model, text)
        except (GrammarError, ValueError) as exc:
            raise ApiError(400, f"tools: {exc}", param="tools") from None
    if plan is not None and plan.constrained:
        param, schema = "tools", plan.schema()
    elif json_format:
        param = "response_format"
        schema = fmt.json_schema.schema_ if fmt.type == "json_schema" and fmt.json_schema.schema_ else ANY_OBJECT
    else:
        return None
    try:
        return await _compile(state.model, schema, state.grammar_budget)
    except GrammarError as exc:
        raise ApiError(400, f"{param}: {exc}", param=param) from None


def _warm(model: Any, schema: Any, budget: float | None) -> Grammar:
    """The grammar compiled with its first mask (`Grammar.json` computes it: the costly part of a hard schema), and
    the budget the decoder grants its masks."""
    return dataclasses.replace(Grammar.for_model(model, schema), budget=budget)


async def _compile(model: Any, schema: Any, budget: float | None) -> Grammar:
    """`_warm` on a thread of its own, waited for at most `budget` seconds (then a GrammarError; the thread, which
    cannot be stopped, finishes on its own and its result is dropped). llguidance's one-time work for the tokenizer
    (`Grammar.prepare`) comes first and is not counted."""
    await asyncio.to_thread(Grammar.prepare, model)
    loop = asyncio.get_running_loop()
    done: asyncio.Future = loop.create_future()

    def work() -> None:
        try:
            result: Any = _warm(model, schema, budget)
        except BaseException as exc:  # handed to the request
            result = exc
        with contextlib.suppress(RuntimeError):  # the loop is closed: the server stopped, nobody waits for it
            loop.call_soon_threadsafe(lambda: done.done() or done.set_result(result))

    threading.Thread(target=work, name="loramix-grammar-compile", daemon=True).start()
    try:
        result = await asyncio.wait_for(done, budget)
    except asyncio.TimeoutError:
        raise GrammarError(OVER_BUDGET.format(budget=budget)) from None
    if isinstance(result, BaseException):
        raise result
    return result


def _special_token(state: ServerState, text: str) -> int | None:
    """The id of the special token that writes `text` (a tool-call trigger such as [TOOL_CALLS]), or None."""
    ids = state.tokenizer.encode(text, add_special_tokens=False)
    return ids[0] if len(ids) == 1 and ids[0] in state.special_ids else None


def _sampling(body: CompletionRequest | ChatRequest) -> SamplingSettings:
    """The request's sampling settings, validated once (a 400 naming the field if they cannot be computed)."""
    try:
        return SamplingSettings(
            temperature=body.temperature,
            top_p=body.top_p,
            top_k=body.loramix.top_k,
            repetition_penalty=body.loramix.repetition_penalty,
            presence_penalty=body.presence_penalty,
            frequency_penalty=body.frequency_penalty,
            logit_bias={int(k): v for k, v in (body.logit_bias or {}).items()},
            seed=body.seed,
        )
    except ConfigError as exc:
        field_name = str(exc).split("=")[0].split(":")[0].split("[")[0]
        raise ApiError(400, str(exc), param=_SAMPLING_PARAMS.get(field_name, field_name)) from None


def _submit(
    state: ServerState, body: CompletionRequest | ChatRequest, prompts: list[list[int]], **extra: Any
) -> tuple[list[Job], asyncio.Queue]:
    """Make every choice's job (prompt i, sample j -> choice i * n + j), then submit them as one group
    (503 when the engine's queue is full)."""
    loop = asyncio.get_running_loop()
    sink: asyncio.Queue = asyncio.Queue()
    group = object()
    deadline = time.monotonic() + state.request_timeout if state.request_timeout else None
    jobs = []
    for i, ids in enumerate(prompts):
        for j in range(body.n):
            index = i * body.n + j

            def emit(message: dict[str, Any], index: int = index) -> None:
                loop.call_soon_threadsafe(sink.put_nowait, {**message, "index": index})

            job = _job(state, body, ids, **extra)
            job.emit, job.group, job.index, job.deadline = emit, group, index, deadline
            jobs.append(job)
    try:
        state.engine.submit_group(jobs)
    except QueueFull as exc:
        state.metrics.reject(503)
        raise ApiError(
            503, str(exc), type_="server_error", code="queue_full", headers={"Retry-After": str(RETRY_AFTER_S)}
        ) from None
    return jobs, sink


def _cancel(jobs: list[Job]) -> None:
    """The client is gone (or the request failed): the engine frees these jobs' slots before its next step."""
    for job in jobs:
        job.cancelled = True


async def _watch_disconnect(request: Request, jobs: list[Job]) -> None:
    """Wait for the client to hang up (ASGI http.disconnect), then cancel its jobs."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            _cancel(jobs)
            return


async def _results(request: Request, sink: asyncio.Queue, jobs: list[Job]) -> list[dict[str, Any]]:
    """Every choice's final message, cancelling the jobs if the client disconnects while it waits."""
    watcher = asyncio.create_task(_watch_disconnect(request, jobs))
    results: list[dict[str, Any] | None] = [None] * len(jobs)
    try:
        while any(r is None for r in results):
            message = await sink.get()
            if message["type"] == "done":
                results[message["index"]] = message
            elif message["type"] == "error":
                status = message.get("status", 500)
                kind = "server_error" if status >= 500 else "invalid_request_error"
                raise ApiError(status, message["message"], type_=kind, param=message.get("param"))
    finally:
        watcher.cancel()
        _cancel(jobs)  # no-op for finished jobs; frees the others if this request failed or was cancelled
    return results  # type: ignore[return-value]


# ---------------------------------------------------------------------- response bodies


def _piece(state: ServerState, token: int) -> str:
    return state.tokenizer.decode([token], skip_special_tokens=False)


def _key(state: ServerState, token: int) -> str:
    """A token as the legacy logprobs name it: its text, or, for a token that is part of a character (its text
    alone is '\ufffd'), `bytes:` and its bytes escaped (as OpenAI writes them), so that no two tokens share a key."""
    piece = _piece(state, token)
    if "\ufffd" not in piece:
        return piece
    raw = token_bytes(state.model, token)
    return "bytes:" + "".join(f"\\x{b:02x}" for b in raw) if raw else piece


def _legacy_logprobs(
    state: ServerState, entries: list[TokenLogprob], start: int, text: str | None = None
) -> dict[str, list[Any]]:
    """OpenAI's legacy completions object; text_offset counts characters of the choice's text from `start`. With
    the choice's `text`, a special token that is not in it (the BOS a tokenizer adds, a generated pad) takes no
    room: every offset points at its token in the text."""
    out: dict[str, list[Any]] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for e in entries:
        piece, key = _piece(state, e.token), _key(state, e.token)
        out["tokens"].append(key)
        out["token_logprobs"].append(e.logprob)
        if e.logprob is None:
            out["top_logprobs"].append(None)
        else:  # the `logprobs` most likely tokens, and the chosen one
            top: dict[str, float] = {}
            for t, lp in e.top:
                name = _key(state, t)
                top[name if name not in top else f"{name} (token {t})"] = lp  # distinct tokens, distinct keys
            if e.token not in {t for t, _ in e.top}:
                top[key if key not in top else f"{key} (token {e.token})"] = e.logprob
            out["top_logprobs"].append(top)
        out["text_offset"].append(start)
        if text is not None and e.token in state.special_ids and not text.startswith(piece, start):
            continue  # added by the tokenizer: not in the text
        start += len(piece)
    return out


def _chat_logprobs(state: ServerState, entries: list[TokenLogprob]) -> dict[str, Any]:
    def item(token: int, logprob: float) -> dict[str, Any]:
        piece = _piece(state, token)
        return {"token": piece, "logprob": logprob, "bytes": list(piece.encode("utf-8"))}

    return {
        "content": [{**item(e.token, e.logprob), "top_logprobs": [item(t, lp) for t, lp in e.top]} for e in entries],
        "refusal": None,
    }


@dataclass
class _Reply:
    """One response under construction: its id, kind and time, and the jobs and prompts behind it."""

    state: ServerState
    rid: str
    kind: str
    prompts: list[list[int]]
    jobs: list[Job]
    now: int = field(default_factory=lambda: int(time.time()))

    def envelope(self, choices: list[dict[str, Any]], kind: str | None = None) -> dict[str, Any]:
        return {
            "id": self.rid,
            "object": kind or self.kind,
            "created": self.now,
            "model": self.state.model_id,
            "choices": choices,
        }

    def extension(self, results: list[dict[str, Any]]) -> dict[str, Any]:
        job, model = self.jobs[0], self.state.model
        out = {"mode": job.mode, "scaling_layer": model.config.scaling_layer, "experts": model.expert_names}
        if job.return_scalings != "none":
            scalings = [r["scalings"] for r in results]
            out["scalings"] = scalings[0] if len(scalings) == 1 else scalings  # one per choice when several
            out["scalings_kind"] = job.return_scalings
            if job.return_scalings in ("token", "layer"):
                out["layers"] = model.layer_names
        return out

    def with_totals(self, body: dict[str, Any], results: list[dict[str, Any]]) -> dict[str, Any]:
        """The response (or the stream's usage chunk) with its usage and the loramix extension."""
        prompt = sum(len(ids) for ids in self.prompts)
        completion = sum(r["completion_tokens"] for r in results)
        body["usage"] = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
        body["loramix"] = self.extension(results)
        return body


ChoiceOf = Callable[..., "dict[str, Any] | None"]


async def _sse(
    reply: _Reply,
    sink: asyncio.Queue,
    opening: ChoiceOf,
    piece: ChoiceOf,
    finish: ChoiceOf,
    usage: bool,
) -> AsyncIterator[bytes]:
    """Server-sent events for the reply's choices. The endpoint gives the choice objects only: `opening(index)` (or
    None), `piece(index, text)`, `finish(result)`; each goes out in the reply's envelope. The last finish chunk
    carries the loramix extension, unless a usage chunk (stream_options.include_usage) follows and carries it with
    the usage. `piece` may give None (nothing to send yet), and `piece` and `finish` a list of choice objects (each
    sent as its own chunk; the last of `finish`'s carries the finish reason). A client that hangs up cancels the jobs
    (the generator is closed)."""

    def event(data: dict[str, Any]) -> bytes:
        return f"data: {json.dumps(data)}\n\n".encode()

    count = len(reply.jobs)
    try:
        for index in range(count):
            first = opening(index)
            if first is not None:
                yield event(reply.envelope([first]))
        results: list[dict[str, Any] | None] = [None] * count
        while any(r is None for r in results):
            message = await sink.get()
            if message["type"] == "piece":
                for choice in _listed(piece(message["index"], message["text"])):
                    yield event(reply.envelope([choice]))
            elif message["type"] == "done":
                results[message["index"]] = message
                *before, last = _listed(finish(message))
                for choice in before:
                    yield event(reply.envelope([choice]))
                chunk = reply.envelope([last])
                if all(r is not None for r in results) and not usage:
                    chunk["loramix"] = reply.extension(results)  # type: ignore[arg-type]
                yield event(chunk)
            else:
                error = {"error": {"message": message["message"], "type": "server_error", "param": None, "code": None}}
                yield event(error)
                yield b"data: [DONE]\n\n"
                return
        if usage:
            yield event(reply.with_totals(reply.envelope([]), results))  # type: ignore[arg-type]
        yield b"data: [DONE]\n\n"
    finally:
        _cancel(reply.jobs)


def _listed(choice: Any) -> list[dict[str, Any]]:
    """A choice function's answer as a list of choice objects (it may give None, one, or several)."""
    return [] if choice is None else choice if isinstance(choice, list) else [choice]


def _stream(reply: _Reply, sink: asyncio.Queue, body: Any, opening: ChoiceOf, piece: ChoiceOf, finish: ChoiceOf):
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    events = _sse(reply, sink, opening, piece, finish, include_usage)
    return StreamingResponse(events, media_type="text/event-stream")


# ---------------------------------------------------------------------- the endpoints


async def _completions(state: ServerState, request: Request, body: CompletionRequest) -> Any:
    items = body.prompts
    _check_fields(state, body, len(items) * body.n)
    for i, p in enumerate(items):  # before the tokenizer adds its BOS to it
        if isinstance(p, str) and not p:
            where = "prompt" if isinstance(body.prompt, str) else f"prompt[{i}]"
            raise ApiError(400, f"{where}: the prompt is empty", param="prompt")
    prompts = [_encode(state, p, "prompt") if isinstance(p, str) else _check_ids(state, p) for p in items]
    texts = [p if isinstance(p, str) else state.tokenizer.decode(ids) for p, ids in zip(items, prompts)]
    for ids in prompts:  # the prompts' checks before the grammar's compile
        _job(state, body, ids)
    grammar = await _grammar(state, body)
    extra = {"logprobs": body.logprobs, "prompt_logprobs": body.echo and body.logprobs is not None, "grammar": grammar}
    jobs, sink = _submit(state, body, prompts, **extra)
    reply = _Reply(state, f"cmpl-{uuid.uuid4().hex}", "text_completion", prompts, jobs)

    def echo(index: int) -> str:
        return texts[index // body.n] if body.echo else ""

    def choice(index: int, text: str, result: dict[str, Any] | None) -> dict[str, Any]:
        logprobs = None
        if result is not None and result["logprobs"] is not None:
            entries = result["logprobs"]["prompt"] + result["logprobs"]["completion"]
            logprobs = _legacy_logprobs(state, result["logprobs"]["prompt"], 0, text)
            tail = _legacy_logprobs(state, result["logprobs"]["completion"], len(echo(index)), text)
            logprobs = {k: logprobs[k] + tail[k] for k in logprobs} if entries else tail
        reason = result["finish_reason"] if result is not None else None
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": reason}

    if body.stream:
        return _stream(
            reply,
            sink,
            body,
            opening=lambda index: choice(index, echo(index), None) if body.echo else None,
            piece=lambda index, text: choice(index, text, None),
            finish=lambda result: choice(result["index"], "", result),
        )
    results = await _results(request, sink, jobs)
    choices = [choice(i, echo(i) + r["text"], r) for i, r in enumerate(results)]
    return reply.with_totals(reply.envelope(choices), results)


async def _chat(state: ServerState, request: Request, body: ChatRequest) -> Any:
    _check_fields(state, body, body.n)
    try:
        plan = plan_tools(body, state.tokenizer, state.tool_parser)
        templated_tools = plan is not None and template_reads_tools(state.tokenizer)
        messages = chat_messages(body.messages, plan, templated_tools)
    except ToolError as exc:
        raise ApiError(400, f"{exc.param}: {exc}", param=exc.param) from None
    try:
        text = render_chat(state.tokenizer, messages, tools=plan.tools if templated_tools else None)
    except ConfigError as exc:  # no template, and the plain format needs what the tokenizer cannot write
        raise ApiError(400, f"messages: {exc}", param="messages") from None
    except Exception as exc:  # the chat template refused the conversation (jinja2's TemplateError, or its own raise)
        raise ApiError(400, f"messages: the chat template cannot render them: {exc}", param="messages") from None
    templated = bool(getattr(state.tokenizer, "chat_template", None))
    prompts = [_encode(state, text, "messages", add_special_tokens=not templated)]
    _job(state, body, prompts[0])  # the prompt's checks before the grammar's compile
    grammar = await _grammar(state, body, plan)
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    jobs, sink = _submit(state, body, prompts, logprobs=logprobs, grammar=grammar)
    reply = _Reply(state, f"chatcmpl-{uuid.uuid4().hex}", "chat.completion.chunk", prompts, jobs)
    calls = plan if plan is not None and plan.choice != "none" else None
    if body.stream:
        return _stream(reply, sink, body, *_chat_deltas(calls, body.n))
    results = await _results(request, sink, jobs)
    choices = []
    for i, r in enumerate(results):
        message: dict[str, Any] = {"role": "assistant", "content": r["text"]}
        reason = r["finish_reason"]
        if calls is not None and calls.choice == "auto":
            content, entries = auto_message(calls, r["text"])
            if entries:
                message = {"role": "assistant", "content": content, "tool_calls": entries}
                reason = "tool_calls" if reason == "stop" else reason
        # complete (the grammar ended it: valid JSON), or a named call cut by max_tokens (its partial arguments)
        elif calls is not None and (reason == "stop" or calls.choice == "named"):
            message = {"role": "assistant", "content": None, "tool_calls": tool_calls(calls, r["text"])}
            reason = "tool_calls" if reason == "stop" else reason
        logprobs_out = _chat_logprobs(state, r["logprobs"]["completion"]) if r["logprobs"] is not None else None
        choices.append({"index": i, "message": message, "logprobs": logprobs_out, "finish_reason": reason})
    return reply.with_totals(reply.envelope(choices, "chat.completion"), results)


def _chat_deltas(calls: ToolPlan | None, n: int) -> tuple[ChoiceOf, ChoiceOf, ChoiceOf]:
    """The stream's (opening, piece, finish) choices of a chat reply. Plain text streams as content. A call of a
    named function streams as OpenAI streams one: its id and name first, then its arguments piece by piece. Calls
    of "required" (a JSON list of calls) are sent whole once the answer is complete (or, cut by max_tokens, the
    partial text as content)."""

    def delta(index: int, content: dict[str, Any], reason: str | None = None) -> dict[str, Any]:
        return {"index": index, "delta": content, "finish_reason": reason}

    def call(index: int, entries: list[dict[str, Any]]) -> dict[str, Any]:
        return delta(index, {"tool_calls": [{"index": i, **entry} for i, entry in enumerate(entries)]})

    if calls is None:
        return (
            lambda index: delta(index, {"role": "assistant", "content": ""}),
            lambda index, text: delta(index, {"content": text}),
            lambda result: delta(result["index"], {}, result["finish_reason"]),
        )
    if calls.choice == "auto":
        return _auto_deltas(calls, n, delta)
    if calls.choice == "named":
        ids = [call_id() for _ in range(n)]

        def opening(index: int) -> dict[str, Any]:
            entry = {
                "index": 0,
                "id": ids[index],
                "type": "function",
                "function": {"name": calls.name, "arguments": ""},
            }
            return delta(index, {"role": "assistant", "content": None, "tool_calls": [entry]})

        def finish(result: dict[str, Any]) -> dict[str, Any]:
            reason = "tool_calls" if result["finish_reason"] == "stop" else result["finish_reason"]
            return delta(result["index"], {}, reason)

        return opening, lambda index, text: call(index, [{"function": {"arguments": text}}]), finish

    def finish_required(result: dict[str, Any]) -> dict[str, Any]:
        if result["finish_reason"] != "stop":
            return delta(result["index"], {"content": result["text"]}, result["finish_reason"])
        return {**call(result["index"], tool_calls(calls, result["text"])), "finish_reason": "tool_calls"}

    return (
        lambda index: delta(index, {"role": "assistant", "content": None}),
        lambda index, text: None,
        finish_required,
    )


def _auto_deltas(plan: ToolPlan, n: int, delta: Callable[..., dict[str, Any]]) -> tuple[ChoiceOf, ChoiceOf, ChoiceOf]:
    """The stream of an "auto" reply: text streams as content until the trigger (held back only while it could be
    the trigger's start); then each call as OpenAI streams one: its id and name, then its arguments (strict: as
    they are written, piece by piece; otherwise once its block is complete, and a block that is not a call of a
    known tool as content; toolparsers.CallReader)."""
    assert plan.parser is not None
    readers = [CallReader(plan.parser, plan.names, incremental=plan.strict) for _ in range(n)]
    counts = [0] * n

    def chunks(index: int, events: list[Any]) -> list[dict[str, Any]]:
        out = []
        for event in events:
            if event.text:
                out.append(delta(index, {"content": event.text}))
            name, arguments = event.call or (event.name, event.arguments)
            if name is not None:
                out.append(delta(index, {"tool_calls": [{"index": counts[index], **entry(name, "")}]}))
                counts[index] += 1
            if arguments:
                piece = {"index": counts[index] - 1, "function": {"arguments": arguments}}
                out.append(delta(index, {"tool_calls": [piece]}))
        return out

    def finish(result: dict[str, Any]) -> list[dict[str, Any]]:
        index = result["index"]
        out = chunks(index, readers[index].finish())
        reason = "tool_calls" if counts[index] and result["finish_reason"] == "stop" else result["finish_reason"]
        return [*out, delta(index, {}, reason)]

    return (
        lambda index: delta(index, {"role": "assistant", "content": ""}),
        lambda index, text: chunks(index, readers[index].feed(text)),
        finish,
    )


# ---------------------------------------------------------------------- the ASGI guard: auth, body size and time


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


# ---------------------------------------------------------------------- the app


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
        _check_model(state, name)
        return state.card

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Any:
        return await _completions(state, request, body)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request) -> Any:
        return await _chat(state, request, body)
