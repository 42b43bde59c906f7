"""The decoder: the one decode engine of loramix, behind `generate` and the server alike.

    Decoder(model, batch, slots)         B rows x C virtual cache columns over a pool of blocks (blocks.PagedCache:
                                         one block table per row for both passes and the gate), a Sampler for B rows
      join(rows, ids, mask, specs)       prompts (left padded, [J, T]) prefilled as ONE batch through both passes,
                                         copied into their rows' blocks, mapped to columns [column - n, column)
                                         (n each row's real tokens); their first tokens
      begin, extend, finish              one prompt entering its row in pieces: the blocks of its cached prefix
                                         (prefix cache), then chunks through the paged caches, then it joins
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

from .attention import use_step_attention
from .base import LoraMixCache, new_dynamic_cache, text_config
from .blocks import BLOCK_SIZE, NULL, TRASH, BlockAllocator, PagedCache, PoolLayout, block_keys, static_cache_support
from .contracts import MixedModel
from .layers import PreparedScalings
from .layout import restore_layout
from .sampling import Sampler, SamplingSettings

logger = logging.getLogger(__name__)

__all__ = [
    "HELD_MODES",
    "MODES",
    "DecodeBuffers",
    "Decoder",
    "Joined",
    "Prefill",
    "RowSpec",
    "Stepped",
    "cache_slots",
    "compile_function",
    "compile_options",
    "compile_support",
    "compiled_step",
    "decode_step",
    "non_finite_rows",
    "prepare_cpu_step",
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
    cache                             the LoraMixCache of the paged caches (the first B rows' read and write maps)
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
        logger.info("compiling the decode step: %d rows, %d cache slots, %s", rows, slots, "held" if held else "gated")
        step = per_model[key] = compile_function(decode_step, model, backend)
    return step


def compile_function(fn: Callable[..., Any], model: Any, backend: str) -> Callable[..., Any]:
    """`fn` (a function of the model and preallocated buffers, like `decode_step`) under torch.compile with
    `compile_options`; compiled at its first call."""
    options = compile_options(model, backend)
    inductor = options.get("options", {})
    if "post_grad_custom_post_pass" in inductor:
        prepare_cpu_step(model)
    compiled = torch.compile(fn, **options)
    return _frozen(compiled) if inductor.get("freezing") else compiled


def prepare_cpu_step(model: Any) -> None:
    """What compiling a CPU step with CPU_INDUCTOR_OPTIONS first does to the model: its weights back in row-major
    layout (which `gemv.RowReduction` reads; layout.py), and the step attention (attention.py). Code that compiles
    other functions of the same model calls it first, so that no compiled code sees the model change under it."""
    if restore_layout(model):
        logger.info("compiling on a CPU: the wide linears back in row-major layout, which the step reads fastest")
    use_step_attention(model.model)


CPU_INDUCTOR_OPTIONS = {"freezing": True, "cpp.weight_prepack": False}
"""Inductor's options for a CPU decode step: the weights frozen (constants of the compiled code, so a compiled step
no longer sees later changes to them), not repacked for oneDNN (its packed tensors cannot be cached on disk: the next
process would compile everything again). `compile_options` adds `gemv.RowReduction`, which turns each one-row
product of a row-major weight into a fused reduction that streams the weight 1.9-2.6x faster than MKL's; inductor's
`concat_linear` is left off, since the weights it concatenates come out in-features-major, which the reduction does
not take. Compiling also restores the row-major layout (layout.py) and gives the model the step attention
(attention.py). docs/generation.md, "Compiling on a CPU"."""


def compile_options(model: Any, backend: str) -> dict[str, Any]:
    """The torch.compile arguments of the decode step: one full graph of static shapes; with inductor, CUDA graphs
    on CUDA (mode="reduce-overhead") and CPU_INDUCTOR_OPTIONS on a CPU."""
    options: dict[str, Any] = dict(fullgraph=True, dynamic=False, backend=backend)
    if backend == "inductor":
        if model.device.type == "cuda":
            options["mode"] = "reduce-overhead"
        elif model.device.type == "cpu":
            from .gemv import RowReduction  # imports inductor: only when a CPU step compiles

            options["options"] = dict(CPU_INDUCTOR_OPTIONS, post_grad_custom_post_pass=RowReduction())
    return options


def _frozen(step: Callable[..., Any]) -> Callable[..., Any]:
    """A step compiled with inductor's `freezing`: dynamo must trace it with freezing on too (it then installs
    the model's parameters in the graph, where inductor can fold them), so it runs with the flag set."""
    import torch._inductor.config

    def run(*args: Any, **kwargs: Any) -> Any:
        with torch._inductor.config.patch(freezing=True):
            return step(*args, **kwargs)

    return run


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
    """One step of rows 0..k-1: tokens [k] chosen, their raw logits [k, V], the scalings [k, L, N] mixed with, and
    `bad` [k] (non-finite logits or scalings). All on the device. Whether a token ends its row is the row's
    `request.RequestState`'s to say."""

    tokens: torch.Tensor
    logits: torch.Tensor
    scalings: torch.Tensor
    bad: torch.Tensor


