"""lm-eval on the demo checkpoint, two ways: the native model "loramix" (python -m loramix.harness) and
local-completions against `loramix serve`; tiny local JSONL tasks, no network."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval")

import loramix
from loramix.demo.run import shipped_checkpoint
from loramix.demo.world import World
from loramix.serve import create_app
from test_serve import Server

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

TASKS = {
    "demo_compare": """task: demo_compare
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}/compare.jsonl
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{prompt}}}}"
doc_to_choice: ["yes", "no"]
doc_to_target: "{{{{completion}}}}"
target_delimiter: ""
metric_list:
  - metric: acc
""",
    "demo_qa": """task: demo_qa
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}/qa.jsonl
test_split: test
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{completion}}}}"
target_delimiter: ""
generation_kwargs:
  until: ["?"]
  max_gen_toks: 12
metric_list:
  - metric: exact_match
""",
}


@pytest.fixture(scope="module")
def tasks(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tasks")
    world = World()
    for domain in ("compare", "qa"):
        records = world.domain_records(domain, "test", 8)
        (root / f"{domain}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    for name, text in TASKS.items():
        (root / f"{name}.yaml").write_text(text.format(data=root))
    return root


@pytest.fixture(scope="module")
def demo():
    return loramix.load(shipped_checkpoint())


def _samples(folder: Path, task: str) -> list[dict]:
    path = next(folder.rglob(f"samples_{task}_*.jsonl"))
    return sorted((json.loads(line) for line in path.read_text().splitlines()), key=lambda s: s["doc_id"])


def test_native_loglikelihood_equals_the_model_and_systems_switch_the_mixture(demo):
    from loramix.harness import LoramixLM

    lm = LoramixLM(model=demo, batch_size=2)
    ids = demo.tokenizer("1.30>0.20?").input_ids
    requests = [(None, ids, demo.tokenizer("yes").input_ids), (None, ids[:4], ids[4:]), (None, ids, [3]),
                # a composite answer: the forward expert's number, then the compare expert's verdict
                (None, demo.tokenizer("GRAVY<FIITGLVRGLTKLF>=").input_ids, demo.tokenizer("1.52>-0.12?yes").input_ids)]
    got = [lp for lp, _ in lm._loglikelihood_tokens(requests)]
    for (_, context, continuation), value in zip(requests, got):
        whole = torch.tensor([context + continuation])
        with torch.no_grad():
            lp = torch.log_softmax(demo(whole).logits[0].float(), -1)
        want = sum(float(lp[len(context) - 1 + k, t]) for k, t in enumerate(continuation))
        assert value == pytest.approx(want, abs=1e-5)
    qa = LoramixLM(model=demo, system="expert:qa")._loglikelihood_tokens(requests[:1])[0][0]
    with torch.no_grad():
        s = torch.zeros(1, len(ids) + 3, demo.n_layers, demo.n_experts)
        s[..., demo.expert_names.index("qa")] = 1
        lp = torch.log_softmax(demo(torch.tensor([requests[0][1] + requests[0][2]]), scalings=s).logits[0], -1)
    assert qa == pytest.approx(sum(float(lp[len(ids) - 1 + k, t]) for k, t in enumerate(requests[0][2])), abs=1e-5)
    held = LoramixLM(model=demo, mode="prompt")._loglikelihood_tokens(requests[3:])[0][0]
    assert held != pytest.approx(got[3], abs=1e-3)  # prompt mode holds the context's last scalings (forward's)
    with pytest.raises(loramix.LoramixError, match="system="):
        LoramixLM(model=demo, system="expert:nope")


@pytest.mark.slow
def test_lm_eval_native_and_through_the_server_agree(tasks, demo, tmp_path):
    ckpt = shipped_checkpoint()
    src = str(Path(loramix.__file__).parents[1])
    env = {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}
    native = tmp_path / "native"
    command = [
        sys.executable,
        "-m",
        "loramix.harness",
        "--model",
        "loramix",
        "--model_args",
        f"checkpoint={ckpt},mode=granular",
        "--tasks",
        "demo_compare,demo_qa",
        "--include_path",
        str(tasks),
        "--batch_size",
        "4",
        "--output_path",
        str(native),
        "--log_samples",
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]

    import lm_eval
    from lm_eval.tasks import TaskManager

    server = Server(create_app(demo, model_id="demo"))
    try:
        api = lm_eval.simple_evaluate(
            model="local-completions",
            model_args=f"model=demo,base_url={server.url}/v1/completions,tokenizer={ckpt / 'tokenizer'},"
            "tokenizer_backend=huggingface,max_length=96,num_concurrent=1",
            tasks=["demo_compare", "demo_qa"],
            task_manager=TaskManager(include_path=str(tasks)),
            batch_size=4,
            log_samples=True,
        )
    finally:
        server.stop()
    results = json.loads(next(native.rglob("results_*.json")).read_text())["results"]
    assert api["results"]["demo_compare"]["acc,none"] == results["demo_compare"]["acc,none"]
    assert api["results"]["demo_qa"]["exact_match,none"] == results["demo_qa"]["exact_match,none"]
    assert results["demo_qa"]["exact_match,none"] > 0.5  # the mixture answers the Q&A expert's questions
    for ours, theirs in zip(
        _samples(native, "demo_compare"), sorted(api["samples"]["demo_compare"], key=lambda s: s["doc_id"])
    ):
        for (a, greedy_a), (b, greedy_b) in zip([r[0] for r in ours["resps"]], [r[0] for r in theirs["resps"]]):
            assert float(a) == pytest.approx(float(b), abs=1e-4) and str(greedy_a) == str(greedy_b)
    answers = [s["resps"][0][0] for s in _samples(native, "demo_qa")]
    assert answers == [s["resps"][0][0] for s in sorted(api["samples"]["demo_qa"], key=lambda s: s["doc_id"])]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ("bogus_key=1", "unknown model_args ['bogus_key']; known: "),
        ("mod=prompt", "unknown model_args ['mod']; known: "),
        ("quantize=fp3", "quantize='fp3': expected one of int8, int4, nf4 or none"),
        ("batch_size=-3", "batch_size=-3 must be an integer >= 1 or 'auto'"),
        ("batch_size=many", "batch_size='many' must be an integer >= 1 or 'auto'"),
        ("dtype=float7", "dtype='float7': expected one of float32, fp32, bfloat16, bf16, float16, fp16"),
        ("max_length=0", "max_length=0 must be an integer >= 1"),
    ],
)
def test_native_model_args_are_checked(args, message):
    from loramix.harness import LoramixLM

    with pytest.raises(loramix.ConfigError) as error:
        # as lm-eval builds the model from --model_args, with its own batch_size / max_batch_size / device
        LoramixLM.create_from_arg_string(f"checkpoint={shipped_checkpoint()},{args}", {"device": "cpu"})
    assert message in str(error.value) and "\n" not in str(error.value)


def test_native_model_errors_are_one_line(monkeypatch, capsys):
    import lm_eval.__main__

    from loramix import harness

    def evaluate():  # lm-eval's command line, as far as building the model from --model_args
        harness.LoramixLM.create_from_arg_string(f"checkpoint={shipped_checkpoint()},bogus_key=1", {"batch_size": 1})

    monkeypatch.setattr(lm_eval.__main__, "cli_evaluate", evaluate)
    with pytest.raises(SystemExit) as exit_:
        harness.main()
    lines = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
    assert exit_.value.code == 1 and len(lines) == 1, lines
    assert lines[0].startswith("error: unknown model_args ['bogus_key']; known: base, batch_size, checkpoint")


class _Launch:
    """What `accelerate launch --num_processes 2` tells process 1 (Accelerate's PartialState, as the model reads it)."""

    num_processes = 2
    process_index = 1
    is_main_process = False
    device = torch.device("cpu")


def test_native_model_takes_rank_and_world_size_from_the_launch(monkeypatch):
    """Under a launch the model reports Accelerate's global process index and count (lm-eval's evaluator splits the
    documents by them) and loads on the process's device, whatever device lm-eval passes; alone, rank 0 of 1."""
    from loramix import harness

    alone = harness.LoramixLM(model=loramix.load(shipped_checkpoint()))
    assert (alone.rank, alone.world_size) == (0, 1)
    monkeypatch.setattr(harness, "processes", lambda: _Launch())
    lm = harness.LoramixLM.create_from_arg_string(f"checkpoint={shipped_checkpoint()}", {"device": "cuda:0"})
    assert (lm.rank, lm.world_size, lm.device) == (1, 2, torch.device("cpu"))


def test_native_model_in_two_processes_equals_one_process(tasks, demo, tmp_path):
    """`python -m loramix.harness` in two processes (torchrun; accelerate launch starts the same): each rank scores
    half of the documents, rank 0 alone writes the results, and they equal one process's."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    import loramix.harness

    src = str(Path(loramix.__file__).parents[1])
    env = {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    out = tmp_path / "two"
    env["ACCELERATE_USE_CPU"] = "true"  # CPU processes (gloo) on a machine with GPUs too
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "loramix.harness", "--model", "loramix",
               "--model_args", f"checkpoint={shipped_checkpoint()}", "--tasks", "demo_compare,demo_qa",
               "--include_path", str(tasks), "--batch_size", "4", "--output_path", str(out), "--log_samples"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert len(list(out.rglob("results_*.json"))) == 1
    two = json.loads(next(out.rglob("results_*.json")).read_text())["results"]
    one = lm_eval.simple_evaluate(model=loramix.harness.LoramixLM(model=demo, batch_size=4),
                                  tasks=["demo_compare", "demo_qa"], task_manager=TaskManager(include_path=str(tasks)))
    for task, metric in (("demo_compare", "acc,none"), ("demo_qa", "exact_match,none")):
        assert two[task][metric] == one["results"][task][metric], task
    assert [s["doc_id"] for s in _samples(out, "demo_qa")] == list(range(8))


def test_generate_until_stops_each_row_at_its_until_string(demo, monkeypatch):
    """Rows stop once they wrote an `until` string (they no longer run on to EOS or max_gen_toks), and the answers
    are the same text as generating to the end and cutting."""
    from types import SimpleNamespace

    from loramix.harness import LoramixLM

    lm = LoramixLM(model=demo, batch_size=2)
    generated, generate = [], demo.generate

    def counted(*args, **kwargs):
        out = generate(*args, **kwargs)
        generated.append(out.new_tokens.shape[1])
        return out

    monkeypatch.setattr(demo, "generate", counted)
    prompts = ["GRAVY<GLWSKIKEVGKEAAKAAAKAAGKAALGAVSEAV>=", "What is the mass of W?"]
    cut = lm.generate_until([SimpleNamespace(args=(p, {"until": ["."], "max_gen_toks": 40})) for p in prompts])
    whole = lm.generate_until([SimpleNamespace(args=(p, {"until": [], "max_gen_toks": 40})) for p in prompts])
    assert all("." in text for text in whole)
    assert cut == [text[: text.index(".")] for text in whole]
    assert generated[0] < generated[1]  # fewer tokens generated: the rows stopped at "."


def test_chat_templating_as_lm_evals_hf_model(llama_dir, llama_experts):
    """--apply_chat_template: the few-shot conversation rendered with the tokenizer's template (continuing the last
    assistant message when asked), or the plain fallback; the tokenizer's name fingerprints the cache."""
    from loramix.harness import LoramixLM
    from loramix.text import render_chat

    from conftest import char_tokenizer

    tok = char_tokenizer()
    mix = loramix.from_pretrained(llama_dir, llama_experts, loramix.MixConfig(), tokenizer=tok)
    plain = LoramixLM(model=mix)
    chat = [{"role": "user", "content": "AB?"}, {"role": "assistant", "content": "C"}]
    assert plain.apply_chat_template(chat[:1]) == render_chat(tok, chat[:1]) == "user: AB?\nassistant:"
    assert plain.apply_chat_template(chat, add_generation_prompt=False) == "user: AB?\nassistant: C"
    assert plain.chat_template(True) == "" and plain.tokenizer_name
    tok.chat_template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
    tok.chat_template += "{% if add_generation_prompt %}<assistant>{% endif %}"
    templated = LoramixLM(model=mix)
    assert templated.apply_chat_template(chat[:1]) == "<user>AB?<assistant>"
    assert templated.apply_chat_template(chat, add_generation_prompt=False) == "<user>AB?<assistant>C"
    assert templated.chat_template(True) == tok.chat_template


def test_python_m_harness_without_lm_eval_names_the_extra(tmp_path):
    (tmp_path / "lm_eval.py").write_text('raise ModuleNotFoundError("No module named \'lm_eval\'", name="lm_eval")\n')
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    out = subprocess.run([sys.executable, "-m", "loramix.harness", "--help"], capture_output=True, text=True, env=env)
    assert out.returncode == 1 and out.stderr == "error: lm_eval is not installed: pip install 'loramix[eval]'\n"
