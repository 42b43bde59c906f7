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

What is scored depends on the record: its "scoring" field, or the first registered scorer that matches its fields
(loramix.scoring; the demo's "design" and "two_segment" kinds are in loramix.demo.scoring, docs/demo.md).
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
from .parallel import processes, split_map
from .scoring import Scorer, scorer, scorer_of

logger = logging.getLogger(__name__)

__all__ = ["SYSTEMS", "EvalResult", "beside", "cell", "evaluate", "generate_answers", "primary_metric"]

SYSTEMS = ("base", "experts", "uniform", "oracle", "router", "granular", "prompt", "truncated")


def primary_metric(kind: str) -> str:
    """The metric that ranks systems for a scoring kind."""
    return scorer(kind).primary


def cell(value: float, fmt: str = "{:.3f}") -> str:
    """A metric as a table cell: `fmt`, or "n/a" where it is undefined (NaN: R^2 of fewer than 2 records, an MAE
    over no parsed answer)."""
    return fmt.format(value) if math.isfinite(value) else "n/a"


@dataclass
class EvalResult:
    """Per system and domain: metrics (dict), plus tokens/s per system, and the answers."""

    metrics: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    speed: dict[str, float] = field(default_factory=dict)
    answers: dict[str, list[str]] = field(default_factory=dict)
    kinds: dict[str, str] = field(default_factory=dict)

    def primary(self, system: str, domain: str) -> float:
        return self.metrics[system][domain][primary_metric(self.kinds[domain])]

    def primary_table(self) -> tuple[list[str], list[list[str]]]:
        """Header and rows of the table of primary metrics: one row per system, one column per domain, tokens/s."""
        header = ["system", *[f"{d} {primary_metric(k)}" for d, k in self.kinds.items()], "tokens/s"]
        rows = [
            [system, *[cell(self.primary(system, d)) for d in self.kinds], cell(self.speed[system], "{:.0f}")]
            for system in self.metrics
        ]
        return header, rows

    def to_markdown(self) -> str:
        header, rows = self.primary_table()
        lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
        return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows]) + "\n"

    def to_dict(self) -> dict[str, Any]:
        return {
            "metrics": self.metrics,
            "tokens_per_s": self.speed,
            "kinds": self.kinds,
            "primary_metric": {d: primary_metric(k) for d, k in self.kinds.items()},
        }


def beside(test: EvalResult, heldout: EvalResult) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the primary metric per domain, "test subset / held-out" for every system that both ran,
    then a row of granular over oracle on each (where both ran): the generalisation table of `loramix eval
    --heldout`."""
    domains = [d for d in test.kinds if d in heldout.kinds]
    header = ["system", *[f"{d} {primary_metric(test.kinds[d])} test / held-out" for d in domains]]
    rows = [
        [system, *[f"{cell(test.primary(system, d))} / {cell(heldout.primary(system, d))}" for d in domains]]
        for system in test.metrics
        if system in heldout.metrics
    ]
    if all(s in r.metrics for s in ("granular", "oracle") for r in (test, heldout)):

        def ratio(r: EvalResult, d: str) -> str:
            oracle = r.primary("oracle", d)
            return cell(r.primary("granular", d) / oracle if oracle > 0 else math.nan)

        rows.append(["granular / oracle", *[f"{ratio(test, d)} / {ratio(heldout, d)}" for d in domains]])
    return header, rows


def _fixed(model: Any, weights: torch.Tensor) -> torch.Tensor:
    """[B, N] expert weights -> fixed scalings [B, L, N]."""
    return weights[:, None, :].expand(-1, model.n_layers, -1).to(model.device, model.dtype)


@dataclass
class _Domain:
    """The records of one domain, how they are scored and the answers' token budget."""

    records: list[dict[str, Any]]
    how: Scorer
    max_new: int


