"""The decoder: the one decode engine of loramix, behind `generate` and the server alike.

    Decoder(model, batch, slots)         B row slots x C cache columns (slots.SlotCache), a Sampler for B rows
      join(rows, ids, mask, specs)       prompts (left padded, [J, T]) prefilled as ONE batch through both passes,
                                         copied into their rows at columns [column - T, column); their first tokens
      step()                             one decode step for every row: the token fed at `column`, the next chosen
      leave(row)                         the row is free for the next join
      place(T, need)                     the column a prompt of T tokens needing `need` more columns can join at,
                                         moving every row along the columns (one roll) when that makes room

    decode_step(model, buffers)          one function of preallocated tensors (compilable with fullgraph=True):
        mask[:, column] = 1                                    (every row, free ones too: none is all masked)
        a row that is not held:  h = scaling_backbone(ids, cache.scaling)      (experts at the dummy scaling)
                                 s = gate(h, mask, cache.gate); scalings, multipliers <- s
        a held row (prompt mode, fixed scalings): the scalings of its last prompt token / its fixed mixture
        mixed pass:              logits = model(ids, cache.mixed), every mixed layer reading `multipliers`
      A batch whose rows are all held skips the scaling pass.

Everything the step reads and writes is a tensor updated in place (the caches' write offsets included), so it has no
host sync and no data-dependent branch: dynamo traces it whole (0 graph breaks) and it compiles once per (model, rows,
columns, held or not); on CUDA with mode="reduce-overhead" (CUDA graphs). The step runs over views of the first k
rows, k the power of two covering the highest occupied row (a padded row costs as much as a real one), and the first
c columns, c the bucket covering the columns in use (a multiple of SLOT_BUCKET eagerly, a power of two compiled, so
that a long generation compiles a few shapes): a server allocates twice its longest request, but a step attends to
what its rows hold (rows move left when the first ones leave). Sampling (sampling.py)
follows the step on the device; the decoder reads nothing back: its caller reads each step's tokens when it needs
them (the server every step, `generate` every few steps).

A row with a grammar (RowSpec.grammar, grammar.py) has its tokens constrained by the sampler, which then reads
the chosen tokens back every step (the grammar advances on the host); rows without one change nothing.

Rows share the write column: a row's tokens fill a contiguous range of columns ending at the current one, its
positions (RoPE) start at 0 and its mask hides the columns before its range.
"""

from __future__ import annotations

import dataclasses
import logging
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .base import LoraMixCache, new_dynamic_cache, text_config
from .layers import PreparedScalings
from .sampling import Sampler, SamplingSettings
from .slots import SlotCache, static_cache_support

logger = logging.getLogger(__name__)

__all__ = [
    "HELD_MODES",
    "MODES",
    "DecodeBuffers",
    "Decoder",
    "Joined",
    "RowSpec",
    "Stepped",
    "cache_slots",
    "compile_support",
    "compiled_step",
    "decode_step",
    "non_finite_rows",
]

MODES = ("granular", "prompt", "truncated")
"""The speed modes a caller names (generate.py's docstring); "fixed" is what a row given its own scalings runs."""
HELD_MODES = ("prompt", "fixed")
"""Modes whose rows mix with scalings held after the prompt (no scaling pass while decoding)."""

SLOT_BUCKET = 64
"""Cache lengths are rounded up to a multiple of this, so that generations of similar length share a compiled step."""


