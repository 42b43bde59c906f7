"""What the server's endpoints share (`ServerState`): the model, its engine and metrics, and the server's limits."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from ..contracts import MixedModel
from .engine import Engine
from .metrics import Metrics

__all__ = ["ServerState"]


@dataclass
class ServerState:
    """What the endpoints share: the model, its engine and metrics, and the server's limits."""

    model: MixedModel
    engine: Engine
    metrics: Metrics
    model_id: str
    prompt_limit: int
    max_tokens_limit: int
    default_max_tokens: int
    context: int  # max_model_len: the longest prompt + max_tokens
    vocab_size: int | None
    request_timeout: float | None
    grammar_budget: float | None = None
    special_ids: set[int] = field(default_factory=set)
    tool_parser: str | None = None
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def tokenizer(self) -> Any:
        return self.model.tokenizer

    @property
    def card(self) -> dict[str, Any]:
        return {"id": self.model_id, "object": "model", "created": self.created, "owned_by": "loramix"}
