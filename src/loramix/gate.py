"""The gate ("scaling head"): hidden states of the scaling pass -> scalings [B, T, L, N]."""

from __future__ import annotations

import torch
from torch import nn

from .config import GateConfig

__all__ = ["ScalingHead", "apply_top_k"]


def apply_top_k(scalings: torch.Tensor, k: int, renormalise: bool) -> torch.Tensor:
    """Keep the k largest scalings over the last (expert) dim, zero the rest; optionally softmax the kept ones."""
    if k >= scalings.shape[-1]:
        return torch.softmax(scalings, dim=-1) if renormalise else scalings
    values, index = scalings.topk(k, dim=-1)
    if renormalise:
        values = torch.softmax(values, dim=-1)
    return torch.zeros_like(scalings).scatter(-1, index, values)


class ScalingHead(nn.Module):
    """MLP gate. Parameter names follow the X-LoRA classifier file format: `inner.{i}.*` then `last.*`.

    h [B, T, H] -> (Linear -> ReLU -> Dropout) x (depth-1) -> last: Linear -> [B, T, L*N] or [B, T, N]
      -> reshape [B, T, L, N] (row = layer * N + expert; broadcast over L when not layerwise)
      -> softmax(logits / temperature) over N -> top-k mask (-> softmax over the kept k)
    """

    def __init__(self, config: GateConfig, hidden_size: int, n_layers: int, n_experts: int) -> None:
        super().__init__()
        self.config = config
        self.hidden_size = hidden_size
        self.n_layers = n_layers
        self.n_experts = n_experts
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

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """hidden_states [B, T, H] -> scalings [B, T, L, N]."""
        s = self.logits(hidden_states)
        if self.config.softmax:
            s = torch.softmax(s / self.config.temperature, dim=-1)
        if self.config.top_k is not None:
            s = apply_top_k(s, self.config.top_k, self.config.topk_softmax)
        return s
