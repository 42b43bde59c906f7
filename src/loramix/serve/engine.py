"""The generation engine behind the server: continuous batching over a fixed number of sequence slots.

One worker thread owns the model (its `MixState` holds the scalings of the current pass, so one thread at a time).
The batch has `max_batch` slots, each with its rows in both static KV caches of the decode engine (decode.py), so
every decode step has the same shapes whatever the occupancy (free slots are padding) and the compiled step is reused.

    a request arrives     -> it waits in a bounded queue (`max_queue` jobs; a full queue raises `QueueFull`: 503)
    a slot is free        -> its prompt is prefilled alone (two DynamicCaches, batch 1), the keys/values are copied
                             into the slot's rows of the static caches, its first token is chosen from the prefill,
                             and it joins the running batch at the next step
    every step            -> one `decode_step` over all slots; each row then chooses its token with its own settings
                             (transformers' logits processors, its own seeded torch.Generator)
    a row ends            -> EOS, a stop string, max_tokens, cancellation (`Job.cancelled`, the client hung up) or its
                             deadline: its slot is free before the next step

A gate that reads context (`GateConfig.context`) has a third cache with the same slots (gate.GateCache): its
running EMA sums per row (set from the prompt's when a row joins, overwritten by the next row to take the slot), or
its attention keys/values per column (copied, rolled and masked like the KV caches' rows).

The caches share one write column (the decode step writes every row at `cache_position`): a row's tokens fill a
contiguous range of columns ending at the current one, its own positions (RoPE) start at 0, and its mask hides the
columns before its range. When a joining prompt is longer than the columns behind the current one, or the cache
would run out before a row finishes, every row is moved along the column axis by the same shift (one roll of the
caches and the mask: attention does not depend on which columns hold a row's keys, only on its mask and positions).
The cache has `cache_len` columns (default: twice the longest request), so a request always fits once the rows
before it have moved.

Modes mix in one batch: granular and truncated rows get the gate's scalings every step; prompt-mode rows hold the
scalings of their last prompt token (`DecodeBuffers.hold_rows` / `hold_values`). A step whose rows all hold their
scalings skips the scaling pass.

Stop strings are applied on the text; streamed text never shows a stop string or a part of one. Log probabilities
are those of the raw logits (before temperature, top-p, penalties or biases): for generated tokens from each step's
logits; for the prompt (echo) from the prefill's logits (every prompt token has its own scalings in all modes).
"""

from __future__ import annotations

import copy
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..base import LoraMixCache, new_dynamic_cache, text_config
from ..decode import DecodeBuffers, cache_slots, compiled_step, decode_step, new_buffers, run_step
from ..errors import LoramixError
from ..generate import logits_processors, resolve_defaults
from ..layers import PreparedScalings
from ..text import IncrementalDecoder

logger = logging.getLogger(__name__)

__all__ = ["Engine", "Job", "PresenceFrequencyPenalty", "QueueFull", "TokenLogprob"]

