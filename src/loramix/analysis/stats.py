"""Statistics of scalings [T, L, N] (tokens x adapted layers x experts), accumulated in bounded memory.

usage      mean scaling of each expert, per layer and overall (and per domain)
entropy    per-token entropy of the scalings (normalised to a distribution over experts), averaged over layers
dominance  share of tokens where an expert is the argmax of the layer-averaged scalings
layer_correlation  Pearson correlation between layers of the (token, expert) scaling values
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["ScalingStats", "dominant_experts", "token_entropy"]


def dominant_experts(scalings: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """scalings [..., L, N] -> (index [...], share [...]) of the expert with the largest mean scaling over layers."""
    mean = scalings.float().mean(-2)
    share, index = mean.max(-1)
    return index, share


def token_entropy(scalings: torch.Tensor) -> torch.Tensor:
    """[..., L, N] -> [...]: entropy (nats) of each layer's scalings as a distribution over experts, mean over layers.

    Scalings are normalised to sum to 1 (a softmax gate's already do); 0 for one expert, ln N for uniform.
    """
    s = scalings.double().clamp_min(0)
    p = s / s.sum(-1, keepdim=True).clamp_min(1e-12)
    h = -(p * p.clamp_min(1e-12).log()).sum(-1)  # [..., L]
    return h.mean(-1)


@dataclass
class _Group:
    tokens: int = 0
    sum_layer_expert: torch.Tensor | None = None  # [L, N]
    entropy_sum: float = 0.0
    dominant: torch.Tensor | None = None  # [N] counts


@dataclass
class ScalingStats:
    """Running statistics over any number of sequences; memory is O(L^2 + domains * L * N)."""

    n_layers: int
    n_experts: int
    groups: dict[str, _Group] = field(default_factory=dict)
    _xx: torch.Tensor | None = None  # [L, L] sum of x_i x_j over (token, expert)
    _x: torch.Tensor | None = None  # [L]
    _n: int = 0

    def _group(self, name: str) -> _Group:
        if name not in self.groups:
            self.groups[name] = _Group(
                sum_layer_expert=torch.zeros(self.n_layers, self.n_experts, dtype=torch.float64),
                dominant=torch.zeros(self.n_experts, dtype=torch.float64),
            )
        return self.groups[name]

    def add(self, scalings: torch.Tensor, domain: str | None = None) -> None:
        """Add one sequence's scalings [T, L, N] (only real tokens)."""
        s = scalings.detach().double().cpu()
        if s.dim() != 3 or s.shape[1:] != (self.n_layers, self.n_experts):
            raise ValueError(f"scalings of shape {tuple(s.shape)}; expected [T, {self.n_layers}, {self.n_experts}]")
        entropy = token_entropy(s)
        dominant = s.mean(1).argmax(-1)
        for name in {"all", domain or "all"}:
            g = self._group(name)
            g.tokens += s.shape[0]
            g.sum_layer_expert += s.sum(0)
            g.entropy_sum += float(entropy.sum())
            g.dominant += torch.bincount(dominant, minlength=self.n_experts).double()
        x = s.permute(0, 2, 1).reshape(-1, self.n_layers)  # [(T*N), L]
        self._xx = x.T @ x if self._xx is None else self._xx + x.T @ x
        self._x = x.sum(0) if self._x is None else self._x + x.sum(0)
        self._n += x.shape[0]

    def usage(self, group: str = "all") -> torch.Tensor:
        """[L, N] mean scaling per layer and expert."""
        g = self.groups[group]
        return g.sum_layer_expert / max(g.tokens, 1)

    def layer_correlation(self) -> torch.Tensor:
        """[L, L] Pearson correlation between layers (NaN where a layer's scalings are constant)."""
        if self._n == 0:
            return torch.full((self.n_layers, self.n_layers), float("nan"), dtype=torch.float64)
        mean = self._x / self._n
        cov = self._xx / self._n - torch.outer(mean, mean)
        std = cov.diagonal().clamp_min(0).sqrt()
        corr = cov / torch.outer(std, std)
        corr[torch.outer(std, std) < 1e-12] = float("nan")
        return corr

    def summary(self, expert_names: list[str], layer_names: list[str]) -> dict[str, Any]:
        """JSON-ready summary: per group (all, and each domain) usage by expert and by layer, mean token entropy,
        dominance; the layer correlation matrix."""
        out: dict[str, Any] = {"experts": expert_names, "layers": layer_names, "groups": {}}
        for name, g in self.groups.items():
            usage = self.usage(name)
            out["groups"][name] = {
                "tokens": g.tokens,
                "usage": {e: float(v) for e, v in zip(expert_names, usage.mean(0))},
                "usage_by_layer": {
                    layer: {e: float(v) for e, v in zip(expert_names, row)} for layer, row in zip(layer_names, usage)
                },
                "mean_token_entropy": g.entropy_sum / max(g.tokens, 1),
                "dominance": {e: float(v) / max(g.tokens, 1) for e, v in zip(expert_names, g.dominant)},
            }
        corr = self.layer_correlation()
        out["layer_correlation"] = [[None if v != v else round(float(v), 6) for v in row] for row in corr]
        return out
