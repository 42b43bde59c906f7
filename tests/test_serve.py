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
from loramix.serve import create_app
from loramix.text import render_chat

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
    return served_mix(llama_dir, llama_experts)


def served_mix(llama_dir, llama_experts):
    """The tiny Llama with three experts and a random layer-wise gate (non-trivial scalings)."""
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
    # and it does sample: other seeds give other texts, and none is the greedy answer (fixed seeds: not flaky)
    others = {client.completions.create(**{**kwargs, "seed": seed}).choices[0].text for seed in (6, 7)}
    greedy = client.completions.create(**{**kwargs, "temperature": 0}).choices[0].text
    assert len({a, *others}) == 3 and greedy not in {a, *others}


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
        assert httpx.get(srv.url + "/metrics").status_code == 200
        # everything else needs the key too: the API's description, and paths that do not exist
        assert httpx.get(srv.url + "/openapi.json").status_code == 401
        assert httpx.get(srv.url + "/openapi.json", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert httpx.get(srv.url + "/nothing").status_code == 401
    finally:
        srv.stop()


def test_error_messages_with_a_lone_surrogate_are_sent_escaped():
    from loramix.serve.app import ApiError

    response = ApiError(404, "model '\ud800' does not exist").response()
    assert response.status_code == 404
    assert json.loads(response.body)["error"]["message"] == "model '\\ud800' does not exist"


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
    # the values are the model's own: per token [L, N] and the mean per expert, as the library generates them
    ids = torch.tensor([mix.tokenizer("ACDK").input_ids])
    want = mix.generate(ids, max_new_tokens=5, return_scalings=True).scalings[0, : len(scalings)]
    torch.testing.assert_close(torch.tensor(scalings), want.float(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(torch.tensor(out.model_extra["loramix"]["scalings"]), want.float().mean((0, 1)),
                               rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------- the client ecosystem (issue 16)


def _model_logprobs(mix, ids: list[int]) -> torch.Tensor:
    """log_softmax of the mixed model's logits for one unpadded sequence [T, V]."""
    with torch.no_grad():
        return torch.log_softmax(mix(torch.tensor([ids])).logits[0].float(), -1)


def test_echo_logprobs_of_token_prompts_equal_the_model(server, mix):
    prompts = [mix.tokenizer("GRAVY of ACDK").input_ids, mix.tokenizer("KKL").input_ids]
    body = {"model": "tiny", "prompt": prompts, "echo": True, "logprobs": 3, "max_tokens": 0, "temperature": 0}
    r = httpx.post(server.url + "/v1/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    choices = r.json()["choices"]
    assert [c["index"] for c in choices] == [0, 1]
    for ids, choice in zip(prompts, choices):
        lp = choice["logprobs"]
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        want = _model_logprobs(mix, ids)
        got = torch.tensor(lp["token_logprobs"][1:])
        assert torch.allclose(got, want[:-1].gather(-1, torch.tensor(ids[1:])[:, None])[:, 0], atol=1e-5)
        assert all(3 <= len(top) <= 4 for top in lp["top_logprobs"][1:])
        assert lp["tokens"] == [mix.tokenizer.decode([t]) for t in ids]
        assert lp["text_offset"][1:] == [sum(len(t) for t in lp["tokens"][1:k]) + 3 for k in range(1, len(ids))]
        assert choice["text"] == mix.tokenizer.decode(ids)


def test_completion_logprobs_of_generated_tokens_equal_the_model(client, mix):
    prompt = "GRAVY of ACDK"
    out = client.completions.create(model="tiny", prompt=prompt, max_tokens=6, temperature=0, logprobs=2, echo=True)
    lp = out.choices[0].logprobs
    ids = mix.tokenizer(prompt).input_ids
    tokens = mix.tokenizer.convert_tokens_to_ids(lp.tokens)
    assert tokens[: len(ids)] == ids and len(tokens) == len(ids) + 6
    want = _model_logprobs(mix, tokens)[:-1].gather(-1, torch.tensor(tokens[1:])[:, None])[:, 0]
    assert torch.allclose(torch.tensor(lp.token_logprobs[1:]), want, atol=1e-5)
    greedy = [max(top, key=top.get) for top in lp.top_logprobs[len(ids) :]]
    assert greedy == lp.tokens[len(ids) :]  # greedy: every chosen token is the most likely one
    plain = client.completions.create(model="tiny", prompt=prompt, max_tokens=6, temperature=0, logprobs=0)
    assert plain.choices[0].logprobs.token_logprobs == pytest.approx(lp.token_logprobs[len(ids) :], abs=1e-6)
    assert plain.choices[0].logprobs.text_offset[0] == 0


def test_chat_logprobs_equal_the_model(client, mix):
    messages = [{"role": "user", "content": "Charge of K?"}]
    out = client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=5, temperature=0, logprobs=True, top_logprobs=3
    )
    content = out.choices[0].logprobs.content
    ids = mix.tokenizer(render_chat(mix.tokenizer, messages)).input_ids
    generated = mix.tokenizer.convert_tokens_to_ids([c.token for c in content])
    want = _model_logprobs(mix, ids + generated)[len(ids) - 1 : -1]
    assert torch.allclose(
        torch.tensor([c.logprob for c in content]), want.gather(-1, torch.tensor(generated)[:, None])[:, 0], atol=1e-5
    )
    assert all(
        len(c.top_logprobs) == 3 and c.top_logprobs[0].logprob == pytest.approx(c.logprob, abs=1e-6) for c in content
    )
    assert content[0].bytes == list(content[0].token.encode())


def test_prompt_lists_are_one_batch_with_a_choice_each(server, mix):
    prompts = ["A", "KKLL", "GRAVY of ACDK"]
    want = [_greedy(mix, mix.tokenizer(p).input_ids, 8)[0] for p in prompts]
    engine = server.server.config.app.state.engine
    before = engine.batches
    body = {"model": "tiny", "prompt": prompts, "max_tokens": 8, "temperature": 0}
    r = httpx.post(server.url + "/v1/completions", json=body, timeout=60).json()
    assert [c["text"] for c in r["choices"]] == want
    assert engine.batches - before == 1
    assert r["usage"]["prompt_tokens"] == sum(len(p) + 1 for p in prompts)
    body["prompt"] = mix.tokenizer("KKLL").input_ids  # one token-id array is one prompt
    assert httpx.post(server.url + "/v1/completions", json=body, timeout=60).json()["choices"][0]["text"] == want[1]


def test_n_choices_are_distinct_samples(client):
    out = client.completions.create(model="tiny", prompt="ACDK", max_tokens=12, temperature=1.0, n=3, seed=3)
    texts = [c.text for c in out.choices]
    assert [c.index for c in out.choices] == [0, 1, 2] and len(set(texts)) == 3
    again = client.completions.create(model="tiny", prompt="ACDK", max_tokens=12, temperature=1.0, n=3, seed=3)
    assert [c.text for c in again.choices] == texts
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}], n=2, max_tokens=8)
    assert len(chat.choices) == 2


def test_logit_bias_and_penalties_are_applied(client, mix):
    from loramix.sampling import SamplingSettings

    forced = mix.tokenizer.convert_tokens_to_ids("Q")
    kwargs = dict(model="tiny", prompt="ACDK", max_tokens=5, temperature=0)
    assert client.completions.create(**kwargs, logit_bias={str(forced): 100}).choices[0].text == "QQQQQ"
    ids = torch.tensor([mix.tokenizer("ACDK").input_ids])
    settings = SamplingSettings(presence_penalty=0.5, frequency_penalty=2.0)
    out = mix.generate(ids, max_new_tokens=30, sampling=settings)
    penalized = mix.tokenizer.decode(out.new_tokens[0, : out.lengths[0]].tolist(), skip_special_tokens=True)
    kwargs["max_tokens"] = 30
    assert penalized != client.completions.create(**kwargs).choices[0].text  # the penalties change this answer
    got = client.completions.create(**kwargs, presence_penalty=0.5, frequency_penalty=2.0).choices[0].text
    assert got == penalized


def test_chat_content_parts_null_assistant_model_card_and_usage_chunk(client, server, mix):
    parts = [{"type": "text", "text": "Charge "}, {"type": "text", "text": "of K?"}]
    messages = [{"role": "user", "content": parts}, {"role": "assistant", "content": None}]
    out = client.chat.completions.create(model="tiny", messages=messages, max_tokens=6, temperature=0)
    plain = [{"role": "user", "content": "Charge of K?"}, {"role": "assistant", "content": ""}]
    assert (
        out.choices[0].message.content
        == client.chat.completions.create(model="tiny", messages=plain, max_tokens=6, temperature=0)
        .choices[0]
        .message.content
    )
    assert client.models.retrieve("tiny").id == "tiny"
    assert httpx.get(server.url + "/v1/models/other").status_code == 404
    chunks = list(client.completions.create(model="tiny", prompt="ACDK", max_tokens=4, temperature=0, stream=True))
    assert all(c.usage is None for c in chunks)
    chunks = list(
        client.chat.completions.create(
            model="tiny", messages=plain[:1], max_tokens=4, stream=True, stream_options={"include_usage": True}
        )
    )
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 4
    assert all(c.usage is None for c in chunks[:-1])


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"tools": [{"type": "function", "function": {"name": "f"}}] * 2}, "tools: two tools have the same function"),
        ({"tool_choice": "auto"}, "tool_choice: tool_choice needs tools"),
        ({"functions": [{"name": "f"}]}, "functions"),
        ({"response_format": {"type": "json_object"}}, "response_format: the tokenizer has no token for '}'"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"logprobs": True, "stream": True}, "logprobs"),
        ({"messages": [{"role": "user", "content": "caf\u00e9"}]}, "messages"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, "messages"),
        ({"messages": [{"role": "user", "content": None}]}, "messages"),
    ],
)
def test_chat_fields_it_cannot_honour_are_refused(server, body, param):
    request = {"model": "tiny", "messages": [{"role": "user", "content": "x"}], **body}
    r = httpx.post(server.url + "/v1/chat/completions", json=request)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["message"].startswith(param), r.json()


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"best_of": 2}, "best_of"),
        ({"suffix": "end"}, "suffix"),
        ({"logprobs": 6}, "logprobs"),
        ({"prompt": "a|b"}, "prompt: the character '|' (U+007C) at position 1"),
        ({"prompt": "caf\u00e9"}, "U+00E9"),
        ({"prompt": [[5, 6], []]}, "the prompt is empty"),
        ({"prompt": [5, 100000]}, "token id 100000"),
        ({"prompt": [5, -1]}, "prompt"),
        ({"logit_bias": {"x": 1}}, "logit_bias"),
        ({"n": 9, "prompt": ["a", "b"]}, "18 choices"),
    ],
)
def test_completion_fields_it_cannot_honour_are_refused(server, body, message):
    r = httpx.post(server.url + "/v1/completions", json={"model": "tiny", "prompt": "x", **body})
    assert r.status_code == 400, r.text
    assert message in r.json()["error"]["message"], r.json()


