"""The held-out generalisation set, the fresh training peptides, the diagnosis' composite breakdown, and `loramix eval
--heldout` (docs/demo.md)."""

import json
import subprocess
import sys
from collections import Counter

import pytest

from loramix.data import DataError
from loramix.demo.heldout import (
    FAMILIES,
    HELDOUT_SIZES,
    check_heldout,
    heldout_chat_records,
    heldout_instructions,
    heldout_peptides,
    heldout_records,
    load_heldout,
)
from loramix.demo.world import AMINO_ACIDS, World, fmt, gravy, load_peptides


@pytest.fixture(scope="module")
def world():
    return World()


@pytest.fixture(scope="module")
def records(world):
    return heldout_records(world=world)


def test_heldout_set_is_large_new_and_labelled_by_protparam(world, records):
    from Bio.SeqUtils.ProtParam import ProteinAnalysis

    assert Counter(r["domain"] for r in records) == HELDOUT_SIZES and min(HELDOUT_SIZES.values()) >= 100
    shipped = set(load_peptides())  # train, validation and test: the held-out peptides are none of them
    peptides = [r["peptide"] for r in records if "peptide" in r]
    assert peptides and not shipped & set(peptides)
    assert all(8 <= len(p) <= 40 and set(p) <= set(AMINO_ACIDS) for p in peptides)
    own = [r for r in records if r["domain"] in ("forward", "inverse", "composite")]
    assert len({r["peptide"] for r in own}) == len(own)  # one peptide per record
    assert Counter(r["family"] for r in own if r["domain"] == "forward") == {f: 60 for f in FAMILIES}
    for r in own[::37]:
        g = ProteinAnalysis(r["peptide"]).gravy()
        assert {"forward": r.get("answer"), "inverse": r.get("target"), "composite": r.get("first")}[r["domain"]] \
            == round(g, 2)
        if r["domain"] == "forward":
            assert r["prompt"] == f"GRAVY<{r['peptide']}>=" and r["completion"] == fmt(g)
    assert heldout_records(world=world) == records  # reproducible
    # another distribution: GRAVY well beyond the training split's
    train_gravy = sorted(gravy(p) for p in world.splits["train"])
    held_gravy = [r["answer"] for r in records if r["domain"] == "forward"]
    low, high = train_gravy[int(0.05 * len(train_gravy))], train_gravy[int(0.95 * len(train_gravy))]
    assert sum(not low <= g <= high for g in held_gravy) > 0.5 * len(held_gravy)  # 10% of the training split


def test_smollm2_heldout_records_phrase_the_set_for_chat(records):
    """The SmolLM2 set: the same held-out records in the chat world's phrasings (here on the demo's tokenizer, which
    has no chat template: the plain chat format), plus 200 general instructions the chat world does not have."""
    from loramix.demo.build import char_tokenizer
    from loramix.demo.chat_world import ChatWorld, instructions

    new = heldout_instructions()
    assert len(new) == 200 and not set(new) & set(instructions())
    sizes = {"forward": 5, "inverse": 5, "compare": 20, "qa": 5, "composite": 5}
    chat = heldout_chat_records(ChatWorld(char_tokenizer(), {i: "A reply." for i in new}), sizes)
    assert Counter(r["domain"] for r in chat) == {**sizes, "chat": 200}
    plain = heldout_records(sizes)
    for r, p in zip(chat, plain):
        assert r["completion"] == p["completion"] and r.get("peptide") == p.get("peptide")
        if r["domain"] in ("forward", "composite"):
            assert p["peptide"] in r["prompt"] and r["prompt"] != p["prompt"]
        if r["domain"] == "compare":
            assert r["prompt"].endswith(p["pair"]) and r["prompt"] != p["prompt"]
    assert all(r["scoring"] == "first_sentence" for r in chat if r["domain"] == "chat")


def test_check_heldout_names_the_first_bad_line(tmp_path, world, records):
    good = [r for r in records if "peptide" in r][:3]
    path = tmp_path / "held.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in good))
    assert load_heldout(path) == good
    bad_residue = {**good[0], "peptide": "KKLLBZ"}
    in_train = {**good[0], "peptide": world.splits["train"][5]}
    path.write_text("\n".join(json.dumps(r) for r in [good[0], good[1], bad_residue, in_train]) + "\n")
    with pytest.raises(DataError, match=r"held\.jsonl:3: peptide 'KKLLBZ' has 'BZ', outside the 20 standard"):
        load_heldout(path)
    path.write_text("\n".join(json.dumps(r) for r in [good[0], {}, in_train]) + "\n")
    with pytest.raises(DataError, match=r"held\.jsonl:2: expected exactly one of"):
        load_heldout(path)
    path.write_text("\n".join(json.dumps(r) for r in [good[0], "", in_train]).replace('\n""', "\n") + "\n")
    with pytest.raises(DataError, match=r"held\.jsonl:3: peptide '\w+' is in the demo's training split"):
        load_heldout(path)
    check_heldout([("x", in_train)], train=set())  # the training split is a parameter


