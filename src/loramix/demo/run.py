"""`loramix demo`: the embedded default. Loads the shipped mini-world (or rebuilds it), shows example answers, runs
the baseline table on a fixed test subset, and writes results.json, results.md and the analysis figures."""

from __future__ import annotations

import json
import logging
import math
import time
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from ..console import make_console
from ..io import check_owned_files, check_replaceable, write_owned_files
from .world import DOMAINS, World

logger = logging.getLogger(__name__)

__all__ = ["EVAL_SIZES", "MEAN_NOTE", "mean_score", "run_demo", "shipped_checkpoint", "test_records"]

RESULT_FILES = ("results.json", "results.md")
# the fixed test subset: records per domain (the first ones of the shuffled test split)
EVAL_SIZES = {"forward": 60, "inverse": 40, "compare": 60, "qa": 60, "composite": 40}
SYSTEM_LABELS = {
    "base": "base model",
    "uniform": "uniform merge (1/N each)",
    "oracle": "oracle (own domain's expert)",
    "router": "per-prompt router (mean scalings of the prompt)",
    "granular": "loramix granular",
    "prompt": "loramix prompt mode",
    "truncated": "loramix truncated scaling pass",
}
MEAN_NOTE = (
    "mean = the mean over forward, design, compare and Q&A of each one's primary metric as a score in [0, 1]: the "
    "shares as they are, forward R² clipped to [0, 1] (below 0, no better than always answering the mean GRAVY, "
    "it counts 0; the R² column keeps the raw value)."
)
SHORT_LABELS = {"uniform": "uniform 1/N", "router": "router (per prompt)", "granular": "loramix granular",
                "prompt": "loramix prompt mode", "truncated": "loramix truncated"}
COLUMNS = [  # (domain, metric, header, format)
    ("forward", "r2", "forward R²", "{:.2f}"),
    ("forward", "mae", "forward MAE", "{:.2f}"),
    ("inverse", "within_tolerance", "design ±0.25", "{:.0%}"),
    ("inverse", "mae", "design MAE", "{:.2f}"),
    ("inverse", "validity", "valid", "{:.0%}"),
    ("inverse", "novelty", "novel", "{:.0%}"),
    ("compare", "exact_match", "compare EM", "{:.0%}"),
    ("qa", "exact_match", "Q&A EM", "{:.0%}"),
    ("composite", "solved", "composite solved", "{:.0%}"),
]


def example_answers(model: Any, world: Any, domains: tuple[str, ...], n: int) -> list[dict[str, str]]:
    """loramix granular's greedy answers to the first n test records of each domain (one prompt at a time: no
    padding)."""
    from ..evaluate import generate_answers

    examples = []
    for domain in domains:
        records = world.domain_records(domain, "test", n)
        answers = generate_answers(model, records, domain, batch_size=1)
        examples += [
            {"domain": domain, "prompt": r["prompt"], "answer": a, "reference": r["completion"]}
            for r, a in zip(records, answers)
        ]
    return examples


def primary_columns(result: Any, columns: list[tuple[str, str, str, str]]) -> list[tuple[str, str, str, str]]:
    """The columns that show each evaluated domain's primary metric (what the console table prints)."""
    from ..evaluate import primary_metric

    return [c for c in columns if c[0] in result.kinds and c[1] == primary_metric(result.kinds[c[0]])]


def analysis_record(analysis: dict[str, Any]) -> dict[str, Any]:
    """What results.json keeps of an `analyze` summary: the figures and each group's expert usage."""
    return {"figures": analysis["figures"], "usage": {g: v["usage"] for g, v in analysis["groups"].items()}}


def write_results(
    out: Path, markdown: str, result: Any, summary: dict[str, Any], examples: list[dict[str, str]], seconds: float,
    sizes: dict[str, int], analysis: dict[str, Any], **fields: Any,
) -> dict[str, Any]:
    """Write a demo's results.json (the evaluation, its summary, example answers, time, subset sizes, the analysis'
    record, then `fields`) and results.md (`markdown`) into `out`; returns the JSON payload."""
    payload = {
        "results": result.to_dict(),
        "summary": summary,
        "examples": examples,
        "seconds": seconds,
        "eval_sizes": sizes,
        "analysis": analysis_record(analysis),
        **fields,
    }
    write_owned_files(out, {"results.json": json.dumps(payload, indent=2), "results.md": markdown}, what="--out")
    return payload