def test_chat_on_the_shipped_demo_checkpoint_without_a_chat_template():
    """The demo's character-level tokenizer has no newline: the plain chat fallback separates its lines with a space
    (what the tokenizer can write), so a chat request is answered; a tokenizer that cannot write the fallback's
    characters is told what is missing (not blamed on the client's messages)."""
    from fastapi.testclient import TestClient

    from loramix.demo.run import weights_dir
    from loramix.errors import ConfigError
    from loramix.text import render_chat

    model = loramix.load(weights_dir() / "checkpoint")
    assert not getattr(model.tokenizer, "chat_template", None)
    messages = [{"role": "system", "content": "Be short."}, {"role": "user", "content": "Mass of GRAVY?"}]
    assert render_chat(model.tokenizer, messages) == "system: Be short. user: Mass of GRAVY? assistant:"
    with TestClient(create_app(model, model_id="demo")) as client:
        body = {"model": "demo", "messages": messages, "max_tokens": 4}
        response = client.post("/v1/chat/completions", json=body)
        assert response.status_code == 200, response.text
        text = "system: Be short. user: Mass of GRAVY? assistant:"
        assert response.json()["usage"]["prompt_tokens"] == len(model.tokenizer(text).input_ids)
    with pytest.raises(ConfigError, match=r"cannot write ':'.*plain chat format"):
        render_chat(char_tokenizer(without=":"), messages)
    assert render_chat(char_tokenizer(), messages[1:]) == "user: Mass of GRAVY?\nassistant:"


