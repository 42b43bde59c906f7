"""Request bodies of the OpenAI-compatible API (pydantic), with loramix's extension field."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class LoramixOptions(BaseModel):
    """The `loramix` extension field (OpenAI clients: `extra_body={"loramix": {...}}`)."""

    model_config = ConfigDict(extra="forbid")

    mode: Literal["granular", "prompt", "truncated"] = "granular"
    """Speed mode of generation (docs/generation.md)."""
    return_scalings: Literal["none", "token", "layer", "expert"] = "none"
    """Scalings in the response: per generated token [n][L][N], per layer [L][N] (mean over the generated tokens), or
    per expert [N] (mean over tokens and layers)."""
    top_k: int = Field(0, ge=0)
    repetition_penalty: float = Field(1.0, gt=0)


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = Field(None, ge=0)
    max_completion_tokens: int | None = Field(None, ge=0)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1, le=1, description="only n=1 is supported")
    stream: bool = False
    stop: str | list[str] | None = None
    seed: int | None = None
    user: str | None = None
    loramix: LoramixOptions = Field(default_factory=LoramixOptions)

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: str | list[str] | None) -> list[str] | None:
        if value is None:
            return None
        stops = [value] if isinstance(value, str) else value
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop must be up to 4 non-empty strings")
        return stops


class CompletionRequest(_Sampling):
    prompt: str | list[str]
    echo: bool = False

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list) and not value:
            raise ValueError("prompt must not be an empty list")
        return value


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str


class ChatRequest(_Sampling):
    messages: list[ChatMessage]

    @field_validator("messages")
    @classmethod
    def _messages(cls, value: list[ChatMessage]) -> list[ChatMessage]:
        if not value:
            raise ValueError("messages must not be empty")
        return value
