"""The demo mini-world: data and labels, scoring, the build pipeline at a tiny size, and `loramix demo`."""

import json

import pytest
import torch

from loramix.demo.world import AMINO_ACIDS, DOMAINS, World, fmt, gravy, load_peptides, parse_number
from loramix.errors import ConfigError
from loramix.scoring import score, scorer_of


@pytest.fixture(scope="module")
def world():
    return World()


def test_peptides_and_splits_are_reproducible_and_disjoint(world):
    peptides = load_peptides()
    assert len(peptides) == 3418 and all(8 <= len(p) <= 40 and set(p) <= set(AMINO_ACIDS) for p in peptides)
    sizes = {k: len(v) for k, v in world.splits.items()}
    assert sizes == {"train": 2776, "val": 312, "test": 330}
    assert not (set(world.splits["train"]) & set(world.splits["test"]))
    assert World().domain_records("forward", "test", 5) == world.domain_records("forward", "test", 5)


def test_labels_are_biopython_protparam(world):
    from Bio.SeqUtils.ProtParam import ProteinAnalysis

    record = world.domain_records("forward", "test", 1)[0]
    seq = record["prompt"][len("GRAVY<") : -2]
    assert record["completion"] == fmt(ProteinAnalysis(seq).gravy())
    kd = {"A": 1.8, "K": -3.9}
    assert gravy("AK") == pytest.approx((kd["A"] + kd["K"]) / 2)
    design = world.domain_records("inverse", "test", 1)[0]
    assert design["prompt"] == f"DESIGN<{fmt(design['target'])},{len(design['completion'])}>="
    lysine = next(f for f in world.facts if f["code"] == "K")
    assert lysine["charge"] == "positive" and lysine["class"] == "hydrophilic" and lysine["three"] == "Lys"
    assert fmt(-0.001) == "0.00" and parse_number(" -1.25") == -1.25 and parse_number("x") is None


def test_qa_is_the_closed_table_and_compare_is_balanced(world):
    questions = world.qa_records()
    assert len(questions) == 20 * 6 * 3 and len({r["prompt"] for r in questions}) == len(questions)
    assert {r["prompt"] for r in world.domain_records("qa", "test")} == {r["prompt"] for r in questions}
    compare = world.domain_records("compare", "train", 400)
    assert 0.4 < sum(r["completion"] == "yes" for r in compare) / 400 < 0.6
    for r in compare:
        a, b = (float(x) for x in r["prompt"].rsplit("=", 1)[-1].split()[-1].rstrip("?").split(">"))
        assert r["completion"] == ("yes" if a > b else "no")
    composite = world.domain_records("composite", "test", 3)
    for r in composite:
        seq = r["prompt"][len("GRAVY<") : -2]
        assert r["first"] == round(gravy(seq), 2) and r["completion"] == f"{fmt(r['first'])}{r['then']}" + (
            "yes" if r["first"] > float(r["then"][1:-1]) else "no"
        )


def test_scoring(world):
    fwd = [{"answer": 1.0, "completion": "1.00"}, {"answer": -1.0, "completion": "-1.00"}]
    s = score("numeric", fwd, ["1.00", "-0.50"])
    assert s["r2"] == pytest.approx(1 - 0.25 / 2) and s["mae"] == pytest.approx(0.25) and s["exact_match"] == 0.5
    assert score("numeric", fwd, ["nonsense", "-1.00"])["r2"] == pytest.approx(1 - 1 / 2)  # unparsed -> 0
    design = [{"target": gravy("AAAA"), "length": 4}, {"target": 0.0, "length": 4}]
    d = score("design", design, ["AAAA", "AXZ1"], {"train_peptides": {"AAAA"}})
    assert d == {"within_tolerance": 0.5, "mae": 0.0, "validity": 0.5, "novelty": 0.0, "length_mae": 0.0}
    comp = [{"then": ">0.50?", "first": 0.62, "completion": "0.62>0.50?yes"}]
    assert score("two_segment", comp, ["0.62>0.50?yes"])["solved"] == 1.0
    too_far = score("two_segment", comp, ["1.00>0.50?yes"])  # right verdict, GRAVY off by 0.38
    assert too_far["solved"] == 0.0 and too_far["exact_match"] == 1.0 and too_far["first_mae"] == pytest.approx(0.38)
    own = score("two_segment", comp, ["0.40>0.50?no"])  # wrong verdict for the truth, right for its own GRAVY
    assert own["solved"] == 1.0 and own["exact_match"] == 0.0
    assert score("two_segment", comp, ["0.62>0.50?no"])["solved"] == 0.0
    unparsed = score("two_segment", comp, ["nonsense"])
    assert unparsed["solved"] == 0.0 and unparsed["first_parsed"] == 0.0
    plus = [{"then": "+0.50=", "first": -0.21, "completion": "-0.21+0.50=0.29"}]
    assert score("two_segment", plus, ["-0.30+0.50=0.20"])["solved"] == 1.0
    assert score("exact", [{"completion": "K"}], [" K "])["exact_match"] == 1.0


