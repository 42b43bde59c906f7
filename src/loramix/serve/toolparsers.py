"""The models' own tool-call formats, for tool_choice "auto": read calls out of the answer's text (streamed or
whole), and write the lazy grammar that makes every call valid in strict mode. Named as vLLM names its parsers.

    hermes        text, then <tool_call>{"name": F, "arguments": {...}}</tool_call> (one per block; Qwen2.5/3,
                  Hermes), or a JSON list of such calls inside one block (SmolLM2's form)
    llama3_json   the whole answer is {"name": F, "parameters": {...}} (several joined by "; "), optionally after
                  <|python_tag|> (Llama 3.1/3.2 JSON tool calling)
    mistral       text, then [TOOL_CALLS] and a JSON list of {"name": F, "arguments": {...}}
    pythonic      the whole answer is a Python list of calls, [f(a=1, b="x"), g()] (Llama 3.2 pythonic, Llama 4)

`CallReader` reads an answer piece by piece: text before the trigger is content (held back only while it could
still be the start of the trigger), each call comes out once its block is complete, and a block that does not parse,
or names a function that is not among the tools, comes out as content: it is never returned as a call. Reading the
whole text at once is the same reader fed one piece, so streamed and whole answers agree.
"""

from __future__ import annotations

import ast
import json
import re
from dataclasses import dataclass
from typing import Any

__all__ = ["PARSERS", "CallReader", "Parsed", "ToolParser", "parse_calls", "parser_for_template"]

Call = tuple[str, str]
"""(function name, arguments as a JSON text)."""


class NotACall(ValueError):
    """A block after the trigger that is not a call of a known tool."""


@dataclass(frozen=True)
class ToolParser:
    """A tool-call format: `triggers` open the calls (anywhere in the answer, or only at its start when
    `at_start`; `keep_trigger`: the trigger is the first character of the calls' own text), `end` closes one block
    (None: the calls run to the end of the answer), `arguments` is the key the arguments object is written under,
    `listed` whether a block holds a JSON list of calls, `instruction` how the default tool prompt asks for a call."""

    name: str
    triggers: tuple[str, ...]
    end: str | None
    arguments: str
    listed: bool
    instruction: str
    at_start: bool = False
    keep_trigger: bool = False

    def calls(self, block: str, names: set[str]) -> list[Call]:
        """The calls written in one block (the text between the trigger and the end); raises `NotACall`."""
        if self.name == "pythonic":
            return _pythonic(block, names)
        text = block.strip()
        if self.name == "llama3_json":
            items: list[Any] = [_json(part) for part in _split_objects(text.removeprefix("<|python_tag|>").strip())]
        elif self.name == "mistral" and not text.startswith(("[", "{")):  # the newer name[ARGS]{...} form
            items = [_mistral_named(part) for part in text.split("[TOOL_CALLS]")]
        else:
            value = _json(text)
            items = value if isinstance(value, list) else [value]
        if not items:
            raise NotACall("an empty list of calls")
        return [_call(item, names) for item in items]


def _json(text: str) -> Any:
    try:
        return json.loads(text)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise NotACall(f"not JSON: {exc}") from None


def _call(item: Any, names: set[str]) -> Call:
    if not isinstance(item, dict) or not isinstance(item.get("name"), str):
        raise NotACall("a call is an object with a name")
    arguments = item.get("arguments", item.get("parameters", {}))
    if isinstance(arguments, str):  # some models write the arguments as a JSON text
        arguments = _json(arguments)
    if not isinstance(arguments, dict):
        raise NotACall("a call's arguments are an object")
    if item["name"] not in names:
        raise NotACall(f"no tool is named {item['name']!r}")
    return item["name"], json.dumps(arguments, ensure_ascii=False)


def _mistral_named(part: str) -> dict[str, Any]:
    name, marker, arguments = part.partition("[ARGS]")
    if not marker:
        raise NotACall("not name[ARGS]{...}")
    return {"name": name.strip(), "arguments": _json(arguments)}


def _split_objects(text: str) -> list[str]:
    """`{...}; {...}` -> each object's text (llama3_json's parallel calls)."""
    decoder, out, at = json.JSONDecoder(), [], 0
    while at < len(text):
        try:
            _, end = decoder.raw_decode(text, at)
        except (json.JSONDecodeError, RecursionError):
            raise NotACall("not a JSON object") from None
        out.append(text[at:end])
        at = end
        while at < len(text) and text[at] in " \n\t;":
            at += 1
    return out


