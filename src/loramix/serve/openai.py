"""The OpenAI shaping, in one module: errors as OpenAI answers them, the response envelopes (id, object, created,
model, choices, usage, the `loramix` extension), log probabilities in both of OpenAI's forms, and server-sent events
with the deltas of text and tool calls. It reads the engine's events (events.py) and knows nothing of the routes.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi.responses import JSONResponse, StreamingResponse

from ..grammar import token_bytes
from .engine import Job
from .events import Done, Piece, TokenLogprob
from .responses import ChatCompletion, Completion, ErrorBody, ErrorResponse, Usage
from .state import ServerState
from .toolparsers import CallReader
from .tools import ToolPlan, call_id, entry, tool_calls

__all__ = [
    "ApiError",
    "ChoiceOf",
    "Reply",
    "chat_deltas",
    "chat_logprobs",
    "legacy_logprobs",
    "stream_response",
]


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
        body = ErrorResponse(error=ErrorBody(message=message, type=self.type, param=self.param, code=self.code))
        return JSONResponse(status_code=self.status, content=body.model_dump(), headers=self.headers)


def token_text(state: ServerState, token: int) -> str:
    return state.tokenizer.decode([token], skip_special_tokens=False)


def token_key(state: ServerState, token: int) -> str:
    """A token as the legacy logprobs name it: its text, or, for a token that is part of a character (its text
    alone is '\ufffd'), `bytes:` and its bytes escaped (as OpenAI writes them), so that no two tokens share a key."""
    piece = token_text(state, token)
    if "\ufffd" not in piece:
        return piece
    raw = token_bytes(state.model, token)
    return "bytes:" + "".join(f"\\x{b:02x}" for b in raw) if raw else piece


def legacy_logprobs(
    state: ServerState, entries: list[TokenLogprob], start: int, text: str | None = None
) -> dict[str, list[Any]]:
    """OpenAI's legacy completions object; text_offset counts characters of the choice's text from `start`. With
    the choice's `text`, a special token that is not in it (the BOS a tokenizer adds, a generated pad) takes no
    room: every offset points at its token in the text."""
    out: dict[str, list[Any]] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for e in entries:
        piece, key = token_text(state, e.token), token_key(state, e.token)
        out["tokens"].append(key)
        out["token_logprobs"].append(e.logprob)
        if e.logprob is None:
            out["top_logprobs"].append(None)
        else:  # the `logprobs` most likely tokens, and the chosen one
            top: dict[str, float] = {}
            for t, lp in e.top:
                name = token_key(state, t)
                top[name if name not in top else f"{name} (token {t})"] = lp  # distinct tokens, distinct keys
            if e.token not in {t for t, _ in e.top}:
                top[key if key not in top else f"{key} (token {e.token})"] = e.logprob
            out["top_logprobs"].append(top)
        out["text_offset"].append(start)
        if text is not None and e.token in state.special_ids and not text.startswith(piece, start):
            continue  # added by the tokenizer: not in the text
        start += len(piece)
    return out


def chat_logprobs(state: ServerState, entries: list[TokenLogprob]) -> dict[str, Any]:
    def item(token: int, logprob: float) -> dict[str, Any]:
        piece = token_text(state, token)
        return {"token": piece, "logprob": logprob, "bytes": list(piece.encode("utf-8"))}

    return {
        "content": [{**item(e.token, e.logprob), "top_logprobs": [item(t, lp) for t, lp in e.top]} for e in entries],
        "refusal": None,
    }


@dataclass
class Reply:
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

    def extension(self, results: list[Done]) -> dict[str, Any]:
        job, model = self.jobs[0], self.state.model
        out = {"mode": job.mode, "scaling_layer": model.config.scaling_layer, "experts": model.expert_names}
        if job.return_scalings != "none":
            scalings = [r.scalings for r in results]
            out["scalings"] = scalings[0] if len(scalings) == 1 else scalings  # one per choice when several
            out["scalings_kind"] = job.return_scalings
            if job.return_scalings in ("token", "layer"):
                out["layers"] = model.layer_names
        return out

    def usage(self, results: list[Done]) -> Usage:
        prompt = sum(len(ids) for ids in self.prompts)
        completion = sum(r.completion_tokens for r in results)
        return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)

    def with_totals(self, body: dict[str, Any], results: list[Done]) -> dict[str, Any]:
        """The stream's usage chunk: its usage and the loramix extension."""
        body["usage"] = self.usage(results).model_dump()
        body["loramix"] = self.extension(results)
        return body

    def body(self, choices: list[dict[str, Any]], results: list[Done]) -> dict[str, Any]:
        """The whole (non-streamed) response, checked against its model (responses.py): a `Completion` or a
        `ChatCompletion`; fields not set (a text message's tool_calls) are left out, as OpenAI does."""
        model = Completion if self.kind == "text_completion" else ChatCompletion
        kind = "text_completion" if model is Completion else "chat.completion"
        response = model.model_validate(
            {**self.envelope(choices, kind), "usage": self.usage(results), "loramix": self.extension(results)}
        )
        return response.model_dump(mode="json", exclude_unset=True)


