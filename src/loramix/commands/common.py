"""What the `loramix` commands share: the consoles, the model loader, the readers of prompt and schema files, and
`Command`, the help without a type label on flags. Imports no torch."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import typer
from typer.core import TyperCommand

from ..console import make_console

__all__ = [
    "Command",
    "check_quantize",
    "console",
    "err_console",
    "interactive",
    "load_model",
    "parse_experts",
    "read_checkpoint_meta",
    "read_prompts",
    "read_schema",
    "without_flag_types",
]

console = make_console()  # tables at their natural width when stdout is a log file or a pipe (console.py)
err_console = make_console(stderr=True)


def _no_type(ctx: Any) -> None:
    return None


def without_flag_types(params: list[Any]) -> list[Any]:
    """The parameters, their flags shown without a type in the help (Typer would write `<bool>`; a flag takes no
    value)."""
    for param in params:
        if getattr(param, "is_flag", False):
            param.display_type_rich = _no_type  # this instance's, not the class's
    return params


class Command(TyperCommand):
    """A Typer command whose help shows no `<bool>` beside a flag."""

    def get_params(self, ctx: Any) -> list[Any]:
        return without_flag_types(super().get_params(ctx))


def check_quantize(name: str | None) -> None:
    """A usage error naming --quantize for a name loramix does not know (before anything is loaded)."""
    from ..errors import ConfigError
    from ..settings import LoadConfig

    try:
        LoadConfig(quantize=name)
    except ConfigError as exc:
        raise typer.BadParameter(str(exc), param_hint="--quantize") from None


def interactive() -> bool:
    """Whether stderr is a terminal: progress bars only there (in a log file a bar is a 10 KB line of \\r)."""
    return sys.stderr.isatty()


def read_checkpoint_meta(path: Path) -> dict[str, Any]:
    from ..checkpoint import CONFIG_NAME
    from ..io import read_json

    return read_json(Path(path) / CONFIG_NAME, "the checkpoint's config")


def load_model(checkpoint: Path, load: Any, *, device: str | None = None, quantize: str | None = None) -> Any:
    """The checkpoint's LoraMixModel per a `settings.LoadConfig` (device, quantize: given here instead)."""
    from ..base import DTYPES
    from ..loading import load as load_checkpoint

    device = device if device is not None else getattr(load, "device", None)
    quantize = quantize if quantize is not None else load.quantize
    dtype = DTYPES[load.dtype] if getattr(load, "dtype", None) else None
    with err_console.status(f"loading {checkpoint}"):
        return load_checkpoint(checkpoint, load.base, device=device, dtype=dtype, quantize=quantize)


def read_prompts(prompts: list[str] | None, file: Path | None) -> list[str]:
    out = list(prompts or [])
    if file is not None:
        from ..errors import ConfigError

        if not file.is_file():
            raise ConfigError(f"{file}: no such file (expected one prompt per line, or JSONL with a 'prompt' field)")
        for number, line in enumerate(file.read_text().splitlines(), 1):
            if not line.strip():
                continue
            if file.suffix == ".jsonl":
                try:
                    record = json.loads(line)
                    out.append(str(record["prompt"]))
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise ConfigError(f"{file}:{number}: expected a JSON object with a 'prompt' field") from None
            else:
                out.append(line)
    if not out:
        raise typer.BadParameter("give at least one --prompt or a --file", param_hint="--prompt")
    return out


def read_schema(path: Path | None, option: str) -> dict | None:
    """A JSON schema file (a JSON object), or None."""
    if path is None:
        return None
    from ..errors import ConfigError
    from ..io import read_json

    return read_json(path, "JSON schema", error=ConfigError, prefix=f"{option}: ")


def parse_experts(values: list[str]) -> dict[str, str]:
    """NAME=ADAPTER_DIR options as {name: dir}; a name given twice is a usage error (a dict would keep the last)."""
    experts: dict[str, str] = {}
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or not name or not path:
            raise typer.BadParameter(f"{value!r}: expected NAME=ADAPTER_DIR", param_hint="--expert")
        if name in experts:
            raise typer.BadParameter(
                f"expert name {name!r} is given twice ({experts[name]} and {path}); give each expert a unique name",
                param_hint="--expert",
            )
        experts[name] = path
    return experts
