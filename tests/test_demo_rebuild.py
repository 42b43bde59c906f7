"""`loramix demo --rebuild`'s comparison with the shipped numbers, at a tiny size. A file of its own: the default
run gives each file to one worker (--dist loadfile), and this build and test_demo.py's would otherwise share one."""

import json

import pytest


def test_rebuild_compares_with_the_shipped_numbers(tmp_path):
    from rich.console import Console

    from loramix.demo.build import BuildConfig
    from loramix.demo.rebuild import rebuild_and_compare
    from loramix.demo.run import weights_dir

    cfg = BuildConfig(hidden=32, layers=2, heads=2, intermediate=64, pretrain_steps=2, pretrain_batch=4,
                      expert_steps=2, expert_batch=4, gate_steps=2, gate_batch=4, gate_width=16)
    sizes = {"forward": 2, "inverse": 1, "compare": 2, "qa": 2, "composite": 1}
    console = Console(record=True, width=200)
    comparison = rebuild_and_compare(tmp_path, config=cfg, sizes=sizes, console=console)
    shipped = json.loads((weights_dir() / "results.json").read_text())["results"]
    rebuilt = json.loads((tmp_path / "results.json").read_text())["results"]
    saved = json.loads((tmp_path / "rebuild.json").read_text())
    assert saved["differences"].keys() == comparison["differences"].keys() and "build_seconds" in saved
    want = (rebuilt["metrics"]["granular"]["compare"]["exact_match"]
            - shipped["metrics"]["granular"]["compare"]["exact_match"])
    assert comparison["differences"]["granular/compare"] == pytest.approx(want)
    assert comparison["max_abs_difference"] >= abs(want)
    assert "shipped weights vs rebuilt weights" in console.export_text()
