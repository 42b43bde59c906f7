"""Gate variants on the demo's mini-world: the shipped MLP gate against the training-free Arrow router.

The Arrow mixtures are built from the shipped checkpoint's own experts (written back as PEFT adapters) over its
bundled base; every variant answers the same records greedily in granular mode (and prompt mode). Settings of Arrow
(top-k, temperature) are chosen on the validation split; the test split is the demo's fixed test subset.

    python benchmarks/gates.py --threads 2 [--json-out gates.jsonl]

Prints a Markdown table (primary metric per domain, mean over the four single domains, composite solved, tokens/s)
and appends one JSON line per (variant, split) to --json-out.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

import loramix
from loramix.demo.run import EVAL_SIZES, shipped_checkpoint
from loramix.demo.world import DOMAINS, World
from loramix.evaluate import evaluate
from loramix.interop.peft import write_peft_experts

ARROW_GRID = [(k, t) for k in (1, 2, 4) for t in (1.0, 0.3)]


def records(world: World, split: str) -> list[dict]:
    return [r for d, n in EVAL_SIZES.items() for r in world.domain_records(d, split, n)]


def score(model, recs, train_peptides, systems=("granular",)) -> dict:
    start = time.perf_counter()
    result = evaluate(model, recs, systems=list(systems), train_peptides=train_peptides, progress=False)
    out = {}
    for system in systems:
        primary = {d: result.primary(system, d) for d in result.kinds}
        out[system] = {
            "primary": primary,
            "mean": sum(primary[d] for d in DOMAINS) / len(DOMAINS),
            "tokens_per_s": result.speed[system],
        }
    out["seconds"] = time.perf_counter() - start
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json-out", type=Path, default=None)
    parser.add_argument("--splits", nargs="+", default=["val", "test"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    world = World()
    train_peptides = set(world.splits["train"])
    ckpt = shipped_checkpoint()
    mlp = loramix.load(ckpt)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        dirs = write_peft_experts(mlp, Path(tmp) / "experts", mlp.expert_names)
        experts = dict(zip(mlp.expert_names, dirs))
        variants = {"mlp (shipped)": mlp}
        for k, t in ARROW_GRID:
            config = loramix.MixConfig(gate=loramix.GateConfig(router="arrow", top_k=k, temperature=t))
            variants[f"arrow k={k} T={t}"] = loramix.from_pretrained(
                ckpt / "base", experts, config, tokenizer=mlp.tokenizer
            )
        for split in args.splits:
            recs = records(world, split)
            for name, model in variants.items():
                result = score(model, recs, train_peptides, systems=("granular", "prompt"))
                for system in ("granular", "prompt"):
                    row = {"variant": name, "split": split, "system": system, **result[system]}
                    rows.append(row)
                    print(json.dumps(row), flush=True)
                    if args.json_out:
                        with args.json_out.open("a") as f:
                            f.write(json.dumps(row) + "\n")
    domains = [*DOMAINS, "composite"]
    print(f"\ntorch {torch.__version__}, {args.threads} threads\n")
    print("| variant | split | mode | " + " | ".join(domains) + " | mean (4 domains) | tokens/s |")
    print("|---" * (len(domains) + 5) + "|")
    for r in rows:
        cells = " | ".join(f"{r['primary'][d]:.2f}" for d in domains)
        speed = f"{r['tokens_per_s']:.0f}"
        print(f"| {r['variant']} | {r['split']} | {r['system']} | {cells} | {r['mean']:.2f} | {speed} |")


if __name__ == "__main__":
    main()
