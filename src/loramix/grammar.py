"""Structured output: JSON schemas enforced on the logits, one grammar state per row (llguidance).

    Grammar.json(tokenizer, schema, vocab, eos)   a JSON schema (a dict, a JSON string or a pydantic model class;
                                                  None: any JSON object) compiled for one tokenizer; checked when
                                                  made (a `GrammarError` names what is wrong)
    Grammar.for_model(model, schema)              the same for a LoraMixModel's tokenizer, logits and EOS ids
    Grammar.lark(tokenizer, text, vocab, eos)     a grammar in llguidance's Lark syntax (the lazy grammars of strict
                                                  tool calls, serve/toolparsers.py), checked when made
    Grammar.lark_for_model(model, text)           the same for a LoraMixModel
    grammar.matcher()                             a fresh matcher for one row (the grammar's state)
    GrammarRow(grammar)                           one row's grammar, advanced on a worker thread of its own
    apply_masks(scores, rows, masks, vocab)       packed masks ([V / 32] int32 each) applied on the scores' device
    allowed_tokens(matchers, vocab)               [n, V] uint8: the tokens each matcher allows next

The decoder's sampler (sampling.py) holds one `GrammarRow` per constrained row: before choosing it sets the tokens a
row's grammar forbids to -inf (greedy and sampled rows alike), after choosing it feeds the chosen token to the
matcher. The matcher works on the row's own thread (llguidance drops the GIL): the next mask is computed while the
model runs the next forward, and the decoder waits for it at most the grammar's `budget` over a request, so one
row's costly grammar cannot hold the other rows' steps for longer. Rows without a grammar pay nothing, and a batch
without one runs exactly as before. When the grammar is
complete it allows only the end-of-sequence tokens, so a constrained row ends with EOS (or at max_tokens, with a
partial text, as OpenAI's API does: finish_reason "length").

JSON is written compactly: no whitespace between tokens outside strings (a small model cannot spend its tokens
on blank lines, and the text parses the same). llguidance reads byte-level BPE, SentencePiece and byte-fallback
tokenizers from their `tokenizer.json`; any other tokenizer (a character-level one, say) is read token by token
through `decode`. The choice of llguidance over xgrammar and outlines-core is explained in docs/design.md.
"""

from __future__ import annotations

import json
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .errors import ConfigError

__all__ = [
    "ANY_OBJECT",
    "Grammar",
    "GrammarError",
    "GrammarRow",
    "allowed_tokens",
    "apply_masks",
    "schema_of",
    "why_dead",
]

ANY_OBJECT: dict[str, Any] = {"type": "object"}
"""The schema of OpenAI's JSON mode (`response_format: {"type": "json_object"}`): any JSON object."""

COMPILE_OPTIONS = {"whitespace_flexible": False}
"""llguidance's JSON options: compact JSON (module docstring)."""

INSTALL = "pip install 'llguidance>=1.0'"


class GrammarError(ConfigError):
    """A schema that cannot be compiled, or that the tokenizer cannot write."""


def _llguidance() -> Any:
    try:
        import llguidance
        import llguidance.hf
    except ImportError as exc:  # a dependency of loramix: only a broken install lacks it
        raise GrammarError(f"structured output needs llguidance ({exc}); {INSTALL}") from None
    return llguidance


def schema_of(schema: Any) -> dict[str, Any]:
    """A JSON schema as a dict, from a dict, a JSON string, or a pydantic model class (`model_json_schema`)."""
    if schema is None:
        return dict(ANY_OBJECT)
    if isinstance(schema, type) and hasattr(schema, "model_json_schema"):
        return schema.model_json_schema()
    if isinstance(schema, (str, bytes)):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as exc:
            raise GrammarError(f"the JSON schema is not valid JSON: {exc}") from None
    if isinstance(schema, bool):
        raise GrammarError("the JSON schema must be an object (a JSON schema document), not true or false")
    if not isinstance(schema, dict):
        raise GrammarError(f"the JSON schema must be an object (a JSON schema document), not {type(schema).__name__}")
    return schema


