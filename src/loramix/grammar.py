"""Structured output: JSON schemas enforced on the logits, one grammar state per row (llguidance).

    Grammar.json(tokenizer, schema, vocab, eos)   a JSON schema (a dict, a JSON string or a pydantic model class;
                                                  None: any JSON object) compiled for one tokenizer; checked when
                                                  made (a `GrammarError` names what is wrong)
    Grammar.for_model(model, schema)              the same for a LoraMixModel's tokenizer, logits and EOS ids
    Grammar.lark(tokenizer, text, vocab, eos)     a grammar in llguidance's Lark syntax (the lazy grammars of strict
                                                  tool calls, serve/toolparsers.py), checked when made
    Grammar.lark_for_model(model, text)           the same for a LoraMixModel
    grammar.matcher()                             a fresh matcher for one row (the grammar's state)
    allowed_tokens(matchers, vocab)               [n, V] uint8: the tokens each matcher allows next

The decoder's sampler (sampling.py) holds one matcher per constrained row: before choosing it sets the tokens a
row's grammar forbids to -inf (greedy and sampled rows alike), after choosing it feeds the chosen token to the
matcher. Rows without a grammar pay nothing, and a batch without one runs exactly as before. When the grammar is
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

__all__ = ["ANY_OBJECT", "Grammar", "GrammarError", "allowed_tokens", "schema_of", "why_dead"]

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

    @classmethod
    def json(cls, tokenizer: Any, schema: Any = None, *, vocab: int, eos: Sequence[int]) -> Grammar:
        """`schema` (module docstring) for `tokenizer`, over `vocab` logits, ending with one of the `eos` ids.
        Raises `GrammarError` when the schema is not valid, or when the tokenizer has no token for JSON punctuation
        the schema needs."""
        if tokenizer is None:
            raise GrammarError("structured output needs a tokenizer: load a checkpoint that has one, or pass one")
        if not eos:
            raise GrammarError(
                "structured output needs an end-of-sequence token to end the JSON with; the model has none"
            )
        llg = _llguidance()
        schema = schema_of(schema)
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
        return cls(schema, vocab, tuple(eos), matcher)

    @classmethod
    def for_model(cls, model: Any, schema: Any = None, *, tokenizer: Any = None) -> Grammar:
        """`json` for a LoraMixModel: its tokenizer (or `tokenizer`), its logits' size, its EOS ids."""
        from .base import resolve_defaults

        vocab = model.model.get_output_embeddings().weight.shape[0]
        eos = resolve_defaults(model).eos_token_ids
        return cls.json(tokenizer if tokenizer is not None else model.tokenizer, schema, vocab=vocab, eos=eos)

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


def _first_line(message: str) -> str:
    return message.strip().splitlines()[0] if message.strip() else "unknown error"


BLOCKED = -1e30
"""What a token the grammar forbids gets added to its score: -inf in effect (exp underflows to 0, argmax never picks
it), as an addition, which is ten times faster on a CPU than masked_fill, and exact for the allowed tokens (+0)."""


def allowed_tokens(matchers: Sequence[Any], vocab: int) -> torch.Tensor:
    """[n, vocab] uint8 (1: allowed), on the CPU: the tokens each matcher allows next (none, for a matcher in an error
    state or whose grammar needs what the tokenizer cannot write: the sampler then lets the row end, and says why)."""
    import llguidance.torch as lt
    import numpy as np

    words = (vocab + 31) // 32
    bitmask = torch.full((len(matchers), words), -1, dtype=torch.int32)
    for i, matcher in enumerate(matchers):
        lt.fill_next_token_bitmask(matcher, bitmask, i)
    bits = np.unpackbits(bitmask.numpy().view(np.uint8), axis=1, bitorder="little")  # token 32w + b: bit b of word w
    return torch.from_numpy(bits[:, :vocab].copy())


def blocked_bias(allowed: torch.Tensor) -> torch.Tensor:
    """[n, V] float: 0 where `allowed` (uint8), BLOCKED elsewhere."""
    return allowed.float().sub_(1).mul_(-BLOCKED)


def why_dead(matcher: Any) -> str | None:
    """Why a matcher can go no further (an error state), or None."""
    return _first_line(matcher.get_error()) if matcher.is_error() else None
