"""The decode engine: one decode step as one function of preallocated tensors, compilable with `fullgraph=True`.

    DecodeBuffers (allocated once per generation, C = cache slots, a bucket >= prompt + new tokens):
        ids [B, 1], positions [B, 1], cache_position [1], live [B, 1]   the token to feed and where it goes
        mask [B, C]                      attention mask over the cache slots; the step sets column cache_position
        scalings [B, 1, L, N]            what the mixed layers mix with (held modes: filled once)
        multipliers [B, 1, sum_l R_l]    their rank multipliers; every mixed layer reads its slice
        cache: LoraMixCache of two transformers `StaticCache`s (scaling pass, mixed pass), and with a context gate
               its static `GateCache` (EMA sums [B, H + 1] or attention keys/values [B, C, d], same columns)

    decode_step(model, ...):   mask[:, cache_position] = live
        granular / truncated:  h = scaling_backbone(ids, cache.scaling)     (experts at the dummy scaling)
                               s = gate(h, mask, cache.gate); scalings.copy_(s); multipliers.copy_(...)
        prompt / fixed (held): nothing: scalings and multipliers were filled once after the prompt
        mixed pass:            logits = model(ids, cache.mixed) with every mixed layer reading `multipliers`
        -> logits [B, V], scalings [B, L, N]

Everything the step reads and writes is a tensor updated in place (the caches' own write offsets included), so the
step has no host sync and no data-dependent Python branch: dynamo traces it whole (0 graph breaks), and it compiles
once per (model, batch size, cache slots, held or not). On CUDA it is compiled with `mode="reduce-overhead"` (CUDA
graphs). Both passes use transformers' `StaticCache`: its layers keep their own write offset as a device tensor,
which is what the two passes need (each cache advances by one token per step), so no cache is written here.

Sparse top-k is not used inside the step (which experts a step needs is data the host would have to read): the
compiled step always takes the dense stacked path. Its outputs are the same (tests check both paths agree).
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from .base import LoraMixCache
from .layers import PreparedScalings

if TYPE_CHECKING:
    from .model import LoraMixModel

logger = logging.getLogger(__name__)

__all__ = ["DecodeBuffers", "cache_slots", "compile_support", "compiled_step", "decode_step", "new_buffers", "prefill"]

SLOT_BUCKET = 64
"""Cache lengths are rounded up to a multiple of this, so that generations of similar length share a compiled step."""


def cache_slots(needed: int, context: int | None) -> int:
    """The cache length bucket for `needed` positions: a multiple of SLOT_BUCKET, at most the context (if known)."""
    slots = -(-needed // SLOT_BUCKET) * SLOT_BUCKET
    return min(slots, context) if context is not None and context >= needed else slots


@dataclass
class DecodeBuffers:
    """The preallocated tensors of one generation, read and written in place by `decode_step` (shapes above)."""

    ids: torch.Tensor
    positions: torch.Tensor
    cache_position: torch.Tensor
    live: torch.Tensor
    mask: torch.Tensor
    scalings: torch.Tensor
    multipliers: torch.Tensor
    cache: LoraMixCache
    prepared: PreparedScalings
    held: bool
    hold_rows: torch.Tensor | None = None
    hold_values: torch.Tensor | None = None

    @property
    def batch(self) -> int:
        return self.ids.shape[0]

    @property
    def slots(self) -> int:
        return self.mask.shape[1]


def compile_support(model: LoraMixModel) -> str | None:
    """None if the decode step of this model can be compiled; otherwise the reason, in a few words."""
    if not getattr(model.model, "_can_compile_fullgraph", False):
        return f"{type(model.model).__name__} does not support static caches (transformers' _can_compile_fullgraph)"
    if model.backbone is model.model:
        return f"{type(model.model).__name__} has no separate backbone for the scaling pass"
    if model.sparse_top_k == "always":
        return 'sparse_top_k="always" forces the sparse top-k path, which cannot run in a compiled step'
    return None


def new_buffers(model: LoraMixModel, batch: int, slots: int, *, held: bool, text_config: Any) -> DecodeBuffers:
    """Allocate the buffers and the two static caches for `batch` rows and `slots` cache positions."""
    from transformers import StaticCache

    device, dtype = model.device, model.dtype
    if not held:
        model.scaling_backbone()  # builds the truncated view now (outside any compiled region)
    scalings = torch.zeros(batch, 1, model.n_layers, model.n_experts, device=device, dtype=dtype)
    multipliers = torch.zeros(batch, 1, sum(model.rank_sizes), device=device, dtype=model.multiplier_dtype)
    cache = LoraMixCache(
        scaling=None if held else StaticCache(config=text_config, max_cache_len=slots),
        mixed=StaticCache(config=text_config, max_cache_len=slots),
        gate=None if held else model.gate.new_cache(batch, slots),
    )
    buffers = DecodeBuffers(
        ids=torch.zeros(batch, 1, dtype=torch.long, device=device),
        positions=torch.zeros(batch, 1, dtype=torch.long, device=device),
        cache_position=torch.zeros(1, dtype=torch.long, device=device),
        live=torch.ones(batch, 1, dtype=torch.long, device=device),
        mask=torch.zeros(batch, slots, dtype=torch.long, device=device),
        scalings=scalings,
        multipliers=multipliers,
        cache=cache,
        prepared=PreparedScalings(scalings, multipliers, sizes=model.rank_sizes),
        held=held,
    )
    if not torch.compiler.is_compiling():  # fixed addresses: CUDA graphs replay them without copies
        for t in (buffers.ids, buffers.positions, buffers.cache_position, buffers.live, buffers.mask):
            torch._dynamo.mark_static_address(t)
        for t in (scalings, multipliers, *(cache.gate.tensors() if cache.gate is not None else ())):
            torch._dynamo.mark_static_address(t)
    return buffers


def hold(model: LoraMixModel, buffers: DecodeBuffers, scalings: torch.Tensor) -> None:
    """Fill the scalings buffer (and its rank multipliers) with `scalings` [B, 1, L, N], in place."""
    buffers.scalings.copy_(scalings)
    buffers.multipliers.copy_(model.rank_multipliers(buffers.scalings))


@torch.no_grad()
def prefill(
    model: LoraMixModel,
    buffers: DecodeBuffers,
    input_ids: torch.Tensor,
    positions: torch.Tensor,
    *,
    mode: str,
    fixed: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The prompt's forward (eager, not compiled) into the static caches: input_ids [B, T] with `buffers.mask`
    already holding the prompt's mask in columns [0, T). Leaves `buffers` ready for the first `decode_step`.
    Returns the logits [B, V] and scalings [B, L, N] of the last prompt position."""
    T = input_ids.shape[1]
    cache = buffers.cache
    if fixed is not None:
        hold(model, buffers, fixed)
        s, mix_with = fixed, buffers.prepared
    elif mode == "prompt":
        s = model.compute_scalings(input_ids, buffers.mask[:, :T], positions)
        hold(model, buffers, s[:, -1:])
        mix_with = s
    else:
        s = model.compute_scalings(
            input_ids, buffers.mask, positions, past_key_values=cache.scaling, use_cache=True, gate_cache=cache.gate
        )
        mix_with = s
    out = model(
        input_ids,
        attention_mask=buffers.mask,
        position_ids=positions,
        scalings=mix_with,
        past_key_values=LoraMixCache(None, cache.mixed),
        use_cache=True,
        **model.last_logits_only,
    )
    buffers.cache_position.fill_(T - 1)  # those of the last token fed; `advance` moves them on to the next one
    buffers.positions.copy_(positions[:, -1:])
    return out.logits[:, -1], s[:, -1]


