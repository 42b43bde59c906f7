"""`loramix eval`: a checkpoint against the baselines, per domain (data parallel under `accelerate launch`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from ..options import config_options
from ..settings import EvalConfig, LoadConfig
from .common import Command, console, interactive, load_model

app = typer.Typer(add_completion=False)


@app.command("eval", cls=Command)
@config_options(LoadConfig, "load", skip=("device", "dtype"))
@config_options(EvalConfig, "run", names={"systems": "--system"})
def eval_cmd(
    checkpoint: Path = typer.Argument(..., help="A loramix checkpoint directory (with its tokenizer)."),
    data: str = typer.Option(..., "--data", help="JSONL: prompt, completion, domain (+ answer/target/then)."),
    heldout: Path | None = typer.Option(
        None,
        "--heldout",
        help="A held-out JSONL (python -m loramix.demo.heldout), scored beside --data; its "
        "'peptide' fields are checked: 20 standard residues, none in the demo's training split.",
    ),
    truncated: Path | None = typer.Option(None, "--truncated", help="A second checkpoint with a truncated gate."),
    out: Path | None = typer.Option(None, "--out", "-o", help="Write results.json and results.md here."),
    run: Any = None,
    load: Any = None,
) -> None:
    """Score a checkpoint against the baselines (base, each expert, uniform merge, oracle, per-prompt router,
    loramix granular / prompt / truncated) per domain; see docs/demo.md for the record format.

    Data parallel under `accelerate launch` (one machine or several): every process answers a share of the records,
    the main process prints the table and alone writes --out (docs/scaling.md)."""
    from .. import demo  # noqa: F401  (registers the demo's record kinds, "design" and "two_segment")
    from ..data import load_records
    from ..evaluate import SYSTEMS, evaluate
    from ..parallel import agree, finish, processes, threads_for_processes

    systems, limit, batch_size = run.systems, run.limit, run.batch_size
    state = processes()
    threads_for_processes(state)
    options = {"checkpoint": str(checkpoint), "--data": data, "--truncated": str(truncated), "--system": systems}
    options |= {"--limit": limit, "--batch-size": batch_size, "--base": load.base, "--quantize": load.quantize}
    agree(options, state)  # ranks with other options would mix their answers under one label
    if out is not None:
        check_out(out, state)
    records = load_records(data)
    records = records[:limit] if limit else records
    held = None
    if heldout is not None:
        from ..demo.heldout import load_heldout

        held = load_heldout(heldout)
        held = held[:limit] if limit else held
    device = str(state.device) if state.num_processes > 1 else None  # one GPU per process under a launcher
    model = load_model(checkpoint, load, device=device)
    trunc = None
    if truncated is not None:
        from ..loading import load as load_checkpoint

        trunc = load_checkpoint(truncated, load.base, device=device, quantize=load.quantize)
    rows = dict(truncated=trunc, systems=systems or SYSTEMS, batch_size=batch_size, state=state)
    rows["progress"] = state.is_main_process and interactive()  # a bar on a terminal only, not in a log file
    result = evaluate(model, records, **rows)
    held_result = evaluate(model, held, **rows) if held is not None else None
    try:
        if state.is_main_process:
            report_eval(result, len(records), state.num_processes, out, held_result)
    finally:
        finish(state)


def check_out(out: Path, state: Any) -> None:
    """Refuse an --out whose results files loramix did not write: before the run, not after it; checked by the
    process that writes, its verdict for all."""
    from ..errors import CheckpointError
    from ..io import check_owned_files
    from ..parallel import same_on_every_process

    refused = None
    if state.is_main_process:
        try:
            check_owned_files(out, ("results.json", "results.md"), what="--out")
        except CheckpointError as exc:
            refused = str(exc)
    refused = same_on_every_process(refused, state)
    if refused is not None:
        raise CheckpointError(refused)


def report_eval(result: Any, n_records: int, n_processes: int, out: Path | None, heldout: Any = None) -> None:
    """The table of `loramix eval` (and, with a held-out set, its table beside the first) and its --out files (the
    main process's part)."""
    from ..evaluate import beside
    from ..io import write_owned_files

    tables = [(result.primary_table(), "primary metric per domain")]
    if heldout is not None:
        tables.append((beside(result, heldout), "primary metric per domain: --data / --heldout"))
    for (header, rows), title in tables:
        table = Table(*header, title=title)
        for row in rows:
            table.add_row(*row)
        console.print(table)
    if n_processes > 1:
        console.print(f"{n_records} records shared by {n_processes} processes")
    if out is not None:
        payload = {**result.to_dict(), **({"heldout": heldout.to_dict()} if heldout is not None else {})}
        markdown = result.to_markdown() + ("" if heldout is None else "\nHeld-out set:\n\n" + heldout.to_markdown())
        results = {"results.json": json.dumps(payload, indent=2), "results.md": markdown}
        write_owned_files(out, results, what="--out")
        console.print(f"[green]wrote[/green] {out}/results.json and {out}/results.md")
