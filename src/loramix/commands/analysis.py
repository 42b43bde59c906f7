"""`loramix analyze` and `loramix converse`: the scalings of prompts and data, and two agents talking."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from ..options import config_options, field_docs
from ..settings import GenerateConfig, LoadConfig, SamplingOptions
from .common import Command, console, load_model, read_schema

app = typer.Typer(add_completion=False)


@app.command("analyze", cls=Command)
@config_options(LoadConfig, "load")
def analyze(
    checkpoint: Path = typer.Argument(..., help="A loramix checkpoint directory (with its tokenizer)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder: table, summary.json, figures/."),
    prompt: list[str] = typer.Option(None, "--prompt", "-p", help="A prompt to analyse; repeat for several."),
    data: str | None = typer.Option(
        None, "--data", help="JSONL records (text / prompt+completion / messages, domain)."
    ),
    max_new_tokens: int = typer.Option(
        0, "--max-new-tokens", "-n", min=0, help="Also generate this many tokens per prompt."
    ),
    limit: int | None = typer.Option(None, min=1, help="Analyse at most this many data records."),
    table_format: str = typer.Option("parquet", "--format", help="Table format: parquet or csv."),
    per_domain: int = typer.Option(1, "--per-domain", min=0, help="Heatmaps for this many examples per domain."),
    batch_size: int = typer.Option(8, "--batch-size", min=1, help="Records per forward pass."),
    compile_: bool = typer.Option(False, "--compile", help=field_docs(GenerateConfig)["compile"]),
    load: Any = None,
) -> None:
    """Record the scalings of prompts and/or a dataset: tidy table, statistics (usage, entropy, dominance, layer
    correlation) and figures (heatmaps, usage by domain)."""
    from ..analysis import analyze as run_analysis
    from ..data import load_records

    if not prompt and not data:
        raise typer.BadParameter("give at least one --prompt or --data", param_hint="--prompt")
    records = load_records(data) if data else None
    if records is not None and limit is not None:
        records = records[:limit]
    model = load_model(checkpoint, load)
    summary = run_analysis(
        model,
        out,
        prompts=prompt or [],
        records=records,
        max_new_tokens=max_new_tokens,
        fmt=table_format,
        batch_size=batch_size,
        per_domain_figures=per_domain,
        **({"compile": True} if compile_ else {}),
    )
    table = Table("group", "tokens", *model.expert_names, "entropy", title="mean scaling per expert")
    for name, group in summary["groups"].items():
        table.add_row(
            name,
            str(group["tokens"]),
            *[f"{group['usage'][e]:.3f}" for e in model.expert_names],
            f"{group['mean_token_entropy']:.3f}",
        )
    console.print(table)
    console.print(
        f"[green]wrote[/green] {out}/{summary['table']}, {out}/summary.json and "
        f"{len(summary['figures'])} figure files under {out}/figures"
    )


@app.command("converse", cls=Command)
@config_options(LoadConfig, "load", skip=("dtype",))
@config_options(
    SamplingOptions, "sampling", skip=("top_p", "top_k", "repetition_penalty"), help={"temperature": "0 is greedy."}
)
def converse(
    checkpoint: Path = typer.Argument(..., help="Checkpoint of agent A (and of B unless --checkpoint-b)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder: transcript, scalings, trajectory figure."),
    checkpoint_b: Path | None = typer.Option(None, "--checkpoint-b", help="A second checkpoint for agent B."),
    persona_a: str = typer.Option("You are agent A. Argue for your position.", "--persona-a", help="System prompt A."),
    persona_b: str = typer.Option("You are agent B. Challenge every claim.", "--persona-b", help="System prompt B."),
    opening: str = typer.Option(..., "--opening", help="The first message, given to agent A."),
    turns: int = typer.Option(6, min=1, help="Turns in all (A speaks first)."),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", "-n", min=1, help="Tokens per turn at most."),
    summary: str | None = typer.Option(None, "--summary", help="After the turns, ask agent A this (a summary)."),
    relay_a: str | None = typer.Option(
        None,
        "--relay-a",
        help='How agent A\'s turns reach B, with "{text}" for the turn, e.g. "What is the GRAVY of '
        'the peptide {text}?" (default: verbatim; with it B does not hear the opening).',
    ),
    relay_b: str | None = typer.Option(None, "--relay-b", help='How agent B\'s turns reach A, with "{text}".'),
    json_schema_a: Path | None = typer.Option(
        None, "--json-schema-a", help="A JSON schema file: agent A answers in JSON valid against it."
    ),
    json_schema_b: Path | None = typer.Option(
        None, "--json-schema-b", help="A JSON schema file: agent B answers in JSON valid against it."
    ),
    table_format: str = typer.Option("parquet", "--format", help="Table format: parquet or csv."),
    sampling: Any = None,
    load: Any = None,
) -> None:
    """Two agents talk for a fixed number of turns; save the transcript and plot each agent's expert trajectory."""
    from ..analysis.converse import converse as run_conversation
    from ..sampling import SamplingSettings

    schema_a, schema_b = read_schema(json_schema_a, "--json-schema-a"), read_schema(json_schema_b, "--json-schema-b")
    model_a = load_model(checkpoint, load)
    model_b = load_model(checkpoint_b, load) if checkpoint_b else None
    record = run_conversation(
        model_a,
        out,
        model_b=model_b,
        persona_a=persona_a,
        persona_b=persona_b,
        opening=opening,
        turns=turns,
        max_new_tokens=max_new_tokens,
        summary_prompt=summary,
        fmt=table_format,
        relay_a=relay_a,
        relay_b=relay_b,
        json_schema_a=schema_a,
        json_schema_b=schema_b,
        sampling=SamplingSettings(temperature=sampling.temperature, seed=sampling.seed),
    )
    for t in record["turns"]:
        dominant = t["dominant"] or "-"
        console.print(f"[bold]{t['turn']} {t['agent']}[/bold] [dim]({dominant})[/dim] {t['text']}", highlight=False)
    console.print(f"[green]wrote[/green] {out}/transcript.json, transcript.md and {out}/figures/trajectory.png")
