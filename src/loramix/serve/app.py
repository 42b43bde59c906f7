"""An OpenAI-compatible HTTP server for a loramix model (FastAPI).

    GET  /health                 {"status": "ok", ...}
    GET  /v1/models              the one model, under its id (and GET /v1/models/{id})
    POST /v1/completions         prompt(s): strings or token ids -> one choice each (stream: server-sent events)
    POST /v1/chat/completions    messages -> reply, with the tokenizer's chat template (or the plain fallback:
                                 "role: content" lines, then "assistant:")

Sampling fields map to `generate`: max_tokens (or max_completion_tokens), temperature (0 = greedy), top_p, stop,
seed, n, presence/frequency_penalty, logit_bias, logprobs (+ echo; chat: top_logprobs). Fields it cannot honour
(tools, response_format other than text, best_of > 1, ...) get a 400 naming them (docs/serving.md).
The extension field `loramix` (OpenAI clients: `extra_body={"loramix": {...}}`) selects the speed mode, top_k,
repetition_penalty, and `return_scalings` ("token", "layer" or "expert"), returned in the response's `loramix` field.
Errors are OpenAI-style JSON: {"error": {"message", "type", "param", "code"}} with a 4xx status.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import ConfigError, LoramixError
from ..generate import resolve_defaults
from ..text import render_chat
from .engine import Engine, Job, TokenLogprob
from .schemas import MAX_CHOICES, ChatRequest, CompletionRequest

__all__ = ["ApiError", "create_app"]


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        type_: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code


def _error(
    status: int, message: str, type_: str = "invalid_request_error", param: str | None = None, code: str | None = None
) -> JSONResponse:
    return JSONResponse(
        status_code=status, content={"error": {"message": message, "type": type_, "param": param, "code": code}}
    )


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
) -> FastAPI:
    """The FastAPI app serving `model` (a LoraMixModel with a tokenizer). One worker thread runs the model."""
    if model.tokenizer is None:
        raise LoramixError("serving needs a tokenizer: the checkpoint has none and its base provides none")
    if api_key is not None and not api_key.strip():
        raise ConfigError(
            "api_key is empty, which would turn authentication off; give a non-empty key, or none to serve without one"
        )
    tokenizer = model.tokenizer
    context = resolve_defaults(model).context
    prompt_limit = max_prompt_tokens or (context - 1 if context else 4096)
    text_config = model.model.config.get_text_config() if hasattr(model.model.config, "get_text_config") else None
    vocab_size = getattr(text_config or model.model.config, "vocab_size", None)
    special_ids = set(getattr(tokenizer, "all_special_ids", [])) - {getattr(tokenizer, "unk_token_id", None)}
    engine = Engine(model, batching=batching, max_batch=max_batch, compile=compile)
    created = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        engine.close()

    app = FastAPI(title="loramix", version="1", docs_url=None, redoc_url=None, lifespan=lifespan)
    app.state.engine = engine

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return _error(exc.status, exc.message, exc.type, exc.param, exc.code)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        if first.get("type") == "json_invalid":
            return _error(400, "the request body is not valid JSON")
        location = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        message = first.get("msg", "invalid request")
        return _error(400, f"{location}: {message}" if location else message, param=location or None)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error(
            exc.status_code,
            str(exc.detail),
            type_="not_found_error" if exc.status_code == 404 else "invalid_request_error",
        )

    @app.exception_handler(LoramixError)
    async def _loramix(_: Request, exc: LoramixError) -> JSONResponse:
        return _error(400, str(exc))

    @app.middleware("http")
    async def _auth(request: Request, call_next: Any) -> Any:
        if api_key is not None and request.url.path.startswith("/v1/"):
            header = request.headers.get("authorization", "")
            token = header[7:] if header.lower().startswith("bearer ") else ""
            if not secrets.compare_digest(token.encode(), api_key.encode()):
                return _error(
                    401,
                    "invalid or missing API key (Authorization: Bearer ...)",
                    type_="authentication_error",
                    code="invalid_api_key",
                )
        return await call_next(request)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": model_id, "experts": model.expert_names, "queued": engine.queue.qsize()}

    card = {"id": model_id, "object": "model", "created": created, "owned_by": "loramix"}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [card]}

    @app.get("/v1/models/{name:path}")
    async def model_card(name: str) -> dict[str, Any]:
        _check_model(name)
        return card

    def _check_model(name: str) -> None:
        if name != model_id:
            raise ApiError(
                404,
                f"model '{name}' does not exist; this server has '{model_id}'",
                param="model",
                code="model_not_found",
            )

    def _check_fields(body: CompletionRequest | ChatRequest, choices: int) -> None:
        _check_model(body.model)
        refused = body.unsupported()
        if refused is not None:
            raise ApiError(400, f"{refused[0]}: {refused[1]}", param=refused[0], code="unsupported_parameter")
        if choices > MAX_CHOICES:
            raise ApiError(400, f"prompts x n = {choices} choices; at most {MAX_CHOICES} per request", param="n")
        if body.stream and body.logprobs:
            raise ApiError(400, "logprobs: not supported with stream=true", param="logprobs")
        for key in body.logit_bias or {}:
            if vocab_size is not None and int(key) >= vocab_size:
                raise ApiError(
                    400, f"logit_bias: token id {key} is not below the vocabulary size {vocab_size}", param="logit_bias"
                )

    def _encode(text: str, param: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of a text; a character the tokenizer has no token for is an error, not a silent pad or unk."""
        if not getattr(tokenizer, "is_fast", False):
            return tokenizer(text, add_special_tokens=add_special_tokens).input_ids
        enc = tokenizer(text, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
        for token, (start, end) in zip(enc.input_ids, enc.offset_mapping):
            if token in special_ids and start < end and text[start:end] != tokenizer.convert_ids_to_tokens(token):
                char = text[start]
                raise ApiError(
                    400,
                    f"{param}: the character {char!r} (U+{ord(char):04X}) at position {start} is not in the "
                    "tokenizer's vocabulary",
                    param=param,
                )
        return list(enc.input_ids)

    def _check_ids(ids: list[int]) -> list[int]:
        if vocab_size is not None and any(i >= vocab_size for i in ids):
            bad = next(i for i in ids if i >= vocab_size)
            raise ApiError(400, f"prompt: token id {bad} is not below the vocabulary size {vocab_size}", param="prompt")
        return ids

    def _job(body: CompletionRequest | ChatRequest, ids: list[int], emit: Any, group: object, **extra: Any) -> Job:
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        max_tokens = default_max_tokens if max_tokens is None else max_tokens
        if len(ids) == 0:
            raise ApiError(400, "the prompt is empty", param="prompt")
        if len(ids) > prompt_limit:
            raise ApiError(
                400,
                f"the prompt has {len(ids)} tokens; this server accepts at most {prompt_limit}",
                param="prompt",
                code="context_length_exceeded",
            )
        if max_tokens > max_tokens_limit:
            raise ApiError(
                400, f"max_tokens={max_tokens} is above this server's limit of {max_tokens_limit}", param="max_tokens"
            )
        if context is not None and len(ids) + max_tokens > context:
            raise ApiError(
                400,
                f"prompt ({len(ids)} tokens) + max_tokens ({max_tokens}) exceeds the model's context "
                f"of {context} tokens",
                param="max_tokens",
                code="context_length_exceeded",
            )
        if body.loramix.mode == "truncated" and model.config.scaling_layer is None:
            raise ApiError(
                400, "mode 'truncated' needs a gate trained on a truncated scaling pass", param="loramix.mode"
            )
        return Job(
            ids=ids,
            max_tokens=max_tokens,
            emit=emit,
            mode=body.loramix.mode,
            do_sample=body.temperature > 0,
            temperature=body.temperature or 1.0,
            top_p=body.top_p,
            top_k=body.loramix.top_k,
            repetition_penalty=body.loramix.repetition_penalty,
            seed=body.seed,
            stops=body.stop or [],
            return_scalings=body.loramix.return_scalings,
            stream=body.stream,
            presence_penalty=body.presence_penalty,
            frequency_penalty=body.frequency_penalty,
            logit_bias={int(k): v for k, v in (body.logit_bias or {}).items()},
            group=group,
            **extra,
        )

    def _submit(jobs_for: Any, prompts: list[list[int]], n: int) -> tuple[list[Job], asyncio.Queue]:
        """Make every choice's job (prompt i, sample j -> choice i * n + j), then submit them as one group."""
        loop = asyncio.get_running_loop()
        sink: asyncio.Queue = asyncio.Queue()
        group = object()
        jobs = []
        for i, ids in enumerate(prompts):
            for j in range(n):
                index = i * n + j

                def emit(message: dict[str, Any], index: int = index) -> None:
                    loop.call_soon_threadsafe(sink.put_nowait, {**message, "index": index})

                jobs.append(jobs_for(ids, emit, group))
        engine.submit_group(jobs)
        return jobs, sink

    async def _results(sink: asyncio.Queue, count: int) -> list[dict[str, Any]]:
        results: list[dict[str, Any] | None] = [None] * count
        while any(r is None for r in results):
            message = await sink.get()
            if message["type"] == "done":
                results[message["index"]] = message
            elif message["type"] == "error":
                raise ApiError(message.get("status", 500), message["message"], type_="server_error")
        return results  # type: ignore[return-value]

    def _extension(job: Job, results: list[dict[str, Any]]) -> dict[str, Any]:
        out = {"mode": job.mode, "scaling_layer": model.config.scaling_layer, "experts": model.expert_names}
        if job.return_scalings != "none":
            scalings = [r["scalings"] for r in results]
            out["scalings"] = scalings[0] if len(scalings) == 1 else scalings  # one per choice when several
            out["scalings_kind"] = job.return_scalings
            if job.return_scalings in ("token", "layer"):
                out["layers"] = model.layer_names
        return out

    def _usage(prompts: list[list[int]], results: list[dict[str, Any]]) -> dict[str, int]:
        prompt = sum(len(ids) for ids in prompts)
        completion = sum(r["completion_tokens"] for r in results)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def _with_totals(
        body: dict[str, Any], prompts: list[list[int]], jobs: list[Job], results: list[dict[str, Any]]
    ) -> dict[str, Any]:
        """The response (or the stream's usage chunk) with its usage and the loramix extension."""
        body["usage"] = _usage(prompts, results)
        body["loramix"] = _extension(jobs[0], results)
        return body

    def _last_of_choice(
        chunk: dict[str, Any], jobs: list[Job], results: list[dict[str, Any]] | None
    ) -> dict[str, Any]:
        """A choice's finish chunk; the last one of the stream (`results` given) carries the loramix extension."""
        if results is not None:
            chunk["loramix"] = _extension(jobs[0], results)
        return chunk

    def _piece(token: int) -> str:
        return tokenizer.decode([token], skip_special_tokens=False)

    def _legacy_logprobs(entries: list[TokenLogprob], start: int) -> dict[str, list[Any]]:
        """OpenAI's legacy completions object; text_offset counts characters of the choice's text from `start`."""
        out: dict[str, list[Any]] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for e in entries:
            piece = _piece(e.token)
            out["tokens"].append(piece)
            out["token_logprobs"].append(e.logprob)
            if e.logprob is None:
                out["top_logprobs"].append(None)
            else:  # the `logprobs` most likely tokens, and the chosen one
                top = {_piece(t): lp for t, lp in e.top}
                top.setdefault(piece, e.logprob)
                out["top_logprobs"].append(top)
            out["text_offset"].append(start)
            start += len(piece)
        return out

    def _chat_logprobs(entries: list[TokenLogprob]) -> dict[str, Any]:
        def item(token: int, logprob: float) -> dict[str, Any]:
            piece = _piece(token)
            return {"token": piece, "logprob": logprob, "bytes": list(piece.encode("utf-8"))}

        return {
            "content": [
                {**item(e.token, e.logprob), "top_logprobs": [item(t, lp) for t, lp in e.top]} for e in entries
            ],
            "refusal": None,
        }

    async def _sse(
        sink: asyncio.Queue, count: int, opening: Any, piece: Any, finish: Any, closing: Any, usage: bool
    ) -> AsyncIterator[bytes]:
        """Server-sent events for `count` choices: opening chunks, text pieces, one finish chunk per choice (the
        last one carries the loramix extension), then, when asked (stream_options.include_usage), a chunk with no
        choices carrying usage."""

        def event(data: dict[str, Any]) -> bytes:
            return f"data: {json.dumps(data)}\n\n".encode()

        for index in range(count):
            first = opening(index)
            if first is not None:
                yield event(first)
        results: list[dict[str, Any] | None] = [None] * count
        while any(r is None for r in results):
            message = await sink.get()
            if message["type"] == "piece":
                yield event(piece(message["index"], message["text"]))
            elif message["type"] == "done":
                results[message["index"]] = message
                last = all(r is not None for r in results)
                yield event(finish(message, results if last and not usage else None))
            else:
                error = {"error": {"message": message["message"], "type": "server_error", "param": None, "code": None}}
                yield event(error)
                yield b"data: [DONE]\n\n"
                return
        if usage:
            yield event(closing(results))
        yield b"data: [DONE]\n\n"

    def envelope(rid: str, kind: str, now: int, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {"id": rid, "object": kind, "created": now, "model": model_id, "choices": choices}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest) -> Any:
        items = body.prompts
        _check_fields(body, len(items) * body.n)
        prompts = [_encode(p, "prompt") if isinstance(p, str) else _check_ids(p) for p in items]
        texts = [p if isinstance(p, str) else tokenizer.decode(ids) for p, ids in zip(items, prompts)]
        extra = {"logprobs": body.logprobs, "prompt_logprobs": body.echo and body.logprobs is not None}
        jobs, sink = _submit(lambda ids, emit, group: _job(body, ids, emit, group, **extra), prompts, body.n)
        rid, now, kind = f"cmpl-{uuid.uuid4().hex}", int(time.time()), "text_completion"

        def echo(index: int) -> str:
            return texts[index // body.n] if body.echo else ""

        def choice(index: int, text: str, result: dict[str, Any] | None) -> dict[str, Any]:
            logprobs = None
            if result is not None and result["logprobs"] is not None:
                entries = result["logprobs"]["prompt"] + result["logprobs"]["completion"]
                logprobs = _legacy_logprobs(result["logprobs"]["prompt"], 0)
                tail = _legacy_logprobs(result["logprobs"]["completion"], len(echo(index)))
                logprobs = {k: logprobs[k] + tail[k] for k in logprobs} if entries else tail
            reason = result["finish_reason"] if result is not None else None
            return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": reason}

        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)

            def opening(index: int) -> dict[str, Any] | None:
                return envelope(rid, kind, now, [choice(index, echo(index), None)]) if body.echo else None

            def piece(index: int, text: str) -> dict[str, Any]:
                return envelope(rid, kind, now, [choice(index, text, None)])

            def finish(result: dict[str, Any], results: list[dict[str, Any]] | None) -> dict[str, Any]:
                return _last_of_choice(envelope(rid, kind, now, [choice(result["index"], "", result)]), jobs, results)

            def closing(results: list[dict[str, Any]]) -> dict[str, Any]:
                return _with_totals(envelope(rid, kind, now, []), prompts, jobs, results)

            events = _sse(sink, len(jobs), opening, piece, finish, closing, include_usage)
            return StreamingResponse(events, media_type="text/event-stream")
        results = await _results(sink, len(jobs))
        choices = [choice(i, echo(i) + r["text"], r) for i, r in enumerate(results)]
        return _with_totals(envelope(rid, kind, now, choices), prompts, jobs, results)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest) -> Any:
        _check_fields(body, body.n)
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text} for m in body.messages]
        text = render_chat(tokenizer, messages)
        templated = bool(getattr(tokenizer, "chat_template", None))
        prompts = [_encode(text, "messages", add_special_tokens=not templated)]
        extra = {"logprobs": (body.top_logprobs or 0) if body.logprobs else None}
        jobs, sink = _submit(lambda ids, emit, group: _job(body, ids, emit, group, **extra), prompts, body.n)
        rid, now, kind = f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), "chat.completion.chunk"
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)

            def opening(index: int) -> dict[str, Any]:
                delta = {"role": "assistant", "content": ""}
                return envelope(rid, kind, now, [{"index": index, "delta": delta, "finish_reason": None}])

            def piece(index: int, text: str) -> dict[str, Any]:
                return envelope(rid, kind, now, [{"index": index, "delta": {"content": text}, "finish_reason": None}])

            def finish(result: dict[str, Any], results: list[dict[str, Any]] | None) -> dict[str, Any]:
                choice = {"index": result["index"], "delta": {}, "finish_reason": result["finish_reason"]}
                return _last_of_choice(envelope(rid, kind, now, [choice]), jobs, results)

            def closing(results: list[dict[str, Any]]) -> dict[str, Any]:
                return _with_totals(envelope(rid, kind, now, []), prompts, jobs, results)

            events = _sse(sink, len(jobs), opening, piece, finish, closing, include_usage)
            return StreamingResponse(events, media_type="text/event-stream")
        results = await _results(sink, len(jobs))
        choices = [
            {
                "index": i,
                "message": {"role": "assistant", "content": r["text"]},
                "logprobs": _chat_logprobs(r["logprobs"]["completion"]) if r["logprobs"] is not None else None,
                "finish_reason": r["finish_reason"],
            }
            for i, r in enumerate(results)
        ]
        return _with_totals(envelope(rid, "chat.completion", now, choices), prompts, jobs, results)

    return app
