"""The generation engine behind the server: one worker thread owns the model; requests wait in a queue.

A model is not safe to run from several threads at once (its `MixState` holds the scalings of the current pass), so
every request goes through one worker. When several requests with the same generation settings are waiting, the
worker runs them together as one left-padded batch (`batching=True`), streaming each row's text to its own request.
Stop strings are applied on the text; streamed text never shows a stop string or a part of one. The prompts and
choices of one request are submitted together (`submit_group`) and run in one batch (up to `max_batch` rows).

Log probabilities are those of the raw logits (before temperature, top-p, penalties or biases), as the model gives
them: for generated tokens from each `Step`'s logits; for the prompt (echo) from one forward over the padded batch,
in the same mode (every prompt token has its own scalings in all modes).
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

__all__ = ["Engine", "Job", "PresenceFrequencyPenalty", "TokenLogprob"]


@dataclass
class Job:
    """One request: prompt token ids, settings, and where to send results (called from the worker thread).

    emit receives {"type": "piece", "text": str} while streaming, then {"type": "done", "text", "finish_reason",
    "completion_tokens", "scalings", "logprobs"}, or {"type": "error", "message", "status"}.

    logprobs: None (off) or how many alternatives to return per position (0 = the chosen token only); the result's
    "logprobs" is then {"prompt": [...], "completion": [...]} of `TokenLogprob`s (the prompt's only with
    prompt_logprobs; its first token has no logprob). group: jobs of one request share it (and, when seeded, a batch).
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
    logprobs: int | None = None
    prompt_logprobs: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    group: object = None

    @property
    def key(self) -> tuple[Any, ...]:
        """Requests with equal keys can share a batch (a seeded request runs alone with its own choices: its own
        random stream)."""
        settings = (
            self.mode,
            self.do_sample,
            self.temperature,
            self.top_p,
            self.top_k,
            self.repetition_penalty,
            self.presence_penalty,
            self.frequency_penalty,
            tuple(sorted(self.logit_bias.items())),
        )
        return (
            settings if self.seed is None else (*settings, "seed", id(self.group if self.group is not None else self))
        )


@dataclass
class TokenLogprob:
    """One position: the token, its log probability (None for a prompt's first token) and the `top` alternatives,
    best first, as (token id, log probability)."""

    token: int
    logprob: float | None
    top: list[tuple[int, float]] = field(default_factory=list)


def _logprobs_at(logprobs: torch.Tensor, tokens: torch.Tensor, k: int) -> list[TokenLogprob]:
    """logprobs [T, V] of the positions predicting tokens [T] -> one TokenLogprob per token (k alternatives)."""
    chosen = logprobs.gather(-1, tokens[:, None].to(logprobs.device))[:, 0].tolist()
    if k > 0:
        values, ids = logprobs.topk(k, dim=-1)
        tops = [list(zip(i, v)) for i, v in zip(ids.tolist(), values.tolist())]
    else:
        tops = [[] for _ in chosen]
    return [TokenLogprob(t, lp, top) for t, lp, top in zip(tokens.tolist(), chosen, tops)]


