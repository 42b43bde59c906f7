"""`loramix eval` in one process against N CPU processes under torchrun (issue 31): wall time of the
whole command (start, loading and evaluation), interleaved runs, and whether the metrics are equal.

    python benchmarks/eval_parallel.py --processes 2 --repeats 2      # runs 1, 2, 1, 2; OMP_NUM_THREADS=1 each

Records: the demo's test subset (`loramix.demo.run.EVAL_SIZES`, 260 records) on the shipped checkpoint.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2, help="pairs of runs (1 process, then N)")
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of every process")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--scale", type=float, default=1.0, help="records: EVAL_SIZES times this")
    args = parser.parse_args()

    sys.path.insert(0, str(SRC))
    from loramix.demo.run import EVAL_SIZES, shipped_checkpoint, test_records
    from loramix.demo.world import World

    work = Path(tempfile.mkdtemp(prefix="eval-parallel-"))
    records = work / "records.jsonl"
    rows = test_records(World(), {d: max(1, round(n * args.scale)) for d, n in EVAL_SIZES.items()})
    records.write_text("".join(json.dumps(r) + "\n" for r in rows))
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": str(args.threads)}
    eval_args = [
        "-m",
        "loramix",
        "eval",
        str(shipped_checkpoint()),
        "--data",
        str(records),
        "--batch-size",
        str(args.batch_size),
    ]
    # torchrun: `accelerate launch --cpu` starts one process (docs/scaling.md); --standalone picks a free port
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(args.processes)]
    env["ACCELERATE_USE_CPU"] = "true"
    commands = {"1": [sys.executable, *eval_args], str(args.processes): [*launch, *eval_args]}
    times: dict[str, list[float]] = {k: [] for k in commands}
    metrics: dict[str, str] = {}
    for run in range(args.repeats):
        for name, command in commands.items():
            out = work / f"{name}-{run}"
            start = time.perf_counter()
            subprocess.run([*command, "--out", str(out)], env=env, check=True, capture_output=True, text=True)
            seconds = time.perf_counter() - start
            times[name].append(seconds)
            result = json.loads((out / "results.json").read_text())
            metrics.setdefault(name, json.dumps(result["metrics"]))
            print(
                json.dumps(
                    {
                        "processes": int(name),
                        "run": run,
                        "seconds": round(seconds, 2),
                        "metrics_equal_to_1": json.dumps(result["metrics"]) == metrics.get("1"),
                    }
                ),
                flush=True,
            )
    one, many = statistics.median(times["1"]), statistics.median(times[str(args.processes)])
    print(
        json.dumps(
            {
                "records": len(rows),
                "median_1": round(one, 2),
                f"median_{args.processes}": round(many, 2),
                "ratio": round(many / one, 3),
                "metrics_equal": len(set(metrics.values())) == 1,
            }
        )
    )


if __name__ == "__main__":
    main()
