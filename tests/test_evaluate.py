"""The baseline suite's scoring edges: undefined metrics are reported as n/a, and the oracle's per-prompt choice."""

import json
import math

import pytest
import torch

from loramix.evaluate import _Domain, _oracle, cell
from loramix.scoring import bounded, score, scorer


def test_r2_of_fewer_than_two_records_or_equal_references_is_undefined():
    """R² compares with the references' variance: one record, or references that are all equal, leave it undefined
    (NaN, shown as n/a), not -240099999999 from a made-up variance of 1e-12."""
    one = score("numeric", [{"answer": -0.42, "completion": "-0.42"}], ["0.07"])
    assert math.isnan(one["r2"]) and one["mae"] == pytest.approx(0.49) and one["exact_match"] == 0.0
    same = [{"answer": 0.1, "completion": "0.10"}] * 3
    assert math.isnan(score("numeric", same, ["0.1", "0.2", "x"])["r2"])
    two = [{"answer": 1.0, "completion": "1.00"}, {"answer": -1.0, "completion": "-1.00"}]
    assert score("numeric", two, ["1.00", "-0.50"])["r2"] == pytest.approx(1 - 0.25 / 2)
    assert cell(float("nan")) == "n/a" and cell(0.1234) == "0.123" and cell(0.5, "{:.0%}") == "50%"


def test_bounded_score_clips_to_the_unit_interval():
    assert bounded(-5237.7) == 0.0 and bounded(0.79) == 0.79 and bounded(1.0) == 1.0 and bounded(3.0) == 1.0
    assert math.isnan(bounded(float("nan")))


class _Runs:
    """A runner whose answers per oracle option are fixed: option i answers `answers[i]`."""

    def __init__(self, answers):
        self.runs = iter(answers)

    def answers(self, system, group, weights):
        return next(self.runs), 1


def test_oracle_takes_the_closer_number_per_prompt():
    """For numeric records the oracle keeps, per prompt, the expert whose number is closest to the truth (R² of one
    record is undefined and cannot rank them)."""
    records = [{"answer": 1.0, "completion": "1.00"}, {"answer": -1.0, "completion": "-1.00"}]
    group = _Domain(records, scorer("numeric"), 12)
    options = [torch.zeros(2, 2), torch.zeros(2, 2)]
    best, tokens = _oracle(_Runs([["0.20", "-0.90"], ["0.95", "x"]]), group, options, {})
    assert best == ["0.95", "-0.90"] and tokens == 2
    exact = _Domain([{"completion": "yes"}], scorer("exact"), 12)
    assert _oracle(_Runs([["no"], ["yes"]]), exact, options, {})[0] == ["yes"]


def test_eval_command_reports_na_for_one_forward_record(tmp_path):
    """`loramix eval` on one numeric record: its R² is n/a in the table and NaN in results.json."""
    from typer.testing import CliRunner

    from loramix.cli import app
    from loramix.demo.run import shipped_checkpoint

    data = tmp_path / "one.jsonl"
    data.write_text(json.dumps({"prompt": "GRAVY<AKLV>=", "completion": "1.12", "answer": 1.12,
                                "domain": "forward"}) + "\n")
    result = CliRunner().invoke(app, ["eval", str(shipped_checkpoint()), "--data", str(data), "--system", "granular",
                                      "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    row = next(line for line in result.output.splitlines() if "granular" in line)
    assert "n/a" in row and "e+" not in row and "-2" not in row
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert math.isnan(saved["metrics"]["granular"]["forward"]["r2"])
    assert "| granular | n/a |" in (tmp_path / "out" / "results.md").read_text()