def test_fresh_peptides_are_new_and_never_held_out(world):
    import random

    from loramix.demo.fresh import FreshPeptides, fresh_mixture

    fresh = FreshPeptides(world, random.Random(0))
    peptides = [fresh() for _ in range(2000)]
    assert all(8 <= len(p) <= 40 and set(p) <= set(AMINO_ACIDS) for p in peptides)
    assert not set(peptides) & fresh.exclude and len(set(peptides) & set(world.splits["train"])) < 20
    assert {p for p, _ in heldout_peptides(100)} <= fresh.exclude and set(world.splits["test"]) <= fresh.exclude
    mixture = fresh_mixture(world, 400, seed=1)
    assert Counter(r["domain"] for r in mixture) == {"forward": 100, "inverse": 100, "compare": 100, "qa": 100}
    assert mixture == fresh_mixture(world, 400, seed=1) and mixture != fresh_mixture(world, 400, seed=2)
    for r in mixture:
        if r["domain"] == "forward":
            assert r["completion"] == fmt(gravy(r["prompt"][6:-2]))


def test_composite_parts_split_the_failures():
    from loramix.demo.diagnose import composite_parts

    records = [{"then": ">0.50?", "first": 1.0}] * 4
    answers = ["1.00>0.50?yes", "1.00>0.50?no", "0.10>0.50?no", "0.10>0.50?yes"]
    # GRAVY right: the first two; verdict right for the model's own number: the first and the third
    assert composite_parts(records, answers) == {"gravy_part": 0.5, "verdict_part": 0.5, "solved": 0.25}


