"""Request bodies of the OpenAI-compatible API (pydantic), with loramix's extension field."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

from ..decode import MODES
from ..request import MAX_STOPS, check_stops
from ..sampling import REPETITION_PENALTY_RANGE
from ..settings import SEED_MAX, SEED_MIN  # torch.Generator.manual_seed's range, the CLI's too


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
TokenIds = list[Annotated[int, Field(strict=True, ge=0)]]
"""A prompt given as token ids."""
MAX_CHOICES = 16
"""The most choices one request may ask for (prompts x n)."""
TOKEN_ID_KEY = re.compile(r"0|[1-9][0-9]{0,17}")
"""A logit_bias key: a token id as canonical ASCII digits ("3"; not "03", "٣" or "²"), at most 18 of them (any id
beyond fits no vocabulary; the vocabulary size is checked when the request is served)."""


class LoramixOptions(BaseModel):
    """The `loramix` extension field (OpenAI clients: `extra_body={"loramix": {...}}`)."""

    model_config = ConfigDict(extra="forbid")

    mode: Literal[MODES] = "granular"  # type: ignore[valid-type]  (decode.MODES, the one list)
    """Speed mode of generation (docs/generation.md)."""
    return_scalings: Literal["none", "token", "layer", "expert"] = "none"
    """Scalings in the response: per generated token [n][L][N], per layer [L][N] (mean over the generated tokens), or
    per expert [N] (mean over tokens and layers)."""
    top_k: Count = Field(0, ge=0)
    repetition_penalty: Real = Field(1.0, ge=REPETITION_PENALTY_RANGE[0], le=REPETITION_PENALTY_RANGE[1])
    """transformers' repetition penalty (> 1 discourages repeats), in `sampling.REPETITION_PENALTY_RANGE`."""


NAME = r"^[a-zA-Z0-9_-]{1,64}$"
"""OpenAI's rule for function and schema names."""


class JsonSchemaFormat(BaseModel):
    """`response_format.json_schema`: the schema the answer must satisfy (every answer does, strict or not)."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    name: str = Field(pattern=NAME)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema(self) -> ResponseFormat:
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError('json_schema is required with type "json_schema", and only with it')
        return self


class FunctionSpec(BaseModel):
    model_config = ConfigDict(extra="ignore")

    name: str = Field(pattern=NAME)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None

    @field_validator("parameters")
    @classmethod
    def _object(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None and value.get("type", "object") != "object":
            raise ValueError(f'must be a JSON schema of type "object" (the arguments); got type {value["type"]!r}')
        return value


class Tool(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["function"]
    function: FunctionSpec


class FunctionName(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["function"]
    function: FunctionName


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: bool = Field(False, strict=True)


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: Text
    max_tokens: Count | None = Field(None, ge=0)
    max_completion_tokens: Count | None = Field(None, ge=0)
    temperature: Real = Field(1.0, ge=0, le=2)
    top_p: Real = Field(1.0, gt=0, le=1)
    n: Count = Field(1, ge=1, le=MAX_CHOICES)
    stream: bool = Field(False, strict=True)
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    include_stop_str_in_output: bool = Field(False, strict=True)
    """vLLM's extension: keep the stop string that ended the answer in its text (default: cut, as OpenAI)."""
    ignore_eos: bool = Field(False, strict=True)
    """vLLM's extension: the end-of-sequence token does not end the answer (it runs to max_tokens or a stop)."""
    seed: Count | None = Field(None, ge=SEED_MIN, le=SEED_MAX)
    presence_penalty: Real = Field(0.0, ge=-2, le=2)
    frequency_penalty: Real = Field(0.0, ge=-2, le=2)
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100, allow_inf_nan=False)]] | None = None
    user: str | None = None
    loramix: LoramixOptions = Field(default_factory=LoramixOptions)
    response_format: ResponseFormat | None = None
    # fields this server cannot honour: declared so that they are refused (`unsupported`), never silently ignored
    functions: Any = None
    function_call: Any = None
    audio: Any = None
    modalities: Any = None
    prediction: Any = None
    web_search_options: Any = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: str | list[str] | None) -> list[str] | None:
        if value is None:
            return None
        return [_valid_text(s) for s in check_stops(value, "stop", MAX_STOPS)]

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        for key in value or {}:
            if not TOKEN_ID_KEY.fullmatch(key):
                shown = repr(key) if len(key) <= 24 else f"{key[:12]!r}... ({len(key)} characters)"
                raise ValueError(
                    f'keys must be token ids written as ASCII digits without leading zeros, at most 18 (e.g. "42"); '
                    f"got {shown}"
                )
        return value

    def unsupported(self) -> tuple[str, str] | None:
        """(field, reason) for the first field set to something this server cannot do, else None."""
        refused = {
            "functions": "the legacy functions field is not supported: use tools",
            "function_call": "the legacy function_call field is not supported: use tool_choice",
            "audio": "audio output is not supported",
            "prediction": "predicted outputs are not supported",
            "web_search_options": "web search is not supported",
        }
        for name, reason in refused.items():
            if getattr(self, name) not in (None, [], {}):
                return name, reason
        if self.modalities not in (None, ["text"]):
            return "modalities", 'only ["text"] is supported'
        return None


