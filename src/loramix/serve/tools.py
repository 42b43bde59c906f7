"""Tool calls on /v1/chat/completions: what the model is shown, what it may write, and how that becomes
`message.tool_calls` (as vLLM serves models that have no tool-call parser).

    tool_choice "none"                  the tools are shown to the model; the answer is plain text
    tool_choice {"type": "function",    the answer is constrained to the function's arguments (a JSON object valid
     "function": {"name": F}}           against its `parameters`); returned as one call of F
    tool_choice "required"              the answer is constrained to a JSON array of calls,
                                        [{"name": F, "parameters": {...}}, ...] (one at most with
                                        parallel_tool_calls=false), each valid against its function; returned as calls
    tool_choice "auto" (the default     refused (400): choosing between text and a call needs a parser for the model's
     when tools are given)              own call format, which loramix does not have (vLLM refuses it too, unless
                                        started with a parser)

The tools reach the prompt through the tokenizer's chat template (`apply_chat_template(tools=...)`) when the
template reads them; otherwise through `DEFAULT_TOOL_PROMPT`, a system message listing them as JSON. An assistant
message's earlier `tool_calls` and the `tool` messages with their results are passed to the template as transformers
expects them (arguments as a dict); a template that does not read tools sees the calls as the JSON the model wrote,
and each result as a `tool` message (the plain fallback renders it "tool: ...").
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass
from typing import Any

from .schemas import ChatMessage, ChatRequest, NamedToolChoice

__all__ = ["DEFAULT_HOW", "DEFAULT_TOOL_PROMPT", "ToolPlan", "call_id", "chat_messages", "plan_tools", "tool_calls"]

DEFAULT_TOOL_PROMPT = "Functions you can call (JSON schemas of their arguments):\n{tools}\n{how}"
DEFAULT_HOW = {
    "required": 'Call functions: answer with JSON only, a list of calls [{{"name": <function name>, "parameters": '
    "<arguments object>}}].",
    "named": "Call {name}: answer with its arguments as one JSON object.",
    "none": "Answer in text: do not call a function now.",
}
"""The system message that shows the tools to a model whose chat template does not read them, and how to answer
(`DEFAULT_HOW`, by tool_choice)."""


class ToolError(ValueError):
    """A request's tools or tool_choice that cannot be served: (param, message)."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass
class ToolPlan:
    """What a request's tools ask for: `choice` "none", "required" or "named" (the function `name`), the tools as
    OpenAI sent them, and whether calls may come several at once."""

    choice: str
    tools: list[dict[str, Any]]
    name: str | None = None
    parallel: bool = True

    @property
    def constrained(self) -> bool:
        return self.choice != "none"

    def parameters(self, name: str) -> dict[str, Any]:
        spec = next(t["function"] for t in self.tools if t["function"]["name"] == name)
        return spec.get("parameters") or {"type": "object"}

    def schema(self) -> dict[str, Any]:
        """The JSON schema the answer must satisfy (module docstring)."""
        if self.choice == "named":
            return self.parameters(self.name)  # type: ignore[arg-type]
        calls = [
            {
                "type": "object",
                "properties": {
                    "name": {"const": t["function"]["name"]},
                    "parameters": self.parameters(t["function"]["name"]),
                },
                "required": ["name", "parameters"],
                "additionalProperties": False,
            }
            for t in self.tools
        ]
        array: dict[str, Any] = {"type": "array", "items": {"anyOf": calls}, "minItems": 1}
        if not self.parallel:
            array["maxItems"] = 1
        return array


def plan_tools(body: ChatRequest) -> ToolPlan | None:
    """The request's `ToolPlan`, None without tools; raises `ToolError` naming the field."""
    choice = body.tool_choice
    if not body.tools:
        if choice not in (None, "none"):
            raise ToolError("tool_choice", "tool_choice needs tools: the request has none")
        return None
    tools = [tool.model_dump(exclude_none=True) for tool in body.tools]
    names = [t["function"]["name"] for t in tools]
    if len(set(names)) != len(names):
        raise ToolError("tools", "two tools have the same function name")
    parallel = body.parallel_tool_calls is not False
    if choice is None or choice == "auto":
        raise ToolError(
            "tool_choice",
            "tool_choice 'auto' (the default when tools are given) is not supported: choosing between text and a call "
            "needs a parser for this model's own call format, which loramix does not have; set tool_choice to "
            '"required", to {"type": "function", "function": {"name": ...}}, or to "none"',
        )
    if isinstance(choice, NamedToolChoice):
        if choice.function.name not in names:
            raise ToolError(
                "tool_choice", f"tool_choice names the function {choice.function.name!r}, which is not in tools {names}"
            )
        return ToolPlan("named", tools, choice.function.name, parallel)
    return ToolPlan(choice, tools, None, parallel)


def call_id() -> str:
    """A new tool call id, as OpenAI writes them."""
    return f"call_{secrets.token_hex(12)}"


def tool_calls(plan: ToolPlan, text: str) -> list[dict[str, Any]]:
    """The answer of a constrained request (complete, valid JSON) as OpenAI's `message.tool_calls`."""
    if plan.choice == "named":
        calls = [(plan.name, text)]
    else:
        calls = [(call["name"], json.dumps(call["parameters"])) for call in json.loads(text)]
    return [{"id": call_id(), "type": "function", "function": {"name": n, "arguments": a}} for n, a in calls]


def template_reads_tools(tokenizer: Any) -> bool:
    """Whether the tokenizer's chat template renders `tools` (a template that does not ignores them silently)."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = " ".join(template.values())
    return bool(template) and "tools" in template


def chat_messages(messages: list[ChatMessage], plan: ToolPlan | None, templated_tools: bool) -> list[dict[str, Any]]:
    """The request's messages as chat-template dicts (module docstring); with tools and a template that does not
    read them, `DEFAULT_TOOL_PROMPT` comes first (or joins the first system message)."""
    out: list[dict[str, Any]] = []
    for m in messages:
        message: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role, "content": m.text}
        if m.tool_calls:
            if templated_tools:
                message["tool_calls"] = [
                    {"id": c.id, "type": "function", "function": {"name": c.function.name, "arguments": _arguments(c)}}
                    for c in m.tool_calls
                ]
            else:
                calls = [{"name": c.function.name, "parameters": _arguments(c)} for c in m.tool_calls]
                message["content"] = (message["content"] + "\n" if message["content"] else "") + json.dumps(calls)
        if m.role == "tool":
            if m.tool_call_id is not None:
                message["tool_call_id"] = m.tool_call_id
            if m.name is not None:
                message["name"] = m.name
        out.append(message)
    if plan is not None and not templated_tools:
        how = DEFAULT_HOW[plan.choice].format(name=plan.name)
        listing = DEFAULT_TOOL_PROMPT.format(tools=json.dumps([t["function"] for t in plan.tools]), how=how)
        if out and out[0]["role"] == "system":
            out[0] = {**out[0], "content": f"{out[0]['content']}\n\n{listing}"}
        else:
            out.insert(0, {"role": "system", "content": listing})
    return out


def _arguments(call: Any) -> Any:
    """A call's arguments as a dict (transformers' templates expect one); text that is not JSON stays text."""
    try:
        return json.loads(call.function.arguments)
    except json.JSONDecodeError:
        return call.function.arguments