def test_echoed_prompt_offsets_point_at_their_tokens_past_the_added_bos(client, mix):
    """The tokenizer adds <s>, which is not in the echoed text: it takes no room, and every offset points at its
    token in the returned text."""
    prompt = "GRAVY of ACDK"
    out = client.completions.create(model="tiny", prompt=prompt, max_tokens=4, temperature=0, logprobs=1, echo=True)
    choice = out.choices[0]
    lp = choice.logprobs
    assert choice.text.startswith(prompt) and lp.tokens[0] == "<s>" and lp.text_offset[:2] == [0, 0]
    assert lp.text_offset == sorted(lp.text_offset)
    ends = [*lp.text_offset[1:], len(choice.text)]
    for token, offset, end in zip(lp.tokens, lp.text_offset, ends):
        if token in ("<s>", "<pad>", "</s>"):  # special tokens are not in the text
            assert end == offset, (token, offset)
        else:
            assert choice.text[offset:end] == token, (token, offset)


def test_legacy_top_logprobs_keep_tokens_that_decode_alike(tmp_path):
    """Byte tokens of a byte-level BPE (each a piece of a character: '\\ufffd' alone) keep one key each, OpenAI's
    `bytes:\\xNN` form, so `logprobs: 5` gives 5 alternatives."""
    from fastapi.testclient import TestClient
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from conftest import make_adapter, save_model, tiny_llama

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1, show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(["abc"], trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="a")
    vocab = len(tokenizer)
    base = save_model(tiny_llama(vocab_size=vocab, pad_token_id=None, bos_token_id=None), tmp_path / "base")
    model = loramix.from_pretrained(base, {"a": make_adapter(base, tmp_path / "a")}, tokenizer=tokenizer)
    alike = [i for i in range(vocab) if tokenizer.decode([i]) == "\ufffd"]  # the 128 bytes 0x80-0xff
    with torch.no_grad():  # these tokens' logits, 100 times larger: the most likely ones are among them
        model.model.get_output_embeddings().weight[alike] *= 100
    body = {"model": "m", "prompt": "bc", "max_tokens": 1, "logprobs": 5, "temperature": 0}
    with TestClient(create_app(model, model_id="m")) as http:
        response = http.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    top = response.json()["choices"][0]["logprobs"]["top_logprobs"][0]
    assert len(top) == 5, top
    assert all(key.startswith("bytes:\\x") and len(key) == 10 for key in top), top


