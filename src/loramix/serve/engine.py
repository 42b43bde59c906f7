"""The generation engine behind the server: one worker thread owns the model; requests wait in a queue.

A model is not safe to run from several threads at once (its `MixState` holds the scalings of the current pass), so
every request goes through one worker. When several requests with the same generation settings are waiting, the
worker runs them together as one left-padded batch (`batching=True`), streaming each row's text to its own request.
Stop strings are applied on the text; streamed text never shows a stop string or a part of one.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..generate import Generation, resolve_defaults
from ..text import IncrementalDecoder

logger = logging.getLogger(__name__)

__all__ = ["Engine", "Job"]


@dataclass
class Job:
    """One request: prompt token ids, settings, and where to send results (called from the worker thread).

    emit receives {"type": "piece", "text": str} while streaming, then {"type": "done", "text", "finish_reason",
    "completion_tokens", "scalings"}, or {"type": "error", "message", "status"}.
    """

    ids: list[int]
    max_tokens: int
    emit: Callable[[dict[str, Any]], None]
    mode: str = "granular"
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stops: list[str] = field(default_factory=list)
    return_scalings: str = "none"
    stream: bool = False

    @property
    def key(self) -> tuple[Any, ...]:
        """Requests with equal keys can share a batch (a seeded request runs alone: its own random stream)."""
        settings = (self.mode, self.do_sample, self.temperature, self.top_p, self.top_k, self.repetition_penalty)
        return settings if self.seed is None else (*settings, "seed", id(self))


def _held_back(text: str, stops: list[str]) -> int:
    """How many trailing characters of `text` could be the start of a stop string (not safe to stream yet)."""
    keep = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:k]):
                keep = max(keep, k)
                break
    return keep


class _Row:
    def __init__(self, job: Job, tokenizer: Any) -> None:
        self.job = job
        self.decoder = IncrementalDecoder(tokenizer)
        self.text = ""
        self.sent = 0
        self.tokens = 0
        self.done = False
        self.finish_reason = "length"
        self.scalings: list[torch.Tensor] = []

    def finish(self, reason: str) -> None:
        self.done = True
        self.finish_reason = reason

    def add_text(self, piece: str) -> None:
        self.text += piece
        for stop in self.job.stops:
            at = self.text.find(stop)
            if at >= 0:
                self.text = self.text[:at]
                self.finish("stop")
        self.flush(final=self.done)

    def flush(self, final: bool = False) -> None:
        if not self.job.stream:
            return
        end = len(self.text) if final else len(self.text) - _held_back(self.text, self.job.stops)
        if end > self.sent:
            self.job.emit({"type": "piece", "text": self.text[self.sent : end]})
            self.sent = end

    def result(self) -> dict[str, Any]:
        scalings = None
        if self.job.return_scalings != "none" and self.scalings:
            s = torch.stack(self.scalings).float()  # [n, L, N]
            if self.job.return_scalings == "token":
                scalings = s.tolist()
            elif self.job.return_scalings == "layer":
                scalings = s.mean(0).tolist()
            else:
                scalings = s.mean((0, 1)).tolist()
        return {
            "type": "done",
            "text": self.text,
            "finish_reason": self.finish_reason,
            "completion_tokens": self.tokens,
            "scalings": scalings,
        }


class Engine:
    """Owns the model in one worker thread. `submit` is thread-safe."""

    def __init__(self, model: Any, *, max_batch: int = 8, batching: bool = True, compile: bool = False) -> None:
        self.model = model
        self.tokenizer = model.tokenizer
        self.max_batch = max_batch if batching else 1
        self.compile = compile  # decode with the compiled step (one compile per batch size)
        self.defaults = resolve_defaults(model, tokenizer=model.tokenizer)
        self.context = self.defaults.context
        self.queue: queue.Queue[Job | None] = queue.Queue()
        self.batches = 0
        self.batched_requests = 0
        self._thread = threading.Thread(target=self._work, name="loramix-engine", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> None:
        self.queue.put(job)

    def close(self) -> None:
        self.queue.put(None)
        self._thread.join(timeout=10)

    def _fits(self, batch: list[Job], job: Job) -> bool:
        if self.context is None:
            return True
        width = max(len(j.ids) for j in [*batch, job])
        return width + max(j.max_tokens for j in [*batch, job]) <= self.context

    def _work(self) -> None:
        pending: list[Job] = []
        while True:
            job = pending.pop(0) if pending else self.queue.get()
            if job is None:
                return
            batch = [job]
            while len(batch) < self.max_batch:
                try:
                    other = self.queue.get_nowait()
                except queue.Empty:
                    break
                if other is None:
                    pending.append(other)
                    break
                if other.key == job.key and self._fits(batch, other):
                    batch.append(other)
                else:
                    pending.append(other)
            try:
                self._run(batch)
            except Exception as exc:  # a failed batch must not take the server down
                logger.exception("generation failed")
                for j in batch:
                    j.emit({"type": "error", "message": f"generation failed: {exc}", "status": 500})

    @torch.no_grad()
    def _run(self, batch: list[Job]) -> None:
        self.batches += 1
        self.batched_requests += len(batch)
        width = max(len(j.ids) for j in batch)
        pad = self.defaults.pad_token_id
        ids = torch.tensor([[pad] * (width - len(j.ids)) + j.ids for j in batch])
        mask = torch.tensor([[0] * (width - len(j.ids)) + [1] * len(j.ids) for j in batch])
        first = batch[0]
        rows = [_Row(j, self.tokenizer) for j in batch]
        max_new = max(j.max_tokens for j in batch)
        eos_ids = set(self.defaults.eos_token_ids)
        steps = Generation(
            self.model,
            ids,
            mask,
            max_new_tokens=max_new,
            do_sample=first.do_sample,
            temperature=first.temperature,
            top_p=first.top_p,
            top_k=first.top_k,
            repetition_penalty=first.repetition_penalty,
            seed=first.seed,
            mode=first.mode,
            pad_token_id=pad,
            compile=self.compile,
        )
        for step in steps:
            tokens = step.token.tolist()  # one host sync per step: every row's text is streamed as it comes
            for r, row in enumerate(rows):
                if row.done:
                    continue
                token = tokens[r]
                if token in eos_ids:
                    row.finish("stop")
                    row.flush(final=True)
                    continue
                if row.job.return_scalings != "none":
                    row.scalings.append(step.scalings[r].detach().cpu())
                row.tokens += 1
                row.add_text(row.decoder.push(token))
                if not row.done and row.tokens >= row.job.max_tokens:
                    row.add_text(row.decoder.flush())
                    if not row.done:
                        row.finish("length")
                    row.flush(final=True)
            if all(row.done for row in rows):
                break
        for row in rows:
            if not row.done:  # the batch ended (context or max_new_tokens)
                row.add_text(row.decoder.flush())
                row.flush(final=True)
            row.job.emit(row.result())
