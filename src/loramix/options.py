"""Command-line options from config dataclasses: one option per field, its help from the field's docstring.

`config_options(GateConfig, "gate", names={"dropout": "--gate-dropout"})` on a Typer command adds an option for every
field of `GateConfig` (`--depth`, `--width`, ..., booleans as `--flag/--no-flag`) and passes the command one argument,
`gate`, built from them: a new config field reaches the command line without an edit here or in the CLI. A value the
config refuses becomes a usage error that names the option.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import itertools
import re
import textwrap
import typing
from collections.abc import Callable, Iterable
from typing import Any

import typer

from .errors import ConfigError

__all__ = ["config_options", "field_docs"]


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of a dataclass (the attribute-docstring convention), by field name."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):  # no source (a frozen application): options without help
        return {}
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs = {}
    for node, after in itertools.pairwise(body):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(after, ast.Expr)
            and isinstance(after.value, ast.Constant)
            and isinstance(after.value.value, str)
        ):
            docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    raise TypeError(f"{f.name} has no default: a config field needs one to become an option")


def _declaration(name: str, kind: Any) -> str:
    flag = "--" + name.replace("_", "-")
    return f"{flag}/--no-{flag[2:]}" if kind is bool else flag


def config_options(
    cls: type,
    param: str,
    *,
    names: dict[str, str] | None = None,
    skip: Iterable[str] = (),
    help: dict[str, str] | None = None,
    defaults: dict[str, Any] | None = None,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorate a Typer command so that every field of `cls` but `skip` is an option and the command receives
    `param=cls(**values)`. names: field -> option declaration where it differs from `--field-name`; help, defaults:
    field -> help text or default where they differ from the field's docstring and default."""
    names, help, defaults = names or {}, help or {}, defaults or {}
    hints = typing.get_type_hints(cls)
    fields = [f for f in dataclasses.fields(cls) if f.name not in set(skip)]
    docs = field_docs(cls)
    flags = {f.name: names.get(f.name) or _declaration(f.name, hints[f.name]) for f in fields}

    def decorate(command: Callable[..., Any]) -> Callable[..., Any]:
        signature = inspect.signature(command)
        added = [
            inspect.Parameter(
                f"{param}__{f.name}",
                inspect.Parameter.KEYWORD_ONLY,
                default=typer.Option(
                    defaults.get(f.name, _default(f)),
                    *flags[f.name].split(" "),
                    help=help.get(f.name, docs.get(f.name)),
                ),
                annotation=hints[f.name],
            )
            for f in fields
        ]

        @functools.wraps(command)
        def wrapper(**kwargs: Any) -> Any:
            values = {f.name: kwargs.pop(f"{param}__{f.name}") for f in fields}
            try:
                kwargs[param] = cls(**values)
            except ConfigError as exc:  # name the option rather than the field
                raise typer.BadParameter(str(exc), param_hint=_option_of(str(exc), flags)) from None
            return command(**kwargs)

        kept = [p for p in signature.parameters.values() if p.name != param]
        wrapper.__signature__ = signature.replace(parameters=kept + added)  # type: ignore[attr-defined]
        wrapper.__annotations__ = {p.name: p.annotation for p in kept + added}
        return wrapper

    return decorate


def _option_of(message: str, flags: dict[str, str]) -> str | None:
    """The option of the field a config error starts with ("gate.depth=0 must ..." -> "--depth")."""
    match = re.match(r"(?:\w+\.)?(\w+)=", message)
    flag = flags.get(match.group(1)) if match else None
    return flag.split("/")[0] if flag else None
