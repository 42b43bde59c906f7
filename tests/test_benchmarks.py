"""benchmarks/gpu.py runs end to end (tiny model, CPU, cheap compile backend), JSON lines naming the device."""

import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu.py"


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
