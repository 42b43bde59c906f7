"""The protein world's own ways of scoring, registered with loramix.scoring on import (docs/demo.md):

design        "target" (+ "length"): the generated peptide's GRAVY against the target (cycle consistency): share
              within 0.25, MAE, validity (only the 20 amino acids), novelty (not in context["train_peptides"])
two_segment   "then" (+ "first"): the model answers a number, the harness appends "then" (">B?" or "+B=") and the
              model continues. "solved": the first number is within 0.25 of "first" (the truth) and segment 2 is
              right for the model's own number (yes/no, or the exact sum); also exact_match of segment 2 against
              the reference, and the first number's MAE
"""

from __future__ import annotations

from typing import Any

from ..errors import ConfigError
from ..scoring import Records, Scorer, parse_number, register_scorer
from .world import fmt, gravy, is_valid_peptide, verdict

__all__ = ["DESIGN", "DESIGN_TOLERANCE", "TWO_SEGMENT"]

DESIGN_TOLERANCE = 0.25
MAX_PEPTIDE = 44  # new tokens for a designed peptide (up to 40 residues and the end)


def second_segment(then: str, first: float) -> str:
    """What segment 2 must say given the model's own segment 1: ">B?" -> yes/no, "+B=" -> the sum."""
    b = parse_number(then[1:-1])
    if then.startswith(">") and then.endswith("?") and b is not None:
        return verdict(first, b)
    if then.startswith("+") and then.endswith("=") and b is not None:
        return fmt(first + b)
    raise ConfigError(f'"then": {then!r} is not one of the supported forms ">B?" or "+B="')


def _two_segment(records: Records, answers: list[str], context: dict[str, Any]) -> dict[str, float]:
    n = len(records)
    solved = exact = 0
    errors = []
    for a, r in zip(answers, records):
        first_text, _, result_text = a.partition(r["then"])
        first = parse_number(first_text)
        expected = r["completion"].split(r["then"])[-1].strip()
        exact += result_text.strip() == expected
        if first is None:
            continue
        errors.append(abs(first - float(r["first"])))
        if errors[-1] <= DESIGN_TOLERANCE:
            solved += result_text.strip() == second_segment(r["then"], first)
    return {
        "solved": solved / n,
        "exact_match": exact / n,
        "first_mae": sum(errors) / len(errors) if errors else float("nan"),
        "first_parsed": len(errors) / n,
    }


def _check_two_segment(domain: str, records: Records) -> None:
    for r in records:
        if not isinstance(r.get("first"), (int, float)):
            raise ConfigError(
                f'domain \'{domain}\': a record with "then" needs "first", the number segment 1 should give '
                f"(got {r.get('first')!r})"
            )
        second_segment(r["then"], 0.0)


def _design(records: Records, answers: list[str], context: dict[str, Any]) -> dict[str, float]:
    n = len(records)
    train_peptides = context.get("train_peptides") or set()
    valid = [a.strip() for a in answers]
    ok = [is_valid_peptide(s) for s in valid]
    errors = [abs(gravy(s) - float(r["target"])) if good else None for s, good, r in zip(valid, ok, records)]
    scored = [e for e in errors if e is not None]
    return {
        "within_tolerance": sum(1 for e in scored if e <= DESIGN_TOLERANCE) / n,
        "mae": sum(scored) / len(scored) if scored else float("nan"),
        "validity": sum(ok) / n,
        "novelty": sum(1 for s, good in zip(valid, ok) if good and s not in train_peptides) / n,
        "length_mae": sum(abs(len(s) - int(r["length"])) for s, good, r in zip(valid, ok, records) if good)
        / max(1, sum(ok)),
    }


TWO_SEGMENT = register_scorer(
    Scorer(
        "two_segment",
        "solved",
        _two_segment,
        matches=lambda r: "then" in r,
        check=_check_two_segment,
        continuation="then",
    )
)
DESIGN = register_scorer(
    Scorer("design", "within_tolerance", _design, matches=lambda r: "target" in r, max_new_tokens=MAX_PEPTIDE)
)
