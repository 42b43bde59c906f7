"""A distribution-shift split on the demo's mini-world: a gate trained on long peptides only, tested on short ones.

The shipped experts and base are kept; a new MLP gate is trained with the demo's recipe (depth 2, width 64,
layerwise, the example-weighted loss and domain supervision, lr 0.01, batch 32) on the demo's gate mixture with every
peptide record of 20 residues or more (compare and Q&A records carry no peptide and are kept as they are). The peptide
domains (forward, design, composite) of the test split are then scored on their short peptides (< 20 residues: the
shift) and on their long ones (the gate's own distribution), for the oracle, the per-prompt router, loramix granular,
and the training-free Arrow router (top-2). `--contexts ema attention` trains one more long-only gate per context
(GateConfig.context; the attention's weights at `--context-lr-scale` times the rate) and scores its per-prompt
router and granular rows; `--no-references` leaves out the shipped gate and Arrow.

    python benchmarks/shift_split.py --threads 2 [--steps 1500] [--json-out shift.jsonl]
    python benchmarks/shift_split.py --threads 2 --contexts none ema attention --no-references
"""

from __future__ import annotations

import argparse
import json
import random
import re
import tempfile
from pathlib import Path

import torch

import loramix
from gates import train_context_gate
from loramix.demo.build import domain_training_data
from loramix.demo.run import shipped_checkpoint
from loramix.demo.world import DOMAINS, World
from loramix.evaluate import evaluate
from loramix.interop.peft import write_peft_experts

PEPTIDE_DOMAINS = ("forward", "inverse", "composite")
LONG = 20


def peptide_length(record: dict) -> int | None:
    """The residues of the record's peptide (forward/composite: in the prompt; design: the length asked), or None."""
    if "length" in record:
        return int(record["length"])
    match = re.match(r"GRAVY<([A-Z]+)>=", record["prompt"])
    return len(match.group(1)) if match else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--json-out", type=Path, default=None)
    parser.add_argument("--contexts", nargs="+", default=["none"], choices=["none", "ema", "attention"],
                        help="one long-only gate per context")
    parser.add_argument("--context-decay", type=float, default=0.9)
    parser.add_argument("--context-lr-scale", type=float, default=0.1)
    parser.add_argument("--no-references", action="store_true", help="leave out the shipped gate and Arrow")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    world = World()
    per_domain = args.steps * 32 // len(DOMAINS) + 1
    mixture = []
    for d in DOMAINS:
        records = [r for r in domain_training_data(world, d, per_domain * 2) if (peptide_length(r) or LONG) >= LONG]
        mixture += records[:per_domain]
    random.Random(0).shuffle(mixture)
    assert all((peptide_length(r) or LONG) >= LONG for r in mixture)
    tests = {
        split: [
            r
            for d in PEPTIDE_DOMAINS
            for r in world.domain_records(d, "test")
            if (peptide_length(r) >= LONG) == (split == "long")
        ]
        for split in ("short", "long")
    }
    shipped = loramix.load(shipped_checkpoint())
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        experts = dict(zip(shipped.expert_names, write_peft_experts(shipped, Path(tmp) / "e", shipped.expert_names)))
        base = shipped_checkpoint() / "base"
        systems = []  # (name, model, systems scored, training seconds)
        seconds = {}
        for context in args.contexts:
            model, seconds[context] = train_context_gate(
                context, base, experts, shipped.tokenizer, mixture, args.steps, Path(tmp) / f"long-only-{context}",
                decay=args.context_decay, lr_scale=args.context_lr_scale,
            )
            label = "gate trained on long peptides" + ("" if context == "none" else f" ({context} context)")
            scored = ["oracle", "router", "granular"] if not systems else ["router", "granular"]
            systems.append((label, model, scored, seconds[context]))
        if not args.no_references:
            arrow_config = loramix.MixConfig(gate=loramix.GateConfig(router="arrow", top_k=2))
            arrow = loramix.from_pretrained(base, experts, arrow_config, tokenizer=shipped.tokenizer)
            systems += [("shipped gate (all lengths)", shipped, ["granular"], 0.0),
                        ("Arrow top-2", arrow, ["granular"], 0.0)]
        train_peptides = set(world.splits["train"])
        for split, records in tests.items():
            for name, m, scored, train_seconds in systems:
                result = evaluate(m, records, systems=scored, train_peptides=train_peptides, progress=False)
                for system in scored:
                    row = {"gate": name, "split": split, "system": system, "records": len(records),
                           "train_seconds": train_seconds,
                           "primary": {d: result.primary(system, d) for d in result.kinds}}
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    if args.json_out:
        with args.json_out.open("a") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    trained = ", ".join(f"{c} {t:.0f} s" for c, t in seconds.items())
    print(f"\n{args.steps} gate steps ({trained}), torch {torch.__version__}, {args.threads} threads\n")
    print("| gate | system | split | " + " | ".join(PEPTIDE_DOMAINS) + " |")
    print("|---" * (len(PEPTIDE_DOMAINS) + 3) + "|")
    for r in rows:
        cells = " | ".join(f"{r['primary'][d]:.2f}" for d in PEPTIDE_DOMAINS)
        print(f"| {r['gate']} | {r['system']} | {r['split']} | {cells} |")


if __name__ == "__main__":
    main()
