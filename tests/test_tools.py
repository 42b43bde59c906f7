"""Tool calls as agents make them (serve/tools.py, serve/toolparsers.py): the parsers of the models' own formats,
read whole and piece by piece; tool_choice "auto" through the server with the official openai client, strict (a lazy
grammar after the trigger) and not, streamed and not; `$defs` in every mode; the refusals."""

from __future__ import annotations

import json
from typing import Literal

import httpx
import jsonschema
import pytest
from pydantic import BaseModel, ConfigDict, Field

import loramix
from loramix import GateConfig, MixConfig
from loramix.serve import create_app
from loramix.serve.toolparsers import PARSERS, CallReader, parse_calls, parser_for_template
from test_serve import Server

from conftest import char_tokenizer, make_adapter, random_gate, save_model, tiny_llama

VOCAB = 128
NAMES = {"get_weather", "get_time"}


class Address(BaseModel):
    model_config = ConfigDict(extra="forbid")

    city: str = Field(max_length=5)
    zip: int = Field(ge=0, le=99)


class Order(BaseModel):
    """A pydantic model with a nested model: its JSON schema has `$defs` and `$ref`s."""

    model_config = ConfigDict(extra="forbid")

    to: Address
    back: Address | None = None
    items: list[Address] = Field(max_length=2)


ORDER = {"type": "function", "function": {"name": "ship", "parameters": Order.model_json_schema()}}
CLOCK = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"enum": ["UTC", "CET"]}},
            "required": ["zone"],
            "additionalProperties": False,
        },
    },
}
ASK = [{"role": "user", "content": "Ship it"}]


# ---------------------------------------------------------------------- the parsers, on text


def _read(parser, text, cut=3):
    """The reader fed `text` in pieces of `cut` characters: (content, calls)."""
    reader = CallReader(PARSERS[parser], NAMES)
    events = []
    for i in range(0, len(text), cut):
        events += reader.feed(text[i : i + cut])
    events += reader.finish()
    return "".join(e.text for e in events), [e.call for e in events if e.call is not None]


CASES = [
    (
        "hermes",
        'Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
        '<tool_call>{"name": "get_time", "arguments": {"zone": "UTC"}}</tool_call>',
        "Let me look.",
        [("get_weather", '{"city": "Paris"}'), ("get_time", '{"zone": "UTC"}')],
    ),
    (
        "hermes",  # SmolLM2's list form, read by the same parser
        '<tool_call>[{"name": "get_weather", "arguments": {"city": "Paris"}}, {"name": "get_time", "arguments": {}}]'
        "</tool_call>",
        None,
        [("get_weather", '{"city": "Paris"}'), ("get_time", "{}")],
    ),
    (
        "llama3_json",
        '{"name": "get_weather", "parameters": {"city": "Rome"}}; {"name": "get_time", "parameters": {"zone": "CET"}}',
        None,
        [("get_weather", '{"city": "Rome"}'), ("get_time", '{"zone": "CET"}')],
    ),
    ("llama3_json", '<|python_tag|>{"name": "get_time", "parameters": {}}', None, [("get_time", "{}")]),
    (
        "mistral",
        'Sure. [TOOL_CALLS][{"name": "get_time", "arguments": {"zone": "UTC"}}]',
        "Sure.",
        [("get_time", '{"zone": "UTC"}')],
    ),
    ("mistral", '[TOOL_CALLS]get_time[ARGS]{"zone": "UTC"}', None, [("get_time", '{"zone": "UTC"}')]),
    (
        "pythonic",
        "[get_weather(city=\"Oslo\", days=3), get_time(zone='UTC')]",
        None,
        [("get_weather", '{"city": "Oslo", "days": 3}'), ("get_time", '{"zone": "UTC"}')],
    ),
]