ChoiceOf = Callable[..., "dict[str, Any] | None"]


async def sse(
    reply: Reply,
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

    def event_line(data: dict[str, Any]) -> bytes:
        return f"data: {json.dumps(data)}\n\n".encode()

    count = len(reply.jobs)
    try:
        for index in range(count):
            first = opening(index)
            if first is not None:
                yield event_line(reply.envelope([first]))
        results: list[Done | None] = [None] * count
        while any(r is None for r in results):
            event = await sink.get()
            if isinstance(event, Piece):
                for choice in listed(piece(event.index, event.text)):
                    yield event_line(reply.envelope([choice]))
            elif isinstance(event, Done):
                results[event.index] = event
                *before, last = listed(finish(event))
                for choice in before:
                    yield event_line(reply.envelope([choice]))
                chunk = reply.envelope([last])
                if all(r is not None for r in results) and not usage:
                    chunk["loramix"] = reply.extension(results)  # type: ignore[arg-type]
                yield event_line(chunk)
            else:
                error = {"error": {"message": event.message, "type": "server_error", "param": None, "code": None}}
                yield event_line(error)
                yield b"data: [DONE]\n\n"
                return
        if usage:
            yield event_line(reply.with_totals(reply.envelope([]), results))  # type: ignore[arg-type]
        yield b"data: [DONE]\n\n"
    finally:
        for job in reply.jobs:  # the client is gone, or the answer is complete: the engine frees the jobs' rows
            job.cancelled = True


def listed(choice: Any) -> list[dict[str, Any]]:
    """A choice function's answer as a list of choice objects (it may give None, one, or several)."""
    return [] if choice is None else choice if isinstance(choice, list) else [choice]


def stream_response(reply: Reply, sink: asyncio.Queue, body: Any, opening: ChoiceOf, piece: ChoiceOf, finish: ChoiceOf):
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    events = sse(reply, sink, opening, piece, finish, include_usage)
    return StreamingResponse(events, media_type="text/event-stream")


def chat_deltas(calls: ToolPlan | None, n: int) -> tuple[ChoiceOf, ChoiceOf, ChoiceOf]:
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
            lambda result: delta(result.index, {}, result.finish_reason),
        )
    if calls.choice == "auto":
        return auto_deltas(calls, n, delta)
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

        def finish(result: Done) -> dict[str, Any]:
            reason = "tool_calls" if result.finish_reason == "stop" else result.finish_reason
            return delta(result.index, {}, reason)

        return opening, lambda index, text: call(index, [{"function": {"arguments": text}}]), finish

    def finish_required(result: Done) -> dict[str, Any]:
        if result.finish_reason != "stop":
            return delta(result.index, {"content": result.text}, result.finish_reason)
        return {**call(result.index, tool_calls(calls, result.text)), "finish_reason": "tool_calls"}

    return (
        lambda index: delta(index, {"role": "assistant", "content": None}),
        lambda index, text: None,
        finish_required,
    )


def auto_deltas(plan: ToolPlan, n: int, delta: Callable[..., dict[str, Any]]) -> tuple[ChoiceOf, ChoiceOf, ChoiceOf]:
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

    def finish(result: Done) -> list[dict[str, Any]]:
        index = result.index
        out = chunks(index, readers[index].finish())
        reason = "tool_calls" if counts[index] and result.finish_reason == "stop" else result.finish_reason
        return [*out, delta(index, {}, reason)]

    return (
        lambda index: delta(index, {"role": "assistant", "content": ""}),
        lambda index, text: chunks(index, readers[index].feed(text)),
        finish,
    )