class _TokenBytes:
    """llguidance's generic tokenizer interface for tokenizers it cannot read from tokenizer.json: the bytes of each
    token id (the decoded text; a piece of a multi-byte character cannot be written and gets no bytes), the
    special tokens by name, and encoding."""

    def __init__(self, tokenizer: Any, vocab: int, eos: Sequence[int]) -> None:
        self.eos_token_id = eos[0]
        self.bos_token_id = getattr(tokenizer, "bos_token_id", None)
        special = {i for i in getattr(tokenizer, "all_special_ids", []) if i is not None and i < vocab} | set(eos)
        self.special_token_ids = sorted(special)
        size = len(tokenizer)
        tokens: list[bytes] = []
        for i in range(vocab):
            if i >= size:
                tokens.append(b"")
            elif i in special:
                tokens.append(str(tokenizer.convert_ids_to_tokens(i)).encode())
            else:
                text = tokenizer.decode([i])
                tokens.append(b"" if "\ufffd" in text else text.encode())
        self.tokens = tokens
        self.characters = {c for token in tokens for c in token.decode("utf-8", "ignore")}
        self._tokenizer = tokenizer

    def __call__(self, text: str) -> list[int]:
        return list(self._tokenizer.encode(text, add_special_tokens=False))


_TABLES: weakref.WeakKeyDictionary[Any, dict[tuple[int, tuple[int, ...]], Any]] = weakref.WeakKeyDictionary()


_READY: weakref.WeakKeyDictionary[Any, set[int]] = weakref.WeakKeyDictionary()


def token_table(tokenizer: Any, vocab: int, eos: Sequence[int]) -> Any:
    """llguidance's view of `tokenizer` over `vocab` ids (the model's output size) ending with `eos`, and the
    characters its tokens hold (None: every byte); made once per tokenizer (about 0.4 s for a 49k-token BPE)."""
    llg = _llguidance()
    key = (vocab, tuple(eos))
    cached = _TABLES.setdefault(tokenizer, {})
    if key in cached:
        return cached[key]
    try:
        table, characters = llg.hf.from_tokenizer(tokenizer, n_vocab=vocab, eos_token=list(eos)), None
    except Exception:  # not a tokenizer.json llguidance can read: token by token
        tokens = _TokenBytes(tokenizer, vocab, eos)
        table, characters = llg.LLTokenizer(llg.TokenizerWrapper(tokens), n_vocab=vocab), tokens.characters
    cached[key] = table, characters
    return cached[key]


def token_bytes(model: Any, token: int) -> bytes:
    """The bytes token `token` of a LoraMixModel's tokenizer writes (a piece of a multi-byte character included),
    from llguidance's view of the tokenizer (made once per tokenizer)."""
    from .base import resolve_defaults

    vocab = model.model.get_output_embeddings().weight.shape[0]
    eos = resolve_defaults(model).eos_token_ids or [0]
    table, _ = token_table(model.tokenizer, vocab, eos)
    return bytes(table.decode_bytes([token]))


def _missing_characters(schema: dict[str, Any], characters: set[str] | None) -> str:
    """The JSON punctuation (and digits) the schema needs that a token-by-token tokenizer has no token for. A
    byte-level or byte-fallback tokenizer (characters None) can write every byte."""
    if characters is None:
        return ""
    text = json.dumps(schema)
    needed = (
        '{}":,'
        + ("[]" if '"array"' in text else "")
        + ("0123456789-" if '"integer"' in text or '"number"' in text else "")
    )
    return "".join(c for c in needed if c not in characters)