@pytest.mark.parametrize("parser, text, content, calls", CASES)
@pytest.mark.parametrize("cut", [1, 4, 1000])
def test_each_parser_reads_text_and_calls_whole_and_in_pieces(parser, text, content, calls, cut):
    assert parse_calls(PARSERS[parser], NAMES, text) == (content, calls)
    streamed_content, streamed_calls = _read(parser, text, cut)
    assert streamed_calls == calls
    assert streamed_content.rstrip() == (content or "")


@pytest.mark.parametrize(
    "parser, text",
    [
        ("hermes", 'Hi <tool_call>{"name": "rm_rf", "arguments": {}}</tool_call>'),  # no such tool
        ("hermes", "Hi <tool_call>{not json</tool_call>"),
        ("hermes", 'Hi <tool_call>{"name": "get_time", "arguments": {"zone": "UTC"'),  # cut
        ("hermes", "<tool_call>" + "[" * 100_000 + "]" * 100_000 + "</tool_call>"),
        ("llama3_json", '{"name": "get_time", "parameters": 3}'),
        ("llama3_json", "The answer is {x}"),
        ("mistral", "[TOOL_CALLS][]"),
        ("pythonic", "[print(open('x').read())]"),
        ("pythonic", "[get_time(zone=__import__('os'))]"),
        ("pythonic", "[1, 2] are numbers"),
    ],
)
def test_what_is_not_a_call_of_a_known_tool_stays_text(parser, text):
    assert parse_calls(PARSERS[parser], NAMES, text) == (text, [])
    content, calls = _read(parser, text, 7)
    assert (content, calls) == (text, [])


def test_text_streams_until_the_trigger_and_only_a_possible_trigger_is_held_back():
    reader = CallReader(PARSERS["hermes"], NAMES)
    assert [e.text for e in reader.feed("Hello <to")] == ["Hello "]  # "<to" may open <tool_call>
    assert [e.text for e in reader.feed("day")] == ["<today"]
    assert reader.feed('<tool_call>{"name": "get_time", "arguments": {}}') == []
    (call,) = reader.feed("</tool_call>")
    assert call.call == ("get_time", "{}")


def test_the_parser_comes_from_the_chat_template():
    assert parser_for_template("{{ '<tool_call>\\n' }}{{ tool_call | tojson }}") == "hermes"
    assert parser_for_template("wrapped with <tool_call>[...]</tool_call>") == "hermes_list"
    assert parser_for_template("{{ '[TOOL_CALLS]' }}") == "mistral"
    assert parser_for_template('{"name": function name, "parameters": dictionary of argument name and') == "llama3_json"
    assert parser_for_template("[func_name1(params_name1=params_value1)]") == "pythonic"
    assert parser_for_template("{% for m in messages %}{{ m.content }}{% endfor %}") is None


# ---------------------------------------------------------------------- through the server


@pytest.fixture(scope="module")
def mix(tmp_path_factory):
    """A tiny random model whose character tokenizer also has <tool_call> and </tool_call> as (non-special) tokens
    of their own, so that a logit_bias can make it open a call."""
    root = tmp_path_factory.mktemp("tools")
    base = save_model(tiny_llama(seed=5, vocab_size=VOCAB, max_position_embeddings=2048), root / "base")
    experts = {name: make_adapter(base, root / name, r=4, alpha=8, seed=seed) for name, seed in (("a", 1), ("b", 2))}
    tokenizer = char_tokenizer(last="~")
    tokenizer.add_tokens(["<tool_call>", "</tool_call>"])
    model = loramix.from_pretrained(
        base, experts, MixConfig(gate=GateConfig(layerwise=True), scaling_layer=1), tokenizer=tokenizer
    )
    return random_gate(model)


@pytest.fixture(scope="module")
def server(mix):
    srv = Server(create_app(mix, model_id="tiny", max_tokens_limit=200, max_batch=8))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def _post(server, **body):
    return httpx.post(server.url + "/v1/chat/completions", json={"model": "tiny", **body}, timeout=60)


