"""Choosing the next token for a batch of rows, each with its own settings, on the device (as vLLM's sampler does).

    SamplingSettings   one row's settings, validated once (generate, the CLI, the server and the harness build one)
    Sampler            the settings of every row of a decoder as [B] tensors; `choose(logits)` is a few tensor ops
                       for the whole batch and no host sync:

    scores = logits (float) + logit_bias
             - presence * (count > 0) - frequency * count          OpenAI's penalties, generated tokens only
             repetition penalty on every token seen (prompt + generated): s < 0 ? s * p : s / p  (transformers')
    greedy rows: argmax(scores)
    sampled rows: scores / temperature, top-k, then top-p (on the renormalised top-k), then
                  argmax(probs / E), E ~ Exponential(1)     (the same distribution as multinomial, without a sync)

    a row with a grammar (grammar.py): the tokens its grammar forbids get -inf (in effect) first; the chosen token
    advances it. Its grammar works on a thread of its own (`grammar.GrammarRow`): the next mask is computed while
    the model runs the next forward, and the decoder waits for it at most the grammar's budget over the request
    (past it, that row alone fails: `failures`)

A seeded row draws E from its own `torch.Generator` (`row_generator`), so it samples the same tokens alone and in
any batch; unseeded rows share one draw. A temperature below `GREEDY_BELOW` is greedy (vLLM's rule), so that a tiny
temperature cannot overflow the softmax.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from .errors import ConfigError
from .grammar import GrammarRow, apply_masks, mask_words

__all__ = ["GREEDY_BELOW", "Sampler", "SamplingSettings", "row_generator"]

GREEDY_BELOW = 1e-5
"""A temperature below this is greedy decoding (0 is the OpenAI API's way to ask for it)."""

REPETITION_PENALTY_RANGE = (0.01, 100.0)
"""The range of the repetition penalty. It divides positive logits and multiplies negative ones, so 1e-300 turns a
logit of 1 into Inf and the probabilities into NaN; within [0.01, 100] a logit of magnitude up to 655 stays finite
even in float16 (65504), and no useful penalty lies outside (transformers' docs suggest 1.0 to 1.2)."""


def _finite(
    name: str, value: Any, low: float | None = None, high: float | None = None, field: str | None = None
) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name}={value!r} must be a number", field=field or name) from None
    if not math.isfinite(number):
        raise ConfigError(f"{name}={value!r} must be a finite number", field=field or name)
    if high is None and low is not None and number < low:
        raise ConfigError(f"{name}={value!r} must be >= {low:g}", field=field or name)
    if (low is not None and number < low) or (high is not None and number > high):
        raise ConfigError(f"{name}={value!r} must be in [{low:g}, {high:g}]", field=field or name)
    return number


@dataclass(frozen=True)
class SamplingSettings:
    """How one row chooses its tokens. Validated when made: a bad value raises `ConfigError` naming the field."""

    temperature: float = 0.0
    """0 (or below GREEDY_BELOW) is greedy; above, the logits are divided by it before sampling."""
    top_p: float = 1.0
    """Nucleus sampling: keep the most likely tokens whose probabilities sum to top_p, in (0, 1]."""
    top_k: int = 0
    """Keep the k most likely tokens before sampling; 0 keeps all."""
    repetition_penalty: float = 1.0
    """transformers' repetition penalty on every token of the prompt and the answer; 1 is off."""
    presence_penalty: float = 0.0
    """OpenAI's: subtracted once from the logit of every token the answer already holds, in [-2, 2]."""
    frequency_penalty: float = 0.0
    """OpenAI's: subtracted per occurrence in the answer, in [-2, 2]."""
    logit_bias: Mapping[int, float] = field(default_factory=dict)
    """Token id -> a value in [-100, 100] added to its logit (OpenAI's logit_bias)."""
    seed: int | None = None
    """The row's own random stream (see `row_generator`); None draws from the shared one."""

    def __post_init__(self) -> None:
        _finite("temperature", self.temperature, 0.0, None)
        _finite("top_p", self.top_p)
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"top_p={self.top_p} must be in (0, 1]", field="top_p")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ConfigError(
                f"top_k={self.top_k!r} must be an integer >= 0 (0 disables top-k sampling)", field="top_k"
            )
        _finite("repetition_penalty", self.repetition_penalty, *REPETITION_PENALTY_RANGE)
        _finite("presence_penalty", self.presence_penalty, -2.0, 2.0)
        _finite("frequency_penalty", self.frequency_penalty, -2.0, 2.0)
        for token, value in self.logit_bias.items():
            if isinstance(token, bool) or not isinstance(token, int) or token < 0:
                raise ConfigError(f"logit_bias: key {token!r} must be a token id (an integer >= 0)", field="logit_bias")
            _finite(f"logit_bias[{token}]", value, -100.0, 100.0, field="logit_bias")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise ConfigError(f"seed={self.seed!r} must be an integer", field="seed")

    @classmethod
    def for_generate(cls, do_sample: bool = False, temperature: float = 1.0, **fields: Any) -> SamplingSettings:
        """transformers' spelling: greedy unless do_sample (and temperature 0 is greedy too)."""
        _finite("temperature", temperature, 0.0)
        return cls(temperature=float(temperature) if do_sample else 0.0, **fields)

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW

    @property
    def penalised(self) -> bool:
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    @property
    def filtered(self) -> bool:
        """Whether top-k or top-p removes tokens before sampling."""
        return not self.greedy and (self.top_k > 0 or self.top_p < 1.0)