def weights_dir() -> Path:
    return Path(str(resources.files("loramix.demo").joinpath("weights")))


def shipped_checkpoint() -> Path:
    """The demo's main loramix checkpoint (its base and tokenizer are bundled)."""
    return weights_dir() / "checkpoint"


def test_records(world: World, sizes: dict[str, int] | None = None) -> list[dict[str, Any]]:
    return [r for d, n in (sizes or EVAL_SIZES).items() for r in world.domain_records(d, "test", n)]


def _label(system: str) -> str:
    if system.startswith("expert:"):
        return f"expert '{system.split(':', 1)[1]}' alone"
    return SYSTEM_LABELS.get(system, system)


def mean_score(result: Any, system: str, domains: tuple[str, ...] = DOMAINS) -> float:
    """The mean over `domains` of each primary metric as a score in [0, 1] (`loramix.scoring.bounded`: R² is
    clipped to [0, 1], the shares are already there), over the domains where it is defined; NaN if none is."""
    from ..scoring import bounded

    scores = [v for v in (bounded(result.primary(system, d)) for d in domains) if math.isfinite(v)]
    return sum(scores) / len(scores) if scores else math.nan


def summary_of(result: Any, domains: tuple[str, ...] = DOMAINS) -> dict[str, Any]:
    """The mean score over the task domains (`mean_score`), and the targets of the demo."""
    mean = {s: mean_score(result, s, domains) for s in result.metrics}
    experts = [s for s in result.metrics if s.startswith("expert:")]
    best_expert = max(experts, key=lambda s: mean[s])
    ratio = {
        d: result.primary("granular", d) / result.primary("oracle", d)
        if result.primary("oracle", d) > 0
        else float("nan")
        for d in domains
    }
    targets = {
        "granular >= 95% of oracle on every domain": all(r >= 0.95 for r in ratio.values()),
        "granular mean above the uniform merge": mean["granular"] > mean["uniform"],
        "granular mean above the best single expert": mean["granular"] > mean[best_expert],
        "granular beats the per-prompt oracle on composite prompts": result.primary("granular", "composite")
        > result.primary("oracle", "composite"),
    }
    return {"mean_score": mean, "best_single_expert": best_expert, "granular_over_oracle": ratio, "targets": targets}


def results_markdown(
    result: Any,
    summary: dict[str, Any],
    examples: list[dict[str, str]],
    seconds: float,
    sizes: dict[str, int],
    *,
    title: str = "the protein mini-world",
    columns: list[tuple[str, str, str, str]] = COLUMNS,
    extra: dict[str, dict[str, str]] | None = None,
) -> str:
    """results.md: the table (`columns` of the metrics, then `extra` columns: header -> system -> cell), the
    targets and the examples."""
    from ..evaluate import cell

    extra = extra or {}
    lines = [
        f"# loramix demo: {title}",
        "",
        f"Evaluation on a fixed test subset ({', '.join(f'{d} {n}' for d, n in sizes.items())}), greedy.",
        "",
        "| system | " + " | ".join([c[2] for c in columns] + list(extra)) + " | mean |",
        "|---|" + "---|" * (len(columns) + len(extra) + 1),
    ]
    for system in result.metrics:
        cells = [cell(result.metrics[system][c[0]][c[1]], c[3]) for c in columns]
        cells += [by_system.get(system, "-") for by_system in extra.values()]
        cells.append(cell(summary["mean_score"][system], "{:.2f}"))
        lines.append(f"| {_label(system)} | " + " | ".join(cells) + " |")
    lines += [
        "",
        MEAN_NOTE,
        "",
        "Speeds are not measured here (the evaluation batches prompts and shares the machine with whatever runs): "
        "the decode benchmark's are in benchmarks/RESULTS.md. results.json keeps this run's tokens/s per system.",
        "",
        "## Targets",
        "",
    ]
    lines += [f"- {'met' if ok else 'NOT met'}: {name}" for name, ok in summary["targets"].items()]
    lines += [
        "",
        "granular / oracle per domain: "
        + ", ".join(f"{d} {v:.2f}" for d, v in summary["granular_over_oracle"].items()),
        "",
        "## Examples (loramix granular)",
        "",
    ]
    lines += [f"- `{e['prompt']}` -> `{e['answer']}` (reference `{e['reference']}`)" for e in examples]
    lines += ["", f"Run time: {seconds:.0f} s."]
    return "\n".join(lines) + "\n"


