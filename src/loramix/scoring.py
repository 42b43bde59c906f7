"""How evaluation records are scored: a registry of scorers, each a named way to turn answers into metrics.

A record names its scorer in a "scoring" field, or is matched by the first registered scorer whose `matches` accepts
it (in registration order), then by the two built-in ones:

    numeric   "answer" is a number: R^2 and MAE over the domain (unparseable answers count as 0), exact match;
              R^2 is NaN ("n/a" in tables) for fewer than 2 records or references without variance: it is undefined
    exact     anything else: exact match of the completion

Applications add their own kinds with `register_scorer`; the protein demo registers "design" and "two_segment"
(loramix.demo.scoring), and the `loramix eval` command loads those so that the demo's record format keeps working.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .errors import ConfigError

__all__ = ["Scorer", "bounded", "parse_number", "register_scorer", "score", "scorer", "scorer_of"]

Records = list[dict[str, Any]]


@dataclass(frozen=True)
class Scorer:
    """One way of scoring a domain's answers."""

    name: str
    """What records give as "scoring" to use it (and what results.json reports as the domain's kind)."""

    primary: str
    """The metric that ranks systems (the oracle's per-prompt choice, the tables' column)."""

    score: Callable[[Records, list[str], dict[str, Any]], dict[str, float]]
    """(records, answers, context) -> metrics. context holds what the caller knows besides the records, e.g.
    "train_peptides" for novelty."""

    matches: Callable[[dict[str, Any]], bool] | None = None
    """Records this scorer takes when they give no "scoring" (None: only records that name it)."""

    check: Callable[[str, Records], None] | None = None
    """Raise `ConfigError` naming the domain when its records lack what the scorer needs (before any generation)."""

    max_new_tokens: int = 12
    """New-token budget of an answer (evaluate's `max_new_tokens` overrides it per domain)."""

    continuation: str | None = None
    """A record field that the harness appends after the model's first answer before the model goes on (two
    segments); None: one answer."""

    rank: Callable[[dict[str, Any], str], float] | None = None
    """(record, answer) -> how good one answer is (higher is better), for the oracle's per-prompt choice between
    experts. None: the primary metric of the answer scored alone (which must then be defined for one record)."""

    def rank_one(self, record: dict[str, Any], answer: str, context: dict[str, Any]) -> float:
        """How good one answer to one record is (higher is better; an undefined score ranks last)."""
        if self.rank is not None:
            return self.rank(record, answer)
        value = self.score([record], [answer], context)[self.primary]
        return value if math.isfinite(value) else -math.inf


_REGISTRY: dict[str, Scorer] = {}


def register_scorer(new: Scorer) -> Scorer:
    """Add (or replace, by name) a scorer; returns it."""
    _REGISTRY[new.name] = new
    return new


def parse_number(text: str) -> float | None:
    """The finite number a text holds (surrounding space allowed), or None."""
    try:
        value = float(text.strip())
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def bounded(value: float) -> float:
    """A primary metric as a score in [0, 1], for means over domains: clipped, so that an unbounded metric cannot
    outweigh the others (R^2 below 0, answers worse than the references' mean, counts 0; above 1 cannot happen for
    the built-in metrics). NaN (undefined) stays NaN."""
    return min(max(value, 0.0), 1.0) if math.isfinite(value) else math.nan


def _exact(records: Records, answers: list[str]) -> float:
    return sum(1 for a, r in zip(answers, records) if a.strip() == r["completion"].strip()) / len(records)


def _numeric(records: Records, answers: list[str], context: dict[str, Any]) -> dict[str, float]:
    n = len(records)
    truth = [float(r["answer"]) for r in records]
    values = [parse_number(a) for a in answers]
    guess = [v if v is not None else 0.0 for v in values]  # unparseable answers count as 0
    mean = sum(truth) / n
    ss_tot = sum((t - mean) ** 2 for t in truth)
    ss_res = sum((t - g) ** 2 for t, g in zip(truth, guess))
    # R^2 compares with the references' variance: undefined for one record or equal references (not -1e11)
    defined = n >= 2 and ss_tot > 1e-12 * sum(t * t for t in truth)
    return {
        "r2": 1 - ss_res / ss_tot if defined else math.nan,
        "mae": sum(abs(t - g) for t, g in zip(truth, guess)) / n,
        "exact_match": _exact(records, answers),
        "parsed": sum(v is not None for v in values) / n,
    }


def _numeric_rank(record: dict[str, Any], answer: str) -> float:
    """Minus the absolute error of one numeric answer (unparseable: counted as 0, as in R^2 and MAE)."""
    value = parse_number(answer)
    return -abs(float(record["answer"]) - (value if value is not None else 0.0))


_BUILT_IN = (
    Scorer("numeric", "r2", _numeric, matches=lambda r: isinstance(r.get("answer"), (int, float)), rank=_numeric_rank),
    Scorer("exact", "exact_match", lambda recs, answers, _: {"exact_match": _exact(recs, answers)}, lambda _: True),
)
for _s in _BUILT_IN:
    register_scorer(_s)


def scorer(name: str) -> Scorer:
    """The registered scorer of this name; `ConfigError` listing the known ones otherwise."""
    if name not in _REGISTRY:
        raise ConfigError(
            f'"scoring": {name!r} is not a registered scorer; expected one of {sorted(_REGISTRY)} '
            "(register your own with loramix.scoring.register_scorer)"
        )
    return _REGISTRY[name]


def scorer_of(record: dict[str, Any]) -> Scorer:
    """The scorer of one record: its "scoring" field, else the first match (registered ones before the built-ins)."""
    if "scoring" in record:
        return scorer(str(record["scoring"]))
    built_in = {s.name for s in _BUILT_IN}
    ordered = [s for s in _REGISTRY.values() if s.name not in built_in] + [_REGISTRY[s.name] for s in _BUILT_IN]
    return next(s for s in ordered if s.matches is not None and s.matches(record))


def score(name: str, records: Records, answers: list[str], context: dict[str, Any] | None = None) -> dict[str, float]:
    """The metrics of `answers` to `records` under the named scorer."""
    return scorer(name).score(list(records), list(answers), context or {})
