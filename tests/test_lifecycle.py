"""One request lifecycle (request.py): the same text and finish reason from `generate()`, the server and the lm-eval
model, greedy and seeded, with and without stop strings; EOS from the tokenizer when the configs name none."""

import logging
import time
from types import SimpleNamespace

import pytest
import torch

import loramix
from loramix.harness import LoramixLM
from loramix.request import RequestState, check_stops
from loramix.sampling import SamplingSettings
from loramix.serve import create_app
from test_serve import Server, served_mix

from conftest import char_tokenizer, save_model, tiny_llama

PROMPT = "GRAVY of ACDK"
"""Encoded without BOS on every path: lm-eval's hf model adds no special tokens to generate_until contexts, and the
loramix model does as it does."""


@pytest.fixture(scope="module")
def mix(llama_dir, llama_experts):
    return served_mix(llama_dir, llama_experts)


@pytest.fixture(scope="module")
def client(mix):
    from openai import OpenAI

    srv = Server(create_app(mix, model_id="tiny", max_tokens_limit=64))
    yield OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0)
    srv.stop()


def _ids(mix):
    return mix.tokenizer(PROMPT, add_special_tokens=False).input_ids


def _library(mix, sampling, stops, n=20):
    ids = torch.tensor([_ids(mix)])
    out = mix.generate(ids, max_new_tokens=n, sampling=sampling, stop_strings=stops)
    return out.texts[0], out.finish_reasons[0]


def _harness(mix, settings, stops, n=20):
    lm = LoramixLM(model=mix, batch_size=2)
    args = {"until": stops or [], "max_gen_toks": n, **settings}
    return lm.generate_until([SimpleNamespace(args=(PROMPT, args))], disable_tqdm=True)[0]


@pytest.mark.parametrize("seeded", [False, True], ids=["greedy", "seeded"])
def test_generate_the_server_and_the_harness_give_the_same_answer(mix, client, seeded):
    sampling = SamplingSettings(temperature=0.9, seed=7) if seeded else SamplingSettings()
    http = dict(temperature=0.9, seed=7) if seeded else dict(temperature=0)
    lm_eval = dict(do_sample=True, temperature=0.9, seed=7) if seeded else {}
    full, reason = _library(mix, sampling, None)
    assert len(full) > 8 and reason == "length"
    stop = full[6:8]  # a stop string the answer writes: every path cuts there, with finish reason "stop"
    for stops, (text, why) in ((None, (full, reason)), ([stop], (full[: full.index(stop)], "stop"))):
        assert _library(mix, sampling, stops) == (text, why)
        served = client.completions.create(model="tiny", prompt=_ids(mix), max_tokens=20, stop=stops, **http)
        assert (served.choices[0].text, served.choices[0].finish_reason) == (text, why)
        streamed = client.completions.create(
            model="tiny", prompt=_ids(mix), max_tokens=20, stop=stops, stream=True, **http
        )
        assert "".join(chunk.choices[0].text for chunk in streamed) == text
        assert _harness(mix, lm_eval, stops) == text
    kept = client.completions.create(
        model="tiny",
        prompt=_ids(mix),
        max_tokens=20,
        stop=[stop],
        extra_body={"include_stop_str_in_output": True},
        **http,
    )
    assert kept.choices[0].text == full[: full.index(stop) + len(stop)] and kept.choices[0].finish_reason == "stop"


def test_a_stop_string_split_across_tokens_is_held_back_then_cut(tokenizer):
    state = RequestState(tokenizer, max_tokens=10, stops=["cd"], end_ids=[2])
    pieces = []
    for token in tokenizer("abcde", add_special_tokens=False).input_ids:
        state.push(token)
        pieces.append(state.take())
    assert pieces == ["a", "b", "", "", ""] and state.text == "ab" and state.finish_reason == "stop"
    assert state.ids == tokenizer("abcd", add_special_tokens=False).input_ids  # pushes after the end are ignored
    ended = RequestState(tokenizer, max_tokens=10, end_ids=[2])
    for token in [*tokenizer("ab", add_special_tokens=False).input_ids, 2]:
        ended.push(token)
    assert (ended.text, ended.finish_reason, ended.text_tokens, len(ended.ids)) == ("ab", "stop", 2, 3)


@pytest.mark.parametrize(
    ("stops", "message"),
    [
        (["a", ""], r"stop\[1\] is empty"),
        (["a", 3], r"stop\[1\] must be a string, got int"),
        (["a"] * 5, r"stop has 5 strings; at most 4 are allowed"),
        ({"a": 1}, r"stop must be a string or a list of strings, got dict"),
    ],
)
def test_bad_stop_lists_are_refused_naming_the_entry(stops, message):
    with pytest.raises(loramix.ConfigError, match=message):
        check_stops(stops, "stop", 4)


def test_bad_stop_lists_are_a_400_naming_stop(client):
    import openai

    for stops, words in ((["a", ""], "stop[1] is empty"), (["a"] * 5, "at most 4")):
        with pytest.raises(openai.BadRequestError) as caught:
            client.completions.create(model="tiny", prompt=PROMPT, max_tokens=4, stop=stops)
        error = caught.value.body
        assert error["param"] == "stop" and words in error["message"], error


