"""The OpenAI-compatible server, with the official openai client and raw httpx, on a free loopback port."""

import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch
import uvicorn

import loramix
from loramix.generate import render_chat
from loramix.serve import create_app

from conftest import char_tokenizer


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, app) -> None:
        self.port = _free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            if time.time() > deadline:
                raise RuntimeError("server did not start")
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture(scope="module")
def mix(llama_dir, llama_experts):
    model = loramix.from_pretrained(
        llama_dir, llama_experts, loramix.MixConfig(gate=loramix.GateConfig(layerwise=True)), tokenizer=char_tokenizer()
    )
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.gate.parameters():
            p.normal_()
    return model


@pytest.fixture(scope="module")
def server(mix):
    srv = Server(create_app(mix, model_id="tiny", max_tokens_limit=64))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def _greedy(mix, ids, n) -> tuple[str, int]:
    out = mix.generate(torch.tensor([ids]), max_new_tokens=n)
    tokens = out.new_tokens[0, : out.lengths[0]].tolist()
    eos = mix.tokenizer.eos_token_id
    text = mix.tokenizer.decode([t for t in tokens if t != eos], skip_special_tokens=True)
    return text, len([t for t in tokens if t != eos])


def test_models_and_health(client, server):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    health = httpx.get(server.url + "/health").json()
    assert health["status"] == "ok" and health["experts"] == ["protein", "math", "qa"]


def test_completion_matches_the_library_and_streams_the_same_text(client, mix):
    prompt = "GRAVY of ACDK"
    want, n = _greedy(mix, mix.tokenizer(prompt).input_ids, 12)
    out = client.completions.create(
        model="tiny", prompt=prompt, max_tokens=12, temperature=0, extra_body={"loramix": {"return_scalings": "layer"}}
    )
    assert out.choices[0].text == want
    assert out.usage.completion_tokens == n and out.usage.prompt_tokens == len(prompt) + 1
    ext = out.model_extra["loramix"]
    assert ext["mode"] == "granular" and len(ext["scalings"]) == mix.n_layers and len(ext["scalings"][0]) == 3
    pieces = list(client.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0, stream=True))
    assert "".join(p.choices[0].text for p in pieces) == want
    assert pieces[-1].choices[0].finish_reason in ("stop", "length")


def test_chat_uses_the_plain_fallback_and_streams(client, mix):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Charge of K?"}]
    text = render_chat(mix.tokenizer, messages)
    assert text == "system: Be brief.\nuser: Charge of K?\nassistant:"
    want, _ = _greedy(mix, mix.tokenizer(text).input_ids, 10)
    out = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0)
    assert out.choices[0].message.content == want and out.choices[0].message.role == "assistant"
    stream = client.chat.completions.create(
        model="tiny",
        messages=messages,
        max_tokens=10,
        temperature=0,
        stream=True,
        extra_body={"loramix": {"mode": "prompt"}},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    prompt_mode = mix.generate(mix.tokenizer([text], return_tensors="pt").input_ids, max_new_tokens=10, mode="prompt")
    eos = mix.tokenizer.eos_token_id
    tokens = prompt_mode.new_tokens[0, : prompt_mode.lengths[0]].tolist()
    expected = mix.tokenizer.decode([t for t in tokens if t != eos], skip_special_tokens=True)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected
    assert chunks[-1].model_extra["loramix"]["mode"] == "prompt"


def test_stop_strings_never_leak(client, mix):
    prompt = "GRAVY of ACDK"
    full, _ = _greedy(mix, mix.tokenizer(prompt).input_ids, 20)
    stop = full[6:8]
    cut = full[: full.find(stop)]
    out = client.completions.create(model="tiny", prompt=prompt, max_tokens=20, temperature=0, stop=[stop])
    assert out.choices[0].text == cut and out.choices[0].finish_reason == "stop"
    streamed = "".join(
        p.choices[0].text
        for p in client.completions.create(
            model="tiny", prompt=prompt, max_tokens=20, temperature=0, stop=stop, stream=True
        )
    )
    assert streamed == cut


def test_sampling_with_a_seed_is_reproducible(client):
    kwargs = dict(model="tiny", prompt="ACDK", max_tokens=16, temperature=1.2, top_p=0.9, seed=5)
    a = client.completions.create(**kwargs).choices[0].text
    b = client.completions.create(**kwargs).choices[0].text
    assert a == b


def test_concurrent_requests_are_batched_and_equal_to_one_by_one(server, mix):
    prompts = ["A", "KKLL", "GRAVY of ACDK", "MKTAYIAKQRQ", "xyz", "W", "CalculateGRAVY<", "12+3="]
    want = [_greedy(mix, mix.tokenizer(p).input_ids, 10)[0] for p in prompts]
    engine = server.server.config.app.state.engine
    before = engine.batches

    def ask(prompt):
        r = httpx.post(
            server.url + "/v1/completions",
            json={"model": "tiny", "prompt": prompt, "max_tokens": 10, "temperature": 0},
            timeout=60,
        )
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["text"]

    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(ask, prompts))
    assert got == want
    assert engine.batches - before < len(prompts)  # some requests shared a batch


