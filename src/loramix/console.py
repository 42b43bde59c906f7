"""The rich consoles that loramix's commands and demos print to.

On a terminal, rich fits the output to the terminal's width (and tables fold their cells to fit it). Anywhere else
(`loramix demo > log`, `| tee`, CI logs, a notebook) rich would assume 80 columns and cut or fold every wide table
("expe…", headers over six lines); there the console is as wide as `LOG_WIDTH`, so tables print at their natural
width, one row per line, and text is not wrapped, whatever `COLUMNS` says (CI runners and pytest-xdist's workers set
it to 80 for output that is not a terminal).
"""

from __future__ import annotations

from typing import IO

from rich.console import Console

__all__ = ["LOG_WIDTH", "make_console"]

LOG_WIDTH = 1000
"""Columns when not attached to a terminal: wider than any table loramix prints, so none is cut."""


def make_console(*, stderr: bool = False, file: IO[str] | None = None) -> Console:
    """A rich console on stdout (stderr, or `file`): the terminal's width on a terminal, else `LOG_WIDTH`."""
    console = Console(stderr=stderr, file=file)
    if console.is_terminal:
        return console
    return Console(stderr=stderr, file=file, width=LOG_WIDTH)
