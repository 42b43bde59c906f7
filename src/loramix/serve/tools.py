"""Tool calls on /v1/chat/completions: what the model is shown, what it may write, and how that becomes
`message.tool_calls` (as vLLM serves models that have no tool-call parser).

    tool_choice "none"                  the tools are shown to the model; the answer is plain text
    tool_choice {"type": "function",    the answer is constrained to the function's arguments (a JSON object valid
     "function": {"name": F}}           against its `parameters`); returned as one call of F
    tool_choice "required"              the answer is constrained to a JSON array of calls,
                                        [{"name": F, "parameters": {...}}, ...] (one at most with
                                        parallel_tool_calls=false), each valid against its function; returned as calls
    tool_choice "auto" (the default     the model writes text or calls in its own format (serve/toolparsers.py: the
     when tools are given)              parser of the chat template's format, or the server's --tool-call-parser);
                                        the calls are read out of the answer. With `"strict": true` on a tool, a lazy
                                        grammar makes every call parse and validate once the trigger is written; the
                                        text before it stays free

Definitions (`$defs`, `definitions`) and `$ref`s work in every mode: when the tools are combined into one schema,
each tool's parameters move under `$defs/f<i>` of the combined schema, and their local `$ref`s are rewritten to point
there (`ToolPlan.call_schema`).

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
from .toolparsers import DEFAULT_PARSER, PARSERS, ToolParser, parse_calls, parser_for_template, strict_grammar

__all__ = [
    "DEFAULT_HOW",
    "DEFAULT_TOOL_PROMPT",
    "ToolError",
    "ToolPlan",
    "call_id",
    "chat_messages",
    "check_parser",
    "plan_tools",
    "tool_calls",
]

DEFAULT_TOOL_PROMPT = "Functions you can call (JSON schemas of their arguments):\n{tools}\n{how}"
DEFAULT_HOW = {
    "required": 'Call functions: answer with JSON only, a list of calls [{{"name": <function name>, "parameters": '
    "<arguments object>}}].",
    "named": "Call {name}: answer with its arguments as one JSON object.",
    "none": "Answer in text: do not call a function now.",
    "auto": "{instruction}",
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
    """What a request's tools ask for: `choice` "none", "auto", "required" or "named" (the function `name`), the
    tools as OpenAI sent them, whether calls may come several at once, and for "auto" the `parser` of the model's
    call format and whether calls are `strict` (a lazy grammar)."""

    choice: str
    tools: list[dict[str, Any]]
    name: str | None = None
    parallel: bool = True
    parser: ToolParser | None = None
    strict: bool = False

    @property
    def constrained(self) -> bool:
        """Whether a grammar constrains the answer."""
        return self.choice in ("required", "named") or (self.choice == "auto" and self.strict)

    @property
    def names(self) -> set[str]:
        return {t["function"]["name"] for t in self.tools}

    def parameters(self, name: str) -> dict[str, Any]:
        spec = next(t["function"] for t in self.tools if t["function"]["name"] == name)
        return spec.get("parameters") or {"type": "object"}

    def call_schema(self, arguments: str = "parameters") -> dict[str, Any]:
        """The JSON schema of one call object, {"name": F, <arguments>: {...}}, any of the tools; each tool's
        parameters live under `$defs/f<i>` with their `$ref`s rewritten to point there (module docstring)."""
        defs, calls = {}, []
        for i, tool in enumerate(self.tools):
            name = tool["function"]["name"]
            defs[f"f{i}"] = _relocate(self.parameters(name), f"#/$defs/f{i}")
            calls.append(
                {
                    "type": "object",
                    "properties": {"name": {"const": name}, arguments: {"$ref": f"#/$defs/f{i}"}},
                    "required": ["name", arguments],
                    "additionalProperties": False,
                }
            )
        return {"anyOf": calls, "$defs": defs}

    def schema(self) -> dict[str, Any]:
        """The JSON schema a "named" or "required" answer must satisfy (module docstring)."""
        if self.choice == "named":
            return self.parameters(self.name)  # type: ignore[arg-type]
        call = self.call_schema()
        array: dict[str, Any] = {
            "type": "array",
            "items": {"anyOf": call["anyOf"]},
            "minItems": 1,
            "$defs": call["$defs"],
        }
        if not self.parallel:
            array["maxItems"] = 1
        return array

    def lazy_grammar(self, special: Any) -> str:
        """The strict "auto" grammar (`toolparsers.strict_grammar`); `special(text)`: the id of the special token
        that writes `text`, or None."""
        assert self.parser is not None
        return strict_grammar(self.parser, self.call_schema(self.parser.arguments), self.parallel, special)


def _relocate(schema: Any, base: str) -> Any:
    """A copy of `schema` whose local `$ref`s ("#", "#/...") point into `base` (where it will live); `$schema`
    and `$id` dropped (they belong at a document's top)."""
    if isinstance(schema, list):
        return [_relocate(item, base) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {}
    for key, value in schema.items():
        if key in ("$schema", "$id"):
            continue
        if key == "$ref" and isinstance(value, str) and value.startswith("#"):
            out[key] = base + value[1:]
        else:
            out[key] = _relocate(value, base)
    return out


def check_parser(name: str | None) -> str | None:
    """A --tool-call-parser name, checked (ToolError naming the known ones)."""
    if name is not None and name not in PARSERS:
        raise ToolError("tool_call_parser", f"unknown tool-call parser {name!r}; known: {', '.join(PARSERS)}")
    return name


def plan_tools(body: ChatRequest, tokenizer: Any = None, parser: str | None = None) -> ToolPlan | None:
    """The request's `ToolPlan`, None without tools; raises `ToolError` naming the field. Under "auto", the parser
    is `parser` (the server's --tool-call-parser) or the one of the chat template's format (the default prompt's,
    `toolparsers.DEFAULT_PARSER`, for a template that does not read tools)."""
    choice = body.tool_choice
    if not body.tools:
        if choice not in (None, "none"):
            raise ToolError("tool_choice", "tool_choice needs tools: the request has none")
        return None
    tools = [tool.model_dump(exclude_none=True) for tool in body.tools]
    names = [t["function"]["name"] for t in tools]
    if len(set(names)) != len(names):
        twice = sorted({n for n in names if names.count(n) > 1})
        raise ToolError("tools", f"two tools have the same function name: {', '.join(twice)}")
    try:
        json.dumps(tools)
        _relocate([t["function"].get("parameters") for t in tools], "#")
    except (RecursionError, ValueError):
        raise ToolError("tools", "a tool's parameters are nested too deeply") from None
    parallel = body.parallel_tool_calls is not False
    if choice is None or choice == "auto":
        return _auto(tools, parallel, tokenizer, parser)
    if isinstance(choice, NamedToolChoice):
        if choice.function.name not in names:
            raise ToolError(
                "tool_choice", f"tool_choice names the function {choice.function.name!r}, which is not in tools {names}"
            )
        return ToolPlan("named", tools, choice.function.name, parallel)
    return ToolPlan(choice, tools, None, parallel)


def _auto(tools: list[dict[str, Any]], parallel: bool, tokenizer: Any, parser: str | None) -> ToolPlan:
    name = check_parser(parser)
    if name is None:
        if template_reads_tools(tokenizer):
            name = parser_for_template(getattr(tokenizer, "chat_template", None))
            if name is None:
                raise ToolError(
                    "tool_choice",
                    "tool_choice 'auto' (the default when tools are given): this model's chat template writes tool "
                    "calls in a format no parser here reads; start the server with --tool-call-parser NAME (one of "
                    f'{", ".join(PARSERS)}), or set tool_choice to "required" or to a named function',
                )
        else:
            name = DEFAULT_PARSER
    if name == "pythonic":  # the calls are Python: a name with "-" cannot be written as one
        unwritable = [t["function"]["name"] for t in tools if not t["function"]["name"].isidentifier()]
        if unwritable:
            raise ToolError(
                "tools",
                f"the pythonic tool-call format writes calls as Python, where {unwritable[0]!r} is not a name: use "
                "letters, digits and underscores",
            )
    strict = any(t["function"].get("strict") for t in tools)
    if strict and name == "pythonic":
        raise ToolError(
            "tools",
            "strict tool calls are not available with the pythonic tool-call format (its arguments are Python "
            'literals): leave "strict" unset, or set tool_choice to "required" or to a named function',
        )
    return ToolPlan("auto", tools, None, parallel, PARSERS[name], strict)


def call_id() -> str:
    """A new tool call id, as OpenAI writes them."""
    return f"call_{secrets.token_hex(12)}"


def tool_calls(plan: ToolPlan, text: str) -> list[dict[str, Any]]:
    """The answer of a "named" or "required" request (complete, valid JSON) as OpenAI's `message.tool_calls`."""
    if plan.choice == "named":
        calls = [(plan.name, text)]
    else:
        calls = [(call["name"], json.dumps(call["parameters"])) for call in json.loads(text)]
    return [entry(n, a) for n, a in calls]


def entry(name: str, arguments: str) -> dict[str, Any]:
    """One `tool_calls` entry, with a new id."""
    return {"id": call_id(), "type": "function", "function": {"name": name, "arguments": arguments}}


def auto_message(plan: ToolPlan, text: str) -> tuple[str | None, list[dict[str, Any]]]:
    """An "auto" answer -> (content, tool_calls) (serve/toolparsers.py: `parse_calls`)."""
    assert plan.parser is not None
    content, calls = parse_calls(plan.parser, plan.names, text, incremental=plan.strict)
    return content, [entry(n, a) for n, a in calls]


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
    for i, m in enumerate(messages):
        message: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role, "content": m.text}
        if m.tool_calls:
            where = f"messages.{i}.tool_calls"
            arguments = [_arguments(c, f"{where}.{j}.function.arguments") for j, c in enumerate(m.tool_calls)]
            if templated_tools:
                message["tool_calls"] = [
                    {"id": c.id, "type": "function", "function": {"name": c.function.name, "arguments": a}}
                    for c, a in zip(m.tool_calls, arguments)
                ]
            else:
                calls = [{"name": c.function.name, "parameters": a} for c, a in zip(m.tool_calls, arguments)]
                message["content"] = (message["content"] + "\n" if message["content"] else "") + json.dumps(calls)
        if m.role == "tool":
            if m.tool_call_id is not None:
                message["tool_call_id"] = m.tool_call_id
            if m.name is not None:
                message["name"] = m.name
        out.append(message)
    if plan is not None and not templated_tools:
        instruction = plan.parser.instruction if plan.parser is not None else ""
        how = DEFAULT_HOW[plan.choice].format(name=plan.name, instruction=instruction)
        shown = [{k: v for k, v in t["function"].items() if k != "strict"} for t in plan.tools]
        listing = DEFAULT_TOOL_PROMPT.format(tools=json.dumps(shown), how=how)
        if out and out[0]["role"] == "system":
            out[0] = {**out[0], "content": f"{out[0]['content']}\n\n{listing}"}
        else:
            out.insert(0, {"role": "system", "content": listing})
    return out


def _arguments(call: Any, param: str) -> Any:
    """A call's arguments as a dict (transformers' templates expect one); text that is not JSON stays text. JSON
    nested too deeply to read is a `ToolError` naming the message (`param`)."""
    try:
        return json.loads(call.function.arguments)
    except json.JSONDecodeError:
        return call.function.arguments
    except RecursionError:
        raise ToolError(param, "the arguments are nested too deeply to read") from None