def test_records_find_their_scorer(world):
    """Each demo domain is scored by its kind; a record's "scoring" field overrides what its fields suggest."""
    kinds = {d: scorer_of(world.domain_records(d, "test", 2)[0]).name for d in (*DOMAINS, "composite")}
    assert kinds == {"forward": "numeric", "inverse": "design", "compare": "exact", "qa": "exact",
                     "composite": "two_segment"}
    assert scorer_of({"answer": 1.0, "scoring": "exact"}).name == "exact"
    with pytest.raises(ConfigError, match=r'"scoring": .nope. is not a registered scorer'):
        scorer_of({"scoring": "nope"})


def test_mean_is_a_bounded_score_and_the_raw_r2_stays():
    """The mean column averages scores in [0, 1]: a forward R² of -5237.73 (the SmolLM2 Q&A expert's) counts 0, not
    -1309 for the mean, while the R² column keeps the raw value. The shipped summaries are this computation."""
    from loramix.demo.run import results_markdown, summary_of, weights_dir
    from loramix.demo.smollm2_run import CHAT_COLUMNS, smollm2_weights
    from loramix.evaluate import EvalResult

    for path in (weights_dir() / "results.json", smollm2_weights() / "results.json"):
        shipped = json.loads(path.read_text())
        r = shipped["results"]
        result = EvalResult(metrics=r["metrics"], speed=r["tokens_per_s"], kinds=r["kinds"])
        summary = summary_of(result)
        assert all(0.0 <= v <= 1.0 for v in summary["mean_score"].values()), path
        assert shipped["summary"]["mean_score"] == pytest.approx(summary["mean_score"]), path
    qa = result.metrics["expert:qa"]
    assert qa["forward"]["r2"] < -5000  # the SmolLM2 results: an unbounded R² ...
    assert summary["mean_score"]["expert:qa"] == pytest.approx((0 + 0 + 0 + qa["qa"]["exact_match"]) / 4)
    row = next(line for line in results_markdown(result, summary, [], 1.0, {}, columns=CHAT_COLUMNS).splitlines()
               if line.startswith("| expert 'qa' alone |"))
    assert row.split(" | ")[1] == f"{qa['forward']['r2']:.2f}" and row.endswith(" | 0.25 |")  # ... kept in its column


