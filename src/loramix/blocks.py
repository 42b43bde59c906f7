"""The decoder's KV memory, in blocks: the only code that knows how the caches are laid out.

    BlockAllocator      host side: a pool of `blocks` blocks of `block_size` tokens, free list, reference counts,
                        the prefix cache (a full block's key: the SHA-256 of the keys before it and its tokens)
                        and the cached blocks no row holds, evicted least recently used first
    PagedCache          device side: for each pass and layer, keys and values [S, heads, head_dim], S = (blocks + 2)
                        x block_size token slots; a context gate's keys and values alike. Two blocks are reserved:
                        block 0 holds zeros and is read where a row has no token, block 1 is written by rows that
                        hold no token and never read (a masked NaN would still poison attention: 0 x NaN)

One block table per row (host lists, `Decoder` rows) drives every pass: a token at position p of a row lives in slot
table[p // block_size] x block_size + p % block_size of the scaling-pass pool, the mixed-pass pool and the gate's
pool alike (the layouts are identical, so one allocation decision serves all of them).

What a forward sees is a transformers `StaticCache` whose layers (`PagedLayer`) write the new tokens' keys and
values at the slots of `write` [B, T] and return, for attention, the slots of `read` [B, C] gathered to
[B, heads, C, head_dim]: column c of row b is the token that the decoder's column c of that row holds (the
decoder keeps its rows in a shared column space, docs/design.md). The gather copies what attention reads once
more; a paged attention kernel would read the pool in place (transformers' paged sdpa needs its own batch layout
and manager, so it does not fit a dual-pass step; docs/design.md).
"""

from __future__ import annotations

import hashlib
import logging
import weakref
from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .base import LoraMixCache
from .contracts import MixedModel
from .errors import ConfigError
from .gate import GateCache

logger = logging.getLogger(__name__)

__all__ = [
    "BLOCK_SIZE",
    "BlockAllocator",
    "PagedCache",
    "PagedLayer",
    "PoolLayout",
    "block_keys",
    "static_cache_support",
]

BLOCK_SIZE = 16
"""Tokens per block (vLLM's default)."""
NULL, TRASH = 0, 1
"""The reserved blocks: zeros, read where a row holds no token; written where a row holds no token, never read."""