class CompletionRequest(_Sampling):
    prompt: str | list[Text] | TokenIds | list[TokenIds]
    echo: bool = Field(False, strict=True)
    logprobs: Count | None = Field(None, ge=0, le=5)
    best_of: Count | None = Field(None, ge=1)
    suffix: str | None = None
    tools: Any = None  # a chat field: refused here
    tool_choice: Any = None

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, value: Any) -> Any:
        if isinstance(value, list) and not value:
            raise ValueError("prompt must not be an empty list")
        if isinstance(value, str):
            _valid_text(value)
        return value

    @property
    def prompts(self) -> list[str | list[int]]:
        """Each prompt of the request (text or token ids): one choice each (n choices with n > 1)."""
        p = self.prompt
        if isinstance(p, str) or isinstance(p[0], int):
            return [p]
        return list(p)

    def unsupported(self) -> tuple[str, str] | None:
        if self.best_of is not None and self.best_of > 1:
            return "best_of", "only best_of=1 is supported"
        if self.suffix:
            return "suffix", "insertion (suffix) is not supported"
        for name in ("tools", "tool_choice"):
            if getattr(self, name) is not None:
                return name, "tools are a field of /v1/chat/completions"
        return super().unsupported()


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: str
    text: Text | None = None

    @model_validator(mode="after")
    def _text_only(self) -> ContentPart:
        if self.type != "text" or self.text is None:
            raise ValueError(f"only text content parts are supported (type 'text' with 'text'); got type {self.type!r}")
        return self


class CalledFunction(BaseModel):
    model_config = ConfigDict(extra="ignore")

    name: str
    arguments: str
    """The arguments as a JSON text (as the API returns them)."""


class ToolCall(BaseModel):
    model_config = ConfigDict(extra="ignore")

    id: str
    type: Literal["function"] = "function"
    function: CalledFunction


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: Text | list[ContentPart] | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    name: str | None = None

    @model_validator(mode="after")
    def _content(self) -> ChatMessage:
        if self.tool_calls and self.role != "assistant":
            raise ValueError(f"only an assistant message has tool_calls, not one of role {self.role!r}")
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a tool message needs tool_call_id: the id of the call whose result it carries")
        if self.content is None and not (self.role == "assistant"):
            raise ValueError(f"content may be null only for an assistant message, not for role {self.role!r}")
        return self

    @property
    def text(self) -> str:
        """The content as one string (text parts joined as they are; null is empty)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text or "" for part in self.content)


class ChatRequest(_Sampling):
    messages: list[ChatMessage]
    logprobs: bool | None = Field(None, strict=True)
    top_logprobs: Count | None = Field(None, ge=0, le=20)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = Field(None, strict=True)

    @field_validator("messages")
    @classmethod
    def _messages(cls, value: list[ChatMessage]) -> list[ChatMessage]:
        if not value:
            raise ValueError("messages must not be empty")
        return value

    def unsupported(self) -> tuple[str, str] | None:
        if self.top_logprobs is not None and not self.logprobs:
            return "top_logprobs", "top_logprobs needs logprobs: true"
        return super().unsupported()
