"""One request's life, from its first generated token to its finish reason: the same in `generate()`, the server,
`converse` and the lm-eval model, which all drive a `RequestState` per row.

    a token arrives   -> an end token (EOS, or one of `stop_token_ids`): the row ends, "stop"; the token is counted
                         in `ids` but is not text
                         any other token: counted, its text decoded incrementally (text.IncrementalDecoder)
    a stop string     -> found in the text: the row ends, "stop"; the text is cut before it (OpenAI's and vLLM's
                         default), or after it with `include_stop_str_in_output`
    max_tokens        -> the row ends, "length" (the decoder's last bytes flushed first: a stop string they
                         complete still makes it "stop")
    a failure         -> `fail(message)`: the row ends alone, "error", with the message; the other rows of its
                         batch go on (non-finite logits or scalings, a grammar that can go no further)

Streaming: `take()` returns the text that is safe to show: never a stop string, nor a part of one that the next
tokens might complete. A state without a tokenizer counts tokens and stops on end tokens only (no text, no stop
strings).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from .errors import ConfigError
from .text import IncrementalDecoder

__all__ = ["FINISH_REASONS", "MAX_STOPS", "RequestState", "check_stops"]

FINISH_REASONS = ("stop", "length", "error")
"""Why a row ended: an end token or a stop string; max_tokens (or the context); a failure of its own."""

MAX_STOPS = 4
"""OpenAI's limit on the stop strings of one request (the server's `stop` field; the library takes any number)."""


def check_stops(stops: str | Sequence[str] | None, field: str = "stop", limit: int | None = None) -> list[str]:
    """A stop list as given by a caller -> a list of non-empty strings; refuses anything else naming `field`."""
    if stops is None:
        return []
    if isinstance(stops, str):
        stops = [stops]
    if not isinstance(stops, (list, tuple)):
        raise ConfigError(f"{field} must be a string or a list of strings, got {type(stops).__name__}", field=field)
    for i, stop in enumerate(stops):
        if not isinstance(stop, str):
            raise ConfigError(f"{field}[{i}] must be a string, got {type(stop).__name__}", field=field)
        if not stop:
            raise ConfigError(f"{field}[{i}] is empty: a stop string needs at least one character", field=field)
    if limit is not None and len(stops) > limit:
        raise ConfigError(f"{field} has {len(stops)} strings; at most {limit} are allowed", field=field)
    return list(stops)


def _held_back(text: str, stops: Sequence[str]) -> int:
    """How many trailing characters of `text` could be the start of a stop string (not safe to stream yet)."""
    keep = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:k]):
                keep = max(keep, k)
                break
    return keep


class RequestState:
    """The tokens, text and end of one generated answer (module docstring).

    ids: the generated tokens, the end token included (as transformers' sequences and the lengths of `generate`);
    text: the answer's text so far (stop strings cut); finish_reason: None while it runs, then one of
    FINISH_REASONS; error: the failure's message (finish_reason "error")."""

    def __init__(
        self,
        tokenizer: Any,
        *,
        max_tokens: int,
        stops: Sequence[str] = (),
        end_ids: Iterable[int] = (),
        include_stop_str_in_output: bool = False,
        skip_special_tokens: bool = True,
    ) -> None:
        if stops and tokenizer is None:
            raise ConfigError("stop strings need a tokenizer (pass tokenizer=... or load a checkpoint that has one)")
        self.max_tokens = max_tokens
        self.stops = list(stops)
        self.end_ids = frozenset(int(i) for i in end_ids)
        self.include_stop = include_stop_str_in_output
        self.decoder = IncrementalDecoder(tokenizer, skip_special_tokens) if tokenizer is not None else None
        self.ids: list[int] = []
        self.text = ""
        self.sent = 0
        self.finish_reason: str | None = None
        self.error: str | None = None
        if max_tokens <= 0:
            self.finish_reason = "length"

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    @property
    def text_tokens(self) -> int:
        """The generated tokens that are text (the end token apart): the usage's completion tokens."""
        return len(self.ids) - (self.finish_reason == "stop" and bool(self.ids) and self.ids[-1] in self.end_ids)

    def push(self, token: int) -> None:
        """One generated token (ignored once the row ended)."""
        if self.done:
            return
        token = int(token)
        self.ids.append(token)
        if token in self.end_ids:
            self._end("stop")
            return
        if self.decoder is not None:
            self._add(self.decoder.push(token))
        if not self.done and len(self.ids) >= self.max_tokens:
            self._end("length")

    def fail(self, message: str) -> None:
        """End the row with its own failure (finish_reason "error")."""
        if not self.done:
            self.finish_reason, self.error = "error", message

    def finish(self, reason: str) -> None:
        """End the row from outside (the context is full: "length"); its last bytes are flushed."""
        if not self.done:
            self._end(reason)

    def take(self) -> str:
        """The text not yet taken that is safe to show (all of it once the row ended)."""
        end = len(self.text) if self.done else len(self.text) - _held_back(self.text, self.stops)
        piece = self.text[self.sent : end] if end > self.sent else ""
        self.sent = max(self.sent, end)
        return piece

    def _add(self, piece: str) -> None:
        if not piece:
            return
        start = max(0, len(self.text) - max((len(s) for s in self.stops), default=0) + 1)
        self.text += piece
        found = [(at, stop) for stop in self.stops if (at := self.text.find(stop, start)) >= 0]
        if found:
            at, stop = min(found)
            self.text = self.text[: at + len(stop) if self.include_stop else at]
            self.finish_reason = "stop"

    def _end(self, reason: str) -> None:
        if self.decoder is not None:
            self._add(self.decoder.flush())
        if not self.done:
            self.finish_reason = reason