@dataclass
class Grammar:
    """A JSON schema compiled for one tokenizer (module docstring). `schema` is the JSON schema it enforces."""

    schema: dict[str, Any]
    vocab: int
    eos: tuple[int, ...]
    _prototype: Any
    budget: float | None = None
    """Seconds the decoder may wait, over one request, for this grammar's masks (`GrammarRow`); None: no limit. The
    server sets it (`create_app(grammar_budget=...)`)."""

    @classmethod
    def json(cls, tokenizer: Any, schema: Any = None, *, vocab: int, eos: Sequence[int]) -> Grammar:
        """`schema` (module docstring) for `tokenizer`, over `vocab` logits, ending with one of the `eos` ids.
        Raises `GrammarError` when the schema is not valid, nested more than MAX_SCHEMA_DEPTH levels, allows no value
        (its first mask is computed here, once for every row), or needs JSON punctuation the tokenizer has no token
        for."""
        if tokenizer is None:
            raise GrammarError("structured output needs a tokenizer: load a checkpoint that has one, or pass one")
        if not eos:
            raise GrammarError(
                "structured output needs an end-of-sequence token to end the JSON with; the model has none"
            )
        llg = _llguidance()
        schema = schema_of(schema)
        if _depth(schema) > MAX_SCHEMA_DEPTH:
            raise GrammarError(f"the JSON schema is nested too deeply: more than {MAX_SCHEMA_DEPTH} levels")
        table, characters = token_table(tokenizer, vocab, eos)
        missing = _missing_characters(schema, characters)
        if missing:
            raise GrammarError(
                f"the tokenizer has no token for {missing!r}, which this JSON schema needs: a model with this "
                "tokenizer cannot write it"
            )
        try:
            text = llg.LLMatcher.grammar_from_json_schema(schema, defaults=COMPILE_OPTIONS)
        except (ValueError, TypeError) as exc:
            raise GrammarError(f"the JSON schema cannot be compiled: {exc}") from None
        matcher = llg.LLMatcher(table, text, log_level=0)
        if matcher.is_error():
            raise GrammarError(f"the JSON schema cannot be compiled: {_first_line(matcher.get_error())}")
        grammar = cls(schema, vocab, tuple(eos), matcher)
        grammar.warm()  # a schema that allows nothing shows it at its first mask
        if matcher.is_error():
            raise GrammarError(dead_message(matcher) or "the JSON schema cannot be compiled")
        return grammar

    @classmethod
    def for_model(cls, model: Any, schema: Any = None, *, tokenizer: Any = None) -> Grammar:
        """`json` for a LoraMixModel: its tokenizer (or `tokenizer`), its logits' size, its EOS ids."""
        from .base import resolve_defaults

        vocab = model.model.get_output_embeddings().weight.shape[0]
        eos = resolve_defaults(model).eos_token_ids
        return cls.json(tokenizer if tokenizer is not None else model.tokenizer, schema, vocab=vocab, eos=eos)

    @classmethod
    def prepare(cls, model: Any) -> None:
        """llguidance's one-time work for the model's tokenizer: its token table, and a first mask (about 2 s once per
        process, whatever the schema), so that what a request's grammar costs afterwards is its own."""
        tokenizer = model.tokenizer
        done = _READY.setdefault(tokenizer, set()) if tokenizer is not None else set()
        key = model.model.get_output_embeddings().weight.shape[0]
        if key not in done:
            cls.for_model(model, ANY_OBJECT).warm()
            done.add(key)

    @classmethod
    def lark(cls, tokenizer: Any, text: str, *, vocab: int, eos: Sequence[int]) -> Grammar:
        """A grammar in llguidance's Lark syntax (its docs/syntax.md) for `tokenizer`, over `vocab` logits, ending
        with one of the `eos` ids; its `schema` is empty. Raises `GrammarError` when it cannot be compiled."""
        if tokenizer is None:
            raise GrammarError("structured output needs a tokenizer: load a checkpoint that has one, or pass one")
        if not eos:
            raise GrammarError("structured output needs an end-of-sequence token; the model has none")
        llg = _llguidance()
        table, _ = token_table(tokenizer, vocab, eos)
        try:
            compiled = llg.LLMatcher.grammar_from_lark(text)
        except (ValueError, TypeError) as exc:
            raise GrammarError(f"the grammar cannot be compiled: {_first_line(str(exc))}") from None
        matcher = llg.LLMatcher(table, compiled, log_level=0)
        if matcher.is_error():
            raise GrammarError(f"the grammar cannot be compiled: {_first_line(matcher.get_error())}")
        return cls({}, vocab, tuple(eos), matcher)

    @classmethod
    def lark_for_model(cls, model: Any, text: str, *, tokenizer: Any = None) -> Grammar:
        """`lark` for a LoraMixModel: its tokenizer (or `tokenizer`), its logits' size, its EOS ids."""
        from .base import resolve_defaults

        vocab = model.model.get_output_embeddings().weight.shape[0]
        eos = resolve_defaults(model).eos_token_ids
        return cls.lark(tokenizer if tokenizer is not None else model.tokenizer, text, vocab=vocab, eos=eos)

    def matcher(self) -> Any:
        """A fresh grammar state for one row."""
        return self._prototype.deep_copy()

    def warm(self) -> None:
        """Compute the first mask once (for a hard schema, the costly part; the rows' copies reuse what it built)."""
        fill_mask(self._prototype, torch.full((1, mask_words(self.vocab)), -1, dtype=torch.int32))


