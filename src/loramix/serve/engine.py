"""The generation engine behind the server: a scheduler around the decoder (decode.py), which `generate` runs too.

One worker thread owns the model (its `MixState` holds the scalings of the current pass, so one thread at a time)
and one `Decoder` of `max_batch` rows whose caches live in a pool of blocks allocated at start (blocks.py: one block
table per row drives both passes' caches; `kv_cache_memory` bytes, or a fraction of the free GPU memory).

    a request arrives     -> its jobs wait in a bounded queue (`max_queue` jobs; a full queue raises `QueueFull`: 503)
    before every step     -> cancelled and timed-out rows leave; the waiting jobs that fit join, in order, while a
                             row and the blocks of their prompts are free: short prompts prefilled as one left-padded
                             batch (`Decoder.join`); one whose prefix is cached (a shared system prompt) starts
                             from the cached blocks and joins with one forward of its rest (`Decoder.begin`,
                             `extend`, `finish`); a prompt longer than `max_num_batched_tokens` enters its row in
                             pieces: one chunk before each step, so rows that stream keep streaming
    blocks run out        -> the row that came last is preempted: its blocks freed, its job back at the head of the
                             queue with the tokens it generated; it is recomputed (its stream goes on where it
                             stopped, the same tokens as without preemption) when blocks free
    every step            -> `Decoder.step()`: one forward over the occupied rows and every row's next token chosen on
                             the device by the batched sampler (each row's own settings and seeded stream); then ONE
                             host read for the whole batch: tokens, failure flags, the metrics' mean scalings
    a row ends            -> EOS, a stop string, max_tokens, cancellation (`Job.cancelled`: the client hung up), its
                             deadline, or a failure of its own (non-finite logits or scalings): an error for that
                             request only; its row is free before the next step

Every way out of a row or the queue goes through `_end` (the decoder's row freed, the metrics counted, one final
message sent), so a failed request leaves nothing behind for the next one, and every job gets exactly one final
message: a handler never waits forever.

Each row's tokens, text, stop strings and finish reason are its `request.RequestState`, as in `generate()`: stop
strings are applied on the text; streamed text never shows a stop string or a part of one. Log probabilities
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
from ..blocks import BLOCK_SIZE, PoolLayout, describe, layout_of, pool_blocks
from ..contracts import MixedModel
from ..decode import Decoder, Prefill, RowSpec, cache_slots
from ..errors import LoramixError
from ..request import RequestState
from ..sampling import SamplingSettings, row_generator
from ..text import left_pad
from .events import Done, Event, Failed, Logprobs, Piece, TokenLogprob

logger = logging.getLogger(__name__)

__all__ = ["Engine", "Job", "QueueFull"]


@dataclass
class Job:
    """One request's choice: prompt token ids, settings, and where to send results (called from the worker thread).

    emit receives `events.Piece`s while streaming, then exactly one final event: `events.Done` or `events.Failed`.

    logprobs: None (off) or how many alternatives to return per position (0 = the chosen token only); the result's
    `logprobs` is then an `events.Logprobs` (the prompt's only with prompt_logprobs; its first token has none).
    group: jobs of one request share it. index: the choice's number, which seeds its own random stream
    (`sampling.row_generator`) and names its events. grammar: the `grammar.Grammar` its tokens follow (structured
    output), or None.
    """

    ids: list[int]
    max_tokens: int
    emit: Callable[[Event], None]
    mode: str = "granular"
    sampling: SamplingSettings = field(default_factory=SamplingSettings)
    stops: list[str] = field(default_factory=list)
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
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
    resume: Any = None  # the engine's row of a preempted job (its text and tokens so far)


class QueueFull(LoramixError):
    """The engine's queue holds `max_queue` jobs: the server answers 503 with Retry-After."""


def _logprobs_at(logprobs: torch.Tensor, tokens: torch.Tensor, k: int) -> list[TokenLogprob]:
    """logprobs [T, V] of the positions predicting tokens [T] -> one TokenLogprob per token (k alternatives)."""
    chosen = logprobs.gather(-1, tokens[:, None].to(logprobs.device))[:, 0].tolist()
    if k > 0:
        values, ids = logprobs.topk(k, dim=-1)
        tops = [list(zip(i, v)) for i, v in zip(ids.tolist(), values.tolist())]
    else:
        tops = [[] for _ in chosen]
    return [TokenLogprob(t, lp, top) for t, lp, top in zip(tokens.tolist(), chosen, tops)]


class _Row:
    """A job in a decoder row: its `RequestState` (tokens, text, stops, finish reason) and what it returns."""

    def __init__(self, job: Job, tokenizer: Any, slot: int, end_ids: tuple[int, ...]) -> None:
        self.job = job
        self.slot = slot
        self.request = RequestState(
            tokenizer,
            max_tokens=job.max_tokens,
            stops=job.stops,
            end_ids=() if job.ignore_eos else end_ids,
            include_stop_str_in_output=job.include_stop_str_in_output,
        )
        self.started = False  # its first token was chosen (a preempted row's was, before)
        self.generator: torch.Generator | None = None  # its own random stream, kept across preemption
        self.held: torch.Tensor | None = None  # a preempted held row's scalings [L, N]
        self.last_token_at = 0.0
        self.scalings: list[torch.Tensor] = []
        self.logprobs: list[TokenLogprob] = []
        self.prompt_logprobs: list[TokenLogprob] = []

    @property
    def generated(self) -> list[int]:
        """The tokens generated so far that are text (a preempted row is recomputed from these)."""
        return self.request.ids[: self.request.text_tokens]

    def flush(self) -> None:
        """Stream the text that is safe to show."""
        if self.job.stream:
            piece = self.request.take()
            if piece:
                self.job.emit(Piece(self.job.index, piece))

    def result(self) -> Done:
        scalings = None
        if self.job.return_scalings != "none" and self.scalings:
            s = torch.stack(self.scalings).float()  # [n, L, N]
            if self.job.return_scalings == "token":
                scalings = s.tolist()
            elif self.job.return_scalings == "layer":
                scalings = s.mean(0).tolist()
            else:
                scalings = s.mean((0, 1)).tolist()
        logprobs = Logprobs(self.prompt_logprobs, self.logprobs) if self.job.logprobs is not None else None
        request = self.request
        return Done(
            self.job.index, request.text, request.finish_reason or "length", request.text_tokens, scalings, logprobs
        )


class Engine:
    """Continuous batching over a `Decoder` of `max_batch` rows in one worker thread (module docstring).
    `submit_group` is thread-safe; `metrics` (optional) receives the engine's events (serve/metrics.py).

    Memory: `longest` is the longest request (prompt + max_tokens; default the model's context: --max-model-len);
    the pool (`blocks.pool_blocks`) holds `kv_cache_memory` bytes, or on CUDA `gpu_memory_utilization` of the
    device less what is in use, allocated here, before the first request. `prefix_caching`: full blocks of prompts
    are reused by later prompts with the same prefix. `max_num_batched_tokens`: the tokens a prompt entering in
    pieces may prefill before each step (decoding rows count one each)."""

    def __init__(
        self,
        model: MixedModel,
        *,
        max_batch: int = 8,
        batching: bool = True,
        compile: bool | str = False,
        max_queue: int = 256,
        longest: int | None = None,
        cache_len: int | None = None,
        metrics: Any = None,
        kv_cache_memory: int | None = None,
        gpu_memory_utilization: float | None = None,
        prefix_caching: bool = True,
        max_num_batched_tokens: int = 512,
        block_size: int = BLOCK_SIZE,
    ) -> None:
        self.model = model
        self.tokenizer = model.tokenizer
        self.max_batch = max_batch if batching else 1
        self.max_queue = max_queue
        self.defaults = resolve_defaults(model, tokenizer=model.tokenizer)
        self.longest = longest or (cache_len // 2 if cache_len else (self.defaults.context or 2048))
        # virtual columns: twice the longest request, so that a request always fits once the rows before it have
        # moved along (they cost a read map and a mask, [rows, columns] each, not KV memory)
        self.cache_len = cache_len or cache_slots(2 * self.longest, None)
        self.max_num_batched_tokens = max_num_batched_tokens
        self.metrics = metrics
        self.batches = 0  # join rounds: steps before which one or more requests joined
        self.batched_requests = 0
        self.preemptions = 0
        layout: PoolLayout = layout_of(model, granular=True)
        blocks = pool_blocks(
            layout,
            model.device,
            rows=self.max_batch,
            longest=self.longest,
            kv_cache_memory=kv_cache_memory,
            gpu_memory_utilization=gpu_memory_utilization,
            block_size=block_size,
        )
        # compile: False, True (inductor) or a torch.compile backend name, as generate(compile=...)
        self.decoder = Decoder(
            model,
            self.max_batch,
            self.cache_len,
            compile=compile,
            blocks=blocks,
            block_size=block_size,
            prefix_cache=prefix_caching,
            layout=layout,
        )
        pool = self.decoder.paged
        self.pool_tokens = blocks * block_size
        self.pool_line = (
            f"{describe(pool)}; {self.pool_tokens // self.longest} rows of {self.longest} tokens fit at once"
            + ("" if self.decoder.prefix_cache else "; prefix caching off")
        )
        logger.info(self.pool_line)
        self._rows: list[_Row | None] = [None] * self.max_batch
        self._prefill: tuple[Job, _Row, Prefill] | None = None  # the prompt entering its row in pieces
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
        """Rows holding a job (decoding, or a prompt entering in pieces)."""
        return sum(row is not None for row in self._rows) + (self._prefill is not None)

    @property
    def decoding(self) -> int:
        return sum(row is not None for row in self._rows)

    @property
    def steps(self) -> int:
        return self.decoder.steps

    @property
    def blocks(self) -> dict[str, int]:
        """The pool's blocks: total, used by rows, free (cached blocks no row holds count as free)."""
        allocator = self.decoder.allocator
        return {"total": allocator.blocks, "used": allocator.used, "free": allocator.available}

    def submit(self, job: Job) -> None:
        self.submit_group([job])

    def submit_group(self, jobs: list[Job]) -> None:
        """Queue the jobs of one request together (they join in order as rows free). Raises `QueueFull` when more
        than `max_queue` jobs would wait beyond the free rows (an empty queue takes any one request; jobs that free
        rows will take at the next step do not count, however close together they arrive)."""
        with self._cond:
            if self._closed:
                raise QueueFull("the server is shutting down")
            free = self._free_slots()
            if self._pending and len(self._pending) + len(jobs) > self.max_queue + len(free):
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

    def _free_slots(self) -> list[int]:
        held = self._prefill[1].slot if self._prefill is not None else None
        return [i for i, row in enumerate(self._rows) if row is None and i != held]

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
                self._chunk()
                if self.decoding:
                    self._make_room()
                    self._step()
            except Exception as exc:  # a failed forward cannot be put on one row: every row in it ends
                logger.exception("generation failed")
                for row in self._rows:
                    if row is not None:
                        self._end(row.job, row, "error", f"generation failed: {exc}", 500, failed=True)
                if self._prefill is not None:
                    job, row, _ = self._prefill
                    self._end(job, row, "error", f"generation failed: {exc}", 500, failed=True)
        for row in self._rows:
            if row is not None:
                self._end(row.job, row, "shutdown", "the server is shutting down", 503)
        if self._prefill is not None:
            self._end(self._prefill[0], self._prefill[1], "shutdown", "the server is shutting down", 503)
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
        """The one way out for a job: its row freed (`failed`: its blocks cleared too), the reason counted, and its
        final message sent (the result, or an error with `message` and `status`)."""
        if row is not None and self._rows[row.slot] is row:
            self._rows[row.slot] = None
            self.decoder.leave(row.slot, failed=failed)
        if self._prefill is not None and self._prefill[0] is job:
            self.decoder.abandon(self._prefill[2], failed=failed)
            self._prefill = None
        if self.metrics is not None:
            self.metrics.finished(why)
        if message is None and row is not None:
            job.emit(row.result())
        else:
            job.emit(Failed(job.index, message or why, status, param))

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
        if self._prefill is not None:
            self._ended_early(self._prefill[0], self._prefill[1])

    # ------------------------------------------------------------------ admission

    def _prompt(self, job: Job) -> list[int]:
        """The tokens a job's row starts from: its prompt, and the tokens it generated before it was preempted."""
        return job.ids + job.resume.generated if job.resume is not None else job.ids

    def _spec(self, job: Job, row: _Row) -> RowSpec:
        if row.generator is None:
            row.generator = row_generator(job.sampling.seed, job.index, self.model.device)
        return RowSpec(job.mode, job.sampling, row.generator, job.max_tokens - len(row.generated), grammar=job.grammar)

    def _in_pieces(self, job: Job) -> bool:
        """Whether a job enters its row in pieces: a resumed one, a prompt longer than one step's token budget, or one
        whose prefix is cached (never one asking for the prompt's logprobs, which need every prompt position)."""
        if job.prompt_logprobs:
            return False
        ids = self._prompt(job)
        if job.resume is not None or len(ids) > self.max_num_batched_tokens:
            return True
        return self.decoder.cached(ids, RowSpec(job.mode)) > 0

    def _take(self) -> list[Job]:
        """The waiting jobs that join at this step as one batch, in order: while a row is free and the next job fits
        the columns and the free blocks with those before it (first come, first served). A job that enters in pieces
        starts here alone (while one is entering, the short prompts queued behind it still join). Cancelled and
        expired jobs end here."""
        group: list[Job] = []
        free = self._free_slots()
        with self._cond:
            while self._pending and len(group) < len(free):
                job = self._pending[0]
                if self._ended_early(job, None):
                    self._pending.popleft()
                    continue
                if self._in_pieces(job):  # one prompt in pieces at a time; short ones behind it join meanwhile
                    if not group and self._prefill is None:
                        self._begin(self._pending.popleft(), free[0])
                    break
                trial = [*group, job]
                blocks = sum(self.decoder.blocks_for(len(j.ids)) for j in trial)
                if self._target(trial) is None or blocks > self.decoder.allocator.available:
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
        """Let waiting jobs join: short prompts as one prefilled batch; a prompt whose prefix is cached, with one
        forward of its rest when that fits this step's token budget (`max_num_batched_tokens`), so that requests
        sharing a system prompt all join before the next step; a longer one goes on in pieces (`_chunk`)."""
        spent = 0
        while True:
            jobs = self._take()
            if jobs:
                self._join(jobs)
            if self._prefill is None:
                if not jobs:
                    return
                continue
            p = self._prefill[2]
            rest = len(p.ids) - p.done
            if rest > self.max_num_batched_tokens - spent:
                return
            spent += rest
            self._chunk(rest)
            if self._prefill is not None:  # it cannot join yet (blocks, columns)
                return

    def _join(self, jobs: list[Job]) -> None:
        """Prefill jobs as one left-padded batch into free rows, then take their first tokens."""
        self.batches += 1
        self.batched_requests += len(jobs)
        ids, mask = left_pad([j.ids for j in jobs], self.defaults.pad_token_id)
        self.decoder.place(ids.shape[1], max(j.max_tokens for j in jobs) - 1)
        slots = self._free_slots()[: len(jobs)]
        rows = [_Row(job, self.tokenizer, slot, self.defaults.eos_token_ids) for job, slot in zip(jobs, slots)]
        specs = [self._spec(job, row) for job, row in zip(jobs, rows)]
        for row in rows:
            self._rows[row.slot] = row
        try:
            joined = self.decoder.join(slots, ids, mask, specs, prompt_logits=any(j.prompt_logprobs for j in jobs))
        except Exception as exc:
            logger.exception("prefill failed")
            for row in rows:
                self._end(row.job, row, "error", f"generation failed: {exc}", 500, failed=True)
            return
        self._started(rows, joined, ids.shape[1])

    def _started(self, rows: list[_Row], joined: Any, T: int) -> None:
        """Rows whose prompts are in: their prompt logprobs, first tokens, or their end (echo only, failures)."""
        tokens, bad = torch.stack([joined.tokens, joined.bad.long()]).tolist()
        now = time.monotonic()
        for j, row in enumerate(rows):
            job = row.job
            if job.prompt_logprobs:
                lp = torch.log_softmax(joined.prompt_logits[j, T - len(job.ids) : T - 1].float(), -1)
                prompt = torch.tensor(job.ids[1:], device=lp.device)
                row.prompt_logprobs = [TokenLogprob(job.ids[0], None), *_logprobs_at(lp, prompt, job.logprobs or 0)]
            if self.metrics is not None and not row.started:
                self.metrics.first_token(now - job.submitted)
            row.started = True
            job.resume = None
            if job.max_tokens <= 0:  # the prompt only (echo)
                self._end(job, row, "length")
            elif not self._failed(row, bool(bad[j])):
                self._accept(row, tokens[j], joined.logits[j], joined.scalings[j])

    def _begin(self, job: Job, slot: int) -> None:
        """Start a job that enters its row in pieces (its cached prefix taken now; `_chunk` does the rest)."""
        row = job.resume or _Row(job, self.tokenizer, slot, self.defaults.eos_token_ids)
        row.slot = slot
        ids = self._prompt(job)
        prefill = self.decoder.begin(slot, ids, self._spec(job, row), output=len(ids) - len(job.ids), held=row.held)
        if self.metrics is not None and prefill.cached:
            self.metrics.prefix_hit(prefill.cached)
        self._prefill = (job, row, prefill)

    @torch.no_grad()
    def _chunk(self, n: int | None = None) -> None:
        """One piece of the prompt entering in pieces (`n` tokens, or at most `max_num_batched_tokens` less the
        decoding rows, at least one block); once all of it is in, its row joins the decoding rows."""
        if self._prefill is None:
            return
        job, row, p = self._prefill
        if not p.complete:
            if n is None:
                n = max(self.decoder.block_size, self.max_num_batched_tokens - self.decoding)
            n = min(len(p.ids) - p.done, n)
            if not self._room(self.decoder.extend_blocks(p, n), job):
                return  # rows that came first hold the blocks: wait for them
            try:
                self.decoder.extend(p, n)
            except Exception as exc:
                logger.exception("prefill failed")
                self._end(job, row, "error", f"generation failed: {exc}", 500, failed=True)
                return
            if not p.complete:
                return
        if self.decoder.place(len(p.ids), p.spec.max_new_tokens - 1) is None:
            return  # the columns are full until rows finish
        self._prefill = None
        self._rows[row.slot] = row
        self.batches += 1
        self.batched_requests += 1
        self._started([row], self.decoder.finish(p), len(p.ids))

    # ------------------------------------------------------------------ preemption

    def _room(self, blocks: int, job: Job | None) -> bool:
        """Free `blocks` blocks by preempting rows that came after `job` (None: any row but the oldest), newest
        first; whether there is room now."""
        allocator = self.decoder.allocator
        while blocks > allocator.available:
            later = [r for r in self._rows if r is not None and (job is None or r.job.submitted > job.submitted)]
            if self._prefill is not None and self._prefill[0] is not job:
                later.append(self._prefill[1])
            if len(later) <= (1 if job is None else 0):  # never the one row left, never the job itself
                return False
            self._preempt(max(later, key=lambda r: (r.job.submitted, r.slot)))
        return True

    def _make_room(self) -> None:
        """Blocks for the next step (a new block for each row whose next token starts one), preempting the newest
        rows when the pool has too few."""
        if not self._room(self.decoder.blocks_needed(), None):
            raise RuntimeError("the KV pool cannot hold the next token of the one row decoding")

    def _preempt(self, row: _Row) -> None:
        """Free a row's blocks and put its job back at the head of the queue, with the tokens it generated: it is
        recomputed when blocks free (its full blocks stay in the prefix cache until then, so this is often cheap)."""
        job = row.job
        self.preemptions += 1
        if self.metrics is not None:
            self.metrics.preempted()
        if self._prefill is not None and self._prefill[1] is row:
            self.decoder.abandon(self._prefill[2])
            self._prefill = None
        else:
            held = self.decoder.rows[row.slot].spec.held
            row.held = self.decoder.held_scalings(row.slot) if held else None
            # a held row's answer was mixed with its held scalings and its scaling-pass keys may not all be written:
            # only its prompt's blocks are offered to the prefix cache
            self._rows[row.slot] = None
            self.decoder.leave(row.slot, cache=job.ids if held else job.ids + row.generated[:-1])
        job.resume = row
        with self._cond:
            self._pending.appendleft(job)

    # ------------------------------------------------------------------ rows

    def _failed(self, row: _Row, bad: bool) -> bool:
        """End the row if its last step failed it: non-finite logits or scalings (500), or a grammar that could go
        no further (400: the tokenizer cannot write what the schema needs); whether it did."""
        why = self.decoder.grammar_failures.get(row.slot)
        if bad:
            self._end(row.job, row, "error", "the model produced non-finite values for this request", 500, failed=True)
        elif why is not None:
            message = f"structured output: {why} (the answer so far: {row.request.text[-80:]!r})"
            self._end(row.job, row, "error", message, 400, param="response_format")
        else:
            return False
        return True

    def _accept(self, row: _Row, token: int, logits: torch.Tensor, scalings: torch.Tensor) -> None:
        """Record the row's new token (its request state, logprobs, scalings); end the row if it is done."""
        job, request = row.job, row.request
        row.last_token_at = time.monotonic()
        if job.logprobs is not None:  # the EOS token too, as vLLM does
            lp = torch.log_softmax(logits[None].float(), -1)
            row.logprobs += _logprobs_at(lp, torch.tensor([token], device=lp.device), job.logprobs)
        request.push(token)
        if job.return_scalings != "none" and len(row.scalings) < request.text_tokens:
            row.scalings.append(scalings.detach().cpu().clone())
        row.flush()
        if self.metrics is not None:
            self.metrics.tokens(1)
        if request.done:
            self._end(job, row, request.finish_reason)

    @torch.no_grad()
    def _step(self) -> None:
        """One decode step over the occupied rows, one host read, then each row's new token."""
        rows = [row for row in self._rows if row is not None]
        out = self.decoder.step()
        occupied = torch.tensor([row.slot for row in rows], device=out.tokens.device)
        mean = out.scalings.index_select(0, occupied).float().mean((0, 1))  # [N], for the metrics
        k = out.tokens.shape[0]
        host = torch.cat([out.tokens.float(), out.bad.float(), mean]).tolist()  # the one sync
        tokens, bad = host[:k], host[k : 2 * k]
        now = time.monotonic()
        if self.metrics is not None:
            self.metrics.step(len(rows), torch.tensor(host[2 * k :]))
        for row in rows:
            if self.metrics is not None:
                self.metrics.inter_token(now - row.last_token_at)
            if not self._failed(row, bool(bad[row.slot])):
                self._accept(row, int(tokens[row.slot]), out.logits[row.slot], out.scalings[row.slot])