def test_limits_name_the_field_sent_and_empty_prompts_and_deep_bodies_are_refused(server, tmp_path):
    """max_completion_tokens over the limit is named as such; an empty prompt string is a 400 even when the
    tokenizer would add its BOS; a body nested past the limit says so before it is parsed; an API key that is not
    printable ASCII is refused at start (clients send non-ASCII header bytes differently)."""
    from typer.testing import CliRunner

    from loramix.cli import app
    from loramix.errors import ConfigError
    from loramix.serve.app import MAX_BODY_DEPTH

    def post(**body):
        return httpx.post(server.url + "/v1/completions", json={"model": "tiny", **body}, timeout=60)

    over = post(prompt="a", max_completion_tokens=10**9)
    assert over.status_code == 400 and over.json()["error"]["param"] == "max_completion_tokens", over.text
    assert over.json()["error"]["message"].startswith("max_completion_tokens=1000000000 is above")
    for prompt, where in (("", "prompt"), (["a", ""], "prompt[1]")):
        empty = post(prompt=prompt, max_tokens=2)
        assert empty.status_code == 400 and empty.json()["error"]["message"] == f"{where}: the prompt is empty"
    nested = "x"
    for _ in range(MAX_BODY_DEPTH + 1):
        nested = [nested]
    deep = post(prompt="a", max_tokens=2, stop=nested)
    assert deep.status_code == 400, deep.text
    assert deep.json()["error"]["message"].startswith("the request body is nested too deeply: more than 200 levels")
    with pytest.raises(ConfigError, match="printable ASCII"):
        create_app(server.server.config.app.state.server.model, api_key="cl\u00e9")
    result = CliRunner().invoke(app, ["serve", str(tmp_path), "--api-key", "cl\u00e9"])
    assert result.exit_code == 2 and "printable ASCII" in result.output, result.output
