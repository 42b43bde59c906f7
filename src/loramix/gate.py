"""The gate ("scaling head"): what the scaling pass saw -> scalings [B, T, L, N].

Two kinds (`GateConfig.router`):
    ScalingHead    "mlp", the paper's learned gate: the scaling pass's last hidden states h [B, T, H] -> an MLP.
    ArrowRouter    "arrow", no training: every adapted layer scores its input x in the scaling pass against each
                   expert's prototype (`arrow_prototypes`), the probes [B, T, L, N] = |<x, prototype_e>|; the router
                   keeps the top-k per (token, layer) and softmaxes them with a temperature.
Both are called as gate(hidden_states, probes); `reads_probes` says which one the model must collect.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import GateConfig

__all__ = ["ArrowRouter", "ScalingHead", "apply_top_k", "arrow_prototypes", "build_gate"]


def apply_top_k(scalings: torch.Tensor, k: int, renormalise: bool) -> torch.Tensor:
    """Keep the k largest scalings over the last (expert) dim, zero the rest; optionally softmax the kept ones."""
    if k >= scalings.shape[-1]:
        return torch.softmax(scalings, dim=-1) if renormalise else scalings
    values, index = scalings.topk(k, dim=-1)
    if renormalise:
        values = torch.softmax(values, dim=-1)
    return torch.zeros_like(scalings).scatter(-1, index, values)


class _Gate(nn.Module):
    """What every gate knows: its config and the sizes of the scalings it gives [B, T, n_layers, n_experts]."""

    reads_probes = False

    def __init__(self, config: GateConfig, hidden_size: int, n_layers: int, n_experts: int) -> None:
        super().__init__()
        self.config = config
        self.hidden_size = hidden_size
        self.n_layers = n_layers
        self.n_experts = n_experts


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

    def logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Raw gate outputs before softmax / top-k: [B, T, L, N]."""
        h = hidden_states.to(self.last.weight.dtype)
        for layer in self.inner:
            h = self.dropout(torch.relu(layer(h)))
        out = self.last(h)
        if self.config.layerwise:
            return out.unflatten(-1, (self.n_layers, self.n_experts))
        return out.unsqueeze(-2).expand(*out.shape[:-1], self.n_layers, self.n_experts)

    def forward(self, hidden_states: torch.Tensor, probes: torch.Tensor | None = None) -> torch.Tensor:
        """hidden_states [B, T, H] -> scalings [B, T, L, N] (probes: unused)."""
        s = self.logits(hidden_states)
        if self.config.softmax:
            s = torch.softmax(s / self.config.temperature, dim=-1)
        if self.config.top_k is not None:
            s = apply_top_k(s, self.config.top_k, self.config.topk_softmax)
        return s


class ArrowRouter(_Gate):
    """Arrow routing (no parameters): probes [B, T, L, N] -> softmax(top-k(probes) / temperature) over the experts,
    zero outside the top k; as PEFT's `ArrowLoraLinearLayer` computes its coefficients."""

    reads_probes = True

    def forward(self, hidden_states: torch.Tensor | None, probes: torch.Tensor | None = None) -> torch.Tensor:
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
