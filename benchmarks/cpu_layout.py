"""The CPU weight layout (loramix.layout) against transformers' row-major weights, on one machine, in one process.

    python benchmarks/cpu_layout.py --model smollm2 --threads 2 --batch 1 16     # SmolLM2-135M, as vs_mistralrs.py
    python benchmarks/cpu_layout.py --model 25m --threads 2 --compile            # the 25M benchmark Llama
    python benchmarks/cpu_layout.py --model tiny --threads 1 --new-tokens 4 --repeats 1 --matmuls 2   # smoke run

Part 1, the matrix-vector products: every linear of the model (its own weights, so that each product reads its
matrix from memory as a decode step does) at M = 1 (and each --batch), in both layouts, timed per shape.
Part 2, whole decodes: transformers `generate` on the base and loramix `generate` (granular and prompt mode; with
--compile also compiled) from a 1-token prompt, --new-tokens greedy tokens, EOS ignored, for each --batch, with the
weights row-major (transformers' layout, `layout.restore_layout`) and with loramix's CPU layout (its default for a
float32 base on a CPU). The two layouts are two copies of the model, timed in alternation (common.interleaved), and
each variant's speed-up is the median of its per-round ratios.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import build_base, interleaved, machine, ratios, sharp_mixture, workdir


def base_dir_for(model: str, work: Path) -> Path:
    if model == "smollm2":
        from generate import smollm2_base

        return smollm2_base(work)
    if model == "tiny":
        return build_base(
            work, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=256,
        )  # fmt: skip
    return build_base(work)


def matmuls(base: torch.nn.Module, batches: list[int], rounds: int) -> None:
    """Part 1: each distinct linear shape, all its matrices in a row, row-major against transposed."""
    from loramix.layout import wants_cpu_layout

    shapes: dict[tuple[int, int], list[torch.Tensor]] = {}
    for m in base.modules():
        if isinstance(m, torch.nn.Linear) and wants_cpu_layout(m.weight.detach()):
            shapes.setdefault((m.out_features, m.in_features), []).append(m.weight.detach().contiguous())
    print("\n| linear (out x in) | matrices | M | row-major (ms) | transposed (ms) | speed-up |")
    print("|---|---|---|---|---|---|")
    for (n_out, n_in), weights in sorted(shapes.items()):
        transposed = [w.t().contiguous().t() for w in weights]
        for m in batches:
            x = torch.randn(m, n_in)
            runs = {
                "row-major": lambda ws=weights, x=x: [torch.nn.functional.linear(x, w) for w in ws],
                "transposed": lambda ws=transposed, x=x: [torch.nn.functional.linear(x, w) for w in ws],
            }
            r = ratios(interleaved(runs, rounds, warmup=1), "row-major")
            print(
                f"| {n_out} x {n_in} | {len(weights)} | {m} | {r['row-major']['median_s'] * 1e3:.3f} | "
                f"{r['transposed']['median_s'] * 1e3:.3f} | {1 / r['transposed']['ratio']:.2f}x |"
            )


def decodes(base_dir: Path, work: Path, args) -> None:
    """Part 2: whole decodes in both layouts."""
    from transformers import AutoModelForCausalLM

    from loramix.layout import apply_cpu_layout, restore_layout, transposed_weights

    mixes = {"row-major": sharp_mixture(base_dir, work), "transposed": sharp_mixture(base_dir, work)}
    restore_layout(mixes["row-major"].model)
    bases = {}
    for layout in mixes:
        bases[layout] = AutoModelForCausalLM.from_pretrained(base_dir).eval().requires_grad_(False)
        if layout == "transposed":
            apply_cpu_layout(bases[layout])
    print(
        f"\ntransposed weights: {transposed_weights(mixes['transposed'].model)} in the mixture, "
        f"{transposed_weights(bases['transposed'])} in the base; row-major copies: "
        f"{transposed_weights(mixes['row-major'].model)}, {transposed_weights(bases['row-major'])}"
    )
    n = args.new_tokens
    modes = [("granular", False), ("prompt", False)] + ([("granular", True), ("prompt", True)] if args.compile else [])
    print("\n| variant | batch | row-major tok/s | transposed tok/s | speed-up |\n|---|---|---|---|---|")
    for batch in args.batch:
        ids = torch.full((batch, 1), 1, dtype=torch.long)
        mask = torch.ones_like(ids)
        runs = {}
        for layout in mixes:
            base, mix = bases[layout], mixes[layout]
            runs[("transformers base", layout)] = lambda b=base, ids=ids, mask=mask: b.generate(
                ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0
            )
            for mode, compiled in modes:
                name = f"loramix {mode}" + (", compiled" if compiled else "")
                runs[(name, layout)] = lambda m=mix, mo=mode, c=compiled, ids=ids, mask=mask: m.generate(
                    ids, mask, max_new_tokens=n, mode=mo, eos_token_id=[], compile=c
                )
        with torch.inference_mode():
            times = interleaved({f"{k[0]}|{k[1]}": v for k, v in runs.items()}, args.repeats, warmup=1)
        for name in dict.fromkeys(k[0] for k in runs):
            row, tr = times[f"{name}|row-major"], times[f"{name}|transposed"]
            speedup = statistics.median(r / t for r, t in zip(row, tr))
            tps = [batch * n / statistics.median(ts) for ts in (row, tr)]
            print(f"| {name} | {batch} | {tps[0]:.2f} | {tps[1]:.2f} | {speedup:.2f}x |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2", choices=["smollm2", "25m", "tiny"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds of part 2 (after one warm-up round)")
    parser.add_argument("--matmuls", type=int, default=20, help="timed rounds of part 1 (0: skip it)")
    parser.add_argument("--batch", type=int, nargs="+", default=[1], help="rows of each decode (and M of part 1)")
    parser.add_argument("--compile", action="store_true", help="also time loramix's compiled decode")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    work = workdir()
    base_dir = base_dir_for(args.model, work)
    print(f"{args.model}, {args.threads} threads, float32; {machine()}; {time.strftime('%Y-%m-%d %H:%M:%S')}")
    if args.matmuls:
        from transformers import AutoModelForCausalLM

        matmuls(
            AutoModelForCausalLM.from_pretrained(base_dir).requires_grad_(False), sorted(set(args.batch)), args.matmuls
        )
    decodes(base_dir, work, args)


if __name__ == "__main__":
    main()
