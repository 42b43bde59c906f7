"""The decoder's caches: rows x columns of transformers' `StaticCache`s (one per pass) and the gate's own static
cache. The only code that knows how transformers lays out a cache (`layer.keys` [B, heads, C, d], the write offset
`cumulative_length`, lazy initialisation); decode.py asks it to write, move and view rows.

    write(rows, start, prompt)   a batch of prompts prefilled into DynamicCaches -> those rows, columns [start, +T)
    move(lo, hi, d)              columns [lo, hi) of every row d columns along (attention reads a row's mask and
                                 positions, not which columns hold it)
    set_column(c)                the column the next token of every row writes (both caches and the gate's)
    view(k, c)                   a LoraMixCache over the first k rows and c columns (views: same storage, offsets)
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from .base import LoraMixCache
from .gate import GateCache

__all__ = ["SlotCache", "static_cache_support"]


def static_cache_support(model: Any) -> str | None:
    """None if the decoder can run this model (a LoraMixModel) over static caches; otherwise why not, in a few
    words (the caller then decodes by recomputing the prefix, with a warning)."""
    from transformers import StaticCache

    from .base import text_config

    hf = model.model
    if not getattr(hf, "_can_compile_fullgraph", False):
        return f"{type(hf).__name__} does not support static caches (transformers' _can_compile_fullgraph)"
    if model.backbone is hf:
        return f"{type(hf).__name__} has no separate backbone for the scaling pass"
    if any(
        getattr(layer, "is_sliding", False) for layer in StaticCache(config=text_config(hf), max_cache_len=1).layers
    ):
        return f"{type(hf).__name__} has sliding-window attention layers, which the slot caches do not move"
    return None


class SlotCache:
    """Static caches of `batch` rows and `slots` columns for the two passes (the scaling pass's only when
    `granular`: held-only decoders run no scaling pass after the prompt) and the gate's cache."""

    def __init__(self, model: Any, text_config: Any, batch: int, slots: int, *, granular: bool) -> None:
        from transformers import StaticCache

        self.batch, self.slots = batch, slots
        self.cache = LoraMixCache(
            scaling=StaticCache(config=text_config, max_cache_len=slots) if granular else None,
            mixed=StaticCache(config=text_config, max_cache_len=slots),
            gate=model.gate.new_cache(batch, slots) if granular else None,
        )
        self._views: dict[int, LoraMixCache] = {}

    def _kv(self) -> list[tuple[Any, Any]]:
        """(static cache, its pass's name) for both passes."""
        return [
            (c, name) for c, name in ((self.cache.scaling, "scaling"), (self.cache.mixed, "mixed")) if c is not None
        ]

    def write(self, rows: list[int], start: int, prompt: LoraMixCache) -> None:
        """Copy a prefilled batch (DynamicCaches of len(rows) rows and T columns) into `rows`, columns
        [start, start + T). The other columns of those rows keep what they had (the mask hides them)."""
        index, initialised = None, False
        for static, name in self._kv():
            source = getattr(prompt, name)
            if source is None:
                continue
            for layer, src in zip(static.layers, source.layers):
                if getattr(src, "keys", None) is None:  # a layer the (truncated) scaling pass never reaches
                    continue
                if not layer.is_initialized:  # the prompt's keys tell the heads, head size, dtype and device
                    shape = (self.batch, *src.keys.shape[1:2], 1)
                    layer.lazy_initialization(
                        src.keys.new_zeros(*shape, src.keys.shape[3]), src.values.new_zeros(*shape, src.values.shape[3])
                    )
                    initialised = True
                if index is None:
                    index = torch.tensor(rows, device=layer.keys.device)
                end = start + src.keys.shape[2]
                layer.keys[index, :, start:end] = src.keys
                layer.values[index, :, start:end] = src.values
        if initialised:
            self._views.clear()  # views made before a layer's initialisation hold no tensors for it
        gate, source = self.cache.gate, prompt.gate
        if gate is None or source is None:
            return
        index = torch.tensor(rows, device=gate.offset.device)
        if gate.ema is not None:
            gate.ema[index] = source.ema
        if gate.keys is not None:
            gate.keys[index, start : start + source.keys.shape[1]] = source.keys
            gate.values[index, start : start + source.values.shape[1]] = source.values

    def clear(self, row: int) -> None:
        """Zero one row of every cache (after a failure left non-finite values in it)."""
        for static, _ in self._kv():
            for layer in static.layers:
                if layer.is_initialized:
                    layer.keys[row].zero_()
                    layer.values[row].zero_()
        if self.cache.gate is not None:
            for t in (self.cache.gate.ema, self.cache.gate.keys, self.cache.gate.values):
                if t is not None:
                    t[row].zero_()

    def move(self, lo: int, hi: int, d: int) -> None:
        """Move columns [lo, hi) of every row d columns along (either way; the caller keeps them inside)."""
        for static, _ in self._kv():
            for layer in static.layers:
                if layer.is_initialized:
                    for t in (layer.keys, layer.values):
                        t[:, :, lo + d : hi + d] = t[:, :, lo:hi].clone()
        gate = self.cache.gate
        if gate is not None and gate.keys is not None:
            for t in (gate.keys, gate.values):
                t[:, lo + d : hi + d] = t[:, lo:hi].clone()

    def set_column(self, column: int) -> None:
        """The column every cache writes next (in place: a compiled step keeps reading the same tensors)."""
        for static, _ in self._kv():
            for layer in static.layers:
                if layer.is_initialized:
                    layer.cumulative_length.fill_(column)
        if self.cache.gate is not None:
            self.cache.gate.offset.fill_(column)

    def tensors(self) -> list[torch.Tensor]:
        """The gate cache's tensors (those a compiled step must see at fixed addresses; the KV layers mark theirs)."""
        return self.cache.gate.tensors() if self.cache.gate is not None else []

    def view(self, k: int, c: int) -> LoraMixCache:
        """The caches of the first k rows and c columns (views of the same storage, sharing the write offsets): a
        step over them attends to c columns, not to all of them."""
        if (k, c) == (self.batch, self.slots):
            return self.cache
        view = self._views.get((k, c))
        if view is None:
            gate = self.cache.gate
            if gate is not None:
                keys, values = (t[:k, :c] if t is not None else None for t in (gate.keys, gate.values))
                gate = GateCache(gate.ema[:k] if gate.ema is not None else None, keys, values, gate.offset)
            view = LoraMixCache(_part(self.cache.scaling, k, c), _part(self.cache.mixed, k, c), gate)
            if not torch.compiler.is_compiling():
                for t in _tensors(view):
                    torch._dynamo.mark_static_address(t)
            self._views[(k, c)] = view
        return view


def _part(cache: Any, k: int, c: int) -> Any:
    """A StaticCache over the first k rows and c columns of `cache` (views of its initialised layers)."""
    if cache is None:
        return None
    view = copy.copy(cache)
    view.layers = []
    for layer in cache.layers:
        part = copy.copy(layer)
        if layer.is_initialized:
            part.keys, part.values = layer.keys[:k, :, :c], layer.values[:k, :, :c]
            part.batch_size, part.max_cache_len = k, c
        view.layers.append(part)
    return view


def _tensors(cache: LoraMixCache) -> list[torch.Tensor]:
    out = [t for t in (cache.gate.ema, cache.gate.keys, cache.gate.values) if t is not None] if cache.gate else []
    for static in (cache.scaling, cache.mixed):
        for layer in static.layers if static is not None else ():
            if layer.is_initialized:
                out += [layer.keys, layer.values]
    return out
