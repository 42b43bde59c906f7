"""One-row products as reductions (loramix.gemv.RowReduction) against MKL's matrix product, compiled, per shape.

    python benchmarks/row_products.py --threads 2                       # SmolLM2-135M's linear shapes
    python benchmarks/row_products.py --threads 1 --rounds 2 --tiny     # a smoke run (tests/test_benchmarks.py)

For each linear shape of SmolLM2-135M (k/v, q/o, down, gate/up, the LM head), as many matrices as the model has,
each its own weight (so that each product reads its matrix from memory, as a decode step does): one module that
applies them all to one input row, compiled by inductor with `freezing` (the decode step's options), once with the
pass and once without, and with the weights row-major (transformers' layout) and in-features-major (layout.py's).
Timed in interleaved rounds (common.interleaved); the table gives the medians, GB/s of weights streamed, and the
pass's speed-up within each layout.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import interleaved, machine

SMOLLM2 = [(192, 576, 60), (576, 576, 60), (576, 1536, 30), (1536, 576, 60), (49152, 576, 1)]
TINY = [(48, 32, 2)]


class Products(nn.Module):
    """`count` frozen linears of one shape, all applied to the same row; a slice of each output is summed so that
    every product is computed."""

    def __init__(self, n_out: int, n_in: int, count: int, transposed: bool) -> None:
        super().__init__()
        self.linears = nn.ModuleList(nn.Linear(n_in, n_out, bias=False) for _ in range(count))
        for linear in self.linears:
            linear.weight.requires_grad_(False)
            if transposed:
                linear.weight.data = linear.weight.data.t().contiguous().t()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        total = 0
        for linear in self.linears:
            total = total + linear(x)[..., :8]
        return total


def compiled(module: nn.Module, with_pass: bool):
    from loramix.decode import CPU_INDUCTOR_OPTIONS
    from loramix.gemv import RowReduction

    options = dict(CPU_INDUCTOR_OPTIONS)
    rows = RowReduction()
    if with_pass:
        options["post_grad_custom_post_pass"] = rows
    step = torch.compile(module, fullgraph=True, dynamic=False, options=options)

    def run(x):
        # caches off: compiled here, so that the pass runs and counts what it rewrites
        with torch.no_grad(), torch._inductor.config.patch(freezing=True, force_disable_caches=True):
            return step(x)

    return run, rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--tiny", action="store_true", help="one tiny shape (a smoke run)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"machine: {machine()}; {args.threads} threads; {args.rounds} rounds")
    print("\n| linear (out x in) | matrices | layout | products rewritten | MKL (ms) | with the pass (ms) | GB/s | "
          "speed-up |")
    print("|---|---|---|---|---|---|---|---|")
    for n_out, n_in, count in TINY if args.tiny else SMOLLM2:
        for layout, transposed in (("row-major", False), ("in-features-major", True)):
            torch._dynamo.reset()  # every Products shares one forward: without a reset, dynamo's recompile limit hits
            module = Products(n_out, n_in, count, transposed).eval()
            x = torch.randn(1, 1, n_in)
            (mm_run, _), (red_run, rows) = compiled(module, False), compiled(module, True)
            runs = {"mm": mm_run, "reduction": red_run}
            with torch.no_grad():
                reference = module(x)
            for run in runs.values():
                torch.testing.assert_close(run(x), reference, rtol=1e-4, atol=1e-4)  # compiles, and checks
            times = interleaved({name: (lambda run=run, x=x: run(x)) for name, run in runs.items()}, args.rounds)
            mm, red = (statistics.median(times[k]) * 1e3 for k in ("mm", "reduction"))
            gbs = n_out * n_in * 4 * count / (red * 1e-3) / 1e9
            print(f"| {n_out} x {n_in} | {count} | {layout} | {rows.rewritten} | {mm:.2f} | {red:.2f} | {gbs:.1f} | "
                  f"{mm / red:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
