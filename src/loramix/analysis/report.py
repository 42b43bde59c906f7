"""`analyze`: scalings of prompts (optionally with a generated answer) and of data records, written as a tidy table,
a summary JSON and figures (what `loramix analyze` produces)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError
from ..io import atomic_directory, write_json
from .collect import ScalingsRecorder, collect_records, token_labels
from .plots import plot_layer_correlation, plot_layer_token_heatmaps, plot_token_expert_heatmap, plot_usage_by_domain

logger = logging.getLogger(__name__)

__all__ = ["ANALYSIS_FILES", "analyze", "sequence_scalings"]

ANALYSIS_FILES = ("scalings.parquet", "scalings.csv", "summary.json", "figures")  # what analyze writes


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "-" for c in str(text))[:40] or "none"


@torch.no_grad()
def sequence_scalings(model: Any, ids: torch.Tensor) -> torch.Tensor:
    """Scalings [T, L, N] of every token of one sequence ids [T] (the scaling pass + gate, no mixed pass)."""
    return model.compute_scalings(ids[None].to(model.device))[0].float().cpu()


def _example_figures(
    model: Any, scalings: torch.Tensor, labels: list[str], stem: Path, layers_title: str, tokens_title: str
) -> list[Path]:
    """The two maps of one sequence: STEM-layers-tokens (a panel per expert) and STEM-tokens-experts."""
    written = plot_layer_token_heatmaps(
        scalings,
        labels,
        model.expert_names,
        model.layer_names,
        stem.with_name(stem.name + "-layers-tokens"),
        title=layers_title,
    )
    return written + plot_token_expert_heatmap(
        scalings, labels, model.expert_names, stem.with_name(stem.name + "-tokens-experts"), title=tokens_title
    )


def analyze(
    model: Any,
    out_dir: str | Path,
    *,
    prompts: Sequence[str] = (),
    records: Sequence[dict[str, Any]] | None = None,
    max_new_tokens: int = 0,
    fmt: str = "parquet",
    batch_size: int = 8,
    per_domain_figures: int = 1,
    max_prompt_figures: int = 8,
    progress: bool = True,
    **generate_kwargs: Any,
) -> dict[str, Any]:
    """Record and plot the scalings of `prompts` (each optionally continued by `max_new_tokens` generated tokens,
    greedy unless sampling arguments are given) and of data `records` (see loramix.data; their "domain" groups the
    statistics). Writes the directory out_dir (atomically: an interrupted run leaves nothing half-written, and a
    directory that loramix did not write is never replaced): scalings.parquet|csv, summary.json, figures/*.png|svg.
    Returns the summary."""
    if not prompts and not records:
        raise ConfigError("nothing to analyse: give prompts and/or data records")
    tokenizer = model.tokenizer
    if tokenizer is None:
        raise ConfigError("analysis needs the model's tokenizer (a checkpoint saved with one)")
    with atomic_directory(out_dir, marker="summary.json", owned=ANALYSIS_FILES, what="--out") as out:
        figures = out / "figures"
        recorder = ScalingsRecorder(out, model.expert_names, model.layer_names, tokenizer=tokenizer, fmt=fmt)
        written: list[Path] = []
        texts = []
        for i, prompt in enumerate(prompts):
            ids = tokenizer(prompt, return_tensors="pt").input_ids[0]
            sources = ["prompt"] * len(ids)
            completion = ""
            if max_new_tokens > 0:
                gen = model.generate(ids[None], max_new_tokens=max_new_tokens, **generate_kwargs)
                new = gen.new_tokens[0, : gen.lengths[0]].cpu()
                completion = tokenizer.decode(new, skip_special_tokens=True)
                ids = torch.cat([ids, new])
                sources += ["generated"] * len(new)
            # one pass over the whole sequence gives every token's own scalings (what granular generation used)
            s = sequence_scalings(model, ids)
            recorder.add(s, ids.tolist(), sequence=f"prompt-{i}", domain="prompts", sources=sources)
            texts.append({"sequence": f"prompt-{i}", "prompt": prompt, "completion": completion})
            if i < max_prompt_figures:
                labels = token_labels(tokenizer, ids.tolist())
                header = repr(prompt if len(prompt) < 60 else prompt[:57] + "...")
                titles = (f"Scalings: {header}", f"Dominant experts per token: {header}")
                written += _example_figures(model, s, labels, figures / f"prompt-{i}", *titles)
        if records:
            examples = collect_records(
                model, records, recorder, batch_size=batch_size, progress=progress, keep=per_domain_figures
            )
            for k, ex in enumerate(examples):
                labels = token_labels(tokenizer, ex["ids"])
                name = _slug(ex["domain"] if ex["domain"] is not None else "no-domain")
                written += _example_figures(
                    model,
                    ex["scalings"],
                    labels,
                    figures / f"domain-{name}-{k}",
                    f"Scalings on a '{ex['domain']}' example",
                    f"Experts per token on a '{ex['domain']}' example",
                )
        summary = recorder.close({"texts": texts})
        written += plot_usage_by_domain(summary, figures / "usage-by-domain")
        corr = torch.tensor([[float("nan") if v is None else v for v in row] for row in summary["layer_correlation"]])
        written += plot_layer_correlation(corr, model.layer_names, figures / "layer-correlation")
        summary["figures"] = [str(p.relative_to(out)) for p in written]
        write_json(out / "summary.json", summary)
        return summary
