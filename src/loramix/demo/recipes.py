"""Training recipes for the mini-world, compared on the held-out set (docs/demo.md, "Training recipes, compared on the
held-out set", "Round 3", "Round 4"): each trains a new gate over a demo build's base and experts, or a new forward
expert (and gate). A recipe is a change to EARLIER, the build of the weights shipped up to round 4 (forward expert on
the split for 1,500 steps, a gate alone for 1,500 steps), over whose weights every recipe in the docs was trained:
`--from WEIGHTS` takes them (src/loramix/demo/weights at commit ce6c8fa: docs/demo.md, "Round 4"); the default is the
weights shipped now. The shipped build (BuildConfig's defaults) is
"tilted-expert-mostly-split+joint-keep-inverse-xlong-gate-tilted-half" (docs/demo.md, "Round 6").

    python -m loramix.demo.recipes RECIPE OUT_DIR [--truncated] [--from WEIGHTS]

trains RECIPE's gate into OUT_DIR/checkpoint (with --truncated, also the k = L/2 gate into
OUT_DIR/checkpoint-truncated). A recipe with "expert_data" ("varied", "tilted") first trains a new forward expert
over the shipped base into OUT_DIR/experts/forward (the other experts copied); with "gate": "shipped" it keeps the
shipped gate as it is (the gate reads the base's hidden states, which the experts do not change). An expert or gate
already in OUT_DIR is kept (a second run with --truncated adds the truncated gate). Then `python -m
loramix.demo.diagnose OUT_DIR/checkpoint OUT.json` or `loramix eval OUT_DIR/checkpoint --data test.jsonl --heldout
heldout.jsonl` scores it. Torch threads: $LORAMIX_THREADS, default 1.
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

__all__ = ["EARLIER", "RECIPES", "earlier_config", "reexpert", "regate"]

# what the recipes change: the build of the weights shipped before round 4 (BuildConfig's defaults then)
EARLIER: dict[str, Any] = {"expert_data": "split", "expert_split_share": 0.5, "forward_expert_steps": 1500,
                           "gate_steps": 1500, "trainable_experts": False, "expert_lr_scale": 1.0,
                           "frozen_experts": (), "gate_data": "split"}


def earlier_config(**changes: Any) -> BuildConfig:
    """EARLIER's BuildConfig with `changes` (a recipe's options)."""
    return BuildConfig(**{**EARLIER, **changes})


# the forward expert that generalises alone (docs/demo.md, "Round 3"): tilted, 3/4 of its records from the split
_MOSTLY_SPLIT: dict[str, Any] = {"expert_data": "tilted", "expert_split_share": 0.75, "forward_expert_steps": 3000}
# over it, a new gate trained with every expert (at 0.1x the gate's learning rate)
_JOINT: dict[str, Any] = {**_MOSTLY_SPLIT, "gate": "train", "trainable_experts": True, "expert_lr_scale": 0.1}
# +joint with the design expert kept as it trained alone, for three times the gate's steps (round 5)
_XLONG: dict[str, Any] = {**_JOINT, "frozen_experts": ("inverse",), "gate_steps": 4500}

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
    # a forward expert trained on varied peptides (fresh.forward_expert_records), the shipped gate kept
    "varied-expert": {"expert_data": "varied", "gate": "shipped"},
    # the same expert, and a new gate trained over it (the split's records): what `build` makes with expert_data
    "varied-expert+gate": {"expert_data": "varied", "gate": "train"},
    # the forward expert on varied peptides for twice the steps (3,000 of 32), the shipped gate kept
    "varied-expert-long": {"expert_data": "varied", "forward_expert_steps": 3000, "gate": "shipped"},
    # a forward expert trained on varied and hydropathy-tilted peptides (every GRAVY range), the shipped gate kept
    "tilted-expert": {"expert_data": "tilted", "gate": "shipped"},
    # the same expert, and a new gate trained over it
    "tilted-expert+gate": {"expert_data": "tilted", "gate": "train"},
    # the tilted expert for twice the steps (3,000 of 32), the shipped gate kept: the precision on the split's peptides
    "tilted-expert-long": {"expert_data": "tilted", "forward_expert_steps": 3000, "gate": "shipped"},
    # the tilted expert, three quarters of its records from the training split, twice the steps, the shipped gate kept
    "tilted-expert-mostly-split": {**_MOSTLY_SPLIT, "gate": "shipped"},
    # the same expert, and a new gate trained over it
    "tilted-expert-mostly-split+gate": {**_MOSTLY_SPLIT, "gate": "train"},
    # the same expert, then the gate and every expert trained together (the experts at 0.1x the gate's rate)
    "tilted-expert-mostly-split+joint": _JOINT,
    # the same (0.1x), with an L2 anchor to the experts' starting values
    "tilted-expert-mostly-split+joint-anchor": {**_JOINT, "expert_anchor_weight": 10.0},
    # the same at 0.03x, no anchor
    "tilted-expert-mostly-split+joint-0.03": {**_JOINT, "expert_lr_scale": 0.03},
    # +joint (0.1x) for twice the gate's steps
    "tilted-expert-mostly-split+joint-long": {**_JOINT, "gate_steps": 3000},
    # +joint (0.1x) with the routing term at 10 (the shipped 3)
    "tilted-expert-mostly-split+joint-route": {**_JOINT, "route_weight": 10.0},
    # the same at 0.3x
    "tilted-expert-mostly-split+joint-0.3": {**_JOINT, "expert_lr_scale": 0.3},
    # +joint (0.1x) with the design (inverse) expert kept as it trained alone
    "tilted-expert-mostly-split+joint-keep-inverse": {**_JOINT, "frozen_experts": ("inverse",)},
    # +joint-keep-inverse for twice the gate's steps
    "tilted-expert-mostly-split+joint-keep-inverse-long": {**_JOINT, "frozen_experts": ("inverse",),
                                                           "gate_steps": 3000},
    # +joint-keep-inverse for three times the gate's steps
    "tilted-expert-mostly-split+joint-keep-inverse-xlong": _XLONG,
    # +joint-keep-inverse-xlong, the gate's forward records drawn as the forward expert's (a quarter new peptides)
    "tilted-expert-mostly-split+joint-keep-inverse-xlong-gate-tilted": {
        **_XLONG, "gate_data": "expert", "gate_split_share": 0.75},
    # the same, half of the gate's forward records new peptides
    "tilted-expert-mostly-split+joint-keep-inverse-xlong-gate-tilted-half": {
        **_XLONG, "gate_data": "expert", "gate_split_share": 0.5},
    # +joint-keep-inverse with the other experts at 0.3x the gate's rate
    "tilted-expert-mostly-split+joint-keep-inverse-0.3": {**_JOINT, "frozen_experts": ("inverse",),
                                                          "expert_lr_scale": 0.3},
    # the same, the forward expert kept too (it generalises alone): compare and Q&A train with the gate
    "tilted-expert-mostly-split+joint-keep-forward-inverse": {**_JOINT, "frozen_experts": ("forward", "inverse")},
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


def reexpert(checkpoint: str | Path, out: str | Path, cfg: BuildConfig, *, gate: str = "train",
             truncated: str | Path | None = None, progress: bool = True) -> dict[str, Any]:
    """A new forward expert (cfg.expert_data's records) over `checkpoint`'s base, the other experts as they are; then
    the gate: `gate="shipped"` copies `checkpoint`'s (and `truncated`'s) gate, "train" trains a new one (cfg's).
    Writes OUT/base, OUT/experts/<name>, OUT/checkpoint and, with `truncated`, OUT/checkpoint-truncated."""
    import shutil

    from ..interop.peft import write_peft_experts
    from ..loading import load
    from ..model import from_pretrained
    from .build import train_demo_expert

    checkpoint, out = Path(checkpoint), Path(out)
    shipped = load(checkpoint)
    base_dir = out / "base"
    if not base_dir.exists():
        shutil.copytree(checkpoint / "base", base_dir)
        for f in (checkpoint / "tokenizer").iterdir():
            shutil.copy(f, base_dir / f.name)
    names = shipped.expert_names
    write_peft_experts(shipped, out / "experts-shipped", names)
    experts = {n: out / "experts-shipped" / n for n in names}
    world = World(seed=cfg.seed)
    record: dict[str, Any] = {}
    start = time.perf_counter()
    if not (out / "experts" / "forward" / "adapter_config.json").is_file():  # else: an earlier run's, reused
        record["expert forward"] = train_demo_expert(
            base_dir, world, "forward", out / "experts" / "forward", cfg, progress
        )
        record["expert seconds"] = time.perf_counter() - start
    experts["forward"] = out / "experts" / "forward"
    runs: list[tuple[str, Any, int | None]] = [("checkpoint", shipped, None)]
    if truncated is not None:
        t = load(truncated)
        runs.append(("checkpoint-truncated", t, t.config.scaling_layer))
    for name, source, k in runs:
        if (out / name / "loramix_config.json").is_file():  # an earlier run's gate over the same experts: kept
            continue
        torch.manual_seed(cfg.seed)
        config = dataclasses.replace(source.config, trainable_experts=cfg.trainable_experts, gate=dataclasses.replace(
            source.config.gate, dropout=cfg.gate_dropout, depth=cfg.gate_depth, width=cfg.gate_width))
        model = from_pretrained(base_dir, experts, config)
        if gate == "shipped":
            model.gate.load_state_dict(source.gate.state_dict())
            model.save(out / name, include_base=k is None)
            continue
        start = time.perf_counter()
        record[name] = train_demo_gate(model, world, gate_training_data(world, cfg), out / name, cfg, progress,
                                       include_base=k is None)
        record[f"{name} seconds"] = time.perf_counter() - start
    return record


def main(argv: list[str] | None = None) -> None:
    from ..io import write_text_atomic
    from .run import shipped_checkpoint

    args = list(sys.argv[1:] if argv is None else argv)
    truncated = "--truncated" in args
    args = [a for a in args if a != "--truncated"]
    weights = shipped_checkpoint().parent
    if "--from" in args:
        i = args.index("--from")
        if i + 1 == len(args):
            raise SystemExit("--from needs a weights folder (with checkpoint/ and checkpoint-truncated/)")
        weights = Path(args.pop(i + 1))
        args.pop(i)
    if len(args) != 2 or args[0] not in RECIPES:
        raise SystemExit(f"usage: python -m loramix.demo.recipes {{{','.join(RECIPES)}}} OUT_DIR [--truncated] "
                         "[--from WEIGHTS]")
    threads = int(os.environ.get("LORAMIX_THREADS", "1"))
    torch.set_num_threads(threads)
    options = dict(RECIPES[args[0]])
    gate = options.pop("gate", None)
    cfg = earlier_config(threads=threads, **options)
    out = Path(args[1])
    record: dict[str, Any] = {"recipe": args[0], "config": dataclasses.asdict(cfg)}
    start = time.perf_counter()
    if gate is not None:
        record["build"] = reexpert(weights / "checkpoint", out, cfg, gate=gate,
                                   truncated=weights / "checkpoint-truncated" if truncated else None)
    else:
        record["checkpoint"] = regate(weights / "checkpoint", out / "checkpoint", cfg)
    if truncated and gate is None:
        k = max(1, cfg.layers // 2)
        record["checkpoint-truncated"] = regate(weights / "checkpoint", out / "checkpoint-truncated", cfg,
                                                scaling_layer=k)
    record["seconds"] = time.perf_counter() - start
    previous = out / "recipe.json"  # an earlier run into OUT_DIR (the gate, before --truncated): kept beside this one
    if previous.is_file():
        earlier = json.loads(previous.read_text())
        record["earlier_runs"] = [*earlier.pop("earlier_runs", []), earlier]
    write_text_atomic(previous, json.dumps(record, indent=2, default=str))


if __name__ == "__main__":
    main()