def static_cache_support(model: MixedModel) -> str | None:
    """None if the decoder can run this model (a LoraMixModel) over its paged caches; otherwise why not, in a few
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
        return f"{type(hf).__name__} has sliding-window attention layers, which the paged caches do not hold"
    return None


def block_keys(tokens: Sequence[int], block_size: int, family: bytes) -> list[bytes]:
    """The prefix-cache key of each full block of `tokens`: a SHA-256 over the key before it, the block's tokens and
    `family` (what else the cached keys and values depend on: the mode's kind and any fixed scalings)."""
    keys, parent = [], hashlib.sha256(family).digest()
    for i in range(len(tokens) // block_size):
        block = tokens[i * block_size : (i + 1) * block_size]
        parent = hashlib.sha256(parent + b"".join(int(t).to_bytes(8, "little") for t in block)).digest()
        keys.append(parent)
    return keys


class BlockAllocator:
    """`blocks` usable blocks (ids 2 .. blocks + 1; 0 and 1 are reserved): who holds each, and the prefix cache."""

    def __init__(self, blocks: int) -> None:
        self.blocks = blocks
        self.free: deque[int] = deque(range(2, blocks + 2))
        self.refs = [0] * (blocks + 2)
        self.cached: dict[bytes, int] = {}  # prefix key -> block
        self.key_of: dict[int, bytes] = {}  # block -> prefix key
        self.idle: OrderedDict[int, None] = OrderedDict()  # cached blocks no row holds, least recently used first
        self.hits = 0  # blocks reused from the prefix cache

    @property
    def available(self) -> int:
        """Blocks a row can take now (free, or cached and held by no row)."""
        return len(self.free) + len(self.idle)

    @property
    def used(self) -> int:
        """Blocks held by rows."""
        return self.blocks - self.available

    def allocate(self) -> int:
        """A block for one row (reference count 1); evicts the least recently used idle cached block when no block is
        free. Raises RuntimeError when none is left (the scheduler checks `available` first)."""
        if self.free:
            block = self.free.popleft()
        elif self.idle:
            block, _ = self.idle.popitem(last=False)
            del self.cached[self.key_of.pop(block)]
        else:
            raise RuntimeError("no KV block is free")
        self.refs[block] = 1
        return block

    def release(self, blocks: Sequence[int]) -> None:
        """A row lets go of its blocks: those no row holds any more become free, or idle if they are cached."""
        for block in blocks:
            self.refs[block] -= 1
            if self.refs[block] == 0:
                if block in self.key_of:
                    self.idle[block] = None
                else:
                    self.free.append(block)

    def lookup(self, keys: Sequence[bytes]) -> list[int]:
        """The cached blocks of the longest run of `keys` from the first, each now held once more by the caller."""
        found = []
        for key in keys:
            block = self.cached.get(key)
            if block is None:
                break
            self.idle.pop(block, None)
            self.refs[block] += 1
            found.append(block)
        self.hits += len(found)
        return found

    def register(self, blocks: Sequence[int], keys: Sequence[bytes]) -> None:
        """Offer a row's full blocks to the prefix cache (a key already cached keeps its block)."""
        for block, key in zip(blocks, keys):
            if key not in self.cached and block not in self.key_of:
                self.cached[key], self.key_of[block] = block, key

    def forget(self, blocks: Sequence[int]) -> None:
        """Take blocks out of the prefix cache (a failed row's: its keys and values may not be finite)."""
        for block in blocks:
            key = self.key_of.pop(block, None)
            if key is not None:
                del self.cached[key]
                if self.idle.pop(block, "held") is None:
                    self.free.append(block)


@dataclass(frozen=True)
class PoolLayout:
    """What one token costs: per pass, the layers (heads, head_dim) its cache holds, the dtype, and the context
    gate's width (0 when its gate keeps no keys)."""

    scaling: tuple[tuple[int, int, int], ...]  # (heads, key dim, value dim) per layer; () without a scaling pass
    mixed: tuple[tuple[int, int, int], ...]
    dtype: torch.dtype
    gate_width: int = 0
    gate_dtype: torch.dtype = torch.float32

    @property
    def bytes_per_token(self) -> int:
        size = torch.empty(0, dtype=self.dtype).element_size()
        kv = sum(h * (k + v) for h, k, v in (*self.scaling, *self.mixed)) * size
        return kv + 2 * self.gate_width * torch.empty(0, dtype=self.gate_dtype).element_size()


_LAYOUTS: weakref.WeakKeyDictionary[Any, dict[tuple[Any, ...], PoolLayout]] = weakref.WeakKeyDictionary()


def layout_of(model: MixedModel, granular: bool) -> PoolLayout:
    """The pool layout of a LoraMixModel, read from one token's keys and values through both passes (what the
    attention layers really write: heads, head sizes, dtype), so no config field has to be guessed. Kept per model,
    dtype, device and scaling layer (a `generate` call reads it once, not each time)."""
    key = (granular, model.dtype, model.device, model.config.scaling_layer)
    known = _LAYOUTS.setdefault(model, {})
    if key not in known:
        known[key] = _read_layout(model, granular)
    return known[key]


def _read_layout(model: MixedModel, granular: bool) -> PoolLayout:
    from .base import new_dynamic_cache, text_config

    config = text_config(model.model)
    device = model.device
    ids = torch.zeros(1, 1, dtype=torch.long, device=device)
    shapes: dict[str, tuple[tuple[int, int, int], ...]] = {}
    dtype = None
    with torch.no_grad():
        for name, module in (("scaling", model.scaling_backbone() if granular else None), ("mixed", model.backbone)):
            if module is None:
                shapes[name] = ()
                continue
            cache = new_dynamic_cache(config)
            with model.state.use(model.dummy_scalings(), model.new_probes(1, 1)):
                module(input_ids=ids, past_key_values=cache, use_cache=True)
            layers = [layer for layer in cache.layers if getattr(layer, "keys", None) is not None]
            shapes[name] = tuple((int(x.keys.shape[1]), int(x.keys.shape[3]), int(x.values.shape[3])) for x in layers)
            dtype = layers[0].keys.dtype
    context = getattr(model.gate, "context", None)
    width = getattr(context, "width", 0) if granular and getattr(context, "key", None) is not None else 0
    gate_dtype = context.key.weight.dtype if width else torch.float32
    return PoolLayout(shapes["scaling"], shapes["mixed"], dtype, width, gate_dtype)


class PagedLayer:
    """One attention layer's pool as a transformers cache layer (a `StaticLayer` in kind: `update` writes in place and
    returns every column the mask covers). keys / values [S, heads, head_dim]; read [B, C]; write [B, T] slots;
    `cumulative_length` the position of the first query (0-d; transformers derives the queries' cache positions
    from it, hence the causal part of the mask). `PagedLayer.new(...)` builds one (a subclass of transformers'
    `StaticLayer`, made on first use so that importing loramix does not import transformers)."""

    _class: Any = None

    @staticmethod
    def new(
        keys: torch.Tensor, values: torch.Tensor, read: torch.Tensor, write: torch.Tensor, offset: torch.Tensor
    ) -> Any:
        if PagedLayer._class is None:
            PagedLayer._class = _layer_class()
        layer = PagedLayer._class.__new__(PagedLayer._class)
        layer.keys, layer.values, layer.read, layer.write, layer.cumulative_length = keys, values, read, write, offset
        layer.max_cache_len, layer.batch_size = read.shape[1], read.shape[0]
        layer.is_initialized = True
        layer.dtype, layer.device = keys.dtype, keys.device
        return layer


def _layer_class() -> type:
    from transformers.cache_utils import StaticLayer

    class _PagedLayer(StaticLayer):
        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            B, H, T, _ = key_states.shape
            slots = self.write.reshape(-1)
            self.keys.index_copy_(0, slots, key_states.transpose(1, 2).reshape(B * T, H, -1).to(self.keys.dtype))
            self.values.index_copy_(0, slots, value_states.transpose(1, 2).reshape(B * T, H, -1).to(self.values.dtype))
            C, read = self.read.shape[1], self.read.reshape(-1)
            keys = self.keys.index_select(0, read).view(B, C, H, -1).transpose(1, 2)
            values = self.values.index_select(0, read).view(B, C, H, -1).transpose(1, 2)
            return keys, values

        def get_mask_sizes(self, *args: Any, **kwargs: Any) -> tuple[int, int]:
            return self.max_cache_len, 0

        def get_seq_length(self) -> Any:
            return self.cumulative_length

        def reset(self) -> None:  # transformers' Cache.reset: the decoder owns the pool
            pass

    _PagedLayer.__name__ = _PagedLayer.__qualname__ = "PagedLayer"
    return _PagedLayer


class PagedCache:
    """The pools of one decoder (module docstring): `rows` rows over `columns` columns, `blocks` blocks of
    `block_size` tokens. `granular=False`: no scaling pass after the prompt, so no scaling-pass pool or gate
    pool. Allocates everything now: a budget that does not fit fails here, not at the first request."""

    def __init__(
        self,
        model: MixedModel,
        rows: int,
        columns: int,
        blocks: int,
        *,
        granular: bool,
        block_size: int = BLOCK_SIZE,
        layout: PoolLayout | None = None,
    ) -> None:
        from .base import text_config

        self.layout = layout or layout_of(model, granular)
        self.block_size = block_size
        self.allocator = BlockAllocator(blocks)
        self.config = text_config(model.model)
        device = model.device
        slots = (blocks + 2) * block_size
        dtype = self.layout.dtype

        def pools(shapes: tuple[tuple[int, int, int], ...]) -> list[tuple[torch.Tensor, torch.Tensor]]:
            return [
                (
                    torch.zeros(slots, h, k, dtype=dtype, device=device),
                    torch.zeros(slots, h, v, dtype=dtype, device=device),
                )
                for h, k, v in shapes
            ]

        self.scaling = pools(self.layout.scaling) if granular else None
        self.mixed = pools(self.layout.mixed)
        self.read = torch.full((rows, columns), NULL * block_size, dtype=torch.long, device=device)
        self.write = torch.full((rows, 1), TRASH * block_size, dtype=torch.long, device=device)
        self.column = torch.zeros(1, dtype=torch.long, device=device)  # the gate's write column (its mask's)
        gate = model.gate.new_cache(rows, 1) if granular else None
        self.gate_ema = gate.ema if gate is not None else None
        self.gate_pool = None
        if self.layout.gate_width:
            w = self.layout.gate_width
            self.gate_pool = tuple(torch.zeros(slots, w, dtype=self.layout.gate_dtype, device=device) for _ in range(2))
        self._views: dict[tuple[int, int], LoraMixCache] = {}

    @property
    def bytes(self) -> int:
        """The bytes of the pools (both passes and the gate's), reserved blocks included."""
        return (self.allocator.blocks + 2) * self.block_size * self.layout.bytes_per_token

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor a compiled step reads or writes in place (fixed addresses for CUDA graphs)."""
        out = [self.read, self.write, self.column]
        for pools in (self.scaling or [], self.mixed):
            for k, v in pools:
                out += [k, v]
        out += [t for t in (self.gate_ema, *(self.gate_pool or ())) if t is not None]
        return out

    # ------------------------------------------------------------------ slots

    def slot(self, table: Sequence[int], position: int) -> int:
        """The pool slot of a row's token at `position` (its block table `table`)."""
        return table[position // self.block_size] * self.block_size + position % self.block_size

    def slots(self, table: Sequence[int], start: int, end: int) -> list[int]:
        """The pool slots of a row's tokens at positions [start, end)."""
        return [self.slot(table, p) for p in range(start, end)]

    def blocks_for(self, tokens: int) -> int:
        """Blocks that hold `tokens` tokens."""
        return -(-tokens // self.block_size)

    # ------------------------------------------------------------------ forwards

    def cache(self, read: torch.Tensor, write: torch.Tensor, offset: torch.Tensor, ema: Any, column: Any) -> Any:
        """A LoraMixCache whose layers write at `write` [B, T] and read `read` [B, C] (module docstring); the gate's
        moving average `ema` [B, H + 1] (rows of `gate_ema`) and the gate's write column `column` [1]."""
        from transformers import StaticCache

        def static(pools: list[tuple[torch.Tensor, torch.Tensor]] | None) -> Any:
            if pools is None:
                return None
            cache = StaticCache(config=self.config, max_cache_len=read.shape[1])
            cache.layers = [PagedLayer.new(k, v, read, write, offset) for k, v in pools]
            return cache

        gate = None
        if self.scaling is not None and (self.gate_ema is not None or self.gate_pool is not None):
            keys, values = self.gate_pool or (None, None)
            gate = GateCache(ema=ema, keys=keys, values=values, offset=column, read=read, write=write)
        return LoraMixCache(static(self.scaling), static(self.mixed), gate)

    def view(self, k: int, c: int) -> LoraMixCache:
        """The caches the decode step runs over: the first k rows, columns [0, c) (the last one the step's)."""
        view = self._views.get((k, c))
        if view is None:
            offset = torch.tensor(c - 1, device=self.read.device)
            ema = self.gate_ema[:k] if self.gate_ema is not None else None
            view = self.cache(self.read[:k, :c], self.write[:k], offset, ema, self.column)
            if not torch.compiler.is_compiling():
                torch._dynamo.mark_static_address(offset)
            self._views[(k, c)] = view
        return view

    def write_prompt(
        self,
        rows: Sequence[int],
        tables: Sequence[Sequence[int]],
        lengths: Sequence[int],
        mask: torch.Tensor,
        prompt: Any,
    ) -> None:
        """Copy a prefilled batch (DynamicCaches of J rows, T left-padded columns; mask [J, T], `lengths` its row
        sums, read on the host) into the rows' blocks: row j's real tokens at its positions 0, 1, ... Its gate state
        into `gate_ema` rows."""
        real = mask.bool()  # [J, T]
        index = torch.tensor(
            [s for table, n in zip(tables, lengths) for s in self.slots(table, 0, n)], device=self.read.device
        )
        for pools, name in ((self.scaling, "scaling"), (self.mixed, "mixed")):
            source = getattr(prompt, name)
            if pools is None or source is None:
                continue
            for (k, v), src in zip(pools, [x for x in source.layers if getattr(x, "keys", None) is not None]):
                k.index_copy_(0, index, src.keys.transpose(1, 2)[real].to(k.dtype))
                v.index_copy_(0, index, src.values.transpose(1, 2)[real].to(v.dtype))
        gate = prompt.gate
        if gate is None or self.scaling is None:
            return
        if self.gate_ema is not None and gate.ema is not None:
            self.gate_ema[torch.tensor(list(rows), device=self.read.device)] = gate.ema
        if self.gate_pool is not None and gate.keys is not None:
            for pool, src in zip(self.gate_pool, (gate.keys, gate.values)):
                pool.index_copy_(0, index, src[real].to(pool.dtype))

    def clear(self, blocks: Sequence[int]) -> None:
        """Zero a failed row's blocks (non-finite values must not stay where a masked read could meet them) and take
        them out of the prefix cache; blocks other rows share (a cached prefix, computed before) stay as they are."""
        blocks = [b for b in blocks if self.allocator.refs[b] == 1]
        if not blocks:
            return
        bs = self.block_size
        index = torch.tensor([b * bs + i for b in blocks for i in range(bs)], device=self.read.device)
        for pools in (self.scaling or [], self.mixed):
            for k, v in pools:
                k.index_fill_(0, index, 0)
                v.index_fill_(0, index, 0)
        for pool in self.gate_pool or ():
            pool.index_fill_(0, index, 0)
        self.allocator.forget(blocks)


def paged_budget(text: str, flag: str = "--kv-cache-memory") -> int:
    """Bytes from "2GiB", "512MiB", "1.5GB", "4e9" or a plain number of bytes; ConfigError naming `flag` otherwise."""
    units = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
    units |= {"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "k": 2**10, "m": 2**20, "g": 2**30}
    s = str(text).strip().lower().replace(" ", "")
    number = s.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = s[len(number) :]
    try:
        value = float(number)
    except ValueError:
        value = float("nan")
    if unit not in units or not value > 0 or value == float("inf"):
        raise ConfigError(f"{flag}={text!r} is not a size; expected e.g. 2GiB, 512MiB, 1.5GB or a number of bytes")
    return int(value * units[unit])


def describe(cache: PagedCache) -> str:
    """One line for the log: the pool's block size, blocks, bytes and how many tokens fit."""
    tokens = cache.allocator.blocks * cache.block_size
    return (
        f"KV cache pool: {cache.allocator.blocks} blocks of {cache.block_size} tokens = {tokens} tokens, "
        f"{cache.bytes / 2**20:.1f} MiB ({cache.layout.bytes_per_token} bytes per token, both passes)"
    )


DEFAULT_CPU_KV_MEMORY = 4 * 2**30
"""The pool's default size on a CPU (vLLM's default KV cache space there)."""
DEFAULT_GPU_MEMORY_UTILIZATION = 0.9
"""The share of an accelerator's memory the process may use by default, the pool taking what the weights leave."""


def _free_memory(device: torch.device) -> tuple[int, int]:
    """(free, total) bytes of the memory the pool would take: the accelerator's, or the host's available RAM."""
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return int(free), int(total)
    import psutil

    memory = psutil.virtual_memory()
    return int(memory.available), int(memory.total)


def pool_blocks(
    layout: PoolLayout,
    device: torch.device,
    *,
    rows: int,
    longest: int,
    kv_cache_memory: int | None = None,
    gpu_memory_utilization: float | None = None,
    block_size: int = BLOCK_SIZE,
) -> int:
    """How many blocks the server's pool holds. The budget: `kv_cache_memory` bytes (--kv-cache-memory); else on
    CUDA `gpu_memory_utilization` x the device's memory less what is in use now (the weights: --gpu-memory-utilization,
    default 0.9); else DEFAULT_CPU_KV_MEMORY. At most what `rows` rows of `longest` tokens can use, twice over (the
    rest of the pool would only hold cached prefixes). ConfigError naming the flag when the budget is above the free
    memory or holds fewer than `longest` tokens (one request at full length)."""
    per_block = layout.bytes_per_token * block_size
    free, total = _free_memory(device)
    if kv_cache_memory is not None:
        budget, flag = kv_cache_memory, f"--kv-cache-memory={_size(kv_cache_memory)}"
    elif device.type == "cuda":
        share = DEFAULT_GPU_MEMORY_UTILIZATION if gpu_memory_utilization is None else gpu_memory_utilization
        if not 0 < share <= 1:
            raise ConfigError(f"--gpu-memory-utilization={share} must be in (0, 1]")
        budget, flag = int(share * total) - (total - free), f"--gpu-memory-utilization={share}"
        if budget <= 0:
            raise ConfigError(
                f"{flag} leaves no memory for the KV cache: {_size(total - free)} of {_size(total)} are in use; "
                "raise it or give --kv-cache-memory"
            )
    else:
        budget, flag = DEFAULT_CPU_KV_MEMORY, f"--kv-cache-memory (default {_size(DEFAULT_CPU_KV_MEMORY)})"
    needed = -(-longest // block_size)
    cap = 2 * rows * needed
    blocks = min(budget // per_block, cap)
    if blocks * per_block > free:
        fits = free // per_block * per_block
        raise ConfigError(
            f"{flag} is above the free memory ({_size(free)} on {device.type}); at most {_size(fits)} would fit"
        )
    if blocks < needed:
        raise ConfigError(
            f"{flag} holds {blocks * block_size} tokens ({layout.bytes_per_token} bytes each, both passes), fewer "
            f"than one request of {longest} tokens (--max-model-len, or the prompt and --max-tokens limits): give at "
            f"least {_size(needed * per_block)} or lower --max-model-len"
        )
    return int(blocks)


def _size(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n}B"
