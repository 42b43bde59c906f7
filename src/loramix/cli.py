"""The `loramix` command line (Typer). Library errors become one red line and exit code 1; `--debug` shows the
traceback. Usage errors exit with 2."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from . import __version__
from .errors import LoramixError

app = typer.Typer(
    help="Mix frozen LoRA experts per token and per layer inside a frozen causal LM (X-LoRA).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console()
err_console = Console(stderr=True)


def _version(value: bool) -> None:
    if value:
        console.print(f"loramix {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="Show Python tracebacks on errors."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    """loramix: X-LoRA mixtures of LoRA experts."""


def _read_checkpoint_meta(path: Path) -> dict[str, Any]:
    from .checkpoint import CONFIG_NAME, read_json

    return read_json(Path(path) / CONFIG_NAME, "the checkpoint's config")


@app.command()
def info(checkpoint: Path = typer.Argument(..., help="A loramix checkpoint directory.")) -> None:
    """Summarise a checkpoint: base, experts, adapted layers and gate (reads the JSON only)."""
    meta = _read_checkpoint_meta(checkpoint)
    base = meta.get("base", {})
    gate = meta.get("mix_config", {}).get("gate", {})
    console.print(
        f"[bold]{checkpoint}[/bold]  format {meta.get('format_version')}, loramix {meta.get('loramix_version')}"
    )
    console.print(
        f"base: {base.get('name_or_path')} ({base.get('fingerprint', {}).get('architecture')}, "
        f"{base.get('dtype')})" + ("  [bundled]" if base.get("bundled") else "")
    )
    table = Table("expert", "rank", "alpha", "rsLoRA", "targets", "source")
    for e in meta.get("experts", []):
        c = e.get("adapter_config", {})
        targets = c.get("target_modules")
        targets = ", ".join(sorted(targets)) if isinstance(targets, list) else str(targets)
        table.add_row(
            e["name"],
            str(c.get("r")),
            str(c.get("lora_alpha")),
            str(bool(c.get("use_rslora"))),
            targets,
            e.get("source", ""),
        )
    console.print(table)
    layers = meta.get("layers", [])
    console.print(f"adapted layers: {len(layers)}  (first {layers[0]['module'] if layers else '-'})")
    console.print("gate: " + json.dumps(gate))
    rest = {k: v for k, v in meta.get("mix_config", {}).items() if k != "gate"}
    console.print("mix: " + json.dumps(rest))


def main() -> None:
    debug = "--debug" in sys.argv[1:]
    try:
        app()
    except (LoramixError, OSError) as exc:
        if debug:
            raise
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        err_console.print(f"[red]error:[/red] {message}", highlight=False, soft_wrap=True)
        sys.exit(1)
    except KeyboardInterrupt:
        err_console.print("[red]interrupted[/red]")
        sys.exit(130)
