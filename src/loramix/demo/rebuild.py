"""`loramix demo --rebuild`: re-create every weight from scratch (fixed seeds, the public training API), run the demo
on the rebuilt weights, and compare its numbers with the shipped ones."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from ..io import check_owned_files, write_owned_files
from .build import BuildConfig, build
from .run import RESULT_FILES, run_demo, weights_dir
from .world import DOMAINS

__all__ = ["rebuild_and_compare"]


def rebuild_and_compare(out_dir: str | Path, *, threads: int = 2, console: Any = None,
                        config: BuildConfig | None = None, sizes: dict[str, int] | None = None) -> dict[str, Any]:
    """Build every weight into OUT/build (BuildConfig defaults: the shipped weights' recipe), run the demo on them,
    and compare each system's primary metrics with the shipped results.json; writes OUT/rebuild.json."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    out = check_owned_files(out_dir, ("rebuild.json", *RESULT_FILES), what="--out")
    config = config or BuildConfig(threads=threads)
    start = time.perf_counter()
    console.print(f"[bold]rebuilding the mini-world[/bold] in {out / 'build'} (base, 4 experts, 2 gates)")
    record = build(out / "build", config, progress=True)
    console.print(f"built in {record['seconds'] / 60:.1f} min")
    payload = run_demo(out, checkpoint=out / "build" / "checkpoint", truncated=out / "build" / "checkpoint-truncated",
                       threads=threads, console=console, sizes=sizes)
    shipped_path = weights_dir() / "results.json"
    comparison: dict[str, Any] = {"build_seconds": record["seconds"], "total_seconds": time.perf_counter() - start}
    if shipped_path.is_file():
        shipped = json.loads(shipped_path.read_text())["results"]
        rebuilt = payload["results"]
        table = Table("system", *[f"{d} shipped -> rebuilt" for d in (*DOMAINS, "composite")],
                      title="primary metrics: shipped weights vs rebuilt weights")
        diffs = {}
        for system in rebuilt["metrics"]:
            cells = []
            for domain in (*DOMAINS, "composite"):
                metric = rebuilt["primary_metric"][domain]
                a = shipped["metrics"].get(system, {}).get(domain, {}).get(metric)
                b = rebuilt["metrics"][system][domain][metric]
                diffs[f"{system}/{domain}"] = None if a is None else b - a
                cells.append("-" if a is None else f"{a:.2f} -> {b:.2f}")
            table.add_row(system, *cells)
        console.print(table)
        known = [abs(v) for v in diffs.values() if v is not None]
        comparison.update({"differences": diffs, "max_abs_difference": max(known) if known else None,
                           "mean_abs_difference": sum(known) / len(known) if known else None})
        console.print(f"largest difference {comparison['max_abs_difference']:.3f}, mean "
                      f"{comparison['mean_abs_difference']:.3f} (same seeds; float summation order and thread "
                      f"count can still move a tiny model's greedy answers)")
    write_owned_files(out, {"rebuild.json": json.dumps(comparison, indent=2)}, what="--out")
    return comparison
