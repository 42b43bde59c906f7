"""benchmarks/gpu.py runs end to end (tiny model, CPU, cheap compile backend), JSON lines naming the device."""

import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu.py"


def run_benchmark(name: str, args: str) -> str:
    """Run benchmarks/NAME with ARGS against this checkout's src/; its stdout (fails on a non-zero exit)."""
    env = {**os.environ, "PYTHONPATH": str(SCRIPT.parents[1] / "src")}
    result = subprocess.run(
        [sys.executable, str(SCRIPT.parent / name), *args.split()], capture_output=True, text=True, timeout=600, env=env
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def test_gpu_benchmark_runs_tiny_on_cpu(tmp_path):
    args = (
        "--threads 2 --device cpu --size tiny --batch 2 --prompt 8 --new 4 --rounds 1 --prefill 1x16 --exact-tokens 4"
    )
    env = {**os.environ, "PYTHONPATH": str(SCRIPT.parents[1] / "src")}
    result = subprocess.run(
        [sys.executable, str(SCRIPT), *args.split(), "--backend", "eager", "--out", str(tmp_path / "o")],
        capture_output=True, text=True, timeout=600, env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    records = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert records and all(r["device"].startswith("cpu") for r in records)
    decode = {r["variant"]: r for r in records if r["kind"] == "decode"}
    want = {"hf_eager", "hf_static", *(f"{p}_{m}" for p in ("lm", "lmc") for m in ("granular", "prompt", "truncated"))}
    assert set(decode) == want
    exact = next(r for r in records if r["kind"] == "exactness")
    assert exact["loramix_compiled_vs_eager_equal"] == exact["tokens"] == 4
    assert exact["loramix_cached_vs_recomputed_equal"] == 4
    assert any(r["kind"] == "prefill" for r in records)
    assert (tmp_path / "o").read_text().count("\n") == len(records)


def test_profile_step_runs_tiny(tmp_path):
    """benchmarks/profile_step.py prints its three tables (tiny model, the cheap "eager" compile backend)."""
    out = run_benchmark("profile_step.py", "--model tiny --threads 1 --steps 2 --rounds 1 --calls 3 --backend eager")
    rows = {line.split("|")[1].strip(): line for line in out.splitlines() if line.startswith("| ")}
    guards = "guard check (profiler: TorchDynamo Cache Lookup)"
    for row in ("Decoder.step (wall)", guards, "matmuls (profiler)", "held step (mixed pass with experts)"):
        assert row in rows, out
    step = [float(x) for x in rows["Decoder.step (wall)"].split("|")[2:5]]
    assert all(ms > 0 for ms in step)
    assert float(rows[guards].split("|")[2] or 0) == 0 < float(rows[guards].split("|")[3])  # eager: no guards
    assert sum(line.startswith("| q_proj |") for line in out.splitlines()) == 1


def test_cpu_layout_benchmark_runs_tiny():
    """benchmarks/cpu_layout.py times both layouts (tiny model): the transposed copies are transposed, the row-major
    copies are not, and every table row has a speed-up."""
    out = run_benchmark("cpu_layout.py", "--model tiny --threads 1 --new-tokens 2 --repeats 1 --matmuls 1 --batch 1")
    assert "transposed weights: 5 in the mixture, 5 in the base; row-major copies: 0, 0" in out, out
    rows = [line.split("|")[1:-1] for line in out.splitlines() if line.startswith("| ") and "x" in line.split("|")[-2]]
    names = {r[0].strip() for r in rows}
    assert {"transformers base", "loramix granular", "loramix prompt", "256 x 64", "128 x 64"} <= names, out


def test_row_products_benchmark_runs_tiny():
    """benchmarks/row_products.py: with the pass, the row-major products become reductions (each variant checked
    against the eager module inside the script) and the in-features-major ones stay matmuls."""
    out = run_benchmark("row_products.py", "--threads 1 --rounds 1 --tiny")
    rows = [[c.strip() for c in line.split("|")[1:-1]] for line in out.splitlines() if line.startswith("| 4")]
    assert [(r[0], r[2], r[3]) for r in rows] == [("48 x 32", "row-major", "2"), ("48 x 32", "in-features-major", "0")]