def _bit(b: int) -> int:
    """Bit b of an int32 word, as a Python int that fits int32 (bit 31 is the sign bit)."""
    return -(1 << 31) if b == 31 else 1 << b


def row_generator(seed: int | None, index: int, device: torch.device) -> torch.Generator | None:
    """The random stream of choice `index` of a request seeded with `seed`: `seed` itself for the first, a seed
    derived from (seed, index) for the others, so that the choices differ and each is reproducible."""
    if seed is None:
        return None
    value = seed if index == 0 else hash((seed, index)) & (2**63 - 1)
    return torch.Generator(device=device).manual_seed(value)


class Sampler:
    """The sampling settings of `batch` rows as tensors (row = a decoder slot); see the module docstring.

    `set_row` when a row joins (with its prompt's tokens, for the repetition penalty), `choose` for rows 0..k-1 or
    any index, `record` the chosen tokens. Penalty and bias tensors [B, V] exist only once a row needs them, and a
    batch whose rows are all greedy without penalties is one argmax."""

    def __init__(self, batch: int, vocab: int, device: torch.device, generator: torch.Generator | None = None) -> None:
        self.vocab, self.device = vocab, device
        self.settings: list[SamplingSettings | None] = [None] * batch
        self.generators: list[torch.Generator | None] = [None] * batch
        self.shared = generator  # the stream of unseeded rows (None: torch's default)
        self.temperature = torch.ones(batch, device=device)
        self.top_k = torch.zeros(batch, dtype=torch.long, device=device)
        self.top_p = torch.ones(batch, device=device)
        self.repetition = torch.ones(batch, device=device)
        self.presence = torch.zeros(batch, device=device)
        self.frequency = torch.zeros(batch, device=device)
        self.greedy = torch.ones(batch, dtype=torch.bool, device=device)
        self.bias: torch.Tensor | None = None  # [B, V]
        self.seen: torch.Tensor | None = None  # [B, V] bool: prompt + generated (repetition penalty)
        self.counts: torch.Tensor | None = None  # [B, V]: generated only (presence / frequency)
        self.grammars: list[GrammarRow | None] = [None] * batch  # a constrained row's grammar state
        self.failures: dict[int, str] = {}  # constrained rows whose grammar could go no further: why
        self._update_flags()

    def _update_flags(self) -> None:
        """What the live rows ask for (host flags: a step skips what no row needs)."""
        live = [s for s in self.settings if s is not None]
        self.any_bias = any(s.logit_bias for s in live)
        self.any_penalty = any(s.penalised for s in live)
        self.any_repetition = any(s.repetition_penalty != 1.0 for s in live)
        self.any_sampled = any(not s.greedy for s in live)
        self.any_filtered = any(s.filtered for s in live)
        self.constrained = [row for row, g in enumerate(self.grammars) if g is not None]

    def set_row(
        self,
        row: int,
        settings: SamplingSettings,
        prompt: torch.Tensor,
        generator: torch.Generator | None,
        grammar: Any = None,
    ) -> None:
        """A row joins: its settings, its prompt's real tokens [T], its own random stream (or None) and its
        `grammar.Grammar` (or None)."""
        self.settings[row], self.generators[row] = settings, generator
        self._drop_grammar(row)
        self.grammars[row] = GrammarRow(grammar) if grammar is not None else None
        self.temperature[row] = 1.0 if settings.greedy else settings.temperature
        self.top_k[row] = settings.top_k if settings.top_k > 0 else self.vocab
        self.top_p[row] = settings.top_p
        self.repetition[row] = settings.repetition_penalty
        self.presence[row] = settings.presence_penalty
        self.frequency[row] = settings.frequency_penalty
        self.greedy[row] = settings.greedy
        if settings.logit_bias or self.bias is not None:
            if self.bias is None:
                self.bias = torch.zeros(len(self.settings), self.vocab, device=self.device)
            self.bias[row].zero_()
            if settings.logit_bias:
                tokens = torch.tensor(list(settings.logit_bias), device=self.device)
                values = torch.tensor(list(settings.logit_bias.values()), device=self.device)
                self.bias[row].index_copy_(0, tokens, values)
        if settings.repetition_penalty != 1.0 or self.seen is not None:
            if self.seen is None:
                self.seen = torch.zeros(len(self.settings), self.vocab, dtype=torch.bool, device=self.device)
            self.seen[row].zero_()
            self.seen[row].index_fill_(0, prompt.to(self.device), True)
        if settings.penalised or self.counts is not None:
            if self.counts is None:
                self.counts = torch.zeros(len(self.settings), self.vocab, device=self.device)
            self.counts[row].zero_()
        self._update_flags()

    def _drop_grammar(self, row: int) -> None:
        if self.grammars[row] is not None:
            self.grammars[row].close()
        self.grammars[row] = None
        self.failures.pop(row, None)

    def clear_row(self, row: int) -> None:
        self.settings[row], self.generators[row] = None, None
        self._drop_grammar(row)
        if self.bias is not None:
            self.bias[row].zero_()
        self._update_flags()

    def record(self, rows: slice | list[int], tokens: torch.Tensor) -> None:
        """The tokens [n] just chosen for `rows` join their rows' history (penalties)."""
        if self.seen is not None:
            self.seen[rows] = self.seen[rows].scatter(1, tokens[:, None], True)
        if self.counts is not None:
            ones = torch.ones(tokens.shape[0], 1, device=tokens.device)
            self.counts[rows] = self.counts[rows].scatter_add(1, tokens[:, None], ones)
        if self.constrained:  # the grammars need the tokens on the host: a read only when a row has one
            at = self._constrained_at(rows)
            if at:
                chosen = tokens[[i for i, _ in at]].tolist()
                for (_, row), token in zip(at, chosen):
                    grammar = self.grammars[row]
                    grammar.advance(token)
                    if grammar.failure is not None:
                        self.failures.setdefault(row, grammar.failure)

    def _constrained_at(self, rows: slice | list[int]) -> list[tuple[int, int]]:
        """(position in `rows`, row) of the constrained rows among `rows`."""
        indices = range(len(self.settings))[rows] if isinstance(rows, slice) else rows
        return [(i, row) for i, row in enumerate(indices) if self.grammars[row] is not None]

    def _constrain(self, scores: torch.Tensor, rows: slice | list[int]) -> torch.Tensor:
        """-inf in effect (`grammar.BLOCKED`) for the tokens the constrained rows' grammars forbid (a new tensor; the
        logits stay raw). A row whose grammar failed (nothing it can write, a token that does not fit, its time
        budget spent) may only end (EOS), and `failures` says why."""
        at = self._constrained_at(rows)
        if not at:
            return scores
        masks = []
        for _, row in at:
            grammar = self.grammars[row]
            mask = grammar.mask()
            if mask is None or row in self.failures:  # it may only end
                self.failures.setdefault(row, grammar.failure or "the grammar failed")
                mask = torch.zeros(mask_words(self.vocab), dtype=torch.int32)
                for eos in grammar.grammar.eos:
                    mask[eos // 32] |= _bit(eos % 32)
            masks.append(mask)
        return apply_masks(scores, [i for i, _ in at], masks, self.vocab)

    def choose(self, logits: torch.Tensor, rows: slice | list[int]) -> torch.Tensor:
        """The next token [n] of each of `rows` (a slice, or a list of row indices) from its raw logits [n, V]."""
        scores = logits.float()
        if self.bias is not None and self.any_bias:
            scores = scores + self.bias[rows]
        if self.counts is not None and self.any_penalty:
            counts = self.counts[rows]
            scores = scores - self.presence[rows, None] * (counts > 0) - self.frequency[rows, None] * counts
        if self.seen is not None and self.any_repetition:
            p = self.repetition[rows, None]
            scores = torch.where(self.seen[rows], torch.where(scores < 0, scores * p, scores / p), scores)
        if self.constrained:
            scores = self._constrain(scores, rows)
        best = scores.argmax(-1)
        if not self.any_sampled:
            return best
        scores = scores / self.temperature[rows, None]
        if self.any_filtered:
            scores = self._filter(scores, self.top_k[rows], self.top_p[rows])
        probs = torch.softmax(scores, dim=-1)
        noise = torch.empty_like(probs).exponential_(1.0, generator=self.shared)
        indices = range(len(self.settings))[rows] if isinstance(rows, slice) else rows
        for at, row in enumerate(indices):
            if self.generators[row] is not None:
                noise[at].exponential_(1.0, generator=self.generators[row])
        sampled = (probs / noise).argmax(-1)
        return torch.where(self.greedy[rows], best, sampled)

    @staticmethod
    def _filter(scores: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
        """Top-k then top-p per row (one sort): tokens outside get -inf; the most likely token always stays."""
        ordered, order = scores.sort(-1, descending=True)
        rank = torch.arange(scores.shape[-1], device=scores.device)
        ordered = ordered.masked_fill(rank >= top_k[:, None], -math.inf)
        probs = torch.softmax(ordered, -1)
        before = probs.cumsum(-1) - probs  # the mass of the tokens ranked above each one
        drop = (before >= top_p[:, None]) & (rank > 0)
        ordered = ordered.masked_fill(drop, -math.inf)
        return torch.full_like(scores, -math.inf).scatter(-1, order, ordered)