def run_demo(
    out_dir: str | Path = "loramix-demo",
    *,
    checkpoint: str | Path | None = None,
    truncated: str | Path | None = None,
    threads: int = 2,
    progress: bool = True,
    console: Any = None,
    sizes: dict[str, int] | None = None,
) -> dict[str, Any]:
    """Run the demo with the shipped weights (or the given checkpoints); returns what results.json holds.
    sizes: records per domain of the test subset (default EVAL_SIZES)."""
    from rich.table import Table

    from ..analysis import analyze
    from ..analysis.report import ANALYSIS_FILES
    from ..evaluate import cell, evaluate
    from ..loading import load

    console = console or make_console()
    torch.set_num_threads(threads)
    start = time.perf_counter()
    out = check_owned_files(out_dir, RESULT_FILES, what="--out")  # before the run: never overwrite a user's file
    check_replaceable(out / "analysis", marker="summary.json", owned=ANALYSIS_FILES, what="--out")
    main_dir = Path(checkpoint) if checkpoint else shipped_checkpoint()
    trunc_dir = Path(truncated) if truncated else main_dir.parent / "checkpoint-truncated"
    with console.status("loading the mini-world"):
        model = load(main_dir)
        base = main_dir / "base" if (main_dir / "base").is_dir() else None
        trunc = load(trunc_dir, base=base or model.base_reference) if trunc_dir.is_dir() else None
        world = World()
    expert_params = sum(p.numel() for n, p in model.model.named_parameters() if n.endswith(("lora_A", "lora_B")))
    base_params = sum(p.numel() for p in model.model.parameters()) - expert_params
    console.print(
        f"[bold]loramix demo[/bold]: a {base_params / 1e6:.2f}M-parameter Llama, experts {model.expert_names} "
        f"({expert_params / 1e6:.2f}M), {model.n_layers} adapted layers, "
        f"{model.config.gate.depth}-layer gate"
        + (f"; truncated gate at k={trunc.config.scaling_layer}" if trunc else "")
    )

    examples = example_answers(model, world, (*DOMAINS, "composite"), 2)
    table = Table("domain", "prompt", "loramix answer", "reference", title="examples (loramix granular, greedy)")
    for e in examples:
        table.add_row(e["domain"], e["prompt"], e["answer"], e["reference"])
    console.print(table)

    sizes = sizes or EVAL_SIZES
    records = test_records(world, sizes)
    result = evaluate(model, records, truncated=trunc, train_peptides=set(world.splits["train"]), progress=progress)
    summary = summary_of(result)
    # the console shows the primary metric of each domain (results.md has every column)
    primary = primary_columns(result, COLUMNS)
    table = Table("system", *[c[2] for c in primary], "mean", title="baselines on the test subset")
    for system in result.metrics:
        style = "bold green" if system == "granular" else None
        table.add_row(
            SHORT_LABELS.get(system, system.replace("expert:", "expert ")),
            *[cell(result.metrics[system][c[0]][c[1]], c[3]) for c in primary],
            cell(summary["mean_score"][system], "{:.2f}"),
            style=style,
        )
    console.print(table)
    console.print(MEAN_NOTE, highlight=False)
    for name, ok in summary["targets"].items():
        console.print(f"  {'[green]met[/green]' if ok else '[red]not met[/red]'}: {name}")

    with console.status("drawing the scalings"):
        analysis_records = [r for d in (*DOMAINS, "composite") for r in world.domain_records(d, "test", 8)]
        analysis = analyze(
            model, out / "analysis", records=analysis_records, progress=False, fmt="csv", per_domain_figures=1
        )
    seconds = time.perf_counter() - start
    markdown = results_markdown(result, summary, examples, seconds, sizes)
    payload = write_results(out, markdown, result, summary, examples, seconds, sizes, analysis)
    console.print(
        f"[green]wrote[/green] {out}/results.json, {out}/results.md and {len(analysis['figures'])} figure "
        f"files in {out}/analysis/figures ({seconds:.0f} s)"
    )
    return payload