HELD_MODES = ("prompt",)
"""Modes whose rows mix with scalings held after the prompt (no scaling pass while decoding)."""


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
    index: int = 0
    deadline: float | None = None
    cancelled: bool = False
    submitted: float = 0.0

    def generator(self, device: torch.device) -> torch.Generator | None:
        """The row's own random stream when seeded: `seed` for the first choice, a seed derived from (seed, index)
        for the others, so that the choices differ and each is reproducible whatever else shares the batch."""
        if self.seed is None:
            return None
        seed = self.seed if self.index == 0 else hash((self.seed, self.index)) & (2**63 - 1)
        return torch.Generator(device=device).manual_seed(seed)


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
    """A job in a slot: its text, tokens, and the settings it chooses its tokens with."""

    def __init__(self, job: Job, tokenizer: Any, slot: int, device: torch.device) -> None:
        self.job = job
        self.slot = slot
        self.start = 0  # the first cache column of its prompt
        self.ids = list(job.ids)  # prompt + generated (what the logits processors see)
        self.held = job.mode in HELD_MODES
        self.do_sample = job.do_sample and job.temperature != 0
        self.processors = logits_processors(
            self.do_sample, job.temperature, job.top_k, job.top_p, job.repetition_penalty
        )
        # OpenAI's biases and penalties come first, on the raw logits: the logit bias is added by the engine to
        # the whole batch at once (`Engine._bias`), the penalties here
        if job.presence_penalty or job.frequency_penalty:
            self.processors.insert(
                0, PresenceFrequencyPenalty(job.presence_penalty, job.frequency_penalty, len(job.ids))
            )
        self.greedy = not self.do_sample and not len(self.processors)
        self.generator = job.generator(device)
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

    @property
    def remaining(self) -> int:
        """Decode steps it may still need (each step feeds its last token and chooses the next one)."""
        return 0 if self.done else self.job.max_tokens - self.tokens

    def choose(self, logits: torch.Tensor) -> int:
        """The next token from this row's logits [V] (float, its logit bias added), with its own processors and
        random stream."""
        scores = logits[None]
        if len(self.processors):
            scores = self.processors(torch.tensor([self.ids], device=logits.device), scores)
        if not self.do_sample:
            return int(scores.argmax(-1))
        probs = torch.softmax(scores, dim=-1)
        return int(torch.multinomial(probs, 1, generator=self.generator))

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
    """Continuous batching over `max_batch` slots in one worker thread (module docstring). `submit_group` is
    thread-safe; `metrics` (optional) receives the engine's events (serve/metrics.py)."""

    def __init__(
        self,
        model: Any,
        *,
        max_batch: int = 8,
        batching: bool = True,
        compile: bool | str = False,
        max_queue: int = 256,
        cache_len: int | None = None,
        metrics: Any = None,
    ) -> None:
        self.model = model
        self.tokenizer = model.tokenizer
        self.max_batch = max_batch if batching else 1
        self.max_queue = max_queue
        # decode with the compiled step (compiled once per step size: the slots fix every shape); True: inductor, or
        # a torch.compile backend name, as generate(compile=...)
        self.compile = compile
        self.defaults = resolve_defaults(model, tokenizer=model.tokenizer)
        self.context = self.defaults.context
        self.cache_len = cache_len or cache_slots(2 * (self.context or 2048), None)
        self.metrics = metrics
        self.batches = 0  # join rounds: steps before which one or more requests joined
        self.batched_requests = 0
        self.steps = 0
        self._eos = set(self.defaults.eos_token_ids)
        self._config = text_config(model.model)
        self._buffers = new_buffers(model, self.max_batch, self.cache_len, held=False, text_config=self._config)
        b = self._buffers
        b.hold_rows = torch.zeros(self.max_batch, 1, 1, 1, dtype=torch.bool, device=model.device)
        b.hold_values = torch.zeros_like(b.scalings)
        self._views: dict[int, DecodeBuffers] = {}
        vocab = model.model.get_output_embeddings().weight.shape[0]
        self._bias = torch.zeros(self.max_batch, vocab, device=model.device)  # each row's logit bias, dense
        self._rows: list[_Row | None] = [None] * self.max_batch
        self._col = 0  # the cache column the next step writes
        self._pending: deque[Job] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._work, name="loramix-engine", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ the client side (any thread)

    @property
    def queued(self) -> int:
        """Jobs waiting for a slot."""
        return len(self._pending)

    @property
    def active(self) -> int:
        """Slots holding a job."""
        return sum(row is not None for row in self._rows)

    def submit(self, job: Job) -> None:
        self.submit_group([job])

    def submit_group(self, jobs: list[Job]) -> None:
        """Queue the jobs of one request together (they join in order as slots free). Raises `QueueFull` when more
        than `max_queue` jobs would wait beyond the free slots (an empty queue takes any one request; jobs that free
        slots will take at the next step do not count, however close together they arrive)."""
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
            except Exception as exc:  # a failed step must not take the server down
                logger.exception("generation failed")
                for row in self._rows:
                    if row is not None:
                        row.job.emit({"type": "error", "message": f"generation failed: {exc}", "status": 500})
                self._rows = [None] * self.max_batch
        for job in [*self._pending, *(row.job for row in self._rows if row is not None)]:
            job.emit({"type": "error", "message": "the server is shutting down", "status": 503})

    def _expired(self, job: Job, now: float) -> bool:
        if job.deadline is None or now < job.deadline:
            return False
        job.emit({"type": "error", "message": "the request timed out before it finished", "status": 504})
        return True

    def _release(self) -> None:
        """Free the slots of cancelled and timed-out jobs (before the step)."""
        now = time.monotonic()
        for row in self._rows:
            if row is not None and (row.job.cancelled or self._expired(row.job, now)):
                self._free(row, "cancelled" if row.job.cancelled else "timeout")

    def _free(self, row: _Row, why: str) -> None:
        self._rows[row.slot] = None
        self._buffers.hold_rows[row.slot] = False
        if self.metrics is not None:
            self.metrics.finished(why)

    def _admit(self) -> None:
        """Let waiting jobs join, in order, while a slot is free and the head of the queue fits the cache."""
        joined = 0
        while None in self._rows:
            with self._cond:
                if not self._pending:
                    break
                job = self._pending[0]
                if job.cancelled or self._expired(job, time.monotonic()):
                    self._pending.popleft()
                    continue
                target = self._target_column(job)
                if target is None and self.active == 0:  # can never fit (create_app's limits prevent this)
                    self._pending.popleft()
                    message = f"prompt + max_tokens exceed the engine's {self.cache_len} cache columns"
                    job.emit({"type": "error", "message": message, "status": 400})
                    continue
                if target is None:
                    break  # waits until rows before it finish (first come, first served)
                self._pending.popleft()
            slot = self._rows.index(None)
            try:
                self._join(job, slot, target)
            except Exception as exc:
                logger.exception("prefill failed")
                job.emit({"type": "error", "message": f"generation failed: {exc}", "status": 500})
                self._rows[slot] = None
            joined += 1
        if joined:
            self.batches += 1
            self.batched_requests += joined

    def _target_column(self, job: Job) -> int | None:
        """The write column the batch must be at for `job` to join (its prompt fills the columns before it), or
        None if it cannot join before other rows finish."""
        rows = [row for row in self._rows if row is not None]
        T, need = len(job.ids), job.max_tokens - 1
        if not rows:
            return T if T + need <= self.cache_len else None
        need = max([need, *(row.remaining for row in rows)])
        if self._col >= T and self._col + need <= self.cache_len:
            return self._col
        target = max([T, *(self._col - row.start for row in rows)])
        return target if target + need <= self.cache_len else None

    def _shift(self, d: int) -> None:
        """Move every row d columns along the caches and the mask (one roll; no row wraps around: see _admit)."""
        if d == 0:
            return
        b = self._buffers
        for cache in (b.cache.scaling, b.cache.mixed):
            for layer in cache.layers:
                if layer.is_initialized:
                    layer.keys.copy_(torch.roll(layer.keys, d, 2))
                    layer.values.copy_(torch.roll(layer.values, d, 2))
        if b.cache.gate is not None:
            b.cache.gate.roll(d)
        b.mask.copy_(torch.roll(b.mask, d, 1))
        for row in self._rows:
            if row is not None:
                row.start += d
        self._col += d

    @torch.no_grad()
    def _prefill(self, job: Job) -> tuple[torch.Tensor, torch.Tensor, LoraMixCache]:
        """The prompt alone (batch 1) through both passes into two DynamicCaches: logits [T, V], scalings
        [T, L, N], the caches."""
        model = self.model
        ids = torch.tensor([job.ids], device=model.device)
        mask = torch.ones_like(ids)
        positions = torch.arange(ids.shape[1], device=model.device)[None]
        held = job.mode in HELD_MODES
        cache = LoraMixCache(
            scaling=None if held else new_dynamic_cache(self._config),
            mixed=new_dynamic_cache(self._config),
            gate=None if held else model.gate.new_cache(),
        )
        if held:
            s = model.compute_scalings(ids, mask, positions)
        else:
            s = model.compute_scalings(
                ids, mask, positions, past_key_values=cache.scaling, use_cache=True, gate_cache=cache.gate
            )
        out = model(
            ids,
            attention_mask=mask,
            position_ids=positions,
            scalings=s,
            past_key_values=LoraMixCache(None, cache.mixed),
            use_cache=True,
        )
        return out.logits[0], s[0], cache

    @torch.no_grad()
    def _join(self, job: Job, slot: int, target: int) -> None:
        """Prefill `job`, copy its keys/values into `slot` ending at column `target`, choose its first token."""
        logits, scalings, cache = self._prefill(job)
        b, T = self._buffers, len(job.ids)
        row = _Row(job, self.tokenizer, slot, self.model.device)
        if job.prompt_logprobs:
            lp = torch.log_softmax(logits[:-1].float(), -1)
            prompt = torch.tensor(job.ids, device=logits.device)
            row.prompt_logprobs = [TokenLogprob(job.ids[0], None)] + _logprobs_at(lp, prompt[1:], job.logprobs or 0)
        if job.max_tokens <= 0:  # the prompt only (echo): it never takes the slot
            row.finish("length")
            job.emit(row.result())
            return
        if self.active == 0:
            self._col = target
        else:
            self._shift(target - self._col)
        start = row.start = self._col - T
        like = cache.mixed.layers[0]
        for layer in (*b.cache.scaling.layers, *b.cache.mixed.layers):  # all at once: the views share them
            if not layer.is_initialized:
                shape = (self.max_batch, like.keys.shape[1], 1)
                layer.lazy_initialization(
                    like.keys.new_zeros(*shape, like.keys.shape[3]), like.values.new_zeros(*shape, like.values.shape[3])
                )
        for static, dynamic in ((b.cache.scaling, cache.scaling), (b.cache.mixed, cache.mixed)):
            if dynamic is None:
                continue
            for layer, src in zip(static.layers, dynamic.layers):
                layer.keys[slot, :, start : self._col] = src.keys[0]
                layer.values[slot, :, start : self._col] = src.values[0]
        _join_gate_cache(b.cache.gate, cache.gate, slot, start, self._col)
        b.mask[slot].zero_()
        b.mask[slot, start : self._col] = 1
        b.positions[slot] = T
        if row.held:
            b.hold_rows[slot] = True
            b.hold_values[slot, 0] = scalings[-1]
            b.scalings[slot, 0] = scalings[-1]
            b.multipliers[slot] = self.model.rank_multipliers(b.scalings[slot : slot + 1])[0]
        self._rows[slot] = row
        self._bias[slot].zero_()
        for t, value in job.logit_bias.items():
            self._bias[slot, t] = value
        token = row.choose(logits[-1].float() + self._bias[slot])
        if self.metrics is not None:
            self.metrics.first_token(time.monotonic() - job.submitted)
        self._accept(row, token, logits[-1], scalings[-1])

    def _accept(self, row: _Row, token: int, logits: torch.Tensor, scalings: torch.Tensor) -> None:
        """Record the row's new token (its text, logprobs, scalings); emit and free the slot if the row ended."""
        job = row.job
        row.last_token_at = time.monotonic()
        if job.logprobs is not None:  # the EOS token too, as vLLM does
            lp = torch.log_softmax(logits[None].float(), -1)
            row.logprobs += _logprobs_at(lp, torch.tensor([token], device=lp.device), job.logprobs)
        if token in self._eos:
            row.finish("stop")
            row.flush(final=True)
        else:
            if job.return_scalings != "none":
                row.scalings.append(scalings.detach().cpu().clone())
            row.tokens += 1
            row.ids.append(token)
            self._buffers.ids[row.slot, 0] = token
            row.add_text(row.decoder.push(token))
            if not row.done and row.tokens >= job.max_tokens:
                row.add_text(row.decoder.flush())
                if not row.done:
                    row.finish("length")
                row.flush(final=True)
        if self.metrics is not None:
            self.metrics.tokens(1)
        if row.done:
            job.emit(row.result())
            self._free(row, row.finish_reason)

    def _view(self, occupied: int) -> DecodeBuffers:
        """The buffers of the first k slots (views: same storage), k the power of two (at most max_batch) that covers
        the occupied slots: on a CPU a padded row costs as much as a real one, so a step runs over the slots in use
        (rows take the lowest free slot), in a few fixed shapes (one compiled step each)."""
        k = min(self.max_batch, 1 << (occupied - 1).bit_length())
        if k == self.max_batch:
            return self._buffers
        view = self._views.get(k)
        if view is None:
            b = self._buffers
            view = DecodeBuffers(
                ids=b.ids[:k],
                positions=b.positions[:k],
                cache_position=b.cache_position,
                live=b.live[:k],
                mask=b.mask[:k],
                scalings=b.scalings[:k],
                multipliers=b.multipliers[:k],
                cache=LoraMixCache(
                    scaling=_cache_rows(b.cache.scaling, k),
                    mixed=_cache_rows(b.cache.mixed, k),
                    gate=b.cache.gate.rows(k) if b.cache.gate is not None else None,
                ),
                prepared=PreparedScalings(b.scalings[:k], b.multipliers[:k], sizes=self.model.rank_sizes),
                held=False,
                hold_rows=b.hold_rows[:k],
                hold_values=b.hold_values[:k],
            )
            self._views[k] = view
        return view

    def _sync(self) -> None:
        """Point both caches' write offsets and the step's cache_position at the current column."""
        b = self._buffers
        b.cache_position.fill_(self._col)
        if b.cache.gate is not None:
            b.cache.gate.offset.fill_(self._col)
        for cache in (b.cache.scaling, b.cache.mixed):
            for layer in cache.layers:
                if layer.is_initialized:
                    layer.cumulative_length.fill_(self._col)

    @torch.no_grad()
    def _step(self) -> None:
        """One decode step over every slot; each active row chooses its next token."""
        rows = [row for row in self._rows if row is not None]
        held = all(row.held for row in rows)
        self._sync()
        b = self._view(max(row.slot for row in rows) + 1)
        b.held = held
        if self.compile:
            backend = self.compile if isinstance(self.compile, str) else None
            step = compiled_step(self.model, b.batch, self.cache_len, held, backend)
        else:
            step = decode_step
        logits, scalings = run_step(step, self.model, b)
        self.steps += 1
        self._col += 1
        b.positions.add_(1)
        scores = logits.float()
        if any(row.job.logit_bias for row in rows):
            scores = scores + self._bias[: scores.shape[0]]
        greedy = scores.argmax(-1).tolist()  # one host sync per step: every row's text is streamed as it comes
        now = time.monotonic()
        if self.metrics is not None:
            active = torch.tensor([row.slot for row in rows], device=scalings.device)
            self.metrics.step(len(rows), scalings.index_select(0, active).float().mean((0, 1)))
        for row in rows:
            if self.metrics is not None:
                self.metrics.inter_token(now - row.last_token_at)
            token = greedy[row.slot] if row.greedy else row.choose(scores[row.slot])
            self._accept(row, token, logits[row.slot], scalings[row.slot])


def _join_gate_cache(static: Any, prompt: Any, slot: int, start: int, end: int) -> None:
    """Put a prompt's gate cache (a dynamic `GateCache`, batch 1; None for a held row) in `slot` of the engine's
    static one, its attention keys/values at columns [start, end) like its KV cache rows; the columns before are
    masked, those after are written by the coming steps."""
    if static is None or prompt is None:
        return
    if static.ema is not None:
        static.ema[slot] = prompt.ema[0]
    if static.keys is not None:
        static.keys[slot, start:end] = prompt.keys[0]
        static.values[slot, start:end] = prompt.values[0]


def _cache_rows(cache: Any, k: int) -> Any:
    """A StaticCache over the first k batch rows of `cache` (views of its initialized layers; the write offsets are
    the same tensors, so syncing the full cache syncs the view)."""
    view = copy.copy(cache)
    view.layers = []
    for layer in cache.layers:
        part = copy.copy(layer)
        part.keys, part.values, part.batch_size = layer.keys[:k], layer.values[:k], k
        view.layers.append(part)
    return view
