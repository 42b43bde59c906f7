"""Data-parallel evaluation in CPU processes (gloo): the split/gather helper, and `loramix eval` in two processes
against one (real launches in subprocesses, on the shipped demo checkpoint).

The launcher is torchrun (`--standalone`: a free port, so that launches of parallel test workers do not collide);
`accelerate launch --multi_gpu` on a machine without GPUs starts the same processes. `accelerate launch --cpu
--num_processes 2` starts one process (Accelerate runs several CPU processes only through mpirun): loramix says so."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import loramix
from loramix.demo.run import shipped_checkpoint
from loramix.demo.world import World
from loramix.parallel import split_map

SRC = str(Path(loramix.__file__).parents[1])
ENV = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1",
       "ACCELERATE_USE_CPU": "true"}  # CPU processes on a machine with GPUs too


def _launch(n: int, *args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n), *args]
    return subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=timeout)


SCRIPT = """
import json, sys
from loramix.parallel import finish, split_map, same_on_every_process

from loramix.parallel import processes

state = processes()
assert state.num_processes == 3, state.num_processes
out = {}
for n in (7, 2, 0):  # 3 processes: shares 3/2/2, 1/1/0 (a process with nothing), 0/0/0
    seen = []
    def fn(items):
        seen.append(list(items))
        return [(item, state.process_index) for item in items]
    out[n] = {"gathered": split_map(fn, [f"r{i}" for i in range(n)], state), "mine": seen[0]}
out["broadcast"] = same_on_every_process(f"from {state.process_index}", state)
with open(sys.argv[1] + f"/{state.process_index}.json", "w") as f:
    json.dump(out, f)
finish(state)
"""


def test_split_map_gathers_every_share_in_order_on_every_process(tmp_path):
    """Three processes, uneven shares (7 items: 3/2/2; 2 items: one process gets none): each process runs fn on its
    contiguous share only, and every process gets all results back in the items' order."""
    script = tmp_path / "split.py"
    script.write_text(SCRIPT)
    done = _launch(3, str(script), str(tmp_path), timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    runs = [json.loads((tmp_path / f"{rank}.json").read_text()) for rank in range(3)]
    for rank, run in enumerate(runs):
        assert run["7"]["gathered"] == [[f"r{i}", p] for i, p in enumerate([0, 0, 0, 1, 1, 2, 2])]
        assert run["7"]["mine"] == [["r0", "r1", "r2"], ["r3", "r4"], ["r5", "r6"]][rank]
        assert run["2"]["gathered"] == [["r0", 0], ["r1", 1]]
        assert run["2"]["mine"] == [["r0"], ["r1"], []][rank]
        assert run["0"]["gathered"] == []
        assert run["broadcast"] == "from 0"


def test_split_map_in_one_process_is_fn_and_checks_one_result_per_item():
    assert split_map(lambda items: [x * 2 for x in items], range(5)) == [0, 2, 4, 6, 8]
    with pytest.raises(ValueError, match="one per item"):
        split_map(lambda items: items[:-1], [1, 2, 3])


@pytest.fixture(scope="module")
def records(tmp_path_factory) -> Path:
    """A few records of every demo domain (two-segment composites included), shares not a multiple of 2."""
    world = World()
    sizes = {"forward": 3, "inverse": 3, "compare": 3, "qa": 3, "composite": 3}
    path = tmp_path_factory.mktemp("records") / "records.jsonl"
    rows = [r for d, n in sizes.items() for r in world.domain_records(d, "test", n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _eval_args(records: Path, out: Path) -> list[str]:
    return ["-m", "loramix", "eval", str(shipped_checkpoint()), "--data", str(records), "--out", str(out),
            "--batch-size", "4"]


def test_eval_in_two_processes_equals_one_process_and_writes_once(records, tmp_path):
    """`loramix eval` in two processes: the same metrics as one process, exactly (every
    system, oracle and router included), the table and results.json written by the main process alone."""
    from typer.testing import CliRunner

    from loramix.cli import app

    one = CliRunner().invoke(app, _eval_args(records, tmp_path / "one")[2:])
    assert one.exit_code == 0, one.output
    two = _launch(2, *_eval_args(records, tmp_path / "two"))
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("wrote") == 1 and two.stdout.count("primary metric per domain") == 1, two.stdout
    assert "15 records shared by 2 processes" in two.stdout
    a = json.loads((tmp_path / "one" / "results.json").read_text())
    b = json.loads((tmp_path / "two" / "results.json").read_text())
    for key in ("metrics", "kinds", "primary_metric"):
        assert json.dumps(b[key]) == json.dumps(a[key]), key  # NaN (R² of 1 record) compares equal as text
    assert set(b["tokens_per_s"]) == set(a["tokens_per_s"])  # throughput: the processes' tokens over the wall time


def test_eval_in_two_processes_refuses_a_foreign_out_on_every_process(records, tmp_path):
    """--out holding a results.json loramix did not write: the main process decides, every process stops with the
    same error before loading the model, and the file is untouched."""
    out = tmp_path / "taken"
    out.mkdir()
    (out / "results.json").write_text("mine")
    done = _launch(2, *_eval_args(records, out))
    assert done.returncode != 0
    assert "error: --out" in done.stderr and "loramix did not write it" in done.stderr, done.stderr[-3000:]
    assert (out / "results.json").read_text() == "mine"


def test_accelerate_launch_cpu_says_it_started_one_process(tmp_path):
    """`accelerate launch --cpu --num_processes 2` starts one process: loramix warns and names the launch lines that
    start several (the run itself goes on, alone)."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2", "--num_machines",
               "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               *_eval_args(tmp_path / "missing.jsonl", tmp_path / "out")]
    done = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert "accelerate launch --cpu started one process" in done.stderr, done.stderr[-3000:]
    assert "torchrun --nproc_per_node N" in done.stderr


def test_eval_processes_with_different_options_refuse_together(records, tmp_path):
    """Rank 1 gets another --system than rank 0: every process stops with the same one-line error naming the
    option (their answers would be mixed under one label), and no results are written."""
    script = tmp_path / "ranks.py"
    script.write_text(
        "import os, sys\n"
        "from loramix.cli import main\n"
        "system = 'granular' if os.environ['RANK'] == '1' else 'base'\n"
        "sys.argv = ['loramix', *sys.argv[1:], '--system', system]\n"
        "main()\n"
    )
    done = _launch(2, str(script), *_eval_args(records, tmp_path / "out")[2:])
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 2, done.stderr[-3000:]
    assert all(e.startswith("error: --system: process 1 has ['granular'], the main process ['base']") for e in errors)
    assert not (tmp_path / "out" / "results.json").exists()
