"""The baseline suite: the same prompts answered by the base, each expert alone, a uniform merge, the oracle, a
per-prompt router, and loramix in its modes; scored per domain (`loramix eval`).

Systems ("rows"):
    base          every expert at scaling 0
    expert:NAME   that expert alone (scaling 1, others 0)
    uniform       every expert at 1/N
    oracle        the prompt's own domain expert (its "domain" field names an expert); for a prompt that lists
                  several "experts" (composite), the best of them, per prompt: one expert per prompt
    router        the gate's scalings averaged over the prompt, held fixed for the whole answer
    granular      loramix, scalings for every token
    prompt        loramix prompt mode (the last prompt token's scalings held for the answer)
    truncated     loramix with a gate trained on a truncated scaling pass (a second checkpoint)

What is scored depends on the record (docs/demo.md):
    "answer" (a number)         numeric: R^2 and MAE over the domain, plus exact match of the text
    "target" (+ "length")        design: the generated peptide's GRAVY against the target (cycle consistency): MAE,
                                 share within 0.25, validity (only the 20 amino acids), novelty (not in training)
    "then" (+ "first")           two segments: the model answers a number, the harness appends "then" (">B?" or "+B=")
                                 and the model continues. "solved": the first number is within 0.25 of "first" (the
                                 truth) and segment 2 is right for the model's own number (yes/no, or the exact
                                 sum); also exact_match of segment 2 against the reference, and the first number's MAE
    otherwise                    exact match of the completion
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .errors import ConfigError

logger = logging.getLogger(__name__)

__all__ = ["SYSTEMS", "EvalResult", "evaluate", "generate_answers", "primary_metric"]

SYSTEMS = ("base", "experts", "uniform", "oracle", "router", "granular", "prompt", "truncated")
DESIGN_TOLERANCE = 0.25
PRIMARY = {"numeric": "r2", "design": "within_tolerance", "exact": "exact_match", "two_segment": "solved"}


def _kind(record: dict[str, Any]) -> str:
    if "then" in record:
        return "two_segment"
    if "target" in record:
        return "design"
    if isinstance(record.get("answer"), (int, float)):
        return "numeric"
    return "exact"


def primary_metric(kind: str) -> str:
    return PRIMARY[kind]


@dataclass
class EvalResult:
    """Per system and domain: metrics (dict), plus tokens/s per system, and the answers."""

    metrics: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    speed: dict[str, float] = field(default_factory=dict)
    answers: dict[str, list[str]] = field(default_factory=dict)
    kinds: dict[str, str] = field(default_factory=dict)

    def primary(self, system: str, domain: str) -> float:
        return self.metrics[system][domain][primary_metric(self.kinds[domain])]

    def to_dict(self) -> dict[str, Any]:
        return {
            "metrics": self.metrics,
            "tokens_per_s": self.speed,
            "kinds": self.kinds,
            "primary_metric": {d: primary_metric(k) for d, k in self.kinds.items()},
        }


def _second_segment(then: str, first: float) -> str:
    """What segment 2 must say given the model's own segment 1: ">B?" -> yes/no, "+B=" -> the sum."""
    from .demo.world import fmt, parse_number, verdict

    if then.startswith(">") and then.endswith("?") and parse_number(then[1:-1]) is not None:
        return verdict(first, parse_number(then[1:-1]))
    if then.startswith("+") and then.endswith("=") and parse_number(then[1:-1]) is not None:
        return fmt(first + parse_number(then[1:-1]))
    raise ConfigError(f'"then": {then!r} is not one of the supported forms ">B?" or "+B="')


def _score(kind: str, records: list[dict[str, Any]], answers: list[str], train_peptides: set[str]) -> dict[str, float]:
    from .demo.world import gravy, is_valid_peptide, parse_number

    n = len(records)
    if kind == "two_segment":
        solved = exact = 0
        errors = []
        for a, r in zip(answers, records):
            first_text, _, result_text = a.partition(r["then"])
            first = parse_number(first_text)
            if first is not None:
                errors.append(abs(first - float(r["first"])))
            expected = r["completion"].split(r["then"])[-1].strip()
            exact += result_text.strip() == expected
            if first is not None and abs(first - float(r["first"])) <= DESIGN_TOLERANCE:
                solved += result_text.strip() == _second_segment(r["then"], first)
        return {
            "solved": solved / n,
            "exact_match": exact / n,
            "first_mae": sum(errors) / len(errors) if errors else float("nan"),
            "first_parsed": len(errors) / n,
        }
    if kind == "numeric":
        truth = [float(r["answer"]) for r in records]
        values = [parse_number(a) for a in answers]
        exact = sum(1 for a, r in zip(answers, records) if a.strip() == r["completion"].strip()) / n
        guess = [v if v is not None else 0.0 for v in values]  # unparseable answers count as 0
        mean = sum(truth) / n
        ss_tot = sum((t - mean) ** 2 for t in truth) or 1e-12
        ss_res = sum((t - g) ** 2 for t, g in zip(truth, guess))
        return {
            "r2": 1 - ss_res / ss_tot,
            "mae": sum(abs(t - g) for t, g in zip(truth, guess)) / n,
            "exact_match": exact,
            "parsed": sum(v is not None for v in values) / n,
        }
    if kind == "design":
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
    return {"exact_match": sum(1 for a, r in zip(answers, records) if a.strip() == r["completion"].strip()) / n}