def _strict(tool):
    return {**tool, "function": {**tool["function"], "strict": True}}


OPEN = {"99": 100}
"""logit_bias that makes the model write <tool_call> (token 99) whenever it may."""


def test_strict_auto_calls_parse_and_validate_streamed_and_not(client, mix):
    tools = [_strict(ORDER), _strict(CLOCK)]
    kwargs = dict(model="tiny", messages=ASK, tools=tools, max_tokens=200, temperature=0, logit_bias=OPEN)
    kwargs["parallel_tool_calls"] = False  # a random model would call on until max_tokens
    out = client.chat.completions.create(**kwargs)
    result = out.choices[0]
    assert result.finish_reason == "tool_calls" and result.message.content is None
    assert result.message.tool_calls
    specs = {"ship": ORDER, "get_time": CLOCK}
    for call in result.message.tool_calls:
        assert call.id.startswith("call_") and call.type == "function"
        jsonschema.validate(json.loads(call.function.arguments), specs[call.function.name]["function"]["parameters"])
    streamed: dict[int, dict] = {}
    reasons, pieces = [], 0
    for chunk in client.chat.completions.create(stream=True, **kwargs):
        delta = chunk.choices[0].delta
        assert not delta.content
        for piece in delta.tool_calls or []:
            entry = streamed.setdefault(piece.index, {"id": None, "name": None, "arguments": ""})
            if piece.id:
                assert entry["id"] is None and piece.function.name and not piece.function.arguments
                entry["id"], entry["name"] = piece.id, piece.function.name
            entry["arguments"] += piece.function.arguments or ""
            pieces += bool(piece.function.arguments)
        reasons.append(chunk.choices[0].finish_reason)
    assert [(e["name"], e["arguments"]) for _, e in sorted(streamed.items())] == [
        (c.function.name, c.function.arguments) for c in result.message.tool_calls
    ]
    assert reasons[-1] == "tool_calls" and pieces > 3  # the arguments stream as they are written


def test_auto_without_strict_returns_what_is_not_a_call_as_text(client):
    kwargs = dict(model="tiny", messages=ASK, tools=[ORDER, CLOCK], max_tokens=12, temperature=0, logit_bias=OPEN)
    out = client.chat.completions.create(**kwargs)
    result = out.choices[0]
    assert result.message.tool_calls is None and result.finish_reason == "length"
    assert result.message.content.startswith("<tool_call>")
    stream = client.chat.completions.create(stream=True, **kwargs)
    pieces = [c.choices[0].delta for c in stream]
    assert not any(d.tool_calls for d in pieces)
    assert "".join(d.content or "" for d in pieces) == result.message.content
    plain = client.chat.completions.create(model="tiny", messages=ASK, tools=[ORDER], max_tokens=6, temperature=0)
    assert plain.choices[0].message.tool_calls is None and plain.choices[0].message.content


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "ship"}}])
def test_tools_with_defs_under_required_and_named(client, choice):
    """pydantic's nested models write `$defs`; combined with other tools they are hoisted (issue 40, item 8)."""
    out = client.chat.completions.create(
        model="tiny", messages=ASK, tools=[ORDER, CLOCK], tool_choice=choice, max_tokens=200, temperature=0
    )
    result = out.choices[0]
    assert result.finish_reason == "tool_calls", result
    for call in result.message.tool_calls:
        spec = {"ship": ORDER, "get_time": CLOCK}[call.function.name]
        jsonschema.validate(json.loads(call.function.arguments), spec["function"]["parameters"])