def _pythonic(block: str, names: set[str]) -> list[Call]:
    text = block.strip().removeprefix("<|python_start|>").removesuffix("<|python_end|>").strip()
    try:
        tree = ast.parse(text, mode="eval").body
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        raise NotACall("not a Python list of calls") from None
    if not isinstance(tree, ast.List) or not tree.elts:
        raise NotACall("not a Python list of calls")
    calls = []
    for node in tree.elts:
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name) or node.args:
            raise NotACall("each item is a call f(name=value, ...)")
        if node.func.id not in names:
            raise NotACall(f"no tool is named {node.func.id!r}")
        try:
            arguments = {k.arg: ast.literal_eval(k.value) for k in node.keywords if k.arg is not None}
            calls.append((node.func.id, json.dumps(arguments, ensure_ascii=False)))
        except (ValueError, TypeError, SyntaxError, RecursionError):
            raise NotACall("arguments are Python literals") from None
    return calls


_HERMES_HOW = (
    'To call functions, write <tool_call>{"name": <function name>, "arguments": <arguments object>}</tool_call> '
    "(one block per call); otherwise answer in text."
)
_LIST_HOW = (
    'To call functions, write <tool_call>[{"name": <function name>, "arguments": <arguments object>}]</tool_call> '
    "(a list of calls); otherwise answer in text."
)
PARSERS: dict[str, ToolParser] = {
    "hermes": ToolParser("hermes", ("<tool_call>",), "</tool_call>", "arguments", False, _HERMES_HOW),
    "hermes_list": ToolParser("hermes_list", ("<tool_call>",), "</tool_call>", "arguments", True, _LIST_HOW),
    "llama3_json": ToolParser(
        "llama3_json",
        ("<|python_tag|>", "{"),
        None,
        "parameters",
        False,
        'To call a function, answer with JSON only: {"name": <function name>, "parameters": <arguments object>}; '
        "otherwise answer in text.",
        at_start=True,
        keep_trigger=True,
    ),
    "mistral": ToolParser(
        "mistral",
        ("[TOOL_CALLS]",),
        None,
        "arguments",
        True,
        'To call functions, write [TOOL_CALLS][{"name": <function name>, "arguments": <arguments object>}]; '
        "otherwise answer in text.",
    ),
    "pythonic": ToolParser(
        "pythonic",
        ("[",),
        None,
        "arguments",
        True,
        "To call functions, answer with a Python list of calls only: [name(argument=value, ...)]; otherwise answer "
        "in text.",
        at_start=True,
        keep_trigger=True,
    ),
}
"""The parsers by name (`--tool-call-parser NAME`). Every hermes parser reads both the one-object and the list form;
`hermes_list` is the same reader whose strict grammar and default prompt use SmolLM2's list form."""

DEFAULT_PARSER = "hermes_list"
"""The format of the default tool prompt (a chat template that does not read tools)."""


def parser_for_template(template: Any) -> str | None:
    """The parser of the tool-call format a chat template asks for (None: no format loramix reads)."""
    if isinstance(template, dict):
        template = " ".join(str(t) for t in template.values())
    text = str(template or "")
    if "<tool_call>" in text:
        return "hermes_list" if re.search(r"<tool_call>\s*\[", text) else "hermes"
    if "[TOOL_CALLS]" in text:
        return "mistral"
    if "<|python_start|>" in text or re.search(r"\[func_name1\(|\[func_name\(", text):
        return "pythonic"
    if '"parameters": dictionary of argument name' in text or "<|python_tag|>" in text:
        return "llama3_json"
    return None


@dataclass
class Parsed:
    """One event of a reader: `text` (content), a complete `call`, or (incremental reading) the `name` of a call
    that begins, or a piece of its `arguments`."""

    text: str = ""
    call: Call | None = None
    name: str | None = None
    arguments: str = ""

    @property
    def empty(self) -> bool:
        return self.call is None and self.name is None and not self.text and not self.arguments


_HEAD = re.compile(r'\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"(?:arguments|parameters)"\s*:\s*')


