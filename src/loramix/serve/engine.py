"""The generation engine behind the server: a scheduler around the decoder (decode.py), which `generate` runs too.

One worker thread owns the model (its `MixState` holds the scalings of the current pass, so one thread at a time)
and one `Decoder` of `max_batch` rows over `cache_len` cache columns.

    a request arrives     -> its jobs wait in a bounded queue (`max_queue` jobs; a full queue raises `QueueFull`: 503)
    before every step     -> cancelled and timed-out rows leave; the waiting jobs that fit join together, in order:
                             one row each, prefilled as one left-padded batch (`Decoder.join`), first tokens chosen
    every step            -> `Decoder.step()`: one forward over the occupied rows and every row's next token chosen on
                             the device by the batched sampler (each row's own settings and seeded stream); then ONE
                             host read for the whole batch: tokens, EOS and failure flags, the metrics' mean scalings
    a row ends            -> EOS, a stop string, max_tokens, cancellation (`Job.cancelled`: the client hung up), its
                             deadline, or a failure of its own (non-finite logits or scalings): an error for that
                             request only; its row is free before the next step

Every way out of a row or the queue goes through `_end` (the decoder's row freed, the metrics counted, one final
message sent), so a failed request leaves nothing behind for the next one, and every job gets exactly one final
message: a handler never waits forever.

Stop strings are applied on the text; streamed text never shows a stop string or a part of one. Log probabilities
are those of the raw logits (before temperature, top-p, penalties or biases): for generated tokens from each step's
logits; for the prompt (echo) from the prefill's logits (every prompt token has its own scalings in all modes).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..base import resolve_defaults
from ..decode import Decoder, RowSpec, cache_slots
from ..errors import LoramixError
from ..sampling import SamplingSettings, row_generator
from ..text import IncrementalDecoder, left_pad

logger = logging.getLogger(__name__)

__all__ = ["Engine", "Job", "QueueFull", "TokenLogprob"]


@dataclass
class Job:
    """One request's choice: prompt token ids, settings, and where to send results (called from the worker thread).

    emit receives {"type": "piece", "text": str} while streaming, then {"type": "done", "text", "finish_reason",
    "completion_tokens", "scalings", "logprobs"}, or {"type": "error", "message", "status"}: exactly one final one.

    logprobs: None (off) or how many alternatives to return per position (0 = the chosen token only); the result's
    "logprobs" is then {"prompt": [...], "completion": [...]} of `TokenLogprob`s (the prompt's only with
    prompt_logprobs; its first token has no logprob). group: jobs of one request share it. index: the choice's
    number, which seeds its own random stream (`sampling.row_generator`). grammar: the `grammar.Grammar` its tokens
    follow (structured output), or None.
    """

    ids: list[int]
    max_tokens: int
    emit: Callable[[dict[str, Any]], None]
    mode: str = "granular"
    sampling: SamplingSettings = field(default_factory=SamplingSettings)
    stops: list[str] = field(default_factory=list)
    return_scalings: str = "none"
    stream: bool = False
    logprobs: int | None = None
    prompt_logprobs: bool = False
    group: object = None
    index: int = 0
    deadline: float | None = None
    cancelled: bool = False
    submitted: float = 0.0
    grammar: Any = None


class QueueFull(LoramixError):
    """The engine's queue holds `max_queue` jobs: the server answers 503 with Retry-After."""


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
    """A job in a decoder row: its text, tokens and what it returns."""

    def __init__(self, job: Job, tokenizer: Any, slot: int) -> None:
        self.job = job
        self.slot = slot
        self.last_token_at = 0.0
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
    """Continuous batching over a `Decoder` of `max_batch` rows in one worker thread (module docstring).
    `submit_group` is thread-safe; `metrics` (optional) receives the engine's events (serve/metrics.py)."""

    def __init__(
        self,
        model: Any,
        *,
        max_batch: int = 8,
        batching: bool = True,
        compile: bool | str = False,
        max_queue: int = 256,
        longest: int | None = None,
        cache_len: int | None = None,
        metrics: Any = None,
    ) -> None:
        self.model = model
        self.tokenizer = model.tokenizer
        self.max_batch = max_batch if batching else 1
        self.max_queue = max_queue
        self.defaults = resolve_defaults(model, tokenizer=model.tokenizer)
        # twice the longest request (prompt + max_tokens; default: the context), so that a request always fits once
        # the rows before it have moved along
        self.cache_len = cache_len or cache_slots(2 * (longest or self.defaults.context or 2048), None)
        self.metrics = metrics
        self.batches = 0  # join rounds: steps before which one or more requests joined
        self.batched_requests = 0
        # compile: False, True (inductor) or a torch.compile backend name, as generate(compile=...)
        self.decoder = Decoder(model, self.max_batch, self.cache_len, compile=compile, eos=self.defaults.eos_token_ids)
        self._rows: list[_Row | None] = [None] * self.max_batch
        self._pending: deque[Job] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._work, name="loramix-engine", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ the client side (any thread)

    @property
    def queued(self) -> int:
        """Jobs waiting for a row."""
        return len(self._pending)

    @property
    def active(self) -> int:
        """Rows holding a job."""
        return sum(row is not None for row in self._rows)

    @property
    def steps(self) -> int:
        return self.decoder.steps

    def submit(self, job: Job) -> None:
        self.submit_group([job])

    def submit_group(self, jobs: list[Job]) -> None:
        """Queue the jobs of one request together (they join in order as rows free). Raises `QueueFull` when more
        than `max_queue` jobs would wait beyond the free rows (an empty queue takes any one request; jobs that free
        rows will take at the next step do not count, however close together they arrive)."""
        with self._cond:
            if self._closed:
                raise QueueFull("the server is shutting down")
            free = self._rows.count(None)
            if self._pending and len(self._pending) + len(jobs) > self.max_queue + free:
                raise QueueFull(f"the queue is full ({len(self._pending)} jobs waiting); retry shortly")
            now = time.monotonic()
            for job in jobs:
                job.submitted = now
            self._pending.extend(jobs)
            self._cond.notify()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(timeout=10)

    # ------------------------------------------------------------------ the worker

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._pending and self.active == 0 and not self._closed:
                    self._cond.wait()
                if self._closed:
                    break
            try:
                self._release()
                self._admit()
                if self.active:
                    self._step()
            except Exception as exc:  # a failed forward cannot be put on one row: every row in it ends
                logger.exception("generation failed")
                for row in self._rows:
                    if row is not None:
                        self._end(row.job, row, "error", f"generation failed: {exc}", 500, failed=True)
        for row in self._rows:
            if row is not None:
                self._end(row.job, row, "shutdown", "the server is shutting down", 503)
        while self._pending:
            self._end(self._pending.popleft(), None, "shutdown", "the server is shutting down", 503)

    def _end(
        self,
        job: Job,
        row: _Row | None,
        why: str,
        message: str | None = None,
        status: int = 500,
        *,
        failed: bool = False,
        param: str | None = None,
    ) -> None:
        """The one way out for a job: its row freed (`failed`: its caches cleared too), the reason counted, and its
        final message sent (the result, or an error with `message` and `status`)."""
        if row is not None and self._rows[row.slot] is row:
            self._rows[row.slot] = None
            self.decoder.leave(row.slot, failed=failed)
        if self.metrics is not None:
            self.metrics.finished(why)
        if message is None and row is not None:
            job.emit(row.result())
        else:
            error = {"type": "error", "message": message or why, "status": status}
            job.emit({**error, "param": param} if param else error)

    def _ended_early(self, job: Job, row: _Row | None) -> bool:
        """End `job` (in its row, or queued) if its client hung up or its deadline passed; whether it did."""
        if job.cancelled:
            self._end(job, row, "cancelled", "the client closed the request", 499)
        elif job.deadline is not None and time.monotonic() >= job.deadline:
            self._end(job, row, "timeout", "the request timed out before it finished", 504)
        else:
            return False
        return True

    def _release(self) -> None:
        """End the rows of cancelled and timed-out jobs (before the step)."""
        for row in self._rows:
            if row is not None:
                self._ended_early(row.job, row)

    def _take(self) -> list[Job]:
        """The waiting jobs that join at this step, in order: while a row is free and the next job fits the columns
        with those before it (first come, first served). Cancelled and expired jobs end here."""
        group: list[Job] = []
        free = self._rows.count(None)
        with self._cond:
            while self._pending and len(group) < free:
                job = self._pending[0]
                if self._ended_early(job, None):
                    self._pending.popleft()
                    continue
                trial = [*group, job]
                if self._target(trial) is None:
                    if not group and self.active == 0:  # can never fit (create_app's limits prevent this)
                        self._pending.popleft()
                        message = f"prompt + max_tokens exceed the engine's {self.cache_len} cache columns"
                        self._end(job, None, "error", message, 400)
                        continue
                    break
                group.append(self._pending.popleft())
        return group

    def _target(self, jobs: list[Job]) -> int | None:
        return self.decoder.target(max(len(j.ids) for j in jobs), max(j.max_tokens for j in jobs) - 1)

    @torch.no_grad()
    def _admit(self) -> None:
        """Let waiting jobs join as one prefilled batch, then take their first tokens."""
        jobs = self._take()
        if not jobs:
            return
        self.batches += 1
        self.batched_requests += len(jobs)
        ids, mask = left_pad([j.ids for j in jobs], self.defaults.pad_token_id)
        T = ids.shape[1]
        self.decoder.place(T, max(j.max_tokens for j in jobs) - 1)
        slots = [i for i, row in enumerate(self._rows) if row is None][: len(jobs)]
        rows = [_Row(job, self.tokenizer, slot) for job, slot in zip(jobs, slots)]
        device = self.model.device
        specs = [
            RowSpec(
                j.mode, j.sampling, row_generator(j.sampling.seed, j.index, device), j.max_tokens, grammar=j.grammar
            )
            for j in jobs
        ]
        for row in rows:
            self._rows[row.slot] = row
        try:
            joined = self.decoder.join(slots, ids, mask, specs, prompt_logits=any(j.prompt_logprobs for j in jobs))
            tokens, bad = torch.stack([joined.tokens, joined.bad.long()]).tolist()
        except Exception as exc:
            logger.exception("prefill failed")
            for row in rows:
                self._end(row.job, row, "error", f"generation failed: {exc}", 500, failed=True)
            return
        now = time.monotonic()
        for j, row in enumerate(rows):
            job = row.job
            if job.prompt_logprobs:
                lp = torch.log_softmax(joined.prompt_logits[j, T - len(job.ids) : T - 1].float(), -1)
                prompt = torch.tensor(job.ids[1:], device=lp.device)
                row.prompt_logprobs = [TokenLogprob(job.ids[0], None), *_logprobs_at(lp, prompt, job.logprobs or 0)]
            if self.metrics is not None:
                self.metrics.first_token(now - job.submitted)
            if job.max_tokens <= 0:  # the prompt only (echo)
                row.finish("length")
                self._end(job, row, "length")
            elif not self._failed(row, bool(bad[j])):
                self._accept(
                    row, tokens[j], tokens[j] in self.defaults.eos_token_ids, joined.logits[j], joined.scalings[j]
                )

    def _failed(self, row: _Row, bad: bool) -> bool:
        """End the row if its last step failed it: non-finite logits or scalings (500), or a grammar that could go
        no further (400: the tokenizer cannot write what the schema needs); whether it did."""
        why = self.decoder.grammar_failures.get(row.slot)
        if bad:
            self._end(row.job, row, "error", "the model produced non-finite values for this request", 500, failed=True)
        elif why is not None:
            message = f"structured output: {why} (the answer so far: {row.text[-80:]!r})"
            self._end(row.job, row, "error", message, 400, param="response_format")
        else:
            return False
        return True

    def _accept(self, row: _Row, token: int, eos: bool, logits: torch.Tensor, scalings: torch.Tensor) -> None:
        """Record the row's new token (its text, logprobs, scalings); end the row if it is done."""
        job = row.job
        row.last_token_at = time.monotonic()
        if job.logprobs is not None:  # the EOS token too, as vLLM does
            lp = torch.log_softmax(logits[None].float(), -1)
            row.logprobs += _logprobs_at(lp, torch.tensor([token], device=lp.device), job.logprobs)
        if eos:
            row.finish("stop")
            row.flush(final=True)
        else:
            if job.return_scalings != "none":
                row.scalings.append(scalings.detach().cpu().clone())
            row.tokens += 1
            row.add_text(row.decoder.push(token))
            if not row.done and row.tokens >= job.max_tokens:
                row.add_text(row.decoder.flush())
                if not row.done:
                    row.finish("length")
                row.flush(final=True)
        if self.metrics is not None:
            self.metrics.tokens(1)
        if row.done:
            self._end(job, row, row.finish_reason)

    @torch.no_grad()
    def _step(self) -> None:
        """One decode step over the occupied rows, one host read, then each row's new token."""
        rows = [row for row in self._rows if row is not None]
        out = self.decoder.step()
        occupied = torch.tensor([row.slot for row in rows], device=out.tokens.device)
        mean = out.scalings.index_select(0, occupied).float().mean((0, 1))  # [N], for the metrics
        k = out.tokens.shape[0]
        host = torch.cat([out.tokens.float(), out.eos.float(), out.bad.float(), mean]).tolist()  # the one sync
        tokens, eos, bad = host[:k], host[k : 2 * k], host[2 * k : 3 * k]
        now = time.monotonic()
        if self.metrics is not None:
            self.metrics.step(len(rows), torch.tensor(host[3 * k :]))
        for row in rows:
            if self.metrics is not None:
                self.metrics.inter_token(now - row.last_token_at)
            if not self._failed(row, bool(bad[row.slot])):
                self._accept(
                    row, int(tokens[row.slot]), bool(eos[row.slot]), out.logits[row.slot], out.scalings[row.slot]
                )
