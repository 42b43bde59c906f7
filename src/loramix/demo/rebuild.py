"""`loramix demo --rebuild`: re-create every weight from scratch (fixed seeds, the public training API), run the demo
on the rebuilt weights, and compare its numbers with the shipped ones."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from ..console import make_console
from ..io import check_owned_files, write_owned_files
from .build import BuildConfig, build
from .run import RESULT_FILES, run_demo, weights_dir
from .world import DOMAINS

__all__ = ["compare_with_shipped", "rebuild_and_compare", "rebuild_smollm2"]


def rebuild_and_compare(
    out_dir: str | Path,
    *,
    threads: int = 2,
    console: Any = None,
    config: BuildConfig | None = None,
    sizes: dict[str, int] | None = None,
) -> dict[str, Any]:
    """Build every weight into OUT/build (BuildConfig defaults: the shipped weights' recipe), run the demo on them,
    and compare each system's primary metrics with the shipped results.json; writes OUT/rebuild.json."""
    console = console or make_console()
    out = check_owned_files(out_dir, ("rebuild.json", *RESULT_FILES), what="--out")
    config = config or BuildConfig(threads=threads)
    start = time.perf_counter()
    console.print(f"[bold]rebuilding the mini-world[/bold] in {out / 'build'} (base, 4 experts, 2 gates)")
    record = build(out / "build", config, progress=True)
    console.print(f"built in {record['seconds'] / 60:.1f} min")
    payload = run_demo(
        out,
        checkpoint=out / "build" / "checkpoint",
        truncated=out / "build" / "checkpoint-truncated",
        threads=threads,
        console=console,
        sizes=sizes,
    )
    comparison: dict[str, Any] = {"build_seconds": record["seconds"], "total_seconds": time.perf_counter() - start}
    comparison.update(compare_with_shipped(weights_dir() / "results.json", payload, (*DOMAINS, "composite"), console))
    write_owned_files(out, {"rebuild.json": json.dumps(comparison, indent=2)}, what="--out")
    return comparison


def compare_with_shipped(
    shipped_path: Path, payload: dict[str, Any], domains: tuple[str, ...], console: Any
) -> dict[str, Any]:
    """Each system's primary metric per domain, shipped -> rebuilt (printed as a table); the differences."""
    from rich.table import Table

    if not shipped_path.is_file():
        return {}
    shipped = json.loads(shipped_path.read_text())["results"]
    rebuilt = payload["results"]
    table = Table(
        "system",
        *[f"{d} shipped -> rebuilt" for d in domains],
        title="primary metrics: shipped weights vs rebuilt weights",
    )
    diffs = {}
    for system in rebuilt["metrics"]:
        cells = []
        for domain in domains:
            metric = rebuilt["primary_metric"][domain]
            a = shipped["metrics"].get(system, {}).get(domain, {}).get(metric)
            b = rebuilt["metrics"][system][domain][metric]
            diffs[f"{system}/{domain}"] = None if a is None else b - a
            cells.append("-" if a is None else f"{a:.2f} -> {b:.2f}")
        table.add_row(system, *cells)
    console.print(table)
    known = [abs(v) for v in diffs.values() if v is not None]
    out = {
        "differences": diffs,
        "max_abs_difference": max(known) if known else None,
        "mean_abs_difference": sum(known) / len(known) if known else None,
    }
    if known:
        console.print(
            f"largest difference {out['max_abs_difference']:.3f}, mean {out['mean_abs_difference']:.3f} "
            "(same seeds; float summation order, thread count and device can still move greedy answers)"
        )
    return out


def rebuild_smollm2(
    out_dir: str | Path,
    *,
    threads: int = 2,
    console: Any = None,
    config: Any = None,
    sizes: dict[str, int] | None = None,
) -> dict[str, Any]:
    """The SmolLM2 demo's weights from scratch into OUT/build (SmolBuildConfig defaults: the shipped recipe), laid
    out as shipped in OUT/build/weights, the demo run on them, and the comparison with the shipped results.json."""
    import shutil

    import torch

    from .smollm2 import build as build_smollm2
    from .smollm2 import ship
    from .smollm2_run import run_smollm2_demo, smollm2_weights

    console = console or make_console()
    torch.set_num_threads(threads)
    out = check_owned_files(out_dir, ("rebuild.json", *RESULT_FILES), what="--out")
    start = time.perf_counter()
    console.print(
        f"[bold]rebuilding the SmolLM2 demo[/bold] in {out / 'build'} (chat references, 4 experts, 2 gates, "
        "the joint stage)"
    )
    record = build_smollm2(out / "build", config)
    console.print(f"built in {record['seconds'] / 60:.1f} min")
    weights = out / "build" / "weights"
    if (weights / "build.json").is_file():  # the layout of an earlier rebuild here
        shutil.rmtree(weights)
    ship(out / "build", weights)
    payload = run_smollm2_demo(out, weights=weights, threads=threads, console=console, sizes=sizes)
    comparison: dict[str, Any] = {"build_seconds": record["seconds"], "total_seconds": time.perf_counter() - start}
    domains = (*DOMAINS, "composite", "chat")
    comparison.update(compare_with_shipped(smollm2_weights() / "results.json", payload, domains, console))
    write_owned_files(out, {"rebuild.json": json.dumps(comparison, indent=2)}, what="--out")
    return comparison
