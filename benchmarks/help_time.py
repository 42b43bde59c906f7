"""`loramix --help` wall time, median of 5 runs: a previous checkout's src/ against this one's, interleaved.

    python benchmarks/help_time.py /path/to/previous/checkout/src
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from pathlib import Path


def main() -> None:
    srcs = {"before": sys.argv[1], "after": str(Path(__file__).resolve().parents[1] / "src")}
    times: dict[str, list[float]] = {name: [] for name in srcs}
    for _ in range(5):
        for name, src in srcs.items():
            env = {**os.environ, "PYTHONPATH": src}
            start = time.perf_counter()
            subprocess.run([sys.executable, "-m", "loramix", "--help"], env=env, capture_output=True, check=True)
            times[name].append(time.perf_counter() - start)
    for name, values in times.items():
        shown = ", ".join(f"{v:.2f}" for v in values)
        print(f"{name}: median {statistics.median(values):.2f} s of 5 ({shown})")


if __name__ == "__main__":
    main()