@dataclass
class _Row:
    spec: RowSpec
    start: int  # the column of its first token
    table: list[int]  # its blocks (blocks.PagedCache): position p lives in table[p // block_size]
    length: int  # tokens in its cache, positions 0 .. length - 1
    generated: int = 0

    @property
    def remaining(self) -> int:
        return self.spec.max_new_tokens - self.generated


@dataclass
class Prefill:
    """A prompt entering a row in pieces (`Decoder.begin`, `extend`, `finish`): its tokens, its block table, how many
    of them are in the cache (`done`: a shared prefix, then each chunk), and what the last piece gave."""

    row: int
    ids: list[int]
    spec: RowSpec
    table: list[int]
    done: int
    keys: list[bytes]
    cached: int = 0  # tokens taken from the prefix cache
    output: int = 0  # the last `output` tokens were generated before (a preempted row resuming)
    held: torch.Tensor | None = None  # [L, N]: a resuming held row's scalings, which its generated tokens mixed with
    ema: torch.Tensor | None = None  # the gate's moving average so far [1, H + 1] (EMA context gates)
    logits: torch.Tensor | None = None  # [V] of the last token, once it is in
    scalings: torch.Tensor | None = None  # [L, N] of the last token

    @property
    def complete(self) -> bool:
        return self.done == len(self.ids)


