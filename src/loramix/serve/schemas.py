"""Request bodies of the OpenAI-compatible API (pydantic), with loramix's extension field."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator

# torch.Generator.manual_seed's range
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1


def _valid_text(value: str) -> str:
    """Refuse strings that are not valid Unicode text (a lone UTF-16 surrogate such as \\ud800 cannot be tokenized)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(
            f"holds the lone surrogate U+{ord(value[exc.start]):04X} at character {exc.start}; send valid Unicode text"
        ) from None
    return value


Text = Annotated[str, AfterValidator(_valid_text)]
"""A string that is valid Unicode (encodable as UTF-8)."""
Count = Annotated[int, Field(strict=True)]
"""An integer given as a JSON integer: "10", 10.5 and true are refused, not coerced."""
Real = Annotated[float, Field(allow_inf_nan=False)]
"""A finite number."""


class LoramixOptions(BaseModel):
    """The `loramix` extension field (OpenAI clients: `extra_body={"loramix": {...}}`)."""

    model_config = ConfigDict(extra="forbid")

    mode: Literal["granular", "prompt", "truncated"] = "granular"
    """Speed mode of generation (docs/generation.md)."""
    return_scalings: Literal["none", "token", "layer", "expert"] = "none"
    """Scalings in the response: per generated token [n][L][N], per layer [L][N] (mean over the generated tokens), or
    per expert [N] (mean over tokens and layers)."""
    top_k: Count = Field(0, ge=0)
    repetition_penalty: Real = Field(1.0, gt=0)


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: Count | None = Field(None, ge=0)
    max_completion_tokens: Count | None = Field(None, ge=0)
    temperature: Real = Field(1.0, ge=0, le=2)
    top_p: Real = Field(1.0, gt=0, le=1)
    n: Count = Field(1, ge=1, le=1, description="only n=1 is supported")
    stream: bool = Field(False, strict=True)
    stop: str | list[str] | None = None
    seed: Count | None = Field(None, ge=SEED_MIN, le=SEED_MAX)
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
        return [_valid_text(s) for s in stops]


class CompletionRequest(_Sampling):
    prompt: str | list[str]
    echo: bool = Field(False, strict=True)

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list) and not value:
            raise ValueError("prompt must not be an empty list")
        for text in [value] if isinstance(value, str) else value:
            _valid_text(text)
        return value


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: Text


class ChatRequest(_Sampling):
    messages: list[ChatMessage]

    @field_validator("messages")
    @classmethod
    def _messages(cls, value: list[ChatMessage]) -> list[ChatMessage]:
        if not value:
            raise ValueError("messages must not be empty")
        return value
