"""Consoles: tables keep their natural width in log files and pipes, and the terminal case is rich's own."""

import io
import json

from rich.table import Table

from loramix.console import LOG_WIDTH, make_console


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def _wide_table():
    table = Table("system", *[f"domain {i} primary metric" for i in range(8)], title="a wide table")
    table.add_row("loramix granular (every token)", *["0.123"] * 8)
    return table


def test_a_log_file_gets_the_tables_natural_width(monkeypatch):
    """Not a terminal (a log file, a pipe, CI): every header and cell on one line, nothing cut ("expe…")."""
    monkeypatch.delenv("COLUMNS", raising=False)
    monkeypatch.delenv("FORCE_COLOR", raising=False)
    monkeypatch.delenv("TTY_COMPATIBLE", raising=False)
    out = io.StringIO()
    make_console(file=out).print(_wide_table())
    lines = out.getvalue().splitlines()
    assert len(lines) == 1 + 3 + 1 + 1  # title, top rule + header + rule, one row, bottom rule
    assert "loramix granular (every token)" in lines[4] and lines[4].count("0.123") == 8
    assert all(f"domain {i} primary metric" in lines[2] for i in range(8)) and "…" not in out.getvalue()
    assert len(lines[2]) > 80


def test_a_terminal_keeps_richs_width(monkeypatch):
    monkeypatch.delenv("COLUMNS", raising=False)
    assert make_console(file=_Terminal()).width != LOG_WIDTH
    monkeypatch.setenv("COLUMNS", "100")  # on a terminal rich's own rules hold (COLUMNS included)
    assert make_console(file=_Terminal()).width == 100
    monkeypatch.setenv("COLUMNS", "80")  # a log stays wide even where CI (or pytest-xdist) exports COLUMNS=80
    assert make_console(file=io.StringIO()).width == LOG_WIDTH


def test_eval_table_is_not_folded_in_a_log(tmp_path, monkeypatch):
    """`loramix eval` with stdout captured (as in `loramix eval ... > log`): one line per system, whole headers."""
    from typer.testing import CliRunner

    from loramix.cli import app
    from loramix.demo.run import shipped_checkpoint

    records = [{"prompt": f"What is the code of {name}?", "completion": code, "domain": f"amino acid code {i}"}
               for i, (name, code) in enumerate([("lysine", "K"), ("proline", "P"), ("alanine", "A"),
                                                 ("glycine", "G"), ("tryptophan", "W"), ("serine", "S")])]
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    result = CliRunner().invoke(app, ["eval", str(shipped_checkpoint()), "--data", str(data), "--system", "granular"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    header = next(line for line in lines if "system" in line)
    assert all(f"amino acid code {i} exact_match" in header for i in range(6))
    rows = [line for line in lines if line.startswith("│ granular ")]
    assert len(rows) == 1 and rows[0].count("│") == 9  # system, 6 domains, tokens/s
