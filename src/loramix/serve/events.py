"""What the engine tells a request's handler (engine -> app), as typed events: a `Piece` of streamed text while the
answer runs, then exactly one final event, `Done` or `Failed`. `Job.emit` receives them in the worker thread."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["Done", "Event", "Failed", "Piece", "TokenLogprob"]


@dataclass
class TokenLogprob:
    """One position: the token, its log probability (None for a prompt's first token) and the `top` alternatives,
    best first, as (token id, log probability)."""

    token: int
    logprob: float | None
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class Logprobs:
    """A choice's log probabilities: the prompt's (with prompt_logprobs / echo; its first token has none) and the
    completion's (the end token included, as vLLM does)."""

    prompt: list[TokenLogprob]
    completion: list[TokenLogprob]


@dataclass
class Piece:
    """Streamed text of choice `index` that is safe to show (request.RequestState.take)."""

    index: int
    text: str


@dataclass
class Done:
    """Choice `index` ended: its text (stop strings cut), finish reason ("stop", "length"), the tokens that are text
    (usage), its scalings as the request asked (a nested list, or None) and its log probabilities (or None)."""

    index: int
    text: str
    finish_reason: str
    completion_tokens: int
    scalings: Any = None
    logprobs: Logprobs | None = None


@dataclass
class Failed:
    """Choice `index` ended without an answer: the HTTP status and message to send, and the field at fault (or
    None)."""

    index: int
    message: str
    status: int = 500
    param: str | None = None


Event = Piece | Done | Failed