@pytest.mark.parametrize(
    ("path", "body", "status", "message"),
    [
        ("/v1/completions", "{not json", 400, "not valid JSON"),
        ("/v1/completions", {"model": "tiny"}, 400, "prompt: Field required"),
        ("/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": "many"}, 400, "max_tokens"),
        ("/v1/completions", {"model": "tiny", "prompt": 5}, 400, "prompt"),
        ("/v1/completions", {"model": "gpt-9", "prompt": "x"}, 404, "model 'gpt-9' does not exist"),
        ("/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 100000}, 400, "above this server's limit"),
        ("/v1/completions", {"model": "tiny", "prompt": "x" * 200}, 400, "the prompt has 201 tokens"),
        ("/v1/completions", {"model": "tiny", "prompt": "x", "n": 17}, 400, "n:"),
        ("/v1/completions", {"model": "tiny", "prompt": []}, 400, "empty list"),
        ("/v1/completions", {"model": "tiny", "prompt": "x", "temperature": -1}, 400, "temperature"),
        ("/v1/completions", {"model": "tiny", "prompt": "x", "loramix": {"mode": "turbo"}}, 400, "loramix.mode"),
        ("/v1/completions", {"model": "tiny", "prompt": "x", "loramix": {"mode": "truncated"}}, 400, "truncated"),
        ("/v1/completions", {"model": "tiny", "prompt": "x", "loramix": {"colour": 1}}, 400, "colour"),
        ("/v1/chat/completions", {"model": "tiny", "messages": []}, 400, "messages"),
        ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user"}]}, 400, "content"),
        ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "wizard", "content": "x"}]}, 400, "role"),
        ("/v1/chat/completions", {"model": "tiny", "messages": "hi"}, 400, "messages"),
        ("/v1/nothing", {}, 404, "Not Found"),
    ],
)
def test_bad_requests_get_4xx_json_errors(server, path, body, status, message):
    if isinstance(body, str):
        r = httpx.post(server.url + path, content=body, headers={"content-type": "application/json"})
    else:
        r = httpx.post(server.url + path, json=body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert message in error["message"], error
    assert set(error) == {"message", "type", "param", "code"}


def test_api_key(mix):
    srv = Server(create_app(mix, model_id="tiny", api_key="s3cret"))
    try:
        assert httpx.get(srv.url + "/v1/models").status_code == 401
        r = httpx.get(srv.url + "/v1/models", headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(srv.url + "/v1/models", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert httpx.get(srv.url + "/health").status_code == 200
    finally:
        srv.stop()


def test_scalings_per_token_and_expert(client, mix):
    out = client.completions.create(
        model="tiny", prompt="ACDK", max_tokens=5, temperature=0, extra_body={"loramix": {"return_scalings": "token"}}
    )
    scalings = out.model_extra["loramix"]["scalings"]
    assert len(scalings) == out.usage.completion_tokens and len(scalings[0]) == mix.n_layers
    out = client.completions.create(
        model="tiny", prompt="ACDK", max_tokens=5, temperature=0, extra_body={"loramix": {"return_scalings": "expert"}}
    )
    assert sum(out.model_extra["loramix"]["scalings"]) == pytest.approx(1.0, abs=1e-5)
    assert json.dumps(out.model_extra)  # JSON all the way
