"""Gate training recipes for the mini-world, compared on the held-out set (docs/demo.md, "Training recipes, compared
on the held-out set"): each trains a new gate over the shipped base and experts, which stay as they are.

    python -m loramix.demo.recipes RECIPE OUT_DIR [--truncated]

trains RECIPE's gate into OUT_DIR/checkpoint (with --truncated, also the k = L/2 gate into
OUT_DIR/checkpoint-truncated), then `python -m loramix.demo.diagnose OUT_DIR/checkpoint OUT.json` or `loramix eval
OUT_DIR/checkpoint --data test.jsonl --heldout heldout.jsonl` scores it. Torch threads: $LORAMIX_THREADS, default 1.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

from .build import BuildConfig, gate_training_data, train_demo_gate
from .world import World

__all__ = ["RECIPES", "regate"]

RECIPES: dict[str, dict[str, Any]] = {
    # the earlier shipped gate: the training split's records, repeated
    "split": {"gate_data": "split"},
    # a new peptide in every record (fresh.py), contexts on compare and Q&A
    "fresh": {"gate_data": "fresh"},
    # fresh, and an entropy term towards one expert per token
    "fresh+entropy": {"gate_data": "fresh", "entropy_weight": 0.2},
    # the training split's records, and the entropy term
    "split+entropy": {"gate_data": "split", "entropy_weight": 0.2},
    # fresh, dropout inside the gate, the gate of the lowest validation loss
    "fresh+dropout+best": {"gate_data": "fresh", "gate_dropout": 0.2, "gate_keep_best": True},
}


def regate(checkpoint: str | Path, out: str | Path, cfg: BuildConfig, *, scaling_layer: int | None = None,
           progress: bool = True) -> dict[str, Any]:
    """A new gate (cfg's) over `checkpoint`'s base and experts, trained with the demo's objective into `out`."""
    from ..gate import build_gate
    from ..loading import load

    torch.manual_seed(cfg.seed)
    model = load(checkpoint)
    gate_config = dataclasses.replace(model.config.gate, dropout=cfg.gate_dropout, depth=cfg.gate_depth,
                                      width=cfg.gate_width)
    model.config = dataclasses.replace(model.config, gate=gate_config, scaling_layer=scaling_layer)
    hidden = model.model.config.hidden_size
    first = next(iter(model.gate.parameters()))
    model.gate = build_gate(gate_config, hidden, model.n_layers, model.n_experts).to(first.device, first.dtype)
    world = World(seed=cfg.seed)
    mixture = gate_training_data(world, cfg)
    return train_demo_gate(model, world, mixture, Path(out), cfg, progress, include_base=scaling_layer is None)


def main(argv: list[str] | None = None) -> None:
    from .run import shipped_checkpoint

    args = sys.argv[1:] if argv is None else argv
    truncated = "--truncated" in args
    args = [a for a in args if a != "--truncated"]
    if len(args) != 2 or args[0] not in RECIPES:
        raise SystemExit(f"usage: python -m loramix.demo.recipes {{{','.join(RECIPES)}}} OUT_DIR [--truncated]")
    threads = int(os.environ.get("LORAMIX_THREADS", "1"))
    torch.set_num_threads(threads)
    cfg = BuildConfig(threads=threads, **RECIPES[args[0]])
    out = Path(args[1])
    record: dict[str, Any] = {"recipe": args[0], "config": dataclasses.asdict(cfg)}
    start = time.perf_counter()
    record["checkpoint"] = regate(shipped_checkpoint(), out / "checkpoint", cfg)
    if truncated:
        k = max(1, cfg.layers // 2)
        record["checkpoint-truncated"] = regate(shipped_checkpoint(), out / "checkpoint-truncated", cfg,
                                                scaling_layer=k)
    record["seconds"] = time.perf_counter() - start
    (out / "recipe.json").write_text(json.dumps(record, indent=2, default=str))


if __name__ == "__main__":
    main()