class _Scanner:
    """Reads calls written as JSON objects {"name": F, "arguments": {...}} (in a list or not) character by character,
    giving each call's name as soon as it is written and its arguments piece by piece. Only for text a strict
    grammar wrote: the name comes first, and every object is complete and valid."""

    def __init__(self) -> None:
        self.phase = "item"  # item (between calls), head (before the arguments), args, tail (after them)
        self.head = ""
        self.depth, self.string, self.escape = 0, False, False

    def read(self, text: str) -> list[Parsed]:
        out: list[Parsed] = []
        piece: list[str] = []
        for char in text:
            if self.phase == "item":
                if char == "{":
                    self.phase, self.head = "head", char
            elif self.phase == "head":
                self.head += char
                match = _HEAD.fullmatch(self.head[:-1]) if char == "{" else None
                if match is not None:
                    out.append(Parsed(name=json.loads(f'"{match.group(1)}"')))
                    self.phase, self.depth, self.string, self.escape = "args", 1, False, False
                    piece = ["{"]
            elif self.phase == "args":
                piece.append(char)
                if self.string:
                    if self.escape:
                        self.escape = False
                    elif char == "\\":
                        self.escape = True
                    elif char == '"':
                        self.string = False
                elif char == '"':
                    self.string = True
                elif char in "{[":
                    self.depth += 1
                elif char in "}]":
                    self.depth -= 1
                    if self.depth == 0:
                        out.append(Parsed(arguments="".join(piece)))
                        piece, self.phase = [], "tail"
            elif char == "}":  # tail: the call object closes
                self.phase = "item"
        if piece:
            out.append(Parsed(arguments="".join(piece)))
        return out


class CallReader:
    """Reads one answer's content and calls, piece by piece (module docstring). `incremental` (strict mode, whose
    grammar makes every call valid): each call's name as soon as it is written, then its arguments piece by piece,
    as the model writes them (`_Scanner`)."""

    def __init__(self, parser: ToolParser, names: set[str], incremental: bool = False) -> None:
        self.parser, self.names = parser, names
        self.incremental = incremental and parser.name != "pythonic"
        self.scanner: _Scanner | None = None
        self.buffer = ""  # text not yet given out
        self.trigger: str | None = None  # the trigger of the block being read (None: reading text)
        self.decided = not parser.at_start  # an at-start format knows after the first visible character
        self.plain = False  # an at-start format whose answer did not open with a trigger: all text

    def feed(self, piece: str) -> list[Parsed]:
        self.buffer += piece
        out: list[Parsed] = []
        while True:
            if self.plain:
                out.append(Parsed(self.buffer))
                self.buffer = ""
                return _merge(out)
            if self.trigger is None:
                if not self._find_trigger(out):
                    return _merge(out)
            elif self.incremental:
                if not self._scan(out):
                    return _merge(out)
            elif self.parser.end is None or self.parser.end not in self.buffer:
                return _merge(out)
            else:
                block, _, self.buffer = self.buffer.partition(self.parser.end)
                out.extend(self._block(block, self.trigger + block + self.parser.end))
                self.trigger = None

    def finish(self) -> list[Parsed]:
        """The rest, once the answer is complete (an unclosed block is read as it is)."""
        out: list[Parsed] = []
        if self.trigger is not None and self.incremental:
            out.extend(self._scanning().read(self.buffer))
        elif self.trigger is not None:
            out.extend(self._block(self.buffer, self.trigger + self.buffer))
        elif self.buffer:
            out.append(Parsed(self.buffer))
        self.buffer, self.trigger = "", None
        return _merge(out)

    def _find_trigger(self, out: list[Parsed]) -> bool:
        """Moves text before a trigger to `out`; True when a block starts (buffer: its text)."""
        triggers = self.parser.triggers
        if not self.decided:
            head = self.buffer.lstrip()
            if not head or any(t.startswith(head) and t != head for t in triggers):
                return False  # only blanks yet, or maybe the start of a trigger
            self.decided = True
            found = next((t for t in triggers if head.startswith(t)), None)
            if found is None:
                self.plain = True
                return True
            self.trigger = "" if self.parser.keep_trigger else found
            self.buffer = head if self.parser.keep_trigger else head[len(found) :]
            return True
        if self.parser.at_start:  # after the calls of an at-start format: the rest is text
            out.append(Parsed(self.buffer))
            self.buffer = ""
            return False
        at = [(self.buffer.find(t), t) for t in triggers if t in self.buffer]
        if at:
            start, found = min(at)
            out.append(Parsed(self.buffer[:start]))
            self.buffer, self.trigger = self.buffer[start + len(found) :], found
            return True
        keep = max((k for t in triggers for k in range(1, len(t)) if self.buffer.endswith(t[:k])), default=0)
        out.append(Parsed(self.buffer[: len(self.buffer) - keep]))
        self.buffer = self.buffer[len(self.buffer) - keep :]
        return False

    def _scanning(self) -> _Scanner:
        if self.scanner is None:
            self.scanner = _Scanner()
        return self.scanner

    def _scan(self, out: list[Parsed]) -> bool:
        """Incremental reading of a block: what cannot be the start of its end marker goes to the scanner; True when
        the block ended (the rest of the buffer is text again)."""
        end = self.parser.end
        if end is not None and end in self.buffer:
            block, _, self.buffer = self.buffer.partition(end)
            out.extend(self._scanning().read(block))
            self.scanner, self.trigger = None, None
            return True
        keep = 0 if end is None else max((k for k in range(1, len(end)) if self.buffer.endswith(end[:k])), default=0)
        out.extend(self._scanning().read(self.buffer[: len(self.buffer) - keep]))
        self.buffer = self.buffer[len(self.buffer) - keep :]
        return False

    def _block(self, block: str, raw: str) -> list[Parsed]:
        try:
            return [Parsed(call=c) for c in self.parser.calls(block, self.names)]
        except NotACall:
            return [Parsed(raw)]


