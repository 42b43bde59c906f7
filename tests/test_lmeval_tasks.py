"""The protein lm-eval tasks (loramix/demo/tasks): offline documents, scored by the project's own scorers, on the demo
checkpoint through lm-eval's API with a small --limit."""

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval")

import lm_eval
from lm_eval.tasks import TaskManager

import loramix
from loramix.demo.chat_world import ChatWorld
from loramix.demo.run import shipped_checkpoint
from loramix.demo.tasks import load, tasks_dir
from loramix.demo.world import World
from loramix.errors import ConfigError
from loramix.evaluate import generate_answers
from loramix.harness import LoramixLM
from loramix.scoring import scorer_of
from loramix.text import render_chat

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

LIMIT = 6


@pytest.fixture(scope="module")
def demo():
    return loramix.load(shipped_checkpoint())


def _run(demo, tasks: list[str]) -> dict:
    return lm_eval.simple_evaluate(
        model=LoramixLM(model=demo, batch_size=8),
        tasks=tasks,
        task_manager=TaskManager(include_path=str(tasks_dir()), include_defaults=False),
        limit=LIMIT,
        log_samples=True,
        bootstrap_iters=0,
    )


def _same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, abs=1e-9)


def test_generate_until_tasks_give_the_demo_answers_and_the_project_scorers_metrics(demo):
    out = _run(demo, ["protein_forward", "protein_design"])
    world = World()
    for task, domain in (("protein_forward", "forward"), ("protein_design", "inverse")):
        samples = sorted(out["samples"][task], key=lambda s: s["doc_id"])
        docs = [{k: v for k, v in s["doc"].items() if v is not None} for s in samples]
        assert docs == world.domain_records(domain, "test", LIMIT)  # the demo's test subset, built offline
        answers = [s["filtered_resps"][0] for s in samples]
        assert answers == generate_answers(demo, docs, domain)  # what `loramix eval` answers to the same records
        how = scorer_of(docs[0])
        want = how.score(docs, answers, {"train_peptides": world.train_set})
        results = out["results"][task].items()
        got = {key.split(",")[0]: v for key, v in results if key.endswith(",none") and "_stderr" not in key}
        assert set(got) == set(want), task
        assert all(_same(got[m], want[m]) for m in want), (task, got, want)
    assert out["results"]["protein_forward"]["parsed,none"] > 0  # real numbers were written and parsed


def _logprob(demo, context: str, continuation: str) -> float:
    """log P(continuation | context) under the mixture, one unpadded row."""
    tok = demo.tokenizer
    ids, cont = tok(context).input_ids, tok(continuation).input_ids
    with torch.no_grad():
        lp = torch.log_softmax(demo(torch.tensor([ids + cont])).logits[0].float(), -1)
    return sum(float(lp[len(ids) - 1 + k, t]) for k, t in enumerate(cont))


def test_multiple_choice_tasks_score_every_choice_by_its_log_probability(demo):
    out = _run(demo, ["protein_compare_choice", "protein_qa_choice"])
    facts = World().facts
    for task in ("protein_compare_choice", "protein_qa_choice"):
        samples = sorted(out["samples"][task], key=lambda s: s["doc_id"])
        correct = 0
        for s in samples:
            doc = s["doc"]
            choices = doc["choices"] if task == "protein_qa_choice" else ["yes", "no"]
            if task == "protein_qa_choice":  # every value of the question's fact kind, the answer among them
                assert choices == list(dict.fromkeys(f[doc["kind"]] for f in facts))
                assert doc["completion"] in choices
            scores = [float(r[0]) for r in s["filtered_resps"]]
            want = [_logprob(demo, doc["prompt"], c) for c in choices]
            assert scores == pytest.approx(want, abs=1e-4)
            picked = choices[max(range(len(choices)), key=want.__getitem__)]
            assert s["acc"] == float(picked == doc["completion"])
            correct += picked == doc["completion"]
        assert out["results"][task]["acc,none"] == pytest.approx(correct / len(samples))


def test_the_task_folder_is_found_and_the_loader_refuses_bad_input(tmp_path, tokenizer):
    printed = subprocess.run([sys.executable, "-m", "loramix.demo.tasks"], capture_output=True, text=True, check=True)
    assert printed.stdout.strip() == str(tasks_dir())
    names = set(TaskManager(include_path=str(tasks_dir()), include_defaults=False).all_tasks)
    for world in ("protein_", "protein_chat_"):
        for task in ("forward", "design", "compare", "qa", "compare_choice", "qa_choice"):
            assert world + task in names
    assert {"protein_turns_forward", "protein_turns_design", "protein_turns_qa"} <= names
    with pytest.raises(ConfigError, match="checkpoint=DIR"):
        load("forward", "chat")
    with pytest.raises(ConfigError, match="protein_n"):
        load("forward", protein_n=0)
    # the chat world renders its prompts with the evaluated checkpoint's tokenizer
    tokenizer.save_pretrained(str(tmp_path / "tokenizer"))
    rows = load("forward", "chat", protein_n=2, checkpoint=str(tmp_path), mode="granular")["test"].to_list()
    assert rows == ChatWorld(tokenizer).domain_records("forward", "test", 2)
    # the turns world: the same records with the user turn alone, for a chat API to render
    turns = load("forward", "turns", protein_n=2)["test"].to_list()
    assert [render_chat(tokenizer, [{"role": "user", "content": t["prompt"]}]) for t in turns] == [
        r["prompt"] for r in rows
    ]
    assert [{**t, "prompt": ""} for t in turns] == [{**r, "prompt": ""} for r in rows]
    with pytest.raises(ConfigError, match="compare has no turns task"):
        load("compare", "turns")


def test_until_benchmark_counts_fewer_tokens_when_rows_stop_at_until():
    """benchmarks/lmeval_until.py end to end on a few documents: the demo's base model does not end its answers, so
    rows given `until` as stop strings generate fewer tokens, with the same answers."""
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "lmeval_until.py"
    args = ["--threads", "1", "--rounds", "1", "--limit", "4", "--system", "base"]
    done = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = {line.split()[0]: line for line in done.stdout.splitlines() if " rows=" in line}
    tokens = {k: int(re.search(r"tokens=(\d+)", v).group(1)) for k, v in lines.items()}
    assert set(tokens) == {"until", "no-stop"} and "rows=16" in lines["until"]
    assert 0 < tokens["until"] < tokens["no-stop"]
    assert "same answers: True" in done.stdout