class _Runner:
    """Answers of one system to one domain's records, in batches of `batch_size`. With `state` (Accelerate's
    `PartialState`) of several processes, each process answers a contiguous share of the records and every process
    gets all the answers back in the records' order (`parallel.split_map`)."""

    def __init__(self, model: Any, truncated: Any, batch_size: int, state: Any = None) -> None:
        self.model = model
        self.truncated = truncated
        self.batch_size = batch_size
        self.tokenizer = model.tokenizer
        self.state = state

    def _encode(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        from .text import encode_prompts

        return encode_prompts(self.tokenizer, texts)

    def _generate(
        self, system: str, texts: list[str], n_new: int, weights: torch.Tensor | None, router: torch.Tensor | None
    ) -> tuple[list[str], list[int]]:
        """Greedy answers (text up to EOS) for a batch of prompts under one system; also each row's generated token
        count."""
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
        return texts_out, [int(out.lengths[row]) for row in range(len(texts))]

    def _router(self, texts: list[str]) -> torch.Tensor:
        ids, mask = self._encode(texts)
        with torch.no_grad():
            s = self.model.compute_scalings(ids.to(self.model.device), mask.to(self.model.device))
        m = mask.to(s.device, s.dtype)[:, :, None, None]
        return (s * m).sum(1) / m.sum(1)  # [B, L, N], mean over the prompt's real tokens

    def answers(self, system: str, domain: _Domain, weights: torch.Tensor | None) -> tuple[list[str], int]:
        """Every record's answer, in the records' order, and the tokens generated (by all processes)."""
        pairs = split_map(
            lambda rows: self._answer_rows(system, domain, weights, rows), range(len(domain.records)), self.state
        )
        return [answer for answer, _ in pairs], sum(n for _, n in pairs)

    def _answer_rows(
        self, system: str, domain: _Domain, weights: torch.Tensor | None, rows: list[int]
    ) -> list[tuple[str, int]]:
        """(answer, tokens generated) of the records at `rows` (indices into the domain's records)."""
        out: list[tuple[str, int]] = []
        then = domain.how.continuation
        for start in range(0, len(rows), self.batch_size):
            at = rows[start : start + self.batch_size]
            chunk = [domain.records[i] for i in at]
            w = weights[at] if weights is not None else None
            prompts = [r["prompt"] for r in chunk]
            router = self._router(prompts) if system == "router" else None
            first, n = self._generate(system, prompts, domain.max_new, w, router)
            if then is None:
                out += zip(first, n)
                continue
            # two segments: the harness appends the continuation, the model writes the rest
            second_prompts = [p + a.strip() + r[then] for p, a, r in zip(prompts, first, chunk)]
            second, m = self._generate(system, second_prompts, DEFAULT_MAX_NEW, w, router)
            out += [(a.strip() + r[then] + b.strip(), i + j) for a, r, b, i, j in zip(first, chunk, second, n, m)]
        return out


DEFAULT_MAX_NEW = 12  # new tokens of a continuation's answer


def _domains(records: Sequence[dict[str, Any]], max_new_tokens: dict[str, int] | None) -> dict[str, _Domain]:
    """Records grouped by their "domain" (checked: every record of a domain is scored the same way and has what its
    scorer needs); budgets from the scorer unless `max_new_tokens` names the domain."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for i, r in enumerate(records):
        if "prompt" not in r or "completion" not in r:
            raise ConfigError(f"record {i}: evaluation needs 'prompt' and 'completion'")
        groups.setdefault(r.get("domain") or "all", []).append(r)
    out = {}
    for name, recs in groups.items():
        found = [scorer_of(r) for r in recs]
        kinds = {s.name for s in found}
        if len(kinds) != 1:
            raise ConfigError(f"domain '{name}': records mix scoring kinds {sorted(kinds)}; split them by domain")
        how = found[0]
        if how.check is not None:
            how.check(name, recs)
        out[name] = _Domain(recs, how, (max_new_tokens or {}).get(name, how.max_new_tokens))
    return out


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
    group = _domains([{**r, "domain": domain} for r in records], max_new_tokens)[domain]
    return _Runner(model, None, batch_size).answers(mode, group, None)[0]


def _rows(systems: Sequence[str], names: list[str], truncated: Any) -> list[tuple[str, str | None]]:
    """(system, expert) per table row: "experts" becomes one row per expert; "truncated" needs its checkpoint."""
    rows: list[tuple[str, str | None]] = []
    for system in systems:
        if system == "experts":
            rows += [(f"expert:{n}", n) for n in names]
        elif system != "truncated" or truncated is not None:
            rows.append((system, None))
    return rows


def _fixed_weights(system: str, expert: str | None, n: int, names: list[str]) -> torch.Tensor | None:
    """[n, N] expert weights of the systems with fixed scalings (base, one expert, uniform); None for the others."""
    if system == "base":
        return torch.zeros(n, len(names))
    if system == "uniform":
        return torch.full((n, len(names)), 1.0 / len(names))
    if expert is not None:
        return torch.nn.functional.one_hot(torch.tensor(names.index(expert)), len(names)).float().expand(n, -1)
    return None


def _oracle_options(domain: str, recs: list[dict[str, Any]], names: list[str]) -> list[torch.Tensor]:
    """[n, N] one-hot weights per option: option i gives each record its i-th listed expert (its last one when it
    lists fewer), so that the oracle can take the best per prompt."""
    options = []
    for option in range(max(len(r.get("experts", [r.get("domain")])) for r in recs)):
        w = torch.zeros(len(recs), len(names))
        for i, r in enumerate(recs):
            wanted = r.get("experts", [r.get("domain")])
            name = wanted[min(option, len(wanted) - 1)]
            if name not in names:
                raise ConfigError(f"domain '{domain}': oracle needs an expert named '{name}' (experts: {names})")
            w[i, names.index(name)] = 1.0
        options.append(w)
    return options


def _oracle(
    runner: _Runner, group: _Domain, options: list[torch.Tensor], context: dict[str, Any]
) -> tuple[list[str], int]:
    """Per prompt, the best-scoring answer among the options (one expert per prompt), and the tokens generated."""
    runs = [runner.answers("oracle", group, w) for w in options]
    best = []
    for i, r in enumerate(group.records):
        scored = [(group.how.rank_one(r, run[i], context), run[i]) for run, _ in runs]
        best.append(max(scored, key=lambda x: x[0])[1])  # ties: the first option
    return best, sum(n for _, n in runs)


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
    state: Any = None,
) -> EvalResult:
    """Run every system over the records (grouped by their "domain") and score them; see the module docstring.
    max_new_tokens: budgets by domain name (default: each scorer's). train_peptides: passed to scorers as context.

    Data parallel: under `accelerate launch` (or with `state`, Accelerate's `PartialState`) every process must call
    this with the same records; each answers a contiguous share of every domain's records, the answers are gathered
    in the records' order and every process scores all of them, so the metrics are those of one process (for greedy
    answers that do not depend on the rows batched with them). tokens/s is then the processes' total over the wall
    time."""
    from tqdm.auto import tqdm

    if model.tokenizer is None:
        raise ConfigError("evaluation needs the model's tokenizer")
    if not records:
        raise ConfigError("no records to evaluate")
    names = model.expert_names
    domains = _domains(records, max_new_tokens)
    result = EvalResult(kinds={name: group.how.name for name, group in domains.items()})
    runner = _Runner(model, truncated, batch_size, processes(state))
    context = {"train_peptides": train_peptides or set()}
    rows = _rows(systems, names, truncated)
    bar = tqdm(total=len(rows) * len(domains), desc="evaluating", disable=not progress)
    for system, expert in rows:
        result.metrics[system] = {}
        generated, seconds = 0, 0.0
        for name, group in domains.items():
            start = time.perf_counter()
            if system == "oracle":
                answers, n = _oracle(runner, group, _oracle_options(name, group.records, names), context)
            else:
                answers, n = runner.answers(system, group, _fixed_weights(system, expert, len(group.records), names))
            generated += n
            seconds += time.perf_counter() - start
            result.metrics[system][name] = group.how.score(group.records, answers, context)
            result.answers[f"{system}/{name}"] = answers
            bar.update(1)
        result.speed[system] = generated / seconds if seconds > 0 else math.nan
    bar.close()
    return result