def _first_line(message: str) -> str:
    """llguidance's error without its parser-state dump, on one line (a regex error's detail is on the next lines)."""
    text = " ".join(message.split("<state>")[0].split())
    if not text:
        return "unknown error"
    return text if len(text) <= 300 else text[:297] + "..."


MAX_SCHEMA_DEPTH = 100
"""The deepest nesting of a JSON schema document accepted (llguidance's reader stops at about 128 levels)."""


def _depth(value: Any) -> int:
    """How deeply a JSON value nests (objects and arrays), without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        if children is None:
            continue
        deepest = max(deepest, level)
        if level > MAX_SCHEMA_DEPTH:
            break
        stack.extend((child, level + 1) for child in children)
    return deepest


def dead_message(matcher: Any) -> str | None:
    """Why a matcher can go no further, said for the one who wrote the schema (None: it can). A schema that allows
    no value, or that passes the grammar engine's limits, is named as such; anything else is a token that does not
    fit what the grammar needs next."""
    if not matcher.is_error():
        return None
    text, reason = _first_line(matcher.get_error()), str(matcher.stop_reason())
    if "NoExtension" in reason or text.startswith("NoExtension"):
        return 'the JSON schema allows no value that can be written out (a "$ref" to itself and nothing else?)'
    if "TooComplex" in reason or "; max is " in text:
        return f"the JSON schema exceeds the grammar engine's limits ({text}): simplify it"
    return f"the grammar cannot go on with this tokenizer ({text})"


BLOCKED = -1e30
"""What a token the grammar forbids gets added to its score: -inf in effect (exp underflows to 0, argmax never picks
it), as an addition, which is ten times faster on a CPU than masked_fill, and exact for the allowed tokens (+0)."""

OVER_BUDGET = (
    "the grammar took longer than this server's {budget:g} s budget to compute which tokens may come next "
    "(simplify the schema: fewer properties, shorter patterns and repetition counts)"
)


def mask_words(vocab: int) -> int:
    """int32 words of a packed token bitmask over `vocab` ids (token 32w + b: bit b of word w; llguidance's layout)."""
    return (vocab + 31) // 32


def fill_mask(matcher: Any, bitmask: torch.Tensor, index: int = 0) -> None:
    """Row `index` of the CPU int32 `bitmask` [n, words] <- the tokens `matcher` allows next (llguidance drops the
    GIL while it computes)."""
    import llguidance.torch as lt

    lt.fill_next_token_bitmask(matcher, bitmask, index)


def allowed_tokens(matchers: Sequence[Any], vocab: int) -> torch.Tensor:
    """[n, vocab] uint8 (1: allowed), on the CPU: the tokens each matcher allows next (none, for a matcher in an error
    state or whose grammar needs what the tokenizer cannot write)."""
    bitmask = torch.full((len(matchers), mask_words(vocab)), -1, dtype=torch.int32)
    for i, matcher in enumerate(matchers):
        fill_mask(matcher, bitmask, i)
    return unpack(bitmask, vocab).to(torch.uint8)


def unpack(bitmask: torch.Tensor, vocab: int) -> torch.Tensor:
    """[n, words] int32 packed masks -> [n, vocab] bool, on the bitmask's device (a few integer ops: the packed mask,
    32 times smaller, is what travels to the device)."""
    shifts = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    bits = (bitmask[:, :, None] >> shifts) & 1  # [n, words, 32]: token 32w + b
    return bits.flatten(1)[:, :vocab].bool()


def blocked_bias(allowed: torch.Tensor) -> torch.Tensor:
    """[n, V] float: 0 where `allowed` (uint8 or bool), BLOCKED elsewhere."""
    return allowed.float().sub_(1).mul_(-BLOCKED)


def why_dead(matcher: Any) -> str | None:
    """Why a matcher can go no further (an error state), or None."""
    return _first_line(matcher.get_error()) if matcher.is_error() else None


class GrammarRow:
    """One constrained row's grammar state, its masks computed off the decoding thread: the chosen token is fed to the
    matcher (microseconds), then a worker thread of the row's own computes the next packed mask (llguidance drops the
    GIL, and the mask is the costly part: seconds, for a hard schema), so the mask of step t + 1 is computed while
    the model runs step t + 1's forward. The decoding thread waits for a row's work only when
    it needs it (`mask`, `advance`), and at most `grammar.budget` seconds over the whole request (None: no limit);
    past it the row fails (`failure`) and its late work is left to finish on its own thread, never waited for again.

    `failure` (None, or why) is set when the budget is spent, when a token does not fit, or when the grammar allows
    nothing the tokenizer can write: the row may then only end (EOS)."""

    def __init__(self, grammar: Grammar) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self.grammar = grammar
        self.matcher = grammar.matcher()
        self.waited = 0.0  # seconds the decoding thread has waited for this row's grammar
        self.failure: str | None = None
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="loramix-grammar")
        self._next = self._pool.submit(self._compute)

    def _compute(self) -> torch.Tensor:  # on the row's worker thread
        bitmask = torch.full((1, mask_words(self.grammar.vocab)), -1, dtype=torch.int32)
        fill_mask(self.matcher, bitmask)
        return bitmask[0]

    def _consume(self, token: int) -> str | None:  # on the decoding thread, the worker idle
        matcher = self.matcher
        if matcher.is_stopped() or matcher.consume_token(token):
            return None
        return dead_message(matcher) or f"the grammar cannot go on with this tokenizer (token {token} does not fit)"

    def _wait(self, future: Any) -> Any:
        """The future's result, or None once the row has failed or its budget runs out while waiting."""
        import time
        from concurrent.futures import TimeoutError as Timeout

        if self.failure is not None:
            return None
        budget = self.grammar.budget
        start = time.perf_counter()
        try:
            return future.result(timeout=None if budget is None else max(budget - self.waited, 0.0))
        except Timeout:
            self.failure = OVER_BUDGET.format(budget=budget)
            return None
        finally:
            self.waited += time.perf_counter() - start

    def mask(self) -> torch.Tensor | None:
        """[words] int32: the tokens allowed next (waits for the worker), or None when the row has failed (then it
        may only end). An empty mask or a matcher in an error state fails the row here."""
        bitmask = self._wait(self._next)
        if bitmask is None:
            return None
        why = dead_message(self.matcher)
        if why is None and not bool(bitmask.any()):
            why = "the tokenizer cannot write what the grammar needs next"
        if why is not None:
            self.failure = why
            return None
        return bitmask

    def advance(self, token: int) -> None:
        """Feed the chosen token (here: it takes microseconds, and the worker is idle once `mask` has returned; a
        token that does not fit fails the row at once), then start computing the next mask on the worker."""
        if self.failure is not None:
            return
        if not self._next.done():  # not after `mask` (the sampler always asks for it first): wait for the worker
            self._wait(self._next)
            if self.failure is not None:
                return
        why = self._consume(token)
        if why is not None:
            self.failure = why
            return
        self._next = self._pool.submit(self._compute)

    def close(self) -> None:
        """The row left: pending work is dropped; work already running finishes on its thread, unread."""
        self._pool.shutdown(wait=False, cancel_futures=True)


def apply_masks(scores: torch.Tensor, index: list[int], masks: Sequence[torch.Tensor], vocab: int) -> torch.Tensor:
    """`scores` [n, V] with BLOCKED added to the tokens the packed `masks` ([words] int32 each, one per row of
    `index`) forbid: the packed masks go to the device (V / 32 words a row) and are unpacked there."""
    packed = torch.stack(list(masks)).to(scores.device, non_blocking=True)
    bias = blocked_bias(unpack(packed, vocab))
    return scores.index_add(0, torch.tensor(index, device=scores.device), bias)