class Decoder:
    """B row slots over C virtual cache columns, the caches in blocks (module docstring, blocks.py). `compile`:
    False, True (inductor) or a torch.compile backend name. `granular=False` makes a decoder whose rows are all
    held (no scaling-pass cache). `generator`: the random stream of rows
    without their own. `blocks`: the pool's blocks (default: every row can hold C tokens); `prefix_cache`: rows
    reuse the full blocks of prompts that share their prefix (blocks.BlockAllocator)."""

    def __init__(
        self,
        model: MixedModel,
        batch: int,
        slots: int,
        *,
        granular: bool = True,
        compile: Any = False,
        generator: torch.Generator | None = None,
        blocks: int | None = None,
        block_size: int = BLOCK_SIZE,
        prefix_cache: bool = False,
        layout: PoolLayout | None = None,
    ) -> None:
        self.model, self.batch, self.slots, self.granular = model, batch, slots, granular
        self.backend = None if compile is False or compile is None else ("inductor" if compile is True else compile)
        device = model.device
        if granular:
            model.scaling_backbone()  # builds a truncated view now, outside any compiled region
        if blocks is None:
            blocks = batch * -(-slots // block_size)
        self.paged = PagedCache(model, batch, slots, blocks, granular=granular, block_size=block_size, layout=layout)
        # an EMA gate's state at a block's end is not kept, so its rows cannot start from a cached prefix
        self.prefix_cache = prefix_cache and self.paged.gate_ema is None
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
            cache=self.paged.view(batch, slots),
            prepared=PreparedScalings(scalings, multipliers, sizes=model.rank_sizes),
        )
        # fixed addresses: CUDA graphs replay them without copies. Not elsewhere: a frozen CPU step (compile_options)
        # would take such tensors for constants, and these change between steps
        if device.type == "cuda" and not torch.compiler.is_compiling():
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
                *self.paged.tensors(),
            ):
                torch._dynamo.mark_static_address(t)
        vocab = model.model.get_output_embeddings().weight.shape[0]
        self.sampler = Sampler(batch, vocab, device, generator)
        self.rows: list[_Row | None] = [None] * batch
        self.column = 0  # the column the next step writes
        self.steps = 0
        self._views: dict[tuple[int, int], DecodeBuffers] = {}
        self._column_moved = False  # set_column is due before the next step

    # ------------------------------------------------------------------ rows

    @property
    def occupied(self) -> list[int]:
        return [i for i, row in enumerate(self.rows) if row is not None]

    @property
    def allocator(self) -> BlockAllocator:
        return self.paged.allocator

    @property
    def block_size(self) -> int:
        return self.paged.block_size

    def blocks_for(self, tokens: int) -> int:
        """Blocks that hold `tokens` tokens."""
        return self.paged.blocks_for(tokens)

    def blocks_needed(self) -> int:
        """Blocks the next step takes: one for each row whose next token starts a block."""
        bs = self.block_size
        return sum(1 for row in self.rows if row is not None and row.length == len(row.table) * bs)

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
        along the columns. Returns the column, or None (nothing moved)."""
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
        few): the mask and the read map shift; the blocks stay where they are."""
        if d == 0:
            return
        lo = min(row.start for row in self.rows if row is not None)
        for t, fill in ((self.buffers.mask, 0), (self.paged.read, NULL * self.block_size)):
            moved = torch.full_like(t, fill)
            moved[:, lo + d : self.column + d] = t[:, lo : self.column]
            t.copy_(moved)
        for row in self.rows:
            if row is not None:
                row.start += d
        self.column += d
        self._column_moved = True

    def _family(self, spec: RowSpec) -> bytes:
        """What a row's cached keys and values depend on besides its tokens (the prefix cache's key)."""
        if spec.fixed is not None:
            return b"fixed:" + spec.fixed.detach().float().cpu().numpy().tobytes()
        return b"gated"

    def _keys(self, ids: list[int], spec: RowSpec) -> list[bytes]:
        return block_keys(ids, self.block_size, self._family(spec)) if self.prefix_cache else []

    def _attach(
        self, row: int, spec: RowSpec, table: list[int], ids: torch.Tensor, last: torch.Tensor, output: int = 0
    ) -> None:
        """Make `row` a decoding row: its `len(ids)` tokens in `table` end at the current column (call `place`
        first); its held scalings `last` [L, N] (the last prompt token's). The last `output` tokens were generated
        by the row before it was preempted: the sampler replays them (penalties, grammar) as it did then."""
        b, n, device = self.buffers, ids.shape[0], self.model.device
        start = self.column - n
        self.rows[row] = _Row(spec, start, table, n)
        b.mask[row].zero_()
        b.mask[row, start : self.column] = 1
        read = self.paged.read[row]
        read.fill_(NULL * self.block_size)
        read[start : self.column] = torch.tensor(self.paged.slots(table, 0, n), device=device)
        b.positions[row] = n
        b.hold_rows[row] = spec.held
        b.hold_values[row] = last[None]
        b.scalings[row] = last[None]
        b.multipliers[row] = self.model.rank_multipliers(last[None, None])[0]
        self.sampler.set_row(row, spec.sampling, ids[: n - output], spec.generator, spec.grammar)
        for token in ids[n - output :]:
            self.sampler.record([row], token[None])

    def _allocate(self, n: int) -> list[int]:
        if n > self.allocator.available:
            raise RuntimeError(f"{n} KV blocks needed, {self.allocator.available} free (the scheduler checks first)")
        return [self.allocator.allocate() for _ in range(n)]

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
        model = self.model
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
        out = self._mixed(ids, mask, positions, s, prompt.mixed, every=prompt_logits)
        lengths = mask.sum(-1).tolist()
        tables = [self._allocate(self.blocks_for(n)) for n in lengths]
        self.paged.write_prompt(rows, tables, lengths, mask, prompt)
        for j, (row, spec) in enumerate(zip(rows, specs)):
            real = ids[j][mask[j].bool()]
            self._attach(row, spec, tables[j], real, s[j, -1])
            if self.prefix_cache:
                self.allocator.register(tables[j], self._keys(real.tolist(), spec))
        return self._first(rows, out.logits[:, -1], s[:, -1], out.logits if prompt_logits else None)

    def _mixed(
        self,
        ids: torch.Tensor,
        mask: torch.Tensor,
        positions: torch.Tensor,
        s: torch.Tensor,
        cache: Any,
        every: bool = False,
    ) -> Any:
        """The mixed pass of a prompt (or a piece of one) with its scalings s [J, T, L, N], extending `cache`; the
        logits of every position (`every`) or of the last one."""
        keep = {} if every else self.model.last_logits_only
        mixed = LoraMixCache(None, cache)
        return self.model(
            ids, attention_mask=mask, position_ids=positions, scalings=s, past_key_values=mixed, use_cache=True, **keep
        )

    def _first(
        self, rows: list[int], logits: torch.Tensor, last: torch.Tensor, prompt_logits: torch.Tensor | None
    ) -> Joined:
        """The first tokens of rows that just joined, chosen from the logits [J, V] of their last prompt token."""
        tokens = self.sampler.choose(logits, rows)
        self.sampler.record(rows, tokens)
        self.buffers.ids[torch.tensor(rows, device=logits.device)] = tokens[:, None]
        self._column_moved = True
        return Joined(tokens, logits, last, non_finite_rows(logits, last), prompt_logits)

    # ------------------------------------------------------------------ prompts in pieces

    def cached(self, ids: list[int], spec: RowSpec) -> int:
        """How many tokens of `ids` the prefix cache holds now (full blocks; never the last token). Changes nothing."""
        n = 0
        for key in self._keys(ids, spec)[: (len(ids) - 1) // self.block_size]:
            if key not in self.allocator.cached:
                break
            n += self.block_size
        return n

    def held_scalings(self, row: int) -> torch.Tensor:
        """[L, N] the scalings a held row (prompt mode, fixed) mixes its answer with."""
        return self.buffers.hold_values[row, 0].clone()

    def begin(
        self, row: int, ids: list[int], spec: RowSpec, *, output: int = 0, held: torch.Tensor | None = None
    ) -> Prefill:
        """Start a prompt that enters `row` in pieces (`extend`, then `finish`): the full blocks of its longest
        cached prefix are taken from the prefix cache (its last token is always computed: its logits choose the
        first token). `output`: its last tokens were generated by the row before it was preempted; `held` [L, N]:
        the scalings a held row mixed them with (`held_scalings`), which they are recomputed with."""
        if not self.granular and not spec.held:
            raise ValueError("this decoder holds only prompt-mode or fixed rows")
        keys = self._keys(ids, spec)
        table = self.allocator.lookup(keys[: (len(ids) - 1) // self.block_size]) if keys else []
        done = len(table) * self.block_size
        ema = self.model.gate.new_cache(1, 1).ema if self.paged.gate_ema is not None else None
        return Prefill(row, list(ids), spec, table, done, keys, cached=done, output=output, held=held, ema=ema)

    def extend_blocks(self, p: Prefill, n: int) -> int:
        """Blocks the next `n` tokens of `p` take."""
        return self.blocks_for(min(p.done + n, len(p.ids))) - len(p.table)

    @torch.no_grad()
    def extend(self, p: Prefill, n: int) -> None:
        """Prefill the next `n` tokens of `p` (one forward of one row through the paged caches, attending to the
        tokens before it: a cached prefix, earlier chunks)."""
        model, device, bs = self.model, self.model.device, self.block_size
        start, end = p.done, min(p.done + n, len(p.ids))
        p.table += self._allocate(self.blocks_for(end) - len(p.table))
        C = cache_slots(end, None)
        read = torch.full((1, C), NULL * bs, dtype=torch.long, device=device)
        read[0, :end] = torch.tensor(self.paged.slots(p.table, 0, end), device=device)
        write = torch.tensor([self.paged.slots(p.table, start, end)], device=device)
        offset = torch.tensor(start, device=device)
        cache = self.paged.cache(read, write, offset, p.ema, torch.tensor([start], device=device))
        ids = torch.tensor([p.ids[start:end]], device=device)
        mask = torch.zeros(1, C, dtype=torch.long, device=device)
        mask[0, :end] = 1
        positions = torch.arange(start, end, device=device)[None]
        if p.spec.fixed is not None:
            s = p.spec.fixed.to(device, model.dtype)[:, None].expand(-1, end - start, -1, -1)
        else:
            s = model.compute_scalings(
                ids, mask, positions, past_key_values=cache.scaling, use_cache=True, gate_cache=cache.gate
            )
            answer = len(p.ids) - p.output  # where the tokens it generated before start
            if p.held is not None and end > answer:
                s[0, max(answer - start, 0) :] = p.held.to(s)
        out = self._mixed(ids, mask, positions, s, cache.mixed)
        p.done = end
        p.logits, p.scalings = out.logits[0, -1], s[0, -1]

    def finish(self, p: Prefill) -> Joined:
        """Make a fully prefilled `p` a decoding row at the current column (call `place` first) and choose its first
        token; its full blocks join the prefix cache."""
        if not p.complete or self.column < len(p.ids):
            raise ValueError("finish() needs the whole prompt prefilled and place() first")
        ids = torch.tensor(p.ids, device=self.model.device)
        if p.ema is not None:
            self.paged.gate_ema[p.row] = p.ema[0]
        self._attach(p.row, p.spec, p.table, ids, p.held if p.held is not None else p.scalings, p.output)
        if self.prefix_cache:
            self.allocator.register(p.table, p.keys)
        last = p.held if p.held is not None else p.scalings
        return self._first([p.row], p.logits[None], last[None], None)

    def abandon(self, p: Prefill, *, failed: bool = False) -> None:
        """Give back the blocks of a prompt that will not finish (cancelled, preempted, failed: zeroed and out of the
        prefix cache). Its full blocks already prefilled join the prefix cache: a preempted prompt resumes cheaply."""
        if failed:
            self.paged.clear(p.table)
        elif self.prefix_cache:
            full = p.done // self.block_size
            self.allocator.register(p.table[:full], p.keys[:full])
        self.allocator.release(p.table)
        p.table = []

    def leave(self, row: int, *, failed: bool = False, cache: list[int] | None = None) -> None:
        """Free `row` (finished, cancelled, failed or preempted): its blocks go back to the pool (cached ones stay
        in the prefix cache until evicted). A `failed` row (non-finite logits or scalings) has its blocks zeroed and
        taken out of the prefix cache, since a masked NaN still poisons attention (0 x NaN). `cache`: the tokens the
        row holds (a preempted row: prompt and output so far), whose full blocks join the prefix cache."""
        state = self.rows[row]
        if state is not None and cache is not None and self.prefix_cache and not failed:
            keys = self._keys(cache[: state.length], state.spec)
            self.allocator.register(state.table[: len(keys)], keys)
        self.rows[row] = None
        self.buffers.hold_rows[row] = False
        self.buffers.mask[row].zero_()
        self.paged.read[row].fill_(NULL * self.block_size)
        self.sampler.clear_row(row)
        if state is not None:
            if failed:
                self.paged.clear(state.table)
            self.allocator.release(state.table)
        if failed:
            self.buffers.scalings[row] = 0
            self.buffers.multipliers[row] = 0
            if self.paged.gate_ema is not None:
                self.paged.gate_ema[row].zero_()

    # ------------------------------------------------------------------ steps

    def _view(self, k: int, c: int) -> DecodeBuffers:
        if (k, c) == (self.batch, self.slots):
            return self.buffers
        view = self._views.get((k, c))
        if view is None:
            cache = self.paged.view(k, c)
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

    def _slots_now(self, k: int) -> None:
        """Where each of the first k rows writes its token this step (a new block where it starts one; rows that
        hold nothing write the reserved block), and that slot at the current column of the read map."""
        bs = self.block_size
        write, read = [TRASH * bs] * k, [NULL * bs] * k
        for i in range(k):
            row = self.rows[i]
            if row is None:
                continue
            if row.length == len(row.table) * bs:
                row.table += self._allocate(1)
            write[i] = read[i] = self.paged.slot(row.table, row.length)
            row.length += 1
        device = self.paged.write.device
        self.paged.write[:k, 0] = torch.tensor(write, device=device)
        self.paged.read[:k, self.column] = torch.tensor(read, device=device)

    @torch.no_grad()
    def step(self) -> Stepped:
        """One decode step over rows 0..k-1 (k the power of two covering the highest occupied row): the tokens
        chosen are fed at the next step. Nothing is read back to the host."""
        occupied = self.occupied
        k = min(self.batch, 1 << max(occupied).bit_length()) if occupied else self.batch
        c = self._columns(occupied)
        if self._column_moved:
            self.buffers.column.fill_(self.column)
            self.paged.column.fill_(self.column)
            self._column_moved = False
        self._slots_now(k)
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
        b.column.add_(1)  # the gate's column (paged.column) the gate advances itself
        self.column += 1
        self.steps += 1
        for i in occupied:
            self.rows[i].generated += 1
        return Stepped(tokens, logits, scalings, non_finite_rows(logits, scalings))


def non_finite_rows(logits: torch.Tensor, scalings: torch.Tensor) -> torch.Tensor:
    """[n] rows whose logits [n, V] or scalings [n, L, N] hold a NaN or an infinity."""
    return ~(torch.isfinite(logits).all(-1) & torch.isfinite(scalings).flatten(1).all(-1))