class PresenceFrequencyPenalty:
    """OpenAI's presence and frequency penalties as a logits processor: every generated token (not the prompt) lowers
    its logit by `presence` once and by `frequency` per occurrence. `prompt_length` is the padded prompt width."""

    def __init__(self, presence: float, frequency: float, prompt_length: int) -> None:
        self.presence, self.frequency, self.prompt_length = presence, frequency, prompt_length

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        generated = input_ids[:, self.prompt_length :]
        if generated.shape[1] == 0:
            return scores
        counts = torch.zeros_like(scores).scatter_add_(-1, generated, torch.ones_like(generated, dtype=scores.dtype))
        return scores - self.presence * (counts > 0).to(scores.dtype) - self.frequency * counts


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
        self.logprobs: list[TokenLogprob] = []
        self.prompt_logprobs: list[TokenLogprob] = []

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
        logprobs = None
        if self.job.logprobs is not None:
            logprobs = {"prompt": self.prompt_logprobs, "completion": self.logprobs}
        return {
            "type": "done",
            "text": self.text,
            "finish_reason": self.finish_reason,
            "completion_tokens": self.tokens,
            "scalings": scalings,
            "logprobs": logprobs,
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
        self.queue: queue.Queue[list[Job] | None] = queue.Queue()
        self.batches = 0
        self.batched_requests = 0
        self._thread = threading.Thread(target=self._work, name="loramix-engine", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> None:
        self.queue.put([job])

    def submit_group(self, jobs: list[Job]) -> None:
        """Submit the jobs of one request at once: those with equal settings run in one batch (up to max_batch)."""
        self.queue.put(list(jobs))

    def close(self) -> None:
        self.queue.put(None)
        self._thread.join(timeout=10)

    def _fits(self, batch: list[Job], job: Job) -> bool:
        if self.context is None:
            return True
        width = max(len(j.ids) for j in [*batch, job])
        return width + max(j.max_tokens for j in [*batch, job]) <= self.context

    def _joins(self, batch: list[Job], other: Job | None) -> bool:
        """Whether `other` (None: the shutdown marker) may run in `batch`: same settings as its first job, and room."""
        return (
            other is not None and len(batch) < self.max_batch and other.key == batch[0].key and self._fits(batch, other)
        )

    def _work(self) -> None:
        pending: list[Job | None] = []
        while True:
            if not pending:
                item = self.queue.get()
                pending.extend([None] if item is None else item)
            job = pending.pop(0)
            if job is None:
                return
            batch, rest = [job], []
            for other in pending:  # the rest of its request first
                (batch if self._joins(batch, other) else rest).append(other)
            pending = rest
            while len(batch) < self.max_batch and None not in pending:
                try:
                    item = self.queue.get_nowait()
                except queue.Empty:
                    break
                for other in [None] if item is None else item:
                    (batch if self._joins(batch, other) else pending).append(other)
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
        # OpenAI's biases and penalties come first, on the raw logits (Generation's processors are a list)
        if first.logit_bias:
            from transformers.generation.logits_process import SequenceBiasLogitsProcessor

            bias = [[[token], value] for token, value in first.logit_bias.items()]
            steps.processors.insert(0, SequenceBiasLogitsProcessor(sequence_bias=bias))
        if first.presence_penalty or first.frequency_penalty:
            steps.processors.insert(0, PresenceFrequencyPenalty(first.presence_penalty, first.frequency_penalty, width))
        if any(j.prompt_logprobs for j in batch):
            self._prompt_logprobs(rows, ids, mask)
        want_logprobs = any(j.logprobs is not None for j in batch)
        for step in steps:
            step_logprobs = torch.log_softmax(step.logits.float(), -1) if want_logprobs else None
            tokens = step.token.tolist()  # one host sync per step: every row's text is streamed as it comes
            for r, row in enumerate(rows):
                if row.done:
                    continue
                token = tokens[r]
                if step_logprobs is not None and row.job.logprobs is not None:  # the EOS token too, as vLLM does
                    row.logprobs += _logprobs_at(step_logprobs[r : r + 1], step.token[r : r + 1], row.job.logprobs)
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

    def _prompt_logprobs(self, rows: list[_Row], ids: torch.Tensor, mask: torch.Tensor) -> None:
        """The echoed prompts' log probabilities: one forward of the mixed model over the left-padded batch."""
        device = self.model.device
        positions = (mask.cumsum(-1) - 1).clamp_min(0)
        logits = self.model(ids.to(device), attention_mask=mask.to(device), position_ids=positions.to(device)).logits
        logprobs = torch.log_softmax(logits.float(), -1)
        width = ids.shape[1]
        for r, row in enumerate(rows):
            if not row.job.prompt_logprobs:
                continue
            start = width - len(row.job.ids)
            tokens = ids[r, start + 1 :]
            row.prompt_logprobs = [TokenLogprob(int(ids[r, start]), None)] + _logprobs_at(
                logprobs[r, start : width - 1], tokens, row.job.logprobs or 0
            )