def test_build_run_and_compare_at_a_tiny_size(tmp_path):
    """The whole rebuild pipeline (pretraining, 4 experts, 2 gates), the demo run on it and the comparison with the
    shipped numbers (`loramix demo --rebuild`), with a tiny model and budget: one build serves all three."""
    from rich.console import Console
    from safetensors.torch import load_file

    import loramix
    from loramix.config import GateConfig, MixConfig
    from loramix.demo.build import BuildConfig
    from loramix.demo.rebuild import rebuild_and_compare
    from loramix.demo.run import weights_dir

    cfg = BuildConfig(hidden=32, layers=2, heads=2, intermediate=64, pretrain_steps=4, pretrain_batch=4,
                      expert_steps=3, forward_expert_steps=3, expert_batch=4, gate_steps=3, gate_batch=4,
                      gate_width=16)
    sizes = {"forward": 3, "inverse": 2, "compare": 3, "qa": 3, "composite": 2}
    console = Console(record=True, width=200)
    comparison = rebuild_and_compare(tmp_path, config=cfg, sizes=sizes, console=console)
    build_dir = tmp_path / "build"
    record = json.loads((build_dir / "build.json").read_text())
    assert set(record["stages"]) == {"base", "expert forward", "expert inverse", "expert compare", "expert qa",
                                     "gate checkpoint", "gate checkpoint-truncated"}
    # every stage trained: PEFT starts lora_B at zero, and a gate starts where the same seed puts it
    for domain in ("forward", "inverse", "compare", "qa"):
        tensors = load_file(str(build_dir / "experts" / domain / "adapter_model.safetensors"))
        assert all(t.abs().max() > 0 for k, t in tensors.items() if "lora_B" in k), domain
    for name, k in (("checkpoint", None), ("checkpoint-truncated", 1)):
        trained = load_file(str(build_dir / name / "gate.safetensors"))
        torch.manual_seed(cfg.seed)
        start = loramix.from_pretrained(
            build_dir / "checkpoint" / "base",
            {d: build_dir / "experts" / d for d in ("forward", "inverse", "compare", "qa")},
            MixConfig(gate=GateConfig(depth=cfg.gate_depth, width=cfg.gate_width, layerwise=True, dropout=0.0),
                      scaling_layer=k),
        )
        fresh = start.gate.state_dict()
        assert any(not torch.equal(trained[key], fresh[key]) for key in fresh), f"the {name} gate did not train"
        # the experts trained with the gate, the design expert kept as it trained alone (BuildConfig's defaults)
        saved = loramix.load(build_dir / name)
        assert saved.config.trainable_experts
        for expert, a, b in zip(saved.expert_names, start.expert_tensors(), saved.expert_tensors()):
            assert all(torch.equal(a[key], b[key]) for key in a) == (expert == "inverse"), (name, expert)
        assert record["stages"][f"gate {name}"]["metrics"]["loss"] > 0
    # the demo run on the rebuilt weights
    saved = json.loads((tmp_path / "results.json").read_text())
    assert list(saved["results"]["metrics"]) == ["base", "expert:forward", "expert:inverse", "expert:compare",
                                                 "expert:qa", "uniform", "oracle", "router", "granular", "prompt",
                                                 "truncated"]
    assert "| loramix granular |" in (tmp_path / "results.md").read_text()
    figures = saved["analysis"]["figures"]
    assert "figures/usage-by-domain.png" in figures and any("domain-composite" in f for f in figures)
    text = console.export_text()
    assert "baselines on the test subset" in text
    # the comparison with the shipped numbers
    shipped = json.loads((weights_dir() / "results.json").read_text())["results"]
    rebuilt = saved["results"]
    assert json.loads((tmp_path / "rebuild.json").read_text())["differences"].keys() == comparison["differences"].keys()
    assert "build_seconds" in comparison
    want = (rebuilt["metrics"]["granular"]["compare"]["exact_match"]
            - shipped["metrics"]["granular"]["compare"]["exact_match"])
    assert comparison["differences"]["granular/compare"] == pytest.approx(want)
    assert comparison["max_abs_difference"] >= abs(want)
    assert "shipped weights vs rebuilt weights" in text


def test_shipped_weights_load_and_reproduce_their_examples(world):
    """The weights in the package: both checkpoints load offline (the truncated one through its relative base
    reference), and greedy answers are the ones recorded in the shipped results.json."""
    from loramix import load
    from loramix.demo.run import shipped_checkpoint, weights_dir

    model = load(shipped_checkpoint())
    assert model.expert_names == ["forward", "inverse", "compare", "qa"] and model.tokenizer is not None
    truncated = load(weights_dir() / "checkpoint-truncated")
    assert truncated.config.scaling_layer == model.n_blocks // 2 and truncated.expert_names == model.expert_names
    shipped = json.loads((weights_dir() / "results.json").read_text())
    for example in [e for e in shipped["examples"] if e["domain"] != "composite"][:6]:
        ids = model.tokenizer([example["prompt"]], return_tensors="pt").input_ids
        out = model.generate(ids, max_new_tokens=44 if example["domain"] == "inverse" else 12)
        answer = model.tokenizer.decode(out.new_tokens[0, : out.lengths[0]], skip_special_tokens=True)
        assert answer == example["answer"], example


def test_eval_command_on_user_records(world, tmp_path):
    """`loramix eval` on a JSONL of the documented formats gives the library's numbers; bad records fail in one line."""
    import subprocess
    import sys

    from typer.testing import CliRunner

    from loramix import load
    from loramix.cli import app
    from loramix.demo.run import shipped_checkpoint
    from loramix.evaluate import evaluate

    records = [r for d in ("forward", "compare", "composite") for r in world.domain_records(d, "test", 4)]
    data = tmp_path / "eval.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    result = CliRunner().invoke(app, ["eval", str(shipped_checkpoint()), "--data", str(data), "--system", "oracle",
                                      "--system", "granular", "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert list(saved["metrics"]) == ["oracle", "granular"]
    assert saved["primary_metric"] == {"forward": "r2", "compare": "exact_match", "composite": "solved"}
    expected = evaluate(load(shipped_checkpoint()), records, systems=["granular"], progress=False)
    for domain, metrics in expected.metrics["granular"].items():
        assert saved["metrics"]["granular"][domain] == pytest.approx(metrics, nan_ok=True)

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "GRAVY<AK>=", "completion": "-1.05>0.20?no", "then": ">0.20?"}) + "\n")
    proc = subprocess.run([sys.executable, "-m", "loramix", "eval", str(shipped_checkpoint()), "--data", str(bad)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert 'needs "first"' in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