def cache_slots(needed: int, context: int | None) -> int:
    """The cache length bucket for `needed` positions: a multiple of SLOT_BUCKET, at most the context (if known)."""
    slots = -(-needed // SLOT_BUCKET) * SLOT_BUCKET
    return min(slots, context) if context is not None and context >= needed else slots


def compile_support(model: Any) -> str | None:
    """None if the decode step of this model can be compiled; otherwise the reason, in a few words."""
    if model.sparse_top_k == "always":
        return 'sparse_top_k="always" forces the sparse top-k path, which cannot run in a compiled step'
    return static_cache_support(model)


@dataclass
class DecodeBuffers:
    """What `decode_step` reads and writes in place (B rows, C columns):

    ids [B, 1], positions [B, 1]      the token each row feeds and its position
    column [1]                        the cache column every row writes
    mask [B, C]                       attention mask over the columns (the step sets `column`)
    scalings [B, 1, L, N]             what the mixed layers mix with; multipliers [B, 1, sum_l R_l] their rank form
    hold_rows [B, 1, 1, 1] bool       rows that mix with `hold_values` [B, 1, L, N] instead of the gate's scalings
    cache                             the LoraMixCache of the slot caches (views of the first B rows)
    held                              every row is held: no scaling pass
    """

    ids: torch.Tensor
    positions: torch.Tensor
    column: torch.Tensor
    mask: torch.Tensor
    scalings: torch.Tensor
    multipliers: torch.Tensor
    hold_rows: torch.Tensor
    hold_values: torch.Tensor
    cache: LoraMixCache
    prepared: PreparedScalings
    held: bool = False

    def first(self, k: int, c: int, cache: LoraMixCache, sizes: list[int]) -> DecodeBuffers:
        """The buffers of the first k rows and c columns (views: same storage)."""
        rows = {
            f.name: getattr(self, f.name)[:k]
            for f in dataclasses.fields(self)
            if f.name not in ("column", "cache", "prepared", "held")
        }
        rows["mask"] = rows["mask"][:, :c]
        prepared = PreparedScalings(rows["scalings"], rows["multipliers"], sizes=sizes)
        return DecodeBuffers(**rows, column=self.column, cache=cache, prepared=prepared)


def decode_step(model: Any, b: DecodeBuffers, sparse: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """One decode step in place over the buffers (module docstring). Returns logits [B, V] and the scalings
    [B, L, N] mixed with (views of buffers the next step overwrites: copy what you keep). `sparse` (eager only):
    let a top-k gate compute only the chosen experts (`LoraMixModel.use_sparse_top_k`)."""
    b.mask.index_fill_(1, b.column, 1)
    prepared = b.prepared
    if not b.held:
        probes = model.new_probes(b.ids.shape[0], 1)
        with model.state.use(model.dummy_scalings(), probes):
            out = model.scaling_backbone()(
                input_ids=b.ids,
                attention_mask=b.mask,
                position_ids=b.positions,
                past_key_values=b.cache.scaling,
                use_cache=True,
                return_dict=True,
            )
        s = model.gate(out.last_hidden_state, probes, b.mask, b.cache.gate)  # [B, 1, L, N]
        b.scalings.copy_(torch.where(b.hold_rows, b.hold_values, s))
        b.multipliers.copy_(model.rank_multipliers(b.scalings))
        if sparse:
            prepared = model.prepare_scalings(b.scalings)
    with model.state.use(prepared):
        out = model.model(
            input_ids=b.ids,
            attention_mask=b.mask,
            position_ids=b.positions,
            past_key_values=b.cache.mixed,
            use_cache=True,
            return_dict=True,
        )
    return out.logits[:, -1], b.scalings[:, 0]


_COMPILED: weakref.WeakKeyDictionary[Any, dict[tuple[Any, ...], Callable[..., Any]]] = weakref.WeakKeyDictionary()


def compiled_step(model: Any, rows: int, slots: int, held: bool, backend: Any = None) -> Callable[..., Any]:
    """`decode_step` compiled with `fullgraph=True` (and `mode="reduce-overhead"` on CUDA) for this model, number of
    rows, columns and kind (held or not); `backend` a torch.compile backend (default "inductor"). Compiled once per
    key: a new shape compiles anew, so a larger batch never runs through a step traced for a smaller one."""
    backend = backend or "inductor"
    key = (rows, slots, held, backend)
    per_model = _COMPILED.setdefault(model, {})
    step = per_model.get(key)
    if step is None:
        options: dict[str, Any] = dict(fullgraph=True, dynamic=False, backend=backend)
        if backend == "inductor" and model.device.type == "cuda":
            options["mode"] = "reduce-overhead"
        logger.info("compiling the decode step: %d rows, %d cache slots, %s", rows, slots, "held" if held else "gated")
        step = torch.compile(decode_step, **options)
        per_model[key] = step
    return step


@dataclass
class RowSpec:
    """How one row decodes: its mode ("granular", "prompt", "truncated", or "fixed" with `fixed` scalings [1, L, N]),
    its sampling settings, its own random stream (or None), how many tokens it may still generate, and the
    `grammar.Grammar` its tokens must follow (or None)."""

    mode: str = "granular"
    sampling: SamplingSettings = dataclasses.field(default_factory=SamplingSettings)
    generator: torch.Generator | None = None
    max_new_tokens: int = 0
    fixed: torch.Tensor | None = None
    grammar: Any = None

    @property
    def held(self) -> bool:
        return self.mode in HELD_MODES


@dataclass
class Joined:
    """What a join gives back: per joining row, its first token [J] (chosen from the prefill), the raw logits and
    scalings of its last prompt position ([J, V], [J, L, N]), `prompt_logits` [J, T, V] when asked for, and
    `bad` [J] (non-finite logits or scalings)."""

    tokens: torch.Tensor
    logits: torch.Tensor
    scalings: torch.Tensor
    bad: torch.Tensor
    prompt_logits: torch.Tensor | None = None


@dataclass
class Stepped:
    """One step of rows 0..k-1: tokens [k] chosen, their raw logits [k, V], the scalings [k, L, N] mixed with,
    `eos` [k] (the token ends the row) and `bad` [k] (non-finite logits or scalings). All on the device."""

    tokens: torch.Tensor
    logits: torch.Tensor
    scalings: torch.Tensor
    eos: torch.Tensor
    bad: torch.Tensor


@dataclass
class _Row:
    spec: RowSpec
    start: int  # the first column of its prompt
    generated: int = 0

    @property
    def remaining(self) -> int:
        return self.spec.max_new_tokens - self.generated


class Decoder:
    """B row slots over C cache columns (module docstring). `compile`: False, True (inductor) or a torch.compile
    backend name. `granular=False` makes a decoder whose rows are all held (no scaling-pass cache). `eos`: the token
    ids that end a row. `generator`: the random stream of rows without their own."""

    def __init__(
        self,
        model: Any,
        batch: int,
        slots: int,
        *,
        granular: bool = True,
        compile: Any = False,
        eos: tuple[int, ...] = (),
        generator: torch.Generator | None = None,
    ) -> None:
        self.model, self.batch, self.slots, self.granular = model, batch, slots, granular
        self.backend = None if compile is False or compile is None else ("inductor" if compile is True else compile)
        device, config = model.device, text_config(model.model)
        self.slot_cache = SlotCache(model, config, batch, slots, granular=granular)
        if granular:
            model.scaling_backbone()  # builds a truncated view now, outside any compiled region
        scalings = torch.zeros(batch, 1, model.n_layers, model.n_experts, device=device, dtype=model.dtype)
        multipliers = torch.zeros(batch, 1, sum(model.rank_sizes), device=device, dtype=model.multiplier_dtype)
        self.buffers = DecodeBuffers(
            ids=torch.zeros(batch, 1, dtype=torch.long, device=device),
            positions=torch.zeros(batch, 1, dtype=torch.long, device=device),
            column=torch.zeros(1, dtype=torch.long, device=device),
            mask=torch.zeros(batch, slots, dtype=torch.long, device=device),
            scalings=scalings,
            multipliers=multipliers,
            hold_rows=torch.zeros(batch, 1, 1, 1, dtype=torch.bool, device=device),
            hold_values=torch.zeros_like(scalings),
            cache=self.slot_cache.cache,
            prepared=PreparedScalings(scalings, multipliers, sizes=model.rank_sizes),
        )
        if not torch.compiler.is_compiling():  # fixed addresses: CUDA graphs replay them without copies
            b = self.buffers
            for t in (
                b.ids,
                b.positions,
                b.column,
                b.mask,
                b.scalings,
                b.multipliers,
                b.hold_rows,
                b.hold_values,
                *self.slot_cache.tensors(),
            ):
                torch._dynamo.mark_static_address(t)
        vocab = model.model.get_output_embeddings().weight.shape[0]
        self.sampler = Sampler(batch, vocab, device, generator)
        self.eos = torch.tensor(eos, dtype=torch.long, device=device) if eos else None
        self.rows: list[_Row | None] = [None] * batch
        self.column = 0  # the column the next step writes
        self.steps = 0
        self._views: dict[int, DecodeBuffers] = {}
        self._column_moved = False  # set_column is due before the next step

    # ------------------------------------------------------------------ rows

    @property
    def occupied(self) -> list[int]:
        return [i for i, row in enumerate(self.rows) if row is not None]

    @property
    def grammar_failures(self) -> dict[int, str]:
        """Constrained rows whose grammar could go no further (row -> why; host state, no sync): their last token
        is not valid output, and the row should end as failed."""
        return self.sampler.failures

    def target(self, prompt: int, need: int) -> int | None:
        """The column at which prompts of `prompt` tokens that need `need` more columns can join (the rows already
        there moved along to it), or None if they cannot join before rows finish. Changes nothing."""
        rows = [row for row in self.rows if row is not None]
        if not rows:
            return prompt if prompt + need <= self.slots else None
        need = max([need, *(row.remaining for row in rows)])
        if self.column >= prompt and self.column + need <= self.slots:
            return self.column
        target = max([prompt, *(self.column - row.start for row in rows)])
        return target if target + need <= self.slots else None

    def place(self, prompt: int, need: int) -> int | None:
        """`target`, then make it the current column: an empty decoder starts over there, otherwise every row moves
        along by one roll of the caches and the mask. Returns the column, or None (nothing moved)."""
        target = self.target(prompt, need)
        if target is None:
            return None
        if self.occupied:
            self._roll(target - self.column)
        else:
            self.column, self._column_moved = target, True
        return target

    def _roll(self, d: int) -> None:
        """Move every row d columns along (right to make room for a longer prompt, left to keep the columns in use
        few): the columns from the first row's start to the current one, in the caches and the mask."""
        if d == 0:
            return
        lo = min(row.start for row in self.rows if row is not None)
        self.slot_cache.move(lo, self.column, d)
        mask = torch.zeros_like(self.buffers.mask)
        mask[:, lo + d : self.column + d] = self.buffers.mask[:, lo : self.column]
        self.buffers.mask.copy_(mask)
        for row in self.rows:
            if row is not None:
                row.start += d
        self.column += d
        self._column_moved = True

    @torch.no_grad()
    def join(
        self,
        rows: list[int],
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        specs: list[RowSpec],
        *,
        prompt_logits: bool = False,
    ) -> Joined:
        """Prefill prompts [J, T] (left padded; mask [J, T]) as one batch into the free `rows`, ending at the current
        column (call `place` first); choose their first tokens. Raises ValueError when called out of turn (no `place`,
        or a gated row in a decoder made for held rows only)."""
        model, b = self.model, self.buffers
        T, device = input_ids.shape[1], model.device
        if self.column < T:
            raise ValueError(f"join at column {self.column} needs place() first: the prompts have {T} tokens")
        ids, mask = input_ids.to(device), attention_mask.to(device=device, dtype=torch.long)
        positions = (mask.cumsum(-1) - 1).clamp_min(0)
        fixed = [spec.fixed is not None for spec in specs]
        if not self.granular and not all(spec.held for spec in specs):
            raise ValueError("this decoder holds only prompt-mode or fixed rows")
        config = text_config(model.model)
        prompt = LoraMixCache(
            scaling=new_dynamic_cache(config) if self.granular else None,
            mixed=new_dynamic_cache(config),
            gate=model.gate.new_cache() if self.granular else None,
        )
        if all(fixed):
            s = torch.cat([spec.fixed for spec in specs]).to(device, model.dtype)[:, None].expand(-1, T, -1, -1)
        else:
            s = model.compute_scalings(
                ids,
                mask,
                positions,
                past_key_values=prompt.scaling,
                use_cache=prompt.scaling is not None,
                gate_cache=prompt.gate,
            )
            if any(fixed):
                for j, spec in enumerate(specs):
                    if spec.fixed is not None:
                        s[j] = spec.fixed.to(s)
        keep = {} if prompt_logits else model.last_logits_only
        out = model(
            ids,
            attention_mask=mask,
            position_ids=positions,
            scalings=s,
            past_key_values=LoraMixCache(None, prompt.mixed),
            use_cache=True,
            **keep,
        )
        start = self.column - T
        self.slot_cache.write(rows, start, prompt)
        index = torch.tensor(rows, device=device)
        b.mask.index_fill_(0, index, 0)
        b.mask[index, start : self.column] = mask
        b.positions[index] = positions[:, -1:] + 1
        held = torch.tensor([spec.held for spec in specs], device=device)
        b.hold_rows[index] = held[:, None, None, None]
        b.hold_values[index] = s[:, -1:]
        b.scalings[index] = s[:, -1:]
        b.multipliers[index] = model.rank_multipliers(s[:, -1:])
        for j, (row, spec) in enumerate(zip(rows, specs)):
            self.rows[row] = _Row(spec, start)
            self.sampler.set_row(row, spec.sampling, ids[j][mask[j].bool()], spec.generator, spec.grammar)
        logits, last = out.logits[:, -1], s[:, -1]
        tokens = self.sampler.choose(logits, rows)
        self.sampler.record(rows, tokens)
        b.ids[index] = tokens[:, None]
        self._column_moved = True
        return Joined(tokens, logits, last, non_finite_rows(logits, last), out.logits if prompt_logits else None)

    def leave(self, row: int, *, failed: bool = False) -> None:
        """Free `row` (finished, cancelled or failed). A free row keeps decoding as padding over finite values;
        a `failed` row (non-finite logits or scalings) has its cache rows zeroed, since a masked NaN still poisons
        attention (0 x NaN) for the next request in the row."""
        self.rows[row] = None
        self.buffers.hold_rows[row] = False
        self.sampler.clear_row(row)
        if failed:
            self.slot_cache.clear(row)
            self.buffers.scalings[row] = 0
            self.buffers.multipliers[row] = 0

    # ------------------------------------------------------------------ steps

    def _view(self, k: int, c: int) -> DecodeBuffers:
        if (k, c) == (self.batch, self.slots):
            return self.buffers
        cache = self.slot_cache.view(k, c)
        view = self._views.get((k, c))
        if view is None or view.cache is not cache:
            view = self._views[(k, c)] = self.buffers.first(k, c, cache, self.model.rank_sizes)
        return view

    def _bucket(self, columns: int) -> int:
        """The columns a step over `columns` columns in use attends to: a multiple of SLOT_BUCKET eagerly; compiled,
        a power of two (at least SLOT_BUCKET), so that a long generation compiles a few shapes, not one per 64."""
        if self.backend is None:
            return cache_slots(columns, None)
        return max(SLOT_BUCKET, 1 << (columns - 1).bit_length())

    def _columns(self, occupied: list[int]) -> int:
        """How many columns the next step attends to: the bucket covering the columns in use (after moving every
        row left when the first row's start has passed a bucket: rows that left free their columns)."""
        if occupied:
            lo = min(self.rows[i].start for i in occupied)
            if lo > 0 and self._bucket(self.column + 1 - lo) < self._bucket(self.column + 1):
                self._roll(-lo)
        return min(self.slots, self._bucket(self.column + 1))

    @torch.no_grad()
    def step(self) -> Stepped:
        """One decode step over rows 0..k-1 (k the power of two covering the highest occupied row): the tokens
        chosen are fed at the next step. Nothing is read back to the host."""
        occupied = self.occupied
        k = min(self.batch, 1 << max(occupied).bit_length()) if occupied else self.batch
        c = self._columns(occupied)
        if self._column_moved:
            self.buffers.column.fill_(self.column)
            self.slot_cache.set_column(self.column)
            self._column_moved = False
        b = self._view(k, c)
        b.held = all(self.rows[i].spec.held for i in occupied)
        if self.backend is not None:
            logits, scalings = compiled_step(self.model, k, c, b.held, self.backend)(self.model, b)
        else:
            logits, scalings = decode_step(self.model, b, self.model.use_sparse_top_k(1))
        rows = slice(0, k)
        tokens = self.sampler.choose(logits, rows)
        self.sampler.record(rows, tokens)
        b.ids.copy_(tokens[:, None])
        b.positions.add_(1)
        b.column.add_(1)
        self.column += 1
        self.steps += 1
        for i in occupied:
            self.rows[i].generated += 1
        eos = torch.isin(tokens, self.eos) if self.eos is not None else torch.zeros_like(tokens, dtype=torch.bool)
        return Stepped(tokens, logits, scalings, eos, non_finite_rows(logits, scalings))


def non_finite_rows(logits: torch.Tensor, scalings: torch.Tensor) -> torch.Tensor:
    """[n] rows whose logits [n, V] or scalings [n, L, N] hold a NaN or an infinity."""
    return ~(torch.isfinite(logits).all(-1) & torch.isfinite(scalings).flatten(1).all(-1))