def _merge(events: list[Parsed]) -> list[Parsed]:
    """Adjacent text events joined, empty ones dropped."""
    out: list[Parsed] = []
    for e in events:
        if e.empty:
            continue
        if e.text and out and out[-1].text:
            out[-1] = Parsed(out[-1].text + e.text)
        elif e.arguments and out and out[-1].arguments:
            out[-1] = Parsed(arguments=out[-1].arguments + e.arguments)
        else:
            out.append(e)
    return out


def parse_calls(
    parser: ToolParser, names: set[str], text: str, incremental: bool = False
) -> tuple[str | None, list[Call]]:
    """A whole answer -> (content, calls). With calls, content is the text around them without its trailing blanks
    (None when that leaves nothing); without, the text as it is. `incremental`: as `CallReader` reads strict calls
    (the arguments as the model wrote them)."""
    reader = CallReader(parser, names, incremental)
    calls: list[Call] = []
    content = ""
    for e in reader.feed(text) + reader.finish():
        if e.call is not None:
            calls.append(e.call)
        elif e.name is not None:
            calls.append((e.name, ""))
        elif e.arguments:
            calls[-1] = (calls[-1][0], calls[-1][1] + e.arguments)
        content += e.text
    if not calls:
        return text, []
    return (content.rstrip() or None), calls


JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
"""How calls are written in strict mode: JSON as `json.dumps` writes it (the spacing models are trained on), with no
other whitespace (a small model cannot pad a call with blank lines forever)."""


def strict_grammar(parser: ToolParser, call: dict[str, Any], parallel: bool, special: Any) -> str:
    """The lazy grammar (llguidance's Lark syntax) of an answer in `parser`'s format whose calls follow `call` (the
    JSON schema of one call object, with its arguments under `parser.arguments`): any text until the trigger, then
    calls that parse and validate, then the end (one call at most without `parallel`). `special(text)` is the id of
    the one special token that writes `text` (a trigger the tokenizer writes as a token of its own), or None.
    Raises ValueError for a format that has no strict grammar (pythonic)."""
    if parser.name == "pythonic":
        raise ValueError("strict tool calls are not available in the pythonic format (Python literals, not JSON)")

    def literal(text: str) -> str:
        token = special(text)
        return f"<[{token}]>" if token is not None else json.dumps(text)

    def json_rule(schema: dict[str, Any]) -> str:
        return "%json " + json.dumps({**schema, "x-guidance": JSON_STYLE})

    calls = {"type": "array", "items": call, "minItems": 1, **({} if parallel else {"maxItems": 1})}
    if call.get("$defs"):  # the definitions stay at the top of the document that uses them
        calls["$defs"] = call["$defs"]
        calls["items"] = {k: v for k, v in call.items() if k != "$defs"}
    lines = ["%llguidance {}", "TEXT: /(.|\\n)*/"]
    if parser.name == "llama3_json":
        more = ' ("; " call)*' if parallel else ""
        lines += ["start: FREE | call" + more, "FREE: /([^{\\s](.|\\n)*)?/", "call: " + json_rule(call)]
        return "\n".join(lines) + "\n"
    trigger = parser.triggers[0]
    head = f"head: TEXT {literal(trigger)}" if special(trigger) is not None else f'head[lazy]: TEXT "{trigger}"'
    body = json_rule(calls if parser.listed else call)
    if parser.end is None:  # mistral: the list runs to the end
        lines += ["start: TEXT | head body", head, "body: " + body]
        return "\n".join(lines) + "\n"
    more = f' ("\\n"? {literal(trigger)} block)*' if parallel and not parser.listed else ""
    lines += [
        "start: TEXT | head block" + more,
        head,
        f'block: "\\n"? body "\\n"? {literal(parser.end)}',
        "body: " + body,
    ]
    return "\n".join(lines) + "\n"