def _eos_first(path, experts):
    """A model whose configs name no EOS, whose tokenizer's EOS (id 2) is the greedy first token of PROMPT."""
    base = tiny_llama(eos_token_id=None)
    base.generation_config.eos_token_id = None
    mix = loramix.from_pretrained(save_model(base, path), experts, loramix.MixConfig(), tokenizer=char_tokenizer())
    ids = mix.tokenizer([PROMPT], return_tensors="pt").input_ids
    first = int(mix.generate(ids, max_new_tokens=1, eos_token_id=[]).new_tokens[0, 0])
    with torch.no_grad():
        head = mix.model.get_output_embeddings().weight
        head[2] = head[first] * 2
    return mix, ids


def test_eos_comes_from_the_tokenizer_when_the_configs_name_none(tmp_path, llama_experts, caplog):
    mix, ids = _eos_first(tmp_path / "no-eos", llama_experts)
    with caplog.at_level(logging.WARNING, logger="loramix.base"):
        out = mix.generate(ids, max_new_tokens=8)
        mix.generate(ids, max_new_tokens=8)
    notices = [r.getMessage() for r in caplog.records if "name no EOS token" in r.getMessage()]
    assert notices == ["the model's configs name no EOS token: ending rows on the tokenizer's, '</s>' (id 2)"]
    assert out.finish_reasons == ["stop"] and out.lengths == [1] and out.texts == [""]
    assert mix.generate(ids, max_new_tokens=8, eos_token_id=[]).lengths == [8]  # [] still turns EOS off
    grammar = loramix.grammar.Grammar.lark_for_model(mix, 'start: "ab"')  # structured output no longer refuses it
    assert grammar.eos == (2,)


def test_a_loramix_model_is_what_the_decode_path_reads(mix):
    from loramix.contracts import MixedModel

    assert isinstance(mix, MixedModel)
    assert not isinstance(mix.model, MixedModel)  # the bare transformers model is not: no gate, no scalings


@pytest.mark.parametrize("seeded", [False, True], ids=["greedy", "seeded"])
def test_loramix_generate_prints_what_generate_gives(mix, tmp_path_factory, seeded):
    """The CLI (`loramix generate --json`) against `generate()` on the same checkpoint: text and finish reason, with
    and without --stop (a text prompt: the tokenizer adds its BOS on both sides)."""
    import json

    from typer.testing import CliRunner

    from loramix.cli import app

    ckpt = mix.save(tmp_path_factory.mktemp("lifecycle") / "ckpt")
    sampling = SamplingSettings(temperature=0.9, seed=7) if seeded else SamplingSettings()
    flags = ["--temperature", "0.9", "--seed", "7"] if seeded else []
    ids = mix.tokenizer([PROMPT], return_tensors="pt").input_ids
    full = mix.generate(ids, max_new_tokens=20, sampling=sampling).texts[0]
    stop = full[6:8]
    for stops in ([], [stop]):
        out = mix.generate(ids, max_new_tokens=20, sampling=sampling, stop_strings=stops or None)
        args = ["generate", str(ckpt), "-p", PROMPT, "-n", "20", "--json", *flags]
        result = CliRunner().invoke(app, args + [a for s in stops for a in ("--stop", s)])
        assert result.exit_code == 0, result.output
        record = json.loads(result.stdout.splitlines()[-1])
        assert (record["completion"], record["finish_reason"]) == (out.texts[0], out.finish_reasons[0])
    assert record["finish_reason"] == "stop" and record["completion"] == full[: full.index(stop)]


def test_loramix_generate_names_a_failed_row_and_prints_the_others(llama_dir, llama_experts, capsys):
    import json

    from loramix.commands.generate import _batch

    model = served_mix(llama_dir, llama_experts)
    bad = model.tokenizer.convert_tokens_to_ids("~") if "~" in model.tokenizer.get_vocab() else 90
    with torch.no_grad():  # one token's embedding overflowed: the row that reads it fails, alone
        model.model.get_input_embeddings().weight[bad] = float("nan")
    prompts = [PROMPT, model.tokenizer.decode([bad])]
    failed = _batch(model, prompts, prompts, False, {"max_new_tokens": 4}, show=False, as_json=True)
    out = capsys.readouterr()
    records = [json.loads(line) for line in out.out.splitlines()]
    assert failed == 1 and [r["finish_reason"] for r in records] == ["length", "error"]
    assert "non-finite" in records[1]["error"] and "error:" in out.err and "non-finite" in out.err


def test_an_empty_stop_is_a_usage_error_naming_the_option(tmp_path):
    from typer.testing import CliRunner

    from loramix.cli import app

    result = CliRunner().invoke(app, ["generate", str(tmp_path), "-p", "x", "--stop", "a", "--stop", ""])
    assert result.exit_code == 2 and "--stop" in result.output and "stop[1] is empty" in result.output


def test_the_server_ends_on_the_tokenizers_eos_unless_asked_to_ignore_it(tmp_path, llama_experts):
    from loramix.serve import Engine, Job
    from loramix.serve.events import Done

    mix, ids = _eos_first(tmp_path / "no-eos", llama_experts)
    engine = Engine(mix, max_batch=2)
    try:
        results = {}
        jobs = [
            Job(
                ids=ids[0].tolist(),
                max_tokens=6,
                index=i,
                ignore_eos=bool(i),
                emit=lambda e: results.update({e.index: e} if isinstance(e, Done) else {}),
            )
            for i in range(2)
        ]
        engine.submit_group(jobs)
        deadline = time.time() + 120
        while len(results) < 2 and time.time() < deadline:
            time.sleep(0.01)
    finally:
        engine.close()
    assert (results[0].finish_reason, results[0].completion_tokens, results[0].text) == ("stop", 0, "")
    assert (results[1].finish_reason, results[1].completion_tokens) == ("length", 6)  # vLLM's ignore_eos
