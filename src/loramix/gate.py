"""The gate ("scaling head"): what the scaling pass saw -> scalings [B, T, L, N].

Two kinds (`GateConfig.router`):
    ScalingHead    "mlp", the paper's learned gate: the scaling pass's last hidden states h [B, T, H] -> an MLP.
    ArrowRouter    "arrow", no training needed: every adapted layer scores its input x in the scaling pass against
                   each expert's prototype (`arrow_prototypes`), the probes [B, T, L, N] = |<x, prototype_e>|; the
                   router keeps the top-k per (token, layer) and softmaxes them with a temperature. The prototypes
                   are its weights: `train_gate` can train them from Arrow's values.
Both are called as gate(hidden_states, probes, mask, cache); `reads_probes` says which one the model must collect.

The MLP gate can read the tokens before each one (`GateConfig.context`, `build_context`), causally:
    "ema"        h'_t = sum_{i<=t} a^(t-i) h_i / sum_{i<=t} a^(t-i)   (padding skipped)      -> MLP
    "attention"  h'_t = h_t + out(softmax(sqrt(d) q_t k_{<=t}^T) v_{<=t})  (one head, width d, q and k unit) -> MLP
What it needs of the earlier tokens between two calls (decoding) is a `GateCache`, the third cache of
`LoraMixCache` beside the two passes' KV caches.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import GateConfig

__all__ = [
    "ArrowRouter",
    "AttentionContext",
    "EmaContext",
    "GateCache",
    "ScalingHead",
    "apply_top_k",
    "arrow_prototypes",
    "build_context",
    "build_gate",
]


def apply_top_k(scalings: torch.Tensor, k: int, renormalise: bool) -> torch.Tensor:
    """Keep the k largest scalings over the last (expert) dim, zero the rest; optionally softmax the kept ones."""
    if k >= scalings.shape[-1]:
        return torch.softmax(scalings, dim=-1) if renormalise else scalings
    values, index = scalings.topk(k, dim=-1)
    if renormalise:
        values = torch.softmax(values, dim=-1)
    return torch.zeros_like(scalings).scatter(-1, index, values)


class GateCache:
    """What a context gate keeps of the tokens before the current call, per row (`LoraMixCache.gate`).

        ema           [B, H + 1] float32   "ema": the decayed sums of the hidden states (first H) and of the weights
        keys, values  [B, S, d]            "attention": column j holds the keys / values of the j-th token column
        offset        [1] long             static only: the column the next token writes (its mask's column)

    Dynamic (eager generation, `GateCache()`): empty at first, replaced or grown by every call; the attention mask
    given with a call covers the S earlier columns and the new tokens. Static (the decode engine,
    `gate.new_cache(batch, slots)`): preallocated over `slots` columns, written in place at `offset`, which advances
    by the tokens written; the mask given covers all the slots. Paged (the decode engine, blocks.PagedCache): `keys`
    and `values` are pools [S, d] shared by every row, `write` [B, T] the slots the new tokens take and `read` [B, C]
    the slots of each column; `ema` is one row per decoder row."""

    def __init__(
        self,
        ema: torch.Tensor | None = None,
        keys: torch.Tensor | None = None,
        values: torch.Tensor | None = None,
        offset: torch.Tensor | None = None,
        read: torch.Tensor | None = None,
        write: torch.Tensor | None = None,
    ) -> None:
        self.ema, self.keys, self.values, self.offset = ema, keys, values, offset
        self.read, self.write = read, write  # paged (blocks.PagedCache): keys / values are pools [S, d]

    @property
    def static(self) -> bool:
        return self.offset is not None

    def tensors(self) -> list[torch.Tensor]:
        """The tensors it holds (those a compiled step must see at fixed addresses)."""
        return [t for t in (self.ema, self.keys, self.values, self.offset, self.read, self.write) if t is not None]

    def columns(self, tokens: int, device: torch.device) -> torch.Tensor:
        """The columns [T] that the next `tokens` tokens take."""
        start = self.offset if self.static else (self.keys.shape[1] if self.keys is not None else 0)
        return torch.arange(tokens, device=device) + start


def _current_mask(mask: torch.Tensor | None, cache: GateCache | None, hidden: torch.Tensor) -> torch.Tensor:
    """The attention mask of the T current tokens [B, T] (float); mask covers the columns described in GateCache."""
    B, T = hidden.shape[:2]
    if mask is None:
        return hidden.new_ones(B, T, dtype=torch.float32)
    if cache is not None and cache.static:
        return mask.index_select(1, cache.columns(T, mask.device)).float()
    return mask[:, -T:].float()


class EmaContext(nn.Module):
    """h [B, T, H] -> the bias-corrected moving average of each row's hidden states so far, [B, T, H]:

        n_t = a n_{t-1} + (1 - a) m_t h_t,   d_t = a d_{t-1} + (1 - a) m_t,   h'_t = n_t / d_t
        (m_t = 0 at padding: the sums stay as they were; a real token's d_t >= 1 - a > 0)

    The sums ([n, d], [B, H + 1], float32) of the last token are what a cache keeps. Over T tokens at once the
    recurrence is one batched matmul by the weights w[t, i] = (1 - a) a^(c_t - c_i) (i <= t, c the running count
    of real tokens), plus a^(c_t) times the cached sums."""

    def __init__(self, decay: float) -> None:
        super().__init__()
        self.decay = float(decay)

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor | None, cache: GateCache | None) -> torch.Tensor:
        a = self.decay
        m = _current_mask(mask, cache, hidden)  # [B, T]
        x = torch.cat([hidden.float(), torch.ones_like(m)[..., None]], -1) * m[..., None]  # [B, T, H + 1]
        count = m.cumsum(1)  # [B, T]
        T = hidden.shape[1]
        causal = torch.ones(T, T, dtype=torch.bool, device=hidden.device).tril()
        weights = torch.where(causal, (1 - a) * a ** (count[:, :, None] - count[:, None, :]).clamp_min(0), 0.0)
        sums = weights @ x  # [B, T, H + 1]
        past = cache.ema if cache is not None else None
        if past is not None:
            sums = sums + a ** count[..., None] * past[:, None]
        if cache is not None:
            if cache.static:
                cache.ema.copy_(sums[:, -1])
            else:
                cache.ema = sums[:, -1]
        out = sums[..., :-1] / sums[..., -1:].clamp_min(torch.finfo(torch.float32).tiny)
        return out.to(hidden.dtype)


class AttentionContext(nn.Module):
    """h [B, T, H] -> h + out(attention), one causal head of width d over the row's hidden states so far:

        q, k, v = unit(query(h)), unit(key(h)), value(h)   [B, T, d]   (keys and values cached, [B, S, d])
        a_tj = softmax_j(sqrt(d) q_t . k_j)                 over the columns j <= t the mask keeps (and j = t itself)
        h'_t = h_t + out(sum_j a_tj v_j)                    out: d -> H, zero at initialisation

    A token always attends to itself, so no row is ever fully masked (a padding token's output is unused). Queries and
    keys are unit vectors (QK-norm), so a score stays within +-sqrt(d) however the weights grow: with the plain
    q . k / sqrt(d) the demo's gate recipe (lr 0.01) diverged (training loss 3.6 after 1,500 steps, against 0.77 for
    the EMA gate; benchmarks/gates.py). `out` starts at zero: an untrained attention gate is the plain MLP gate."""

    def __init__(self, hidden_size: int, width: int) -> None:
        super().__init__()
        self.width = width
        self.query = nn.Linear(hidden_size, width, bias=False)
        self.key = nn.Linear(hidden_size, width, bias=False)
        self.value = nn.Linear(hidden_size, width, bias=False)
        self.out = nn.Linear(width, hidden_size, bias=False)
        nn.init.zeros_(self.out.weight)  # starts as the plain MLP gate; the attention grows in from the first step

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor | None, cache: GateCache | None) -> torch.Tensor:
        h = hidden.to(self.query.weight.dtype)
        B, T = h.shape[:2]
        q, k, v = F.normalize(self.query(h), dim=-1), F.normalize(self.key(h), dim=-1), self.value(h)
        if cache is None:
            keys, values = k, v
            columns = torch.arange(T, device=h.device)
        elif cache.read is not None:  # paged: write the new tokens at their slots, read the row's columns
            columns = cache.columns(T, h.device)
            slots = cache.write.reshape(-1)
            cache.keys.index_copy_(0, slots, k.reshape(B * T, -1).to(cache.keys.dtype))
            cache.values.index_copy_(0, slots, v.reshape(B * T, -1).to(cache.values.dtype))
            C = cache.read.shape[1]
            keys = cache.keys.index_select(0, cache.read.reshape(-1)).view(B, C, -1)
            values = cache.values.index_select(0, cache.read.reshape(-1)).view(B, C, -1)
        elif cache.static:
            columns = cache.columns(T, h.device)
            cache.keys.index_copy_(1, columns, k.to(cache.keys.dtype))
            cache.values.index_copy_(1, columns, v.to(cache.values.dtype))
            keys, values = cache.keys, cache.values
        else:
            columns = cache.columns(T, h.device)
            keys = k if cache.keys is None else torch.cat([cache.keys, k], 1)
            values = v if cache.values is None else torch.cat([cache.values, v], 1)
            cache.keys, cache.values = keys, values
        S = keys.shape[1]
        key_columns = torch.arange(S, device=h.device)
        key_mask = torch.ones(B, S, dtype=torch.bool, device=h.device) if mask is None else mask[:, -S:] != 0
        own = key_columns[None, :] == columns[:, None]  # [T, S]
        allowed = (key_columns[None, :] <= columns[:, None])[None] & (key_mask[:, None, :] | own[None])  # [B, T, S]
        scores = (q @ keys.transpose(1, 2)).float() * math.sqrt(self.width)
        weights = torch.softmax(scores.masked_fill(~allowed, torch.finfo(torch.float32).min), -1)
        return h + self.out(weights.to(values.dtype) @ values)


def build_context(config: GateConfig, hidden_size: int) -> nn.Module | None:
    """The module that `config.context` names (None for "none", the paper's gate)."""
    if config.context == "ema":
        return EmaContext(config.context_decay)
    if config.context == "attention":
        return AttentionContext(hidden_size, config.context_width)
    return None


class _Gate(nn.Module):
    """What every gate knows: its config and the sizes of the scalings it gives [B, T, n_layers, n_experts]."""

    reads_probes = False

    def __init__(self, config: GateConfig, hidden_size: int, n_layers: int, n_experts: int) -> None:
        super().__init__()
        self.config = config
        self.hidden_size = hidden_size
        self.n_layers = n_layers
        self.n_experts = n_experts
        self.context: nn.Module | None = None  # what reads the tokens before (ScalingHead, GateConfig.context)

    @property
    def has_context(self) -> bool:
        """Whether a token's scalings depend on the tokens before it (then decoding needs a `GateCache`)."""
        return self.context is not None

    def new_cache(self, batch: int | None = None, slots: int | None = None) -> GateCache | None:
        """An empty cache of this gate's context: dynamic (no sizes), or static for `batch` rows and `slots`
        columns; None when the gate has no context."""
        context = self.context
        if context is None:
            return None
        if slots is None:
            return GateCache()
        device = next(iter(self.parameters()), torch.empty(0)).device
        offset = torch.zeros(1, dtype=torch.long, device=device)
        if isinstance(context, EmaContext):
            ema = torch.zeros(batch, self.hidden_size + 1, device=device, dtype=torch.float32)
            return GateCache(ema=ema, offset=offset)
        weight = context.key.weight
        keys = torch.zeros(batch, slots, context.width, device=device, dtype=weight.dtype)
        return GateCache(keys=keys, values=torch.zeros_like(keys), offset=offset)


class ScalingHead(_Gate):
    """MLP gate. Parameter names follow the X-LoRA classifier file format: `inner.{i}.*` then `last.*`.

    h [B, T, H] -> (Linear -> ReLU -> Dropout) x (depth-1) -> last: Linear -> [B, T, L*N] or [B, T, N]
      -> reshape [B, T, L, N] (row = layer * N + expert; broadcast over L when not layerwise)
      -> softmax(logits / temperature) over N -> top-k mask (-> softmax over the kept k)
    """

    def __init__(self, config: GateConfig, hidden_size: int, n_layers: int, n_experts: int) -> None:
        super().__init__(config, hidden_size, n_layers, n_experts)
        width = config.width or hidden_size
        self.inner = nn.ModuleList()
        size = hidden_size
        for _ in range(config.depth - 1):
            self.inner.append(nn.Linear(size, width, bias=config.bias))
            size = width
        self.dropout = nn.Dropout(config.dropout) if config.depth > 1 and config.dropout > 0 else nn.Identity()
        out = n_layers * n_experts if config.layerwise else n_experts
        self.last = nn.Linear(size, out, bias=config.bias)
        self.context = build_context(config, hidden_size)

    def logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Raw gate outputs before softmax / top-k: [B, T, L, N]."""
        h = hidden_states.to(self.last.weight.dtype)
        for layer in self.inner:
            h = self.dropout(torch.relu(layer(h)))
        out = self.last(h)
        if self.config.layerwise:
            return out.unflatten(-1, (self.n_layers, self.n_experts))
        return out.unsqueeze(-2).expand(*out.shape[:-1], self.n_layers, self.n_experts)

    def forward(
        self,
        hidden_states: torch.Tensor,
        probes: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        cache: GateCache | None = None,
    ) -> torch.Tensor:
        """hidden_states [B, T, H] -> scalings [B, T, L, N] (probes: unused). With a context: `mask` the attention
        mask (of the cached columns and the T tokens, or of every static slot), `cache` the `GateCache` it reads
        and extends (None: the T tokens are the whole sequence)."""
        if self.context is not None:
            hidden_states = self.context(hidden_states, mask, cache)
            if cache is not None and cache.static:
                cache.offset.add_(hidden_states.shape[1])
        s = self.logits(hidden_states)
        if self.config.softmax:
            s = torch.softmax(s / self.config.temperature, dim=-1)
        if self.config.top_k is not None:
            s = apply_top_k(s, self.config.top_k, self.config.topk_softmax)
        return s


class ArrowRouter(_Gate):
    """Arrow routing: probes [B, T, L, N] -> softmax(top-k(probes) / temperature) over the experts, zero outside the
    top k; as PEFT's `ArrowLoraLinearLayer` computes its coefficients.

    Its weights are the prototypes, one [N, d_in] per adapted layer (`prototypes[l]`, set by the model from the
    experts with `arrow_prototypes`): as built, the training-free router; `train_gate` trains them from there
    (Arrow as the initialisation of a trained router; the probes then carry gradients to them)."""

    reads_probes = True

    def __init__(self, config: GateConfig, hidden_size: int, n_layers: int, n_experts: int) -> None:
        super().__init__(config, hidden_size, n_layers, n_experts)
        self.prototypes = nn.ParameterList()

    def set_prototypes(self, prototypes: list[torch.Tensor]) -> None:
        """One [N, d_in] per adapted layer, in layer order."""
        if len(prototypes) != self.n_layers:
            raise ValueError(f"{len(prototypes)} prototypes for {self.n_layers} adapted layers")
        self.prototypes = nn.ParameterList(nn.Parameter(p, requires_grad=False) for p in prototypes)

    def forward(
        self,
        hidden_states: torch.Tensor | None,
        probes: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        cache: GateCache | None = None,
    ) -> torch.Tensor:
        if probes is None:
            raise ValueError("ArrowRouter needs the probes that the adapted layers write in the scaling pass")
        k = min(self.config.top_k or self.n_experts, self.n_experts)
        return apply_top_k(probes.float() / self.config.temperature, k, renormalise=True).to(probes.dtype)


def build_gate(config: GateConfig, hidden_size: int, n_layers: int, n_experts: int) -> nn.Module:
    """The gate module that `config.router` names."""
    if config.router == "arrow":
        return ArrowRouter(config, hidden_size, n_layers, n_experts)
    return ScalingHead(config, hidden_size, n_layers, n_experts)


@torch.no_grad()
def arrow_prototypes(lora_A: torch.Tensor, lora_B: torch.Tensor, ranks: list[int], scales: list[float]) -> torch.Tensor:
    """Each expert's prototype for one layer: the top right-singular vector of B_e A_e (unit norm, sign arbitrary),
    [N, d_in]; zeros for an expert that does not adapt the layer (scale 0 or rank 0).

    Exact and cheap, without forming B_e A_e [d_out, d_in]: with A_e^T = Q R (Q [d_in, r]), B_e A_e = (B_e R^T) Q^T,
    so the top right-singular vector is Q v, v the top right-singular vector of the small B_e R^T [d_out, r].
    """
    out = torch.zeros(len(ranks), lora_A.shape[1], dtype=torch.float64, device=lora_A.device)
    start = 0
    for e, (r, scale) in enumerate(zip(ranks, scales)):
        a = lora_A[start : start + r].double()
        b = lora_B[:, start : start + r].double()
        start += r
        if r == 0 or scale == 0 or not bool(a.any()) or not bool(b.any()):
            continue
        q, rr = torch.linalg.qr(a.T)  # a.T [d_in, r] = q [d_in, r] @ rr [r, r]
        _, _, vh = torch.linalg.svd(b @ rr.T, full_matrices=False)
        out[e] = q @ vh[0]
    return out.to(lora_A.dtype)
