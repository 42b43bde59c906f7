"""Command-line options from config dataclasses: one option per field, its help from the field's docstring.

`config_options(GateConfig, "gate", names={"dropout": "--gate-dropout"})` on a Typer command adds an option for every
field of `GateConfig` (`--depth`, `--width`, ..., booleans as `--flag/--no-flag`) and passes the command one argument,
`gate`, built from them: a new config field reaches the command line without an edit here or in the CLI. A value the
config refuses becomes a usage error that names the option: the option of the error's `field` (ConfigError.field).

A field's `metadata={"cli": {...}}` passes more keyword arguments to its `typer.Option` (min, max, envvar, ...): a
range given there is typer's check and message on the command line and the config's own check in `__post_init__`
(`check_bounds`), from the one declaration. A default of None is not shown (it cannot be typed).
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

__all__ = ["check_bounds", "cli_metadata", "config_options", "field_docs"]


def cli_metadata(**option: Any) -> dict[str, Any]:
    """`dataclasses.field(metadata=cli_metadata(min=1, max=65535))`: extra `typer.Option` arguments of a field."""
    return {"cli": option}


def check_bounds(config: Any) -> None:
    """A ConfigError naming the first field of `config` (a dataclass) outside the min/max its metadata declares."""
    for f in dataclasses.fields(config):
        bounds, value = f.metadata.get("cli", {}), getattr(config, f.name)
        if value is None or isinstance(value, bool) or not isinstance(value, int | float):
            continue
        low, high = bounds.get("min"), bounds.get("max")
        if (low is not None and value < low) or (high is not None and value > high):
            expected = " and ".join(
                part for part in (low is not None and f">= {low}", high is not None and f"<= {high}") if part
            )
            raise ConfigError(f"{f.name}={value!r} must be {expected}", field=f.name)


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
                default=_option(
                    f,
                    flags[f.name],
                    defaults.get(f.name, _default(f)),
                    help.get(f.name, docs.get(f.name)),
                    hints[f.name],
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
                raise typer.BadParameter(str(exc), param_hint=_option_of(exc, flags, fields)) from None
            return command(**kwargs)

        kept = [p for p in signature.parameters.values() if p.name != param]
        wrapper.__signature__ = signature.replace(parameters=kept + added)  # type: ignore[attr-defined]
        wrapper.__annotations__ = {p.name: p.annotation for p in kept + added}
        return wrapper

    return decorate


def _option(f: dataclasses.Field, flag: str, default: Any, text: str | None, hint: Any) -> Any:
    """The typer.Option of one field: its help (escaped for rich: "[0, 1)" is text, not markup), no "None" shown
    for a default of None; a number field that may be None with another default takes "none" for None (so a help
    that says "None: no clipping" can be typed)."""
    from rich.markup import escape

    extra = dict(f.metadata.get("cli", {}))
    if default is None:
        extra.setdefault("show_default", False)
    kinds = [k for k in typing.get_args(hint) if k is not type(None)]
    if default is not None and type(None) in typing.get_args(hint) and len(kinds) == 1 and kinds[0] in (int, float):
        extra.setdefault("parser", functools.partial(_or_none, kinds[0]))
        extra.setdefault("metavar", f"{kinds[0].__name__.upper()}|none")
    return typer.Option(default, *flag.split(" "), help=escape(text) if text else text, **extra)


def _or_none(kind: type, text: str) -> Any:
    if isinstance(text, str) and text.strip().lower() == "none":
        return None
    try:
        return kind(text)
    except (TypeError, ValueError):
        raise typer.BadParameter(f"{text!r} is not a {kind.__name__} (or none)") from None


def _option_of(exc: ConfigError, flags: dict[str, str], fields: list[dataclasses.Field]) -> str | None:
    """The option of the field a config error names (`exc.field`), and its environment variable if it has one.
    Configs that do not say the field yet (train/'s) are named by the message's leading "field=" ("gate.depth=0
    must ..." -> "--depth")."""
    name = exc.field
    if name is None:
        match = re.match(r"(?:\w+\.)?(\w+)=", str(exc))
        name = match.group(1) if match else None
    flag = flags.get(name) if name else None
    if not flag:
        return None
    envvar = next((f.metadata.get("cli", {}).get("envvar") for f in fields if f.name == name), None)
    return flag.split("/")[0].split(" ")[0] + (f" / {envvar}" if envvar else "")
