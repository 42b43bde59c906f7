"""--trainable-experts on the demo's mini-world, with and without the safety options.

Continues the shipped checkpoint (`train-gate --init` in Python) on the demo's gate-training mixture for a few hundred
steps with the experts trainable: once as before (experts at the gate's rate, no anchor, the last weights), once with
a lower rate for the experts, an L2 anchor to their starting values and the best validation loss kept. Each result is
then scored greedily in granular mode on the demo's fixed test subset, next to the shipped checkpoint.

    python benchmarks/trainable_experts.py --threads 2 --steps 300 [--json-out te.jsonl]
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

import torch

import loramix
from loramix.demo.build import domain_training_data
from loramix.demo.run import EVAL_SIZES, shipped_checkpoint, test_records
from loramix.demo.world import DOMAINS, World
from loramix.evaluate import evaluate
from loramix.train import GateObjective, TrainConfig, train_gate

VARIANTS = {
    "experts at the gate's rate": dict(objective={}, keep_best=False),
    "rate x0.1, anchor 1.0, best on val": dict(
        objective={"expert_lr_scale": 0.1, "expert_anchor_weight": 1.0}, keep_best=True
    ),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--json-out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    world = World()
    per_domain = args.steps * 32 // len(DOMAINS) + 1
    mixture = [r for d in DOMAINS for r in domain_training_data(world, d, per_domain)]
    random.Random(0).shuffle(mixture)
    val = [r for d in DOMAINS for r in world.domain_records(d, "val", 30)]
    tests = test_records(world, EVAL_SIZES)
    train_peptides = set(world.splits["train"])

    def score(model) -> dict:
        result = evaluate(model, tests, systems=["granular"], train_peptides=train_peptides, progress=False)
        primary = {d: result.primary("granular", d) for d in result.kinds}
        return {"primary": primary, "mean": sum(primary[d] for d in DOMAINS) / len(DOMAINS)}

    rows = [{"variant": "shipped checkpoint", **score(loramix.load(shipped_checkpoint()))}]
    with tempfile.TemporaryDirectory() as tmp:
        for name, spec in VARIANTS.items():
            model = loramix.load(shipped_checkpoint())
            model.config.trainable_experts = True
            train = TrainConfig(learning_rate=args.lr, max_steps=args.steps, batch_size=32, warmup_steps=20,
                                seed=0, max_length=96, eval_every=max(1, args.steps // 6), keep_best=spec["keep_best"],
                                progress=False, log_every=50)
            objective = GateObjective(loss_weighting="example", route_weight=3.0, **spec["objective"])
            start = time.perf_counter()
            metrics = train_gate(model, mixture, Path(tmp) / f"v{len(rows)}", train=train, eval_data=val,
                                 objective=objective)
            row = {"variant": name, "train_seconds": time.perf_counter() - start,
                   "eval_loss": metrics.get("eval_loss"), "best_step": metrics.get("best_step"), **score(model)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.json_out:
        with args.json_out.open("a") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    domains = [*DOMAINS, "composite"]
    print(f"\n{args.steps} steps, lr {args.lr}, torch {torch.__version__}, {args.threads} threads\n")
    print("| variant | " + " | ".join(domains) + " | mean of 4 |")
    print("|---" * (len(domains) + 2) + "|")
    for r in rows:
        print(f"| {r['variant']} | " + " | ".join(f"{r['primary'][d]:.2f}" for d in domains) + f" | {r['mean']:.2f} |")


if __name__ == "__main__":
    main()
