"""An OpenAI-compatible HTTP server for a loramix model (FastAPI).

    GET  /health                 {"status": "ok", ...}
    GET  /v1/models              the one model, under its id
    POST /v1/completions         prompt -> text (stream: server-sent events)
    POST /v1/chat/completions    messages -> reply, with the tokenizer's chat template (or the plain fallback:
                                 "role: content" lines, then "assistant:")

Sampling fields map to `generate`: max_tokens (or max_completion_tokens), temperature (0 = greedy), top_p, stop,
seed. The extension field `loramix` (OpenAI clients: `extra_body={"loramix": {...}}`) selects the speed mode, top_k,
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
from .engine import Engine, Job
from .schemas import ChatRequest, CompletionRequest

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

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {
            "object": "list",
            "data": [{"id": model_id, "object": "model", "created": created, "owned_by": "loramix"}],
        }

    def _check_model(name: str) -> None:
        if name != model_id:
            raise ApiError(
                404,
                f"model '{name}' does not exist; this server has '{model_id}'",
                param="model",
                code="model_not_found",
            )

    def _job(
        body: CompletionRequest | ChatRequest, ids: list[int], loop: asyncio.AbstractEventLoop, sink: asyncio.Queue
    ) -> Job:
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

        def emit(message: dict[str, Any]) -> None:
            loop.call_soon_threadsafe(sink.put_nowait, message)

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
        )

    async def _result(sink: asyncio.Queue) -> dict[str, Any]:
        while True:
            message = await sink.get()
            if message["type"] == "done":
                return message
            if message["type"] == "error":
                raise ApiError(message.get("status", 500), message["message"], type_="server_error")

    def _extension(job: Job, result: dict[str, Any]) -> dict[str, Any]:
        out = {"mode": job.mode, "scaling_layer": model.config.scaling_layer, "experts": model.expert_names}
        if job.return_scalings != "none":
            out["scalings"] = result["scalings"]
            out["scalings_kind"] = job.return_scalings
            if job.return_scalings in ("token", "layer"):
                out["layers"] = model.layer_names
        return out

    def _usage(prompt: int, completion: int) -> dict[str, int]:
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    async def _sse(sink: asyncio.Queue, job: Job, make_chunk: Any, final_chunk: Any) -> AsyncIterator[bytes]:
        first = make_chunk(None)
        if first is not None:
            yield f"data: {json.dumps(first)}\n\n".encode()
        while True:
            message = await sink.get()
            if message["type"] == "piece":
                yield f"data: {json.dumps(make_chunk(message['text']))}\n\n".encode()
            elif message["type"] == "done":
                yield f"data: {json.dumps(final_chunk(message))}\n\n".encode()
                break
            else:
                error = {"error": {"message": message["message"], "type": "server_error", "param": None, "code": None}}
                yield f"data: {json.dumps(error)}\n\n".encode()
                break
        yield b"data: [DONE]\n\n"

    def envelope(
        rid: str, kind: str, created: int, choices: list[dict[str, Any]], ids: list[int], job: Any = None,
        result: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """One OpenAI response object (or stream chunk); the last one carries usage and the loramix extension."""
        body: dict[str, Any] = {"id": rid, "object": kind, "created": created, "model": model_id, "choices": choices}
        if result is not None:
            body["usage"] = _usage(len(ids), result["completion_tokens"])
            body["loramix"] = _extension(job, result)
        return body

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest) -> Any:
        _check_model(body.model)
        prompt = body.prompt if isinstance(body.prompt, str) else None
        if prompt is None:
            if len(body.prompt) != 1:
                raise ApiError(400, "one prompt per request is supported (got a list of several)", param="prompt")
            prompt = body.prompt[0]
        ids = tokenizer(prompt).input_ids
        loop = asyncio.get_running_loop()
        sink: asyncio.Queue = asyncio.Queue()
        job = _job(body, ids, loop, sink)
        engine.submit(job)
        rid, now = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        echo = prompt if body.echo else ""

        def choice(text: str, finish_reason: str | None) -> list[dict[str, Any]]:
            return [{"index": 0, "text": text, "finish_reason": finish_reason, "logprobs": None}]

        if body.stream:

            def chunk(text: str | None) -> dict[str, Any] | None:
                if text is None:  # the opening chunk: the echoed prompt, if any
                    return envelope(rid, "text_completion", now, choice(echo, None), ids) if echo else None
                return envelope(rid, "text_completion", now, choice(text, None), ids)

            def final(result: dict[str, Any]) -> dict[str, Any]:
                return envelope(rid, "text_completion", now, choice("", result["finish_reason"]), ids, job, result)

            return StreamingResponse(_sse(sink, job, chunk, final), media_type="text/event-stream")
        result = await _result(sink)
        return envelope(
            rid, "text_completion", now, choice(echo + result["text"], result["finish_reason"]), ids, job, result
        )

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest) -> Any:
        _check_model(body.model)
        messages = [
            {"role": "system" if m.role == "developer" else m.role, "content": m.content} for m in body.messages
        ]
        text = render_chat(tokenizer, messages)
        templated = bool(getattr(tokenizer, "chat_template", None))
        ids = tokenizer(text, add_special_tokens=not templated).input_ids
        loop = asyncio.get_running_loop()
        sink: asyncio.Queue = asyncio.Queue()
        job = _job(body, ids, loop, sink)
        engine.submit(job)
        rid, now = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if body.stream:

            def chunk(piece: str | None) -> dict[str, Any]:
                delta = {"role": "assistant", "content": ""} if piece is None else {"content": piece}
                choices = [{"index": 0, "delta": delta, "finish_reason": None}]
                return envelope(rid, "chat.completion.chunk", now, choices, ids)

            def final(result: dict[str, Any]) -> dict[str, Any]:
                choices = [{"index": 0, "delta": {}, "finish_reason": result["finish_reason"]}]
                return envelope(rid, "chat.completion.chunk", now, choices, ids, job, result)

            return StreamingResponse(_sse(sink, job, chunk, final), media_type="text/event-stream")
        result = await _result(sink)
        message = {"role": "assistant", "content": result["text"]}
        choices = [{"index": 0, "message": message, "finish_reason": result["finish_reason"]}]
        return envelope(rid, "chat.completion", now, choices, ids, job, result)

    return app