def test_eval_reports_the_heldout_set_beside_the_data(tmp_path, world, records):
    from typer.testing import CliRunner

    from loramix import load
    from loramix.cli import app
    from loramix.demo.run import shipped_checkpoint
    from loramix.evaluate import evaluate

    test = [r for d in ("forward", "compare") for r in world.domain_records(d, "test", 3)]
    held = [r for r in records if r["domain"] == "forward"][:3] + [r for r in records if r["domain"] == "compare"][:3]
    (tmp_path / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in test))
    (tmp_path / "held.jsonl").write_text("".join(json.dumps(r) + "\n" for r in held))
    args = ["eval", str(shipped_checkpoint()), "--data", str(tmp_path / "test.jsonl"), "--heldout",
            str(tmp_path / "held.jsonl"), "--system", "oracle", "--system", "granular", "--out", str(tmp_path / "o")]
    result = CliRunner().invoke(app, args, terminal_width=300)
    assert result.exit_code == 0, result.output
    saved = json.loads((tmp_path / "o" / "results.json").read_text())
    expected = evaluate(load(shipped_checkpoint()), held, systems=["granular"], progress=False)
    for domain, metrics in expected.metrics["granular"].items():
        assert saved["heldout"]["metrics"]["granular"][domain] == pytest.approx(metrics, nan_ok=True)
    assert "--data / --heldout" in result.output and "granular / oracle" in result.output
    from loramix.evaluate import EvalResult, beside

    test_r, held_r = (EvalResult(metrics=d["metrics"], kinds=d["kinds"]) for d in (saved, saved["heldout"]))
    header, rows = beside(test_r, held_r)
    assert header[1] == "forward r2 test / held-out" and [r[0] for r in rows] == ["oracle", "granular",
                                                                                  "granular / oracle"]
    ratio = held_r.primary("granular", "compare") / held_r.primary("oracle", "compare")
    assert rows[-1][2].endswith(f" / {ratio:.3f}")
    assert rows[1][1].startswith(f"{test_r.primary('granular', 'forward'):.3f} / ")

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(held[0]) + "\n" + json.dumps({**held[1], "peptide": world.splits["train"][0]}) + "\n")
    proc = subprocess.run([sys.executable, "-m", "loramix", "eval", str(shipped_checkpoint()), "--data",
                           str(tmp_path / "test.jsonl"), "--heldout", str(bad)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "bad.jsonl:2: peptide" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_gate_training_data_split_fresh_and_expert(world):
    import random

    from loramix.demo.build import BuildConfig, domain_training_data, gate_training_data
    from loramix.demo.world import DOMAINS

    cfg = BuildConfig(gate_steps=3, gate_batch=4, gate_data="split")
    split = gate_training_data(world, cfg)
    expected = [r for d in DOMAINS for r in domain_training_data(world, d, 3 * 4 // 4 + 1)]
    random.Random(cfg.seed).shuffle(expected)
    assert split == expected  # the recipe the gates shipped until round 5 were trained with
    fresh = gate_training_data(world, BuildConfig(gate_steps=3, gate_batch=4, gate_data="fresh"))
    assert len(fresh) == 12 and fresh != split[:12]
    with pytest.raises(ValueError, match="gate_data='other'"):
        gate_training_data(world, BuildConfig(gate_data="other"))
    # "expert": the split's records, but the forward ones drawn as the forward expert's (a share new peptides)
    cfg = BuildConfig(gate_steps=100, gate_batch=4, gate_data="expert", gate_split_share=0.5)
    mixed = gate_training_data(world, cfg)
    plain = gate_training_data(world, BuildConfig(gate_steps=100, gate_batch=4, gate_data="split"))
    forward = [r for r in mixed if r["domain"] == "forward"]
    assert sorted(map(str, (r for r in mixed if r["domain"] != "forward"))) == sorted(
        map(str, (r for r in plain if r["domain"] != "forward")))
    new = [r for r in forward if r["prompt"][6:-2] not in world.train_set]
    assert len(forward) == 101 and 45 <= len(new) <= 55
    assert not {r["prompt"][6:-2] for r in new} & {p for p, _ in heldout_peptides(300)}


def test_varied_forward_expert_data_is_new_wide_and_never_held_out(world):
    import random

    from loramix.demo.build import domain_training_data
    from loramix.demo.fresh import TiltedPeptides, VariedPeptides, forward_expert_records

    varied = VariedPeptides(world, random.Random(0))
    peptides = [varied() for _ in range(3000)]
    lengths = [len(p) for p in peptides]
    assert min(lengths) == 5 and max(lengths) == 50 and all(set(p) <= set(AMINO_ACIDS) for p in peptides)
    assert not set(peptides) & varied.exclude and {p for p, _ in heldout_peptides(300)} <= varied.exclude
    values = sorted(gravy(p) for p in peptides)
    assert values[30] < -2.0 and values[-30] > 1.5  # random compositions reach every GRAVY range
    records = forward_expert_records(world, 400, seed=3)
    assert records == forward_expert_records(world, 400, seed=3) and len(records) == 400
    in_split = [r for r in records if r["prompt"][6:-2] in world.train_set]
    assert 195 <= len(in_split) <= 210  # half the split's peptides (a varied one is rarely a training peptide)
    assert all(r["completion"] == fmt(gravy(r["prompt"][6:-2])) and r["domain"] == "forward" for r in records)
    assert domain_training_data(world, "forward", 50, "varied") == forward_expert_records(world, 50, seed=0)
    assert domain_training_data(world, "inverse", 50, "varied") == domain_training_data(world, "inverse", 50)
    with pytest.raises(ValueError, match="expert_data='other'"):
        domain_training_data(world, "forward", 5, "other")
    tilted = TiltedPeptides(world, random.Random(0))
    values = sorted(gravy(tilted()) for _ in range(1000))
    assert values[100] < -2.0 and values[-100] > 2.0  # a tenth of them beyond -2 and 2 on each side
    assert domain_training_data(world, "forward", 50, "tilted") == forward_expert_records(world, 50, tilted=True)


def test_reexpert_replaces_only_the_forward_expert_and_keeps_or_trains_the_gate(tmp_path):
    import torch

    from loramix.demo.recipes import earlier_config, reexpert
    from loramix.demo.run import shipped_checkpoint
    from loramix.loading import load

    cfg = earlier_config(forward_expert_steps=2, expert_batch=4, gate_steps=2, gate_batch=4, expert_data="tilted",
                         threads=1)
    shipped = load(shipped_checkpoint())
    reexpert(shipped_checkpoint(), tmp_path / "kept", cfg, gate="shipped", progress=False)
    kept = load(tmp_path / "kept" / "checkpoint")
    assert kept.expert_names == shipped.expert_names
    for name, a, b in zip(shipped.expert_names, shipped.expert_tensors(), kept.expert_tensors()):
        assert all(torch.equal(a[k], b[k]) for k in a) == (name != "forward"), name
    gate_a, gate_b = shipped.gate.state_dict(), kept.gate.state_dict()
    assert all(torch.equal(gate_a[k], gate_b[k]) for k in gate_a)  # the shipped gate, as it is
    reexpert(shipped_checkpoint(), tmp_path / "new", cfg, gate="train", progress=False)
    new = load(tmp_path / "new" / "checkpoint")
    assert any(not torch.equal(gate_a[k], new.gate.state_dict()[k]) for k in gate_a)  # a gate trained over it
    for a, b in zip(kept.expert_tensors(), new.expert_tensors()):  # the same seed and data: the same forward expert
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_shipped_recipe_is_the_builds_defaults():
    """The recipe the docs say ships (docs/demo.md, "Round 6") is what `loramix demo --rebuild` builds."""
    from loramix.demo.build import BuildConfig
    from loramix.demo.recipes import RECIPES, earlier_config

    options = dict(RECIPES["tilted-expert-mostly-split+joint-keep-inverse-xlong-gate-tilted-half"])
    assert options.pop("gate") == "train"
    assert earlier_config(**options) == BuildConfig()