def _fixed(model: Any, weights: torch.Tensor) -> torch.Tensor:
    """[B, N] expert weights -> fixed scalings [B, L, N]."""
    return weights[:, None, :].expand(-1, model.n_layers, -1).to(model.device, model.dtype)


class _Runner:
    def __init__(self, model: Any, truncated: Any, max_new_tokens: dict[str, int], batch_size: int) -> None:
        self.model = model
        self.truncated = truncated
        self.max_new = max_new_tokens
        self.batch_size = batch_size
        self.tokenizer = model.tokenizer

    def _encode(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        from .text import encode_prompts

        return encode_prompts(self.tokenizer, texts)

    def _generate(
        self, system: str, texts: list[str], n_new: int, weights: torch.Tensor | None, router: torch.Tensor | None
    ) -> tuple[list[str], int]:
        """Greedy answers (text up to EOS) for a batch of prompts under one system; also the generated token count."""
        model = self.truncated if system == "truncated" else self.model
        ids, mask = self._encode(texts)
        kwargs: dict[str, Any] = {"max_new_tokens": n_new}
        if weights is not None:
            kwargs["scalings"] = _fixed(model, weights)
        elif router is not None:
            kwargs["scalings"] = router.to(model.device, model.dtype)
        elif system == "prompt":
            kwargs["mode"] = "prompt"
        elif system == "truncated":
            kwargs["mode"] = "truncated"
        out = model.generate(ids, mask, **kwargs)
        texts_out = []
        for row in range(len(texts)):
            tokens = out.new_tokens[row, : out.lengths[row]].tolist()
            texts_out.append(self.tokenizer.decode(tokens, skip_special_tokens=True))
        return texts_out, sum(out.lengths)

    def _router(self, texts: list[str]) -> torch.Tensor:
        ids, mask = self._encode(texts)
        with torch.no_grad():
            s = self.model.compute_scalings(ids.to(self.model.device), mask.to(self.model.device))
        m = mask.to(s.device, s.dtype)[:, :, None, None]
        return (s * m).sum(1) / m.sum(1)  # [B, L, N], mean over the prompt's real tokens

    def answers(
        self, system: str, records: list[dict[str, Any]], domain: str, weights: torch.Tensor | None
    ) -> tuple[list[str], int]:
        out: list[str] = []
        tokens = 0
        for start in range(0, len(records), self.batch_size):
            chunk = records[start : start + self.batch_size]
            w = weights[start : start + self.batch_size] if weights is not None else None
            prompts = [r["prompt"] for r in chunk]
            router = self._router(prompts) if system == "router" else None
            n_new = self.max_new.get(domain, self.max_new["default"])
            first, n = self._generate(system, prompts, n_new, w, router)
            tokens += n
            if "then" not in chunk[0]:
                out += first
                continue
            # two segments: the harness appends the continuation, the model writes the rest
            second_prompts = [p + a.strip() + r["then"] for p, a, r in zip(prompts, first, chunk)]
            second, n = self._generate(system, second_prompts, self.max_new["default"], w, router)
            tokens += n
            out += [a.strip() + r["then"] + b.strip() for a, r, b in zip(first, chunk, second)]
        return out, tokens


def _max_new(max_new_tokens: dict[str, int] | None) -> dict[str, int]:
    """New-token budgets per domain ("default" for the others): design answers are peptides of up to 40 residues."""
    return {"default": 12, "inverse": 44, **(max_new_tokens or {})}


@torch.no_grad()
def generate_answers(
    model: Any,
    records: Sequence[dict[str, Any]],
    domain: str,
    *,
    mode: str = "granular",
    max_new_tokens: dict[str, int] | None = None,
    batch_size: int = 64,
) -> list[str]:
    """Greedy answers of loramix in one mode ("granular" or "prompt") to records of one domain, as `evaluate`
    produces them (two-segment records get the harness's continuation)."""
    return _Runner(model, None, _max_new(max_new_tokens), batch_size).answers(mode, list(records), domain, None)[0]


@torch.no_grad()
def evaluate(
    model: Any,
    records: Sequence[dict[str, Any]],
    *,
    truncated: Any = None,
    systems: Sequence[str] = SYSTEMS,
    max_new_tokens: dict[str, int] | None = None,
    batch_size: int = 64,
    train_peptides: set[str] | None = None,
    progress: bool = True,
) -> EvalResult:
    """Run every system over the records (grouped by their "domain") and score them; see the module docstring."""
    from tqdm.auto import tqdm

    if model.tokenizer is None:
        raise ConfigError("evaluation needs the model's tokenizer")
    records = list(records)
    if not records:
        raise ConfigError("no records to evaluate")
    names = model.expert_names
    by_domain: dict[str, list[dict[str, Any]]] = {}
    for i, r in enumerate(records):
        if "prompt" not in r or "completion" not in r:
            raise ConfigError(f"record {i}: evaluation needs 'prompt' and 'completion'")
        by_domain.setdefault(r.get("domain") or "all", []).append(r)
    result = EvalResult()
    for domain, recs in by_domain.items():
        kinds = {_kind(r) for r in recs}
        if len(kinds) != 1:
            raise ConfigError(f"domain '{domain}': records mix scoring kinds {sorted(kinds)}; split them by domain")
        result.kinds[domain] = kinds.pop()
        if result.kinds[domain] == "two_segment":
            for r in recs:
                if not isinstance(r.get("first"), (int, float)):
                    raise ConfigError(
                        f"domain '{domain}': a record with \"then\" needs \"first\", the number segment 1 should give "
                        f"(got {r.get('first')!r})"
                    )
                _second_segment(r["then"], 0.0)
    runner = _Runner(model, truncated, _max_new(max_new_tokens), batch_size)
    rows: list[tuple[str, str | None]] = []
    for system in systems:
        if system == "experts":
            rows += [(f"expert:{n}", n) for n in names]
        elif system == "truncated" and truncated is None:
            continue
        else:
            rows.append((system, None))
    bar = tqdm(total=len(rows) * len(by_domain), desc="evaluating", disable=not progress)
    train_peptides = train_peptides or set()
    for system, expert in rows:
        result.metrics[system] = {}
        generated, seconds = 0, 0.0
        for domain, recs in by_domain.items():
            weights = None
            candidates: list[torch.Tensor] = []
            if system == "base":
                weights = torch.zeros(len(recs), len(names))
            elif expert is not None or system == "uniform":
                row = (
                    torch.full((len(names),), 1.0 / len(names))
                    if system == "uniform"
                    else torch.nn.functional.one_hot(torch.tensor(names.index(expert)), len(names)).float()
                )
                weights = row.expand(len(recs), -1)
            elif system == "oracle":
                for option in range(max(len(r.get("experts", [r.get("domain")])) for r in recs)):
                    w = torch.zeros(len(recs), len(names))
                    for i, r in enumerate(recs):
                        wanted = r.get("experts", [r.get("domain")])
                        name = wanted[min(option, len(wanted) - 1)]
                        if name not in names:
                            raise ConfigError(
                                f"domain '{domain}': oracle needs an expert named '{name}' (experts: {names})"
                            )
                        w[i, names.index(name)] = 1.0
                    candidates.append(w)
            start = time.perf_counter()
            if candidates:  # oracle: the best expert per prompt among the listed ones
                options = [runner.answers(system, recs, domain, w) for w in candidates]
                generated += sum(n for _, n in options)
                answers = []
                for i, r in enumerate(recs):
                    scored = [
                        (
                            _score(result.kinds[domain], [r], [o[0][i]], train_peptides)[
                                primary_metric(result.kinds[domain])
                            ],
                            o[0][i],
                        )
                        for o in options
                    ]
                    answers.append(max(scored, key=lambda x: x[0])[1])
            else:
                answers, n = runner.answers(system, recs, domain, weights)
                generated += n
            seconds += time.perf_counter() - start
            result.metrics[system][domain] = _score(result.kinds[domain], recs, answers, train_peptides)
            result.answers[f"{system}/{domain}"] = answers
            bar.update(1)
        result.speed[system] = generated / seconds if seconds > 0 else math.nan
    bar.close()
    return result
