"""The `loramix` command line (Typer). Library errors become one red line and exit code 1; `--debug` shows the
traceback. Usage errors exit with 2.

Each command lives in a module of `loramix.commands`, imported when that command runs or shows its help: the list
below (`COMMANDS`) names the module and the command's one-line summary, so `loramix --help` imports neither torch
nor any command's dependencies.
"""

from __future__ import annotations

import dataclasses
import importlib
import sys
from typing import Any

import typer
from rich.markup import escape
from typer.core import TyperCommand, TyperGroup

from .commands.common import console, err_console, without_flag_types
from .errors import LoramixError
from .version import __version__

COMMANDS: dict[str, tuple[str, str]] = {
    "info": ("checkpoints", "Summarise a checkpoint: base, experts, adapted layers and gate (reads the JSON only)."),
    "generate": (
        "generate",
        "Generate text from prompts with a checkpoint, optionally streaming and showing the dominant expert per token.",
    ),
    "train-expert": ("train", "Train one LoRA expert with PEFT; the output is a plain PEFT adapter directory."),
    "train-gate": (
        "train",
        "Train the gate of a mixture (base + experts frozen); the output is a self-contained loramix checkpoint.",
    ),
    "mix": (
        "train",
        "Build a mixture that needs no training (the Arrow router: each layer routes every token to the experts whose "
        "prototypes match its input; docs/gates.md) and save it as a loramix checkpoint.",
    ),
    "analyze": (
        "analysis",
        "Record the scalings of prompts and/or a dataset: tidy table, statistics (usage, entropy, dominance, layer "
        "correlation) and figures (heatmaps, usage by domain).",
    ),
    "converse": (
        "analysis",
        "Two agents talk for a fixed number of turns; save the transcript and plot each agent's expert trajectory.",
    ),
    "serve": (
        "serve",
        "Serve a checkpoint behind an OpenAI-compatible API (/v1/completions, /v1/chat/completions, /v1/models).",
    ),
    "export": (
        "checkpoints",
        "Export a checkpoint: to mistral.rs's X-LoRA layout, or bake one fixed mixture into a plain PEFT LoRA.",
    ),
    "demo": (
        "demo",
        "The protein world: LoRA experts and a gate, evaluated against the baselines (docs/demo.md, "
        "docs/demo-smollm2.md).",
    ),
    "eval": (
        "evaluation",
        "Score a checkpoint against the baselines (base, each expert, uniform merge, oracle, per-prompt router, "
        "loramix granular / prompt / truncated) per domain; see docs/demo.md for the record format.",
    ),
}
"""Command -> (its module under loramix.commands, its summary: the first paragraph of its help, on one line)."""

EXTRAS = {"lm_eval": "eval", "ray": "ray", "torchao": "quant", "bitsandbytes": "quant", "gguf": "smollm2"}
"""Optional packages -> the loramix extra that installs them (pyproject.toml)."""


class LazyGroup(TyperGroup):
    """The root command: its subcommands are imported from their module when used; the command list of the
    help is made from `COMMANDS` alone."""

    listing = False

    def get_params(self, ctx: Any) -> list[Any]:
        return without_flag_types(super().get_params(ctx))

    def list_commands(self, ctx: Any) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: Any, cmd_name: str) -> Any:
        if cmd_name not in COMMANDS:
            return None
        summary = COMMANDS[cmd_name][1]
        if self.listing:
            return TyperCommand(cmd_name, short_help=summary, help=summary)
        command = load_command(cmd_name)
        command.short_help = summary
        return command

    def format_help(self, ctx: Any, formatter: Any) -> None:
        self.listing = True
        try:
            super().format_help(ctx, formatter)
        finally:
            self.listing = False


def load_command(name: str) -> Any:
    """The Typer command `name`, from its module under loramix.commands."""
    module = importlib.import_module(f".commands.{COMMANDS[name][0]}", __package__)
    command = typer.main.get_command(module.app)
    return command.commands[name] if isinstance(command, TyperGroup) else command


app = typer.Typer(
    cls=LazyGroup,
    help="Mix frozen LoRA experts per token and per layer inside a frozen causal LM (X-LoRA).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def _version(value: bool) -> None:
    if value:
        console.print(f"loramix {__version__}")
        raise typer.Exit()


@dataclasses.dataclass
class _Session:
    """What the root options tell `main` (Click passes it to every command as the context's `obj`)."""

    debug: bool = False


@app.callback()
def _root(
    ctx: typer.Context,
    debug: bool = typer.Option(False, "--debug", help="Show Python tracebacks on errors."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    """loramix: X-LoRA mixtures of LoRA experts."""
    if isinstance(ctx.obj, _Session):
        ctx.obj.debug = debug


def _quiet_libraries() -> None:
    """Keep the terminal for loramix's own output: no per-file loading bars or deprecation notes from libraries
    (set before they are imported: transformers reads TRANSFORMERS_VERBOSITY then)."""
    import os
    import warnings

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    warnings.filterwarnings("ignore", category=FutureWarning)
    if "transformers" in sys.modules:  # pragma: no cover  (imported before main, e.g. by a test)
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()


def _import_failure(exc: ImportError) -> str:
    """One line for an import that failed: the extra to install for an optional package, else the library."""
    missing = (exc.name or "").split(".")[0] if isinstance(exc, ModuleNotFoundError) else ""
    if missing in EXTRAS:
        return f"{missing} is not installed: pip install 'loramix[{EXTRAS[missing]}]'"
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else "no message"
    return f"a library failed to import ({type(exc).__name__}: {first}); reinstall it, or run with --debug"


def _fail(message: str, code: int) -> None:
    err_console.print(f"[red]error:[/red] {escape(message)}", highlight=False, soft_wrap=True)
    sys.exit(code)


def main() -> None:
    try:  # typer >= 0.2x vendors click; older ones use click itself
        from typer._click.exceptions import NoArgsIsHelpError, UsageError
    except ImportError:  # pragma: no cover
        from click.exceptions import NoArgsIsHelpError, UsageError

    session = _Session()
    _quiet_libraries()
    try:
        command = typer.main.get_command(app)
        code = command.main(args=sys.argv[1:], prog_name="loramix", standalone_mode=False, obj=session)
        if isinstance(code, int) and code:
            sys.exit(code)
    except NoArgsIsHelpError as exc:
        exc.show()  # bare `loramix` or `loramix COMMAND` without arguments: the help
        sys.exit(exc.exit_code)
    except UsageError as exc:  # bad options: one line, exit code 2 (click's code, without typer's box)
        if session.debug:
            raise
        hint = f" (see '{exc.ctx.command_path} --help')" if exc.ctx is not None else ""
        _fail(exc.format_message() + hint, exc.exit_code)
    except typer.Abort:
        err_console.print("[red]interrupted[/red]")
        sys.exit(130)
    except (LoramixError, OSError) as exc:
        if session.debug:
            raise
        _fail(str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__, 1)
    except ImportError as exc:  # an optional extra missing, or an installed library that fails to import
        if session.debug:
            raise
        _fail(_import_failure(exc), 1)
    except KeyboardInterrupt:
        err_console.print("[red]interrupted[/red]")
        sys.exit(130)