def _refused(server, param, **body):
    response = _post(server, max_tokens=4, **body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param, error
    return error["message"]


def test_call_arguments_nested_too_deeply_are_a_400_naming_the_message(server):
    """Issue 40, item 4: json.loads' RecursionError was a plain-text 500."""
    deep = "[" * 100_000 + "]" * 100_000
    call = {"id": "call_1", "type": "function", "function": {"name": "get_time", "arguments": deep}}
    messages = [*ASK, {"role": "assistant", "content": None, "tool_calls": [call]}]
    message = _refused(server, "messages.1.tool_calls.0.function.arguments", messages=messages)
    assert "nested too deeply" in message


def test_a_tool_message_without_tool_call_id_is_a_400(server):
    """Issue 40, item 12 (OpenAI answers 400 too)."""
    call = {"id": "call_1", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}
    messages = [*ASK, {"role": "assistant", "content": None, "tool_calls": [call]}, {"role": "tool", "content": "12"}]
    assert "tool_call_id" in _refused(server, "messages.2", messages=messages)
    messages[-1]["tool_call_id"] = "call_1"
    assert _post(server, messages=messages, max_tokens=2).status_code == 200


def test_the_refusals_of_tools_and_parsers(server, mix):
    assert "get_time" in _refused(server, "tools", messages=ASK, tools=[CLOCK, CLOCK])
    fmt = {"type": "json_object"}
    assert "'auto'" in _refused(server, "response_format", messages=ASK, tools=[CLOCK], response_format=fmt)
    pythonic = Server(create_app(mix, model_id="tiny", tool_call_parser="pythonic"))
    try:
        message = _refused(pythonic, "tools", messages=ASK, tools=[_strict(CLOCK)])
        assert "pythonic" in message
        dashed = {"type": "function", "function": {"name": "get-time"}}
        assert "'get-time' is not a name" in _refused(pythonic, "tools", messages=ASK, tools=[dashed])
    finally:
        pythonic.stop()
    with pytest.raises(loramix.errors.ConfigError, match="unknown tool-call parser 'qwen9'"):
        create_app(mix, tool_call_parser="qwen9")
    # a chat template that reads tools, in a format no parser reads: "auto" says so; the other choices work
    mix.tokenizer.chat_template = (
        "{% if tools %}TOOLS {{ tools | tojson }}\n{% endif %}{% for m in messages %}{{ m.content }}\n{% endfor %}"
    )
    try:
        templated = Server(create_app(mix, model_id="tiny"))
        try:
            assert "--tool-call-parser" in _refused(templated, "tool_choice", messages=ASK, tools=[CLOCK])
            required = _post(templated, messages=ASK, tools=[CLOCK], tool_choice="required", max_tokens=60)
            assert required.status_code == 200, required.text
        finally:
            templated.stop()
    finally:
        mix.tokenizer.chat_template = None


# ---------------------------------------------------------------------- the strict grammars, token by token


def _accepts(grammar, tokenizer, text):
    """Whether the grammar lets a model write `text` then end (EOS)."""
    matcher = grammar.matcher()
    for token in tokenizer.encode(text, add_special_tokens=False):
        if not matcher.consume_token(token):
            return False
    return matcher.consume_token(2)  # </s>


@pytest.mark.parametrize(
    "parser, good, bad",
    [
        (
            "hermes",
            'Sure.\n<tool_call>\n{"name": "get_time", "arguments": {"zone": "UTC"}}\n</tool_call>'
            '<tool_call>{"name": "ship", "arguments": {"to": {"city": "Oslo", "zip": 1}, "items": []}}</tool_call>',
            ['Sure <tool_call>{"name": "rm", "arguments": {}}</tool_call>', '<tool_call>{"name": "get_time"}'],
        ),
        (
            "hermes_list",
            'Ok <tool_call>[{"name": "get_time", "arguments": {"zone": "CET"}}]</tool_call>',
            [
                '<tool_call>[{"name": "get_time", "arguments": {"zone": "PST"}}]</tool_call>',
                "<tool_call>[]</tool_call>",
            ],
        ),
        (
            "llama3_json",
            '{"name": "ship", "parameters": {"to": {"city": "Rome", "zip": 3}, "back": null, "items": []}}',
            ['{"name": "ship", "parameters": {"to": {"city": "Rome"}, "items": []}}', '{"name": "get_time"}'],
        ),
        (
            "mistral",
            'Here: [TOOL_CALLS][{"name": "get_time", "arguments": {"zone": "UTC"}}]',
            ['[TOOL_CALLS][{"name": "get_time", "arguments": {"zone": 1}}]'],
        ),
    ],
)
def test_strict_grammars_let_text_and_valid_calls_through_and_nothing_else(mix, parser, good, bad):
    from loramix.grammar import Grammar
    from loramix.serve.schemas import ChatRequest
    from loramix.serve.tools import plan_tools

    body = ChatRequest(model="tiny", messages=ASK, tools=[_strict(ORDER), _strict(CLOCK)])
    plan = plan_tools(body, mix.tokenizer, parser)
    grammar = Grammar.lark(mix.tokenizer, plan.lazy_grammar(lambda _: None), vocab=VOCAB, eos=[2])
    assert _accepts(grammar, mix.tokenizer, good)
    assert _accepts(grammar, mix.tokenizer, "Just text, no call.")
    for text in bad:
        assert not _accepts(grammar, mix.tokenizer, text), text
    assert parse_calls(PARSERS[parser], {"ship", "get_time"}, good)[1]  # what the grammar lets through parses


# ---------------------------------------------------------------------- LangChain, as agents use it


def test_langchain_bind_tools_and_an_agent_loop(server):
    """LangChain's `bind_tools` with its default tool choice ("auto"): the model calls a tool (the logit_bias
    makes the random model open a call; strict makes the call valid), the loop runs the tool, sends its result back,
    and the model answers in text."""
    from langchain_core.messages import HumanMessage, ToolMessage
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI

    ran = []

    @tool
    def get_time(zone: Literal["UTC", "CET"]) -> str:
        """The time in a zone."""
        ran.append(zone)
        return "12:00"

    @tool
    def get_date(zone: Literal["UTC", "CET"]) -> str:
        """The date in a zone."""
        ran.append(zone)
        return "2026-12-06"

    settings = dict(base_url=server.url + "/v1", api_key="unused", model="tiny", temperature=0, max_retries=0)
    caller = ChatOpenAI(**settings, max_tokens=120, logit_bias={99: 100}).bind_tools(
        [get_time, get_date], strict=True, parallel_tool_calls=False
    )
    answerer = ChatOpenAI(**settings, max_tokens=8).bind_tools([get_time, get_date])
    messages = [HumanMessage("What time is it in Paris?")]
    first = caller.invoke(messages)
    (call,) = first.tool_calls
    result = {"get_time": get_time, "get_date": get_date}[call["name"]].invoke(call["args"])
    assert ran == [call["args"]["zone"]]
    messages += [first, ToolMessage(result, tool_call_id=call["id"])]
    final = answerer.invoke(messages)
    assert not final.tool_calls and isinstance(final.content, str) and final.content


def test_the_cli_refuses_an_unknown_parser_in_one_line(tmp_path):
    from conftest import run_cli

    result = run_cli("serve", tmp_path, "--tool-call-parser", "qwen9")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "unknown tool-call parser 'qwen9'; known: hermes" in " ".join(result.stderr.split())


def test_the_protein_tool_set_and_its_scoring():
    from loramix.demo.tool_world import TOOLS, prompts, score

    records = prompts()
    assert records == prompts() and len(records) >= 40
    assert {r["tool"] for r in records} == {t["function"]["name"] for t in TOOLS} | {None}
    for record in records:
        if record["tool"] is None:
            assert score(record, []) == {"right_tool": True, "valid": True, "right_arguments": True}
            assert not score(record, [("gravy", '{"sequence": "AK"}')])["right_tool"]
            continue
        right = json.dumps(record["arguments"])
        assert score(record, [(record["tool"], right)]) == {"right_tool": True, "valid": True, "right_arguments": True}
        other = next(t["function"]["name"] for t in TOOLS if t["function"]["name"] != record["tool"])
        assert not score(record, [(other, right)])["right_tool"]
        assert not score(record, [(record["tool"], '{"x": 1}')])["valid"]
        assert not score(record, [])["right_tool"]


@pytest.mark.parametrize(
    "parser, text, calls",
    [
        (
            "hermes_list",
            'Ok. <tool_call>\n[{"name": "get_weather", "arguments": {"q": "a}\\"{b", "n": [1, {"x": []}]}}, '
            '{"name": "get_time", "arguments": {}}]\n</tool_call>',
            [("get_weather", '{"q": "a}\\"{b", "n": [1, {"x": []}]}'), ("get_time", "{}")],
        ),
        (
            "hermes",
            '<tool_call>{"name": "get_time", "arguments": {"zone": "UTC"}}</tool_call>\n'
            '<tool_call>{"name": "get_weather", "arguments": {"city": "\\u00e9"}}</tool_call>',
            [("get_time", '{"zone": "UTC"}'), ("get_weather", '{"city": "\\u00e9"}')],
        ),
        ("llama3_json", '{"name": "get_time", "parameters": {"zone": "UTC"}}', [("get_time", '{"zone": "UTC"}')]),
        ("mistral", 'x [TOOL_CALLS][{"name": "get_time", "arguments": {"a": 1.50}}]', [("get_time", '{"a": 1.50}')]),
    ],
)
def test_strict_calls_stream_their_name_first_then_their_arguments_as_written(parser, text, calls):
    assert parse_calls(PARSERS[parser], NAMES, text, incremental=True)[1] == calls
    reader = CallReader(PARSERS[parser], NAMES, incremental=True)
    events, names_at, pieces = [], [], 0
    for i, char in enumerate(text):
        for event in reader.feed(char):
            events.append(event)
            if event.name is not None:
                names_at.append(i)
            pieces += bool(event.arguments)
    events += reader.finish()
    assert [e.name for e in events if e.name is not None] == [name for name, _ in calls]
    # each name comes out as soon as its arguments open, and the arguments in many pieces
    assert [text[i - 2 : i + 1] for i in names_at] == [": {"] * len(calls)
    assert pieces >= sum(len(arguments) for _, arguments in calls)  # one piece per character fed


def test_rows_without_tools_are_unchanged_beside_strict_auto_rows(client):
    from concurrent.futures import ThreadPoolExecutor

    plain = dict(model="tiny", messages=[{"role": "user", "content": "Hello"}], max_tokens=24, temperature=0)
    alone = client.chat.completions.create(**plain).choices[0].message.content
    calling = {**plain, "tools": [_strict(CLOCK)], "logit_bias": OPEN, "parallel_tool_calls": False, "max_tokens": 80}
    with ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(client.chat.completions.create, **(calling if i % 2 else plain)) for i in range(6)]
        results = [f.result().choices[0] for f in futures]
    for i, result in enumerate(results):
        if i % 2:
            (call,) = result.message.tool_calls
            assert call.function.name == "get_time" and json.loads(call.function.arguments)["zone"] in ("UTC", "CET")
        else:
            assert result.message.content == alone


def test_strict_rows_write_what_plain_rows_write_until_the_trigger(client):
    """Before the trigger the lazy grammar allows every token that writes text. The bias keeps the random model off
    the tokens that write none (<pad>, <s>, and the ids above the tokenizer's 101), which plain rows may pick and
    strict rows may not."""
    silent = {str(i): -100 for i in [0, 1, *range(101, VOCAB)]}
    kwargs = dict(model="tiny", messages=ASK, max_tokens=30, temperature=0, logit_bias=silent)
    plain = client.chat.completions.create(tools=[CLOCK], **kwargs).choices[0].message
    strict = client.chat.completions.create(tools=[_strict(CLOCK)], **kwargs).choices[0].message
    assert "<tool_call>" not in plain.content and strict.content == plain.content
