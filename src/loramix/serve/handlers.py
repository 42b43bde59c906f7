"""The two generating endpoints, /v1/completions and /v1/chat/completions: a request's checks (each a 400 naming
its field), its jobs for the engine, its grammar (structured output, tools), and its answer, shaped by openai.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import threading
import time
import uuid
from typing import Any

from fastapi import Request

from ..contracts import MixedModel
from ..errors import ConfigError
from ..grammar import ANY_OBJECT, OVER_BUDGET, Grammar, GrammarError
from ..sampling import SamplingSettings
from ..text import render_chat
from .engine import Job, QueueFull
from .events import Done, Event, Failed
from .openai import ApiError, Reply, chat_deltas, chat_logprobs, legacy_logprobs, stream_response
from .schemas import MAX_CHOICES, ChatRequest, CompletionRequest
from .state import ServerState
from .tools import ToolError, ToolPlan, auto_message, chat_messages, plan_tools, template_reads_tools, tool_calls

__all__ = ["chat", "check_model", "completions"]


RETRY_AFTER_S = 1
"""What a 503 (queue full) tells the client to wait, in seconds."""


def check_model(state: ServerState, name: str) -> None:
    if name != state.model_id:
        raise ApiError(
            404,
            f"model '{name}' does not exist; this server has '{state.model_id}'",
            param="model",
            code="model_not_found",
        )


def _check_fields(state: ServerState, body: CompletionRequest | ChatRequest, choices: int) -> None:
    check_model(state, body.model)
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


def make_job(state: ServerState, body: CompletionRequest | ChatRequest, ids: list[int], **extra: Any) -> Job:
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
        include_stop_str_in_output=body.include_stop_str_in_output,
        ignore_eos=body.ignore_eos,
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


def _warm(model: MixedModel, schema: Any, budget: float | None) -> Grammar:
    """The grammar compiled with its first mask (`Grammar.json` computes it: the costly part of a hard schema), and
    the budget the decoder grants its masks."""
    return dataclasses.replace(Grammar.for_model(model, schema), budget=budget)


async def _compile(model: MixedModel, schema: Any, budget: float | None) -> Grammar:
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
        raise ApiError(400, str(exc), param=_SAMPLING_PARAMS.get(exc.field, exc.field)) from None


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

            def emit(event: Event) -> None:
                loop.call_soon_threadsafe(sink.put_nowait, event)

            job = make_job(state, body, ids, **extra)
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


async def _results(request: Request, sink: asyncio.Queue, jobs: list[Job]) -> list[Done]:
    """Every choice's final event, cancelling the jobs if the client disconnects while it waits."""
    watcher = asyncio.create_task(_watch_disconnect(request, jobs))
    results: list[Done | None] = [None] * len(jobs)
    try:
        while any(r is None for r in results):
            event = await sink.get()
            if isinstance(event, Done):
                results[event.index] = event
            elif isinstance(event, Failed):
                kind = "server_error" if event.status >= 500 else "invalid_request_error"
                raise ApiError(event.status, event.message, type_=kind, param=event.param)
    finally:
        watcher.cancel()
        _cancel(jobs)  # no-op for finished jobs; frees the others if this request failed or was cancelled
    return results  # type: ignore[return-value]


async def completions(state: ServerState, request: Request, body: CompletionRequest) -> Any:
    items = body.prompts
    _check_fields(state, body, len(items) * body.n)
    for i, p in enumerate(items):  # before the tokenizer adds its BOS to it
        if isinstance(p, str) and not p:
            where = "prompt" if isinstance(body.prompt, str) else f"prompt[{i}]"
            raise ApiError(400, f"{where}: the prompt is empty", param="prompt")
    prompts = [_encode(state, p, "prompt") if isinstance(p, str) else _check_ids(state, p) for p in items]
    texts = [p if isinstance(p, str) else state.tokenizer.decode(ids) for p, ids in zip(items, prompts)]
    for ids in prompts:  # the prompts' checks before the grammar's compile
        make_job(state, body, ids)
    grammar = await _grammar(state, body)
    extra = {"logprobs": body.logprobs, "prompt_logprobs": body.echo and body.logprobs is not None, "grammar": grammar}
    jobs, sink = _submit(state, body, prompts, **extra)
    reply = Reply(state, f"cmpl-{uuid.uuid4().hex}", "text_completion", prompts, jobs)

    def echo(index: int) -> str:
        return texts[index // body.n] if body.echo else ""

    def choice(index: int, text: str, result: Done | None) -> dict[str, Any]:
        logprobs = None
        if result is not None and result.logprobs is not None:
            entries = result.logprobs.prompt + result.logprobs.completion
            logprobs = legacy_logprobs(state, result.logprobs.prompt, 0, text)
            tail = legacy_logprobs(state, result.logprobs.completion, len(echo(index)), text)
            logprobs = {k: logprobs[k] + tail[k] for k in logprobs} if entries else tail
        reason = result.finish_reason if result is not None else None
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": reason}

    if body.stream:
        return stream_response(
            reply,
            sink,
            body,
            opening=lambda index: choice(index, echo(index), None) if body.echo else None,
            piece=lambda index, text: choice(index, text, None),
            finish=lambda result: choice(result.index, "", result),
        )
    results = await _results(request, sink, jobs)
    choices = [choice(i, echo(i) + r.text, r) for i, r in enumerate(results)]
    return reply.body(choices, results)


async def chat(state: ServerState, request: Request, body: ChatRequest) -> Any:
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
    make_job(state, body, prompts[0])  # the prompt's checks before the grammar's compile
    grammar = await _grammar(state, body, plan)
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    jobs, sink = _submit(state, body, prompts, logprobs=logprobs, grammar=grammar)
    reply = Reply(state, f"chatcmpl-{uuid.uuid4().hex}", "chat.completion.chunk", prompts, jobs)
    calls = plan if plan is not None and plan.choice != "none" else None
    if body.stream:
        return stream_response(reply, sink, body, *chat_deltas(calls, body.n))
    results = await _results(request, sink, jobs)
    choices = []
    for i, r in enumerate(results):
        message: dict[str, Any] = {"role": "assistant", "content": r.text}
        reason = r.finish_reason
        if calls is not None and calls.choice == "auto":
            content, entries = auto_message(calls, r.text)
            if entries:
                message = {"role": "assistant", "content": content, "tool_calls": entries}
                reason = "tool_calls" if reason == "stop" else reason
        # complete (the grammar ended it: valid JSON), or a named call cut by max_tokens (its partial arguments)
        elif calls is not None and (reason == "stop" or calls.choice == "named"):
            message = {"role": "assistant", "content": None, "tool_calls": tool_calls(calls, r.text)}
            reason = "tool_calls" if reason == "stop" else reason
        logprobs_out = chat_logprobs(state, r.logprobs.completion) if r.logprobs is not None else None
        choices.append({"index": i, "message": message, "logprobs": logprobs_out, "finish_reason": reason})
    return reply.body(choices, results)
