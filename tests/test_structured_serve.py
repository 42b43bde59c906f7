"""Structured output and tool calls through the server, with the official openai client, on a tiny random model
whose only way to write JSON is the grammar: response_format (json_object, json_schema, `parse()`), tools with
tool_choice (named, required; streamed and not), under load beside unconstrained rows, and the refusals."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

import httpx
import jsonschema
import pytest
from pydantic import BaseModel, ConfigDict, Field

import loramix
from loramix import GateConfig, MixConfig
from loramix.serve import create_app
from loramix.serve.events import Done, Failed
from test_serve import Server

from conftest import char_tokenizer, make_adapter, random_gate, save_model, tiny_llama

VOCAB = 128


class Weather(BaseModel):
    model_config = ConfigDict(extra="forbid")

    city: str = Field(max_length=6)
    unit: Literal["C", "F"]
    days: int = Field(ge=1, le=7)


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The forecast for a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "where": {
                    "type": "object",
                    "properties": {"city": {"type": "string", "maxLength": 5}, "country": {"enum": ["FR", "DE"]}},
                    "required": ["city", "country"],
                    "additionalProperties": False,
                },
                "unit": {"enum": ["C", "F"]},
                "days": {"type": "integer", "minimum": 1, "maximum": 7},
            },
            "required": ["where", "unit", "days"],
            "additionalProperties": False,
        },
    },
}
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
ASK = [{"role": "user", "content": "Weather in Paris?"}]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("json_serve")
    base = save_model(tiny_llama(seed=5, vocab_size=VOCAB, max_position_embeddings=2048), root / "base")
    experts = {name: make_adapter(base, root / name, r=4, alpha=8, seed=seed) for name, seed in (("a", 1), ("b", 2))}
    return base, experts


@pytest.fixture(scope="module")
def mix(dirs):
    base, experts = dirs
    model = loramix.from_pretrained(
        base,
        experts,
        MixConfig(gate=GateConfig(layerwise=True), scaling_layer=1),
        tokenizer=char_tokenizer(last="~"),
    )
    return random_gate(model)


@pytest.fixture(scope="module")
def server(mix):
    srv = Server(create_app(mix, model_id="tiny", max_tokens_limit=160, max_batch=16))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def _post(server, path, **body):
    return httpx.post(server.url + path, json={"model": "tiny", **body}, timeout=60)


@pytest.mark.parametrize("mode", ["granular", "prompt", "truncated"])
def test_parse_with_a_pydantic_model_in_every_mode(client, mode):
    out = client.chat.completions.parse(
        model="tiny",
        messages=ASK,
        response_format=Weather,
        max_tokens=80,
        temperature=0,
        extra_body={"loramix": {"mode": mode}},
    )
    choice = out.choices[0]
    assert choice.finish_reason == "stop"
    assert isinstance(choice.message.parsed, Weather)
    assert choice.message.parsed == Weather.model_validate_json(choice.message.content)


def test_json_mode_and_completions_with_a_schema_sampled_and_streamed(client):
    out = client.chat.completions.create(
        model="tiny", messages=ASK, response_format={"type": "json_object"}, max_tokens=100, n=3, seed=1
    )
    for choice in out.choices:  # sampled at temperature 1: any JSON object, or cut by max_tokens
        assert choice.message.content.startswith("{")
        if choice.finish_reason == "stop":
            assert isinstance(json.loads(choice.message.content), dict)
    schema = Weather.model_json_schema()
    fmt = {"type": "json_schema", "json_schema": {"name": "weather", "schema": schema, "strict": True}}
    whole = client.completions.create(
        model="tiny", prompt="Forecast:", max_tokens=80, temperature=0, extra_body={"response_format": fmt}
    )
    jsonschema.validate(json.loads(whole.choices[0].text), schema)
    pieces = client.completions.create(
        model="tiny", prompt="Forecast:", max_tokens=80, temperature=0, stream=True, extra_body={"response_format": fmt}
    )
    assert "".join(chunk.choices[0].text for chunk in pieces) == whole.choices[0].text


def test_half_the_rows_constrained_under_load(client, mix):
    """16 concurrent requests, every other one with a schema: each constrained answer validates, and each
    unconstrained one is what it is alone (the grammar of a neighbour changes nothing)."""
    schema = Weather.model_json_schema()
    fmt = {"type": "json_schema", "json_schema": {"name": "w", "schema": schema}}
    prompts = [f"Request {i}:" for i in range(16)]

    def one(i):
        extra = {"response_format": fmt} if i % 2 else {}
        return client.completions.create(
            model="tiny", prompt=prompts[i], max_tokens=60, temperature=0, seed=i, extra_body=extra
        )

    alone = {i: one(i).choices[0].text for i in range(0, 16, 2)}
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(one, range(16)))
    for i, out in enumerate(results):
        if i % 2:
            jsonschema.validate(json.loads(out.choices[0].text), schema)
        else:
            assert out.choices[0].text == alone[i]


def test_a_named_tool_call_with_nested_and_enum_arguments(client):
    kwargs = dict(model="tiny", messages=ASK, tools=[WEATHER, CLOCK], max_tokens=120, temperature=0)
    choice = {"type": "function", "function": {"name": "get_weather"}}
    out = client.chat.completions.create(tool_choice=choice, **kwargs)
    result = out.choices[0]
    assert result.finish_reason == "tool_calls" and result.message.content is None
    (call,) = result.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
    jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])
    stream = client.chat.completions.create(tool_choice=choice, stream=True, **kwargs)
    arguments, names, reasons = "", [], []
    for chunk in stream:
        delta = chunk.choices[0].delta
        for piece in delta.tool_calls or []:
            assert piece.index == 0
            names += [piece.function.name] if piece.function.name else []
            arguments += piece.function.arguments or ""
        reasons.append(chunk.choices[0].finish_reason)
    assert names == ["get_weather"] and arguments == call.function.arguments
    assert reasons[-1] == "tool_calls"


def test_required_tool_calls_streamed_and_not_and_the_conversation_goes_on(client):
    kwargs = dict(model="tiny", messages=ASK, tools=[WEATHER, CLOCK], max_tokens=150, temperature=0)
    out = client.chat.completions.create(tool_choice="required", parallel_tool_calls=False, **kwargs)
    result = out.choices[0]
    assert result.finish_reason == "tool_calls"
    (call,) = result.message.tool_calls
    spec = {"get_weather": WEATHER, "get_time": CLOCK}[call.function.name]
    jsonschema.validate(json.loads(call.function.arguments), spec["function"]["parameters"])
    chunks = list(
        client.chat.completions.create(tool_choice="required", parallel_tool_calls=False, stream=True, **kwargs)
    )
    streamed = [c for chunk in chunks for c in (chunk.choices[0].delta.tool_calls or [])]
    assert [(c.function.name, c.function.arguments) for c in streamed] == [
        (call.function.name, call.function.arguments)
    ]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    # the call and its result go back into the conversation; the model answers in text (tool_choice "none")
    messages = [
        *ASK,
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": '{"temp": 21}'},
    ]
    answer = client.chat.completions.create(
        model="tiny", messages=messages, tools=[WEATHER, CLOCK], tool_choice="none", max_tokens=8, temperature=0
    )
    assert answer.choices[0].message.tool_calls is None and answer.choices[0].finish_reason in ("stop", "length")


def test_the_tools_reach_the_prompt(mix):
    from loramix.serve.schemas import ChatRequest
    from loramix.serve.tools import chat_messages, plan_tools
    from loramix.text import render_chat

    body = ChatRequest(model="tiny", messages=ASK, tools=[WEATHER], tool_choice="required")
    plan = plan_tools(body)
    plain = render_chat(mix.tokenizer, chat_messages(body.messages, plan, False))
    assert plain.startswith(
        'system: Functions you can call (JSON schemas of their arguments):\n[{"name": "get_weather"'
    )
    assert plain.endswith(
        'a list of calls [{"name": <function name>, "parameters": <arguments object>}].\n'
        + "user: Weather in Paris?\nassistant:"
    )
    tokenizer = char_tokenizer(last="~")
    tokenizer.chat_template = (
        "{% if tools %}TOOLS {{ tools | map(attribute='function.name') | join(',') }}\n{% endif %}"
        "{% for m in messages %}{{ m.role }}> {{ m.content }}\n{% endfor %}"
    )
    templated = render_chat(tokenizer, chat_messages(body.messages, plan, True), tools=plan.tools)
    assert templated == "TOOLS get_weather\nuser> Weather in Paris?\n"


def test_too_few_tokens_and_the_refusals(server, dirs):
    fmt = {"type": "json_schema", "json_schema": {"name": "w", "schema": Weather.model_json_schema()}}
    cut = _post(server, "/v1/chat/completions", messages=ASK, response_format=fmt, max_tokens=4, temperature=0).json()
    assert cut["choices"][0]["finish_reason"] == "length" and cut["choices"][0]["message"]["content"] == '{"ci'

    def refused(path, param, **body):
        response = _post(server, path, max_tokens=8, **body)
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["param"] == param, error
        return error["message"]

    chat = "/v1/chat/completions"
    bad_schema = {"type": "json_schema", "json_schema": {"name": "w", "schema": {"type": "nonsense"}}}
    assert "cannot be compiled" in refused(chat, "response_format", messages=ASK, response_format=bad_schema)
    refused(chat, "response_format.type", messages=ASK, response_format={"type": "xml"})
    refused(chat, "response_format", messages=ASK, response_format={"type": "json_schema"})
    named = {"type": "function", "function": {"name": "nope"}}
    assert "'nope'" in refused(chat, "tool_choice", messages=ASK, tools=[WEATHER], tool_choice=named)
    listed = {"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}
    refused(chat, "tools.0.function.parameters", messages=ASK, tools=[listed], tool_choice="required")
    forced = {"type": "function", "function": {"name": "get_weather"}}
    refused(chat, "response_format", messages=ASK, tools=[WEATHER], tool_choice=forced, response_format=fmt)
    refused("/v1/completions", "tools", prompt="x", tools=[WEATHER])
    # a tokenizer without '{' (the mini-world demo's) cannot write JSON: said before anything runs
    no_brace = Server(
        create_app(loramix.from_pretrained(*dirs, MixConfig(), tokenizer=char_tokenizer(last="z")), model_id="tiny")
    )
    try:
        response = _post(no_brace, chat, messages=ASK, response_format={"type": "json_object"}, max_tokens=8)
        assert response.status_code == 400 and response.json()["error"]["param"] == "response_format"
        assert "no token for '{}'" in response.json()["error"]["message"]
    finally:
        no_brace.stop()


def test_a_grammar_that_gets_stuck_fails_its_request_alone(dirs):
    """The tokenizer has no '|', which the enum's value needs: that request ends with a 400 naming response_format;
    an unconstrained neighbour in the same batch ends normally."""
    from loramix.grammar import Grammar
    from loramix.serve.engine import Engine, Job
    from test_serve_load import Sink

    model = loramix.from_pretrained(*dirs, MixConfig(), tokenizer=char_tokenizer(last="~", without="|"))
    schema = {
        "type": "object",
        "properties": {"n": {"enum": ["a|b"]}},
        "required": ["n"],
        "additionalProperties": False,
    }
    grammar = Grammar.json(model.tokenizer, schema, vocab=VOCAB, eos=[2])
    engine = Engine(model, max_batch=2)
    try:
        stuck, free = Sink(), Sink()
        engine.submit_group([Job(ids=[1, 40, 41], max_tokens=20, emit=stuck, grammar=grammar)])
        engine.submit_group([Job(ids=[1, 40, 41], max_tokens=20, emit=free)])
        assert stuck.result.status == 400 and stuck.result.param == "response_format"
        message = stuck.result.message
        assert message.startswith("structured output: the grammar cannot go on with this tokenizer (")
        assert message.endswith('(the answer so far: \'{"n":"a\')')
        assert isinstance(free.result, Done)
    finally:
        engine.close()


def _bomb(properties: int) -> dict:
    """A small schema whose masks take llguidance a long time: about 0.15 s per property per token on a CPU core."""
    names = [f"p{i}" for i in range(properties)]
    pattern = {"type": "string", "pattern": "^a{100000}$"}
    return {"type": "object", "properties": {n: pattern for n in names}, "required": names}


def test_a_grammar_over_its_budget_fails_alone(dirs):
    """The decoder waits for a row's masks (computed on the row's own thread) at most the grammar's budget over the
    request: past it that request alone ends, 400 naming response_format, and its neighbour ends normally."""
    import dataclasses

    from loramix.grammar import Grammar
    from loramix.serve.engine import Engine, Job
    from test_serve_load import Sink

    model = loramix.from_pretrained(*dirs, MixConfig(), tokenizer=char_tokenizer(last="~"))
    grammar = dataclasses.replace(Grammar.json(model.tokenizer, _bomb(1), vocab=VOCAB, eos=[2]), budget=0.01)
    engine = Engine(model, max_batch=2)
    try:
        slow, free = Sink(), Sink()
        engine.submit_group([Job(ids=[1, 40, 41], max_tokens=20, emit=slow, grammar=grammar)])
        engine.submit_group([Job(ids=[1, 40, 41], max_tokens=2, emit=free)])
        assert isinstance(slow.result, Failed) and slow.result.status == 400, slow.messages
        assert slow.result.param == "response_format"
        assert "longer than this server's 0.01 s budget" in slow.result.message
        assert isinstance(free.result, Done) and free.result.completion_tokens == 2
    finally:
        engine.close()


def test_the_grammar_compiles_off_the_loop_within_its_budget_and_after_the_prompt_checks(server):
    """A schema whose first mask costs more than the server's grammar budget is refused before it takes a row (400
    naming response_format) while a plain request is served; a prompt too long is refused before any compile."""
    state = server.server.config.app.state.server
    fmt = {"type": "json_schema", "json_schema": {"name": "bomb", "schema": _bomb(2)}}
    state.grammar_budget = 0.05
    try:
        with ThreadPoolExecutor(2) as pool:
            slow = pool.submit(_post, server, "/v1/completions", prompt="x", response_format=fmt, max_tokens=4)
            plain = pool.submit(_post, server, "/v1/completions", prompt="x", max_tokens=2)
            refused, served = slow.result(), plain.result()
    finally:
        state.grammar_budget = 1.0
    assert served.status_code == 200, served.text
    assert refused.status_code == 400, refused.text
    error = refused.json()["error"]
    assert error["param"] == "response_format" and "budget" in error["message"], error
    # a schema that cannot compile with a prompt that is too long: the prompt is what is refused
    bad = {"type": "json_schema", "json_schema": {"name": "w", "schema": {"type": "nonsense"}}}
    too_long = _post(server, "/v1/completions", prompt="x" * 3000, response_format=bad, max_tokens=4)
    assert too_long.status_code == 400 and too_long.json()["error"]["param"] == "prompt", too_long.text
