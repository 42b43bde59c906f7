"""Figures of scalings (matplotlib, written as PNG and SVG). Each has a title, labelled axes and one colour bar (beside
the panels, as tall as they are) or one legend; long sequences are binned (mean over consecutive tokens) so that
labels stay readable. Every figure uses matplotlib's constrained layout: no empty bands, whatever the panel count."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from pathlib import Path

import torch

__all__ = [
    "bin_tokens",
    "plot_layer_correlation",
    "plot_layer_token_heatmaps",
    "plot_token_expert_heatmap",
    "plot_trajectory",
    "plot_usage_by_domain",
    "short_layer_name",
]

EXPERT_COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf"]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _figure(nrows: int = 1, ncols: int = 1, **kwargs):
    """(figure, axes [nrows, ncols]) with constrained layout (titles, labels and colour bars get their room)."""
    return _pyplot().subplots(nrows, ncols, layout="constrained", squeeze=False, **kwargs)


def _colorbar_beside(fig, image, ax, label: str) -> None:
    """A colour bar right of `ax`, exactly as tall as the drawn image (also when an aspect ratio shrinks it)."""
    cax = ax.inset_axes((1.015, 0.0, 0.025, 1.0))
    fig.colorbar(image, cax=cax, label=label)


def _save(fig, stem: Path) -> list[Path]:
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = [stem.with_suffix(".png"), stem.with_suffix(".svg")]
    fig.savefig(paths[0], dpi=150, bbox_inches="tight")
    fig.savefig(paths[1], bbox_inches="tight")
    _pyplot().close(fig)
    return paths


def short_layer_name(name: str) -> str:
    """'model.layers.3.self_attn.q_proj' -> '3 q_proj'; 'transformer.h.0.attn.c_attn' -> '0 c_attn'."""
    match = re.search(r"\.(\d+)\.(?:.*\.)?([^.]+)$", name)
    return f"{match.group(1)} {match.group(2)}" if match else name.rsplit(".", 1)[-1]


def bin_tokens(scalings: torch.Tensor, tokens: Sequence[str], max_tokens: int) -> tuple[torch.Tensor, list[str]]:
    """[T, ...] -> [<= max_tokens, ...] by averaging runs of consecutive tokens; labels 'i-j first…'."""
    t = scalings.shape[0]
    if t <= max_tokens:
        return scalings, list(tokens)
    size = math.ceil(t / max_tokens)
    chunks, labels = [], []
    for start in range(0, t, size):
        end = min(start + size, t)
        chunks.append(scalings[start:end].mean(0))
        labels.append(f"{start}-{end - 1} {tokens[start]}…")
    return torch.stack(chunks), labels


def plot_layer_token_heatmaps(
    scalings: torch.Tensor,
    tokens: Sequence[str],
    expert_names: Sequence[str],
    layer_names: Sequence[str],
    stem: Path,
    *,
    title: str = "",
    max_tokens: int = 64,
) -> list[Path]:
    """One panel per expert: adapted layers (rows) x tokens (columns), colour = scaling. scalings [T, L, N]."""
    s, labels = bin_tokens(scalings.float(), tokens, max_tokens)
    t, n_layers, n_experts = s.shape
    vmax = max(float(s.max()), 1e-6)
    vmin = min(float(s.min()), 0.0)
    width = min(max(6.0, 0.22 * t + 2.5), 24)
    # a panel grows with its rows up to 3.5 in: 150 adapted modules x 5 experts stay one readable page
    height_panel = min(max(1.6, 0.13 * n_layers + 0.8), 3.5)
    fig, axes = _figure(n_experts, 1, figsize=(width, height_panel * n_experts + 1.0), sharex=True)
    step = max(1, math.ceil(n_layers / 24))
    image = None
    for e in range(n_experts):
        ax = axes[e, 0]
        image = ax.imshow(
            s[:, :, e].T.numpy(), aspect="auto", cmap="viridis", vmin=vmin, vmax=vmax, interpolation="nearest"
        )
        ax.set_title(f"expert '{expert_names[e]}'", loc="left", fontsize=10)
        ax.set_ylabel("adapted layer")
        ax.set_yticks(range(0, n_layers, step))
        ax.set_yticklabels([short_layer_name(layer_names[i]) for i in range(0, n_layers, step)], fontsize=6)
    axes[-1, 0].set_xticks(range(t))
    axes[-1, 0].set_xticklabels(labels, rotation=90, fontsize=7 if t <= 48 else 6)
    axes[-1, 0].set_xlabel("token" + (" (binned: mean over consecutive tokens)" if len(tokens) > max_tokens else ""))
    fig.suptitle(title or "Scalings per adapted layer and token", fontsize=12)
    # one colour bar for all panels (they share vmin/vmax), beside them and as tall as they are, 0.15 in wide
    fig.colorbar(image, ax=axes[:, 0].tolist(), label="scaling", pad=0.01, aspect=height_panel * n_experts / 0.15)
    return _save(fig, stem)


def plot_token_expert_heatmap(
    scalings: torch.Tensor,
    tokens: Sequence[str],
    expert_names: Sequence[str],
    stem: Path,
    *,
    title: str = "",
    max_tokens: int = 96,
) -> list[Path]:
    """Experts (rows) x tokens (columns), colour = scaling averaged over the adapted layers. scalings [T, L, N]."""
    s, labels = bin_tokens(scalings.float().mean(1), tokens, max_tokens)  # [T', N]
    t, n_experts = s.shape
    fig, axes = _figure(figsize=(min(max(6.0, 0.2 * t + 2.5), 24), 0.5 * n_experts + 2.2))
    ax = axes[0, 0]
    image = ax.imshow(
        s.T.numpy(), aspect="auto", cmap="magma", vmin=0.0, vmax=max(float(s.max()), 1e-6), interpolation="nearest"
    )
    ax.set_yticks(range(n_experts))
    ax.set_yticklabels(expert_names)
    ax.set_ylabel("expert")
    ax.set_xticks(range(t))
    ax.set_xticklabels(labels, rotation=90, fontsize=7 if t <= 48 else 6)
    ax.set_xlabel("token" + (" (binned)" if len(tokens) > max_tokens else ""))
    ax.set_title(title or "Scalings per token and expert (mean over layers)")
    _colorbar_beside(fig, image, ax, "mean scaling")
    return _save(fig, stem)


def plot_usage_by_domain(summary: dict, stem: Path, *, title: str = "") -> list[Path]:
    """Grouped bars: for each domain (and all tokens), the mean scaling of each expert."""
    experts = summary["experts"]
    groups = [g for g in summary["groups"] if g != "all"] + ["all"]
    n = len(experts)
    fig, axes = _figure(figsize=(max(6.0, 1.2 * len(groups) * max(1, n / 3) + 2), 4.2))
    ax = axes[0, 0]
    width = 0.8 / n
    for e, name in enumerate(experts):
        values = [summary["groups"][g]["usage"][name] for g in groups]
        positions = [i + (e - (n - 1) / 2) * width for i in range(len(groups))]
        ax.bar(positions, values, width=width, label=name, color=EXPERT_COLOURS[e % len(EXPERT_COLOURS)])
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels([f"{g}\n({summary['groups'][g]['tokens']} tokens)" for g in groups])
    ax.set_xlabel("domain")
    ax.set_ylabel("mean scaling (over tokens and layers)")
    ax.set_title(title or "Expert usage by domain")
    fig.legend(title="expert", loc="outside right upper")
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, stem)


def plot_trajectory(
    per_agent: dict[str, tuple[list[int], torch.Tensor, Sequence[str]]], stem: Path, *, title: str = ""
) -> list[Path]:
    """Expert trajectories over a conversation: one panel per agent, turns on x, mean scaling of each expert on y.
    per_agent: name -> (turn numbers over the whole conversation, [turns, N] mean over each turn's tokens and layers,
    the agent's expert names).
    """
    agents = list(per_agent)
    fig, axes = _figure(1, len(agents), figsize=(5.5 * len(agents) + 1.5, 4.2), sharey=True)
    shared = all(list(per_agent[a][2]) == list(per_agent[agents[0]][2]) for a in agents)
    for a, agent in enumerate(agents):
        ax = axes[0, a]
        turns, values, expert_names = per_agent[agent]
        for e, name in enumerate(expert_names):
            colour = EXPERT_COLOURS[e % len(EXPERT_COLOURS)]
            ax.plot(turns, values[:, e].tolist(), marker="o", label=name, color=colour)
        ax.set_title(f"agent {agent}")
        ax.set_xlabel("turn")
        ax.set_xticks(turns)
        ax.grid(alpha=0.3)
        if not shared:  # different experts per agent: a legend per panel
            ax.legend(title="expert", fontsize=8)
    if shared:  # one legend beside the panels
        fig.legend(*axes[0, 0].get_legend_handles_labels(), title="expert", loc="outside right upper")
    axes[0, 0].set_ylabel("mean scaling (over the turn's tokens and layers)")
    fig.suptitle(title or "Expert trajectories over the conversation")
    return _save(fig, stem)


def plot_layer_correlation(
    corr: torch.Tensor, layer_names: Sequence[str], stem: Path, *, title: str = ""
) -> list[Path]:
    """Layers x layers Pearson correlation of the scalings."""
    n = corr.shape[0]
    fig, axes = _figure(figsize=(min(max(5.0, 0.16 * n + 3), 16), min(max(4.2, 0.16 * n + 2), 15)))
    ax = axes[0, 0]
    image = ax.imshow(corr.float().numpy(), cmap="coolwarm", vmin=-1, vmax=1, interpolation="nearest")
    step = max(1, math.ceil(n / 24))
    names = [short_layer_name(layer_names[i]) for i in range(0, n, step)]
    ax.set_xticks(range(0, n, step))
    ax.set_xticklabels(names, rotation=90, fontsize=6)
    ax.set_yticks(range(0, n, step))
    ax.set_yticklabels(names, fontsize=6)
    ax.set_xlabel("adapted layer")
    ax.set_ylabel("adapted layer")
    ax.set_title(title or "Layer-to-layer correlation of the scalings")
    _colorbar_beside(fig, image, ax, "Pearson r")
    return _save(fig, stem)
