"""The mixing math, in one place.

For an adapted linear y = W x with experts e = 1..N, rank r_e and scale c_e = alpha_e / r_e, a token whose gate
gave scalings s = (s_1..s_N) for this layer gets

    y = W x + g * sum_e  s_e * c_e * B_e (A_e x)                      g = global_scaling_weight
      = W x + B_cat ( (A_cat x) * (g * s[expert(j)] * c[expert(j)])_j )

    A_cat = [A_1; ...; A_N]   [R, d_in]        R = sum_e r_e
    B_cat = [B_1 ... B_N]     [d_out, R]
    expert(j): which expert owns rank row j    [R]  (`rank_expert`)

Two matmuls and one broadcast multiply in rank space, whatever N is; no Python loop over experts. The per-token
scalings come from an explicit `MixState` that the model sets for the duration of a pass (no hooks).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from .experts import StackedLoRA, linear_features

__all__ = ["MixState", "MixedLoRALinear", "PreparedScalings", "rank_multipliers"]


def rank_multipliers(scalings: torch.Tensor, index: torch.Tensor, scale: torch.Tensor, g: float) -> torch.Tensor:
    """The one formula of the rank multipliers: g * s[index[j]] * scale[j] for every rank row j.

    scalings [..., K] (one layer's N experts, or all L * N flattened), index [R] into its last axis, scale [R] the
    rows' c_e -> [..., R] in scale's dtype. A layer passes its own rows; the model passes every layer's at once.
    """
    if scalings.device != scale.device:
        scalings = scalings.to(scale.device)
    return scalings.index_select(-1, index).to(scale.dtype) * (scale * g)


class MixState:
    """What every mixed layer of one model reads during a pass. Owned by `LoraMixModel`, set with `use()`.

    scalings: None -> experts off (plain base layer, no expert matmuls);
              a float c -> every expert at scaling c (the scaling pass's dummy value);
              a tensor [B, T, L, N] -> per token, per adapted layer, per expert;
              a `PreparedScalings` -> the same, with every layer's rank multiplier computed in advance.
    probes:   None, or a tensor [B, T, L, N] that every layer fills with |<x, prototype_e>| for its input x (the Arrow
              router's input; see gate.py), from `prototypes`, the router's [N, d_in] per layer (by layer index);
              with `probe_grad`, the probes carry gradients to the prototypes (training the router: the scaling pass
              around them runs without gradients).
    """

    def __init__(self, global_scaling_weight: float = 1.0) -> None:
        self.scalings: torch.Tensor | float | None = None
        self.probes: torch.Tensor | None = None
        self.prototypes: Sequence[torch.Tensor] | None = None
        self.probe_grad = False
        self.global_scaling_weight = float(global_scaling_weight)

    @contextmanager
    def use(
        self, scalings: torch.Tensor | float | None, probes: torch.Tensor | None = None, probe_grad: bool = False
    ) -> Iterator[None]:
        previous = self.scalings, self.probes, self.probe_grad
        self.scalings, self.probes, self.probe_grad = scalings, probes, probe_grad
        try:
            yield
        finally:
            self.scalings, self.probes, self.probe_grad = previous


class PreparedScalings:
    """Scalings [B, T, L, N] turned into each layer's rank multiplier g * s[expert(j)] * c[expert(j)] ([B, T, R_l])
    in one gather for all layers (`LoraMixModel.prepare_scalings`). Reusable across passes, e.g. when a mixture is
    held fixed during decoding.

    multipliers: one tensor per layer (a list), or one tensor [B, T, sum_l R_l] with `sizes` (R_l per layer) that
    each layer reads its slice of. The second form is what the decode engine uses: a preallocated buffer filled in
    place with `copy_` every step, so that a compiled step reads one fixed tensor.
    """

    def __init__(
        self,
        scalings: torch.Tensor,
        multipliers: list[torch.Tensor] | torch.Tensor,
        used_experts: list[tuple[int, ...]] | None = None,
        sizes: list[int] | None = None,
    ) -> None:
        self.scalings = scalings
        self.used_experts = used_experts  # per layer, with sparse top-k: the experts any token of the pass uses
        if isinstance(multipliers, torch.Tensor):
            if sizes is None:
                raise ValueError("PreparedScalings: one multiplier tensor needs the per-layer sizes")
            starts = [0]
            for size in sizes:
                starts.append(starts[-1] + size)
            self._layers: list[torch.Tensor] | None = None
            self._flat: torch.Tensor | None = multipliers
            self._spans = [(starts[i], size) for i, size in enumerate(sizes)]
        else:
            self._layers, self._flat, self._spans = list(multipliers), None, []

    @property
    def multipliers(self) -> list[torch.Tensor]:
        """Every layer's rank multipliers [B, T, R_l]."""
        if self._layers is not None:
            return self._layers
        return [self.layer_multiplier(i) for i in range(len(self._spans))]

    def layer_multiplier(self, index: int) -> torch.Tensor:
        """Layer `index`'s rank multipliers [B, T, R_l] (a view; no copy)."""
        if self._flat is None:
            return self._layers[index]
        start, size = self._spans[index]
        return self._flat.narrow(-1, start, size)


class MixedLoRALinear(nn.Module):
    """A frozen base `nn.Linear` / GPT-2 `Conv1D` plus N stacked LoRA experts mixed by per-token scalings.

    Holds the base layer (composition, not inheritance). `lora_A` [R, d_in] and `lora_B` [d_out, R] are PEFT's
    matrices concatenated over experts; `rank_scale` [R] is c_e repeated r_e times; `rank_expert` [R] maps each
    rank row to its expert. dtype and device follow the base layer.
    """

    def __init__(self, base_layer: nn.Module, stacked: StackedLoRA, layer_index: int, state: MixState) -> None:
        super().__init__()
        features = linear_features(base_layer)
        if features is None:
            raise TypeError(f"MixedLoRALinear wraps nn.Linear or Conv1D, got {type(base_layer).__name__}")
        self.in_features, self.out_features = features
        self.base_layer = base_layer
        self.layer_index = layer_index
        self.n_experts = len(stacked.ranks)
        self.ranks = list(stacked.ranks)
        self.scales = list(stacked.scales)  # per expert c_e, 0.0 where the expert does not adapt this module
        self.state = state
        self._rows_cache: dict[tuple[int, ...], torch.Tensor] = {}
        self.n_rank_rows = int(stacked.lora_A.shape[0])
        self.lora_A = nn.Parameter(stacked.lora_A, requires_grad=False)
        self.lora_B = nn.Parameter(stacked.lora_B, requires_grad=False)
        device = stacked.lora_A.device
        counts = torch.tensor(self.ranks, dtype=torch.long)
        rank_expert = torch.repeat_interleave(torch.arange(self.n_experts), counts)
        rank_scale = torch.repeat_interleave(torch.tensor(stacked.scales, dtype=torch.float64), counts)
        self.register_buffer("rank_expert", rank_expert.to(device), persistent=False)
        self.register_buffer("rank_scale", rank_scale.to(device=device, dtype=stacked.lora_A.dtype), persistent=False)

    def stacked(self) -> StackedLoRA:
        """The stacked experts as stored (detached), e.g. for saving."""
        return StackedLoRA(self.lora_A.detach(), self.lora_B.detach(), list(self.ranks), list(self.scales))

    def rank_multiplier(self, scalings: torch.Tensor | float) -> torch.Tensor:
        """g * s[expert(j)] * c[expert(j)] for each rank row j: [..., R] for tensor scalings, [R] for a constant."""
        g = self.state.global_scaling_weight
        if isinstance(scalings, torch.Tensor):  # [B, T, L, N] -> this layer's [B, T, N]
            return rank_multipliers(scalings[..., self.layer_index, :], self.rank_expert, self.rank_scale, g)
        return self.rank_scale * (float(scalings) * g)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)  # [..., d_out]
        if self.state.probes is not None:
            self._probe(x)
        scalings = self.state.scalings
        if scalings is None or self.n_rank_rows == 0:
            return out  # experts off: the plain base layer, no expert matmul at all
        lora_A = self.lora_A
        if x.dtype != lora_A.dtype:
            x = x.to(lora_A.dtype)
        if isinstance(scalings, PreparedScalings):
            mult = scalings.layer_multiplier(self.layer_index)
            if scalings.used_experts is not None and not torch.is_grad_enabled():
                return self._sparse_forward(x, out, mult, scalings.used_experts[self.layer_index])
        else:
            mult = self.rank_multiplier(scalings)
        z = F.linear(x, lora_A)  # [..., R]
        if mult.dim() > 1 and mult.dim() != z.dim():  # tokens flattened to [B*T, d] by the model
            mult = mult.expand(mult.shape[0], z.shape[0] // mult.shape[0], mult.shape[-1]).reshape(z.shape)
        if torch.is_grad_enabled() and (z.requires_grad or mult.requires_grad):
            return out + F.linear(z * mult, self.lora_B).to(out.dtype)
        # inference: the same sum in place, without temporaries (decode steps are dominated by op count)
        z.mul_(mult)
        if out.dtype == z.dtype and out.is_contiguous():
            out.view(-1, out.shape[-1]).addmm_(z.view(-1, z.shape[-1]), self.lora_B.t())
            return out
        return out + F.linear(z, self.lora_B).to(out.dtype)

    def _probe(self, x: torch.Tensor) -> None:
        """Write |<x, prototype_e>| [B, T, N] into this layer's column of the state's probes [B, T, L, N]."""
        probes, prototypes = self.state.probes, self.state.prototypes[self.layer_index]  # [N, d_in]
        with torch.set_grad_enabled(self.state.probe_grad):
            scores = F.linear(x.to(prototypes.device, prototypes.dtype), prototypes).abs()
            probes.select(-2, self.layer_index).copy_(scores.reshape(probes.shape[0], probes.shape[1], -1))

    def _sparse_forward(
        self, x: torch.Tensor, out: torch.Tensor, mult: torch.Tensor, used: tuple[int, ...]
    ) -> torch.Tensor:
        """Top-k inference: only the rank rows of the experts some token uses (gathered), instead of all R rows."""
        rows = self._rows_cache.get(used)
        if rows is None:
            offsets = [0, *torch.tensor(self.ranks).cumsum(0).tolist()]
            rows = torch.tensor(
                [j for e in used for j in range(offsets[e], offsets[e + 1])], dtype=torch.long, device=x.device
            )
            if len(self._rows_cache) < 256:
                self._rows_cache[used] = rows
        if rows.numel() == 0:
            return out
        z = F.linear(x, self.lora_A.index_select(0, rows))
        z.mul_(mult.index_select(-1, rows) if mult.dim() > 1 else mult[rows])
        delta = F.linear(z, self.lora_B.index_select(1, rows))
        return out.add_(delta.to(out.dtype)) if delta.shape == out.shape else out + delta.to(out.dtype)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, layer={self.layer_index}, ranks={self.ranks}"
