"""Gate variants on the demo's mini-world: the shipped MLP gate against the training-free Arrow router and against
MLP gates that read the tokens before (GateConfig.context "ema" / "attention").

The Arrow mixtures are built from the shipped checkpoint's own experts (written back as PEFT adapters) over its
bundled base; every variant answers the same records greedily in granular mode, in prompt mode and as the per-prompt
router (its scalings averaged over the prompt; `--systems` chooses). Settings of Arrow (top-k, temperature) are
chosen on the validation split; the test split is the demo's fixed test subset.
`--contexts ema attention` (or `none`: the MLP again) trains one gate per context over the same experts and base
with the recipe of the gate shipped until round 4 (loramix.demo.recipes.EARLIER: the same gate mixture, depth 2,
width 64, layer-wise, lr 0.01, batch 32, 1,500 steps, the example-weighted loss with domain supervision, seed 0, the
experts frozen), so that only the context differs. docs/gates.md's tables were measured over the weights shipped until
round 4 (commit ce6c8fa); since then the shipped experts were trained with their gate (docs/demo.md, "Round 4").
`--pack F` replaces a fraction F of the context gates' training records by packed pairs of two records of different
domains (`packed_pairs`); `--route-weight W` and `--route-tokens answer` change their routing term. `--trained-arrow`
trains the Arrow router (all experts, temperature 1) from Arrow's prototypes with the same data, rate, steps and loss
(Arrow as the initialisation of a trained router).

    python benchmarks/gates.py --threads 2 [--json-out gates.jsonl] [--trained-arrow]
    python benchmarks/gates.py --threads 1 --no-arrow --contexts ema attention [--context-decays 0.9 0.5]
        [--context-lr-scales 1.0 0.1]

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
from loramix.demo.build import domain_training_data
from loramix.demo.recipes import earlier_config
from loramix.demo.run import EVAL_SIZES, shipped_checkpoint
from loramix.demo.world import DOMAINS, World
from loramix.evaluate import evaluate
from loramix.interop.peft import write_peft_experts
from loramix.train import GateObjective, TrainConfig, train_gate

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


def packed_pairs(records: list[dict], fraction: float, seed: int, max_chars: int = 90) -> list[dict]:
    """Replace `fraction` of the records by pairs of two records of different domains, one after the other: the
    prompt is the first record whole and the second's prompt, the completion the second's (no "domain", so no routing
    term: only the second answer's loss, which needs the gate to switch to its expert after the first record). A pair
    fits in `max_chars` characters (the world's tokenizer reads one token per character)."""
    import random

    rng = random.Random(seed)
    n = int(len(records) * fraction)
    out = records[n:]

    def chars(r):
        return len(r["prompt"]) + len(r["completion"])

    for first in records[:n]:
        second = rng.choice(records)
        while second["domain"] == first["domain"] or chars(first) + chars(second) > max_chars:
            second = rng.choice(records)
        out.append({"prompt": first["prompt"] + first["completion"] + second["prompt"],
                    "completion": second["completion"]})
    rng.shuffle(out)
    return out


def gate_mixture(world: World, steps: int, pack: float = 0.0) -> list[dict]:
    """The training mixture of the gate shipped until round 4 (recipes.EARLIER) for `steps` steps, `pack` of it
    packed."""
    import random

    cfg = earlier_config()
    per_domain = steps * cfg.gate_batch // len(DOMAINS) + 1
    mixture = [r for d in DOMAINS for r in domain_training_data(world, d, per_domain)]
    random.Random(cfg.seed).shuffle(mixture)
    return packed_pairs(mixture, pack, cfg.seed) if pack else mixture


def train_context_gate(context: str, base: Path, experts: dict, tokenizer, mixture: list[dict], steps: int,
                       out: Path, decay: float = 0.9, lr_scale: float = 1.0, route_weight: float | None = None,
                       route_tokens: str = "all", **label) -> tuple:
    """A gate reading `context` ("arrow": the Arrow router over all experts, trained from Arrow's prototypes; EMA
    decay `decay`; the attention's rate x `lr_scale`), trained on `mixture` with the recipe of the gate shipped until
    round 4 (recipes.EARLIER: the experts frozen); returns it and its training seconds (`label`: more fields of its
    JSON line)."""
    cfg = earlier_config()
    torch.manual_seed(cfg.seed)
    if context == "arrow":
        gate = loramix.GateConfig(router="arrow")
    else:
        gate = loramix.GateConfig(depth=cfg.gate_depth, width=cfg.gate_width, layerwise=True, dropout=0.0,
                                  context=context, context_decay=decay)
    model = loramix.from_pretrained(base, experts, loramix.MixConfig(gate=gate), tokenizer=tokenizer)
    train = TrainConfig(learning_rate=cfg.gate_lr, max_steps=steps, batch_size=cfg.gate_batch, warmup_steps=20,
                        seed=cfg.seed, max_length=cfg.context, progress=False, log_every=100)
    start = time.perf_counter()
    objective = GateObjective(loss_weighting="example",
                              route_weight=cfg.route_weight if route_weight is None else route_weight,
                              route_tokens=route_tokens,
                              context_lr_scale=lr_scale if context == "attention" else 1.0)
    metrics = train_gate(model, mixture, out, train=train, objective=objective)
    seconds = time.perf_counter() - start
    record = {"trained": context, "decay": decay, "lr_scale": lr_scale, **label, "route_weight": route_weight,
              "route_tokens": route_tokens, "steps": steps, "seconds": seconds}
    print(json.dumps({**record, "metrics": metrics}, default=str), flush=True)
    return model, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json-out", type=Path, default=None)
    parser.add_argument("--splits", nargs="+", default=["val", "test"])
    parser.add_argument("--no-arrow", action="store_true", help="leave out the Arrow grid")
    parser.add_argument("--no-shipped", action="store_true", help="leave out the shipped MLP gate")
    parser.add_argument("--contexts", nargs="*", default=[], choices=["none", "ema", "attention"])
    parser.add_argument("--steps", type=int, default=earlier_config().gate_steps)
    parser.add_argument("--systems", nargs="+", default=["granular", "prompt", "router"],
                        choices=["granular", "prompt", "router"], help="granular and prompt mode, per-prompt router")
    parser.add_argument("--save-dir", type=Path, default=None, help="keep each trained gate's checkpoint here")
    parser.add_argument("--route-weight", type=float, default=None,
                        help="the context gates' routing-term weight (default: the shipped gate's, 3)")
    parser.add_argument("--route-tokens", default="all", choices=["all", "answer"],
                        help="the tokens the context gates' routing term covers")
    parser.add_argument("--pack", type=float, default=0.0,
                        help="fraction of the context gates' training records replaced by packed pairs of two domains")
    parser.add_argument("--trained-arrow", action="store_true",
                        help="also train an Arrow router (all experts, T=1) from Arrow's prototypes")
    parser.add_argument("--context-decays", nargs="+", type=float, default=[0.9], help="EMA decays to train")
    parser.add_argument("--context-lr-scales", nargs="+", type=float, default=[1.0],
                        help="attention learning-rate factors to train")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    world = World()
    train_peptides = set(world.splits["train"])
    ckpt = shipped_checkpoint()
    mlp = loramix.load(ckpt)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        saved = args.save_dir or Path(tmp)
        dirs = write_peft_experts(mlp, Path(tmp) / "experts", mlp.expert_names)
        experts = dict(zip(mlp.expert_names, dirs))
        variants = {} if args.no_shipped else {"mlp (shipped)": mlp}
        mixture = gate_mixture(world, args.steps)
        packed = gate_mixture(world, args.steps, args.pack) if args.pack else mixture
        for context in args.contexts:
            settings = {"none": [1.0], "ema": args.context_decays, "attention": args.context_lr_scales}[context]
            for value in settings:
                label = {"none": "retrained", "ema": f"a={value}", "attention": f"lr x{value}"}[context]
                label += f", packed {args.pack}" if args.pack else ""
                label += f", route weight {args.route_weight}" if args.route_weight is not None else ""
                label += ", routing term on the answer" if args.route_tokens == "answer" else ""
                kwargs = {"decay": value} if context == "ema" else {"lr_scale": value}
                kwargs.update(pack=args.pack, route_weight=args.route_weight, route_tokens=args.route_tokens)
                variants[f"mlp + {context} context ({label})"], _ = train_context_gate(
                    context, ckpt / "base", experts, mlp.tokenizer, packed, args.steps, saved / f"{context}{value}",
                    **kwargs,
                )
        if args.trained_arrow:
            variants["arrow, trained from Arrow"], _ = train_context_gate(
                "arrow", ckpt / "base", experts, mlp.tokenizer, mixture, args.steps, saved / "arrow", pack=0.0
            )
        for k, t in [] if args.no_arrow else ARROW_GRID:
            config = loramix.MixConfig(gate=loramix.GateConfig(router="arrow", top_k=k, temperature=t))
            variants[f"arrow k={k} T={t}"] = loramix.from_pretrained(
                ckpt / "base", experts, config, tokenizer=mlp.tokenizer
            )
        for split in args.splits:
            recs = records(world, split)
            for name, model in variants.items():
                result = score(model, recs, train_peptides, systems=args.systems)
                for system in args.systems:
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