def decode_step(
    model: LoraMixModel,
    ids: torch.Tensor,
    positions: torch.Tensor,
    cache_position: torch.Tensor,
    live: torch.Tensor,
    mask: torch.Tensor,
    scalings: torch.Tensor,
    multipliers: torch.Tensor,
    cache: LoraMixCache,
    prepared: PreparedScalings,
    held: bool,
    hold_rows: torch.Tensor | None = None,
    hold_values: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One decode step, in place over the buffers (see the module docstring). ids [B, 1] is the token at
    `positions` [B, 1], written at column `cache_position` of both caches. Returns logits [B, V] and the scalings
    [B, L, N] it mixed with (views of buffers that the next step overwrites: copy what you keep).

    A batch that mixes modes (the server's slots) passes `hold_rows` [B, 1, 1, 1] bool and `hold_values`
    [B, 1, L, N]: the rows marked mix with their held scalings (prompt / fixed modes), the others with the gate's."""
    mask.index_copy_(1, cache_position, live)
    if not held:
        probes = model.new_probes(ids.shape[0], 1)
        with model.state.use(model.dummy_scalings(), probes):
            out = model.scaling_backbone()(
                input_ids=ids,
                attention_mask=mask,
                position_ids=positions,
                past_key_values=cache.scaling,
                use_cache=True,
                return_dict=True,
            )
        s = model.gate(out.last_hidden_state, probes, mask, cache.gate)  # [B, 1, L, N]
        if hold_rows is not None:
            s = torch.where(hold_rows, hold_values, s)
        scalings.copy_(s)
        multipliers.copy_(model.rank_multipliers(s))
    with model.state.use(prepared):
        out = model.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            past_key_values=cache.mixed,
            use_cache=True,
            return_dict=True,
        )
    return out.logits[:, -1], scalings[:, 0]


def run_step(
    step: Callable[..., Any], model: LoraMixModel, buffers: DecodeBuffers
) -> tuple[torch.Tensor, torch.Tensor]:
    """Call `step` (decode_step, compiled or not) on the buffers."""
    b = buffers
    return step(
        model,
        b.ids,
        b.positions,
        b.cache_position,
        b.live,
        b.mask,
        b.scalings,
        b.multipliers,
        b.cache,
        b.prepared,
        b.held,
        b.hold_rows,
        b.hold_values,
    )


def advance(buffers: DecodeBuffers, token: torch.Tensor, live: torch.Tensor) -> None:
    """After a step: feed `token` [B] next, one position on; `live` [B] bool (rows still generating)."""
    buffers.ids.copy_(token[:, None])
    buffers.positions.add_(1)
    buffers.cache_position.add_(1)
    buffers.live.copy_(live[:, None])


_COMPILED: weakref.WeakKeyDictionary[Any, dict[tuple[Any, ...], Callable[..., Any]]] = weakref.WeakKeyDictionary()


def compiled_step(model: LoraMixModel, batch: int, slots: int, held: bool, backend: Any = None) -> Callable[..., Any]:
    """`decode_step` compiled with `fullgraph=True` (and `mode="reduce-overhead"` on CUDA) for this model, batch
    size, cache slots and kind (held or not); `backend` is a torch.compile backend (default "inductor"). Compiled
    once per key; a new batch size or bucket compiles anew
    (shapes are static), so a larger batch is never run through a step traced for a smaller one."""
    backend = backend or "inductor"
    key = (batch, slots, held, backend)
    per_model = _COMPILED.setdefault(model, {})
    step = per_model.get(key)
    if step is None:
        options: dict[str, Any] = dict(fullgraph=True, dynamic=False, backend=backend)
        if backend == "inductor" and model.device.type == "cuda":
            options["mode"] = "reduce-overhead"
        logger.info(
            "compiling the decode step: batch %d, %d cache slots, %s", batch, slots, "held" if held else "granular"
        )
        step = torch.compile(decode_step, **options)
        per_model[key] = step
    return step
