"""When does computing only the top-k experts beat the dense stacked matmul? One MixedLoRALinear, inference.

For each (experts N, rank r, k, width d, tokens M): median microseconds of the dense path and of the sparse path
(gather the rank rows of the experts any token uses), ratios in one run, torch threads fixed. The "auto" policy of
`LoraMixModel.use_sparse_top_k` is derived from this table.

    python benchmarks/sparse_topk.py --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from loramix.experts import StackedLoRA
from loramix.layers import MixedLoRALinear, MixState, PreparedScalings

from common import machine

CASES = [  # (N, r, k, d, M)
    (4, 8, 1, 512, 1),
    (4, 8, 2, 512, 1),
    (8, 16, 2, 2048, 1),
    (16, 16, 2, 2048, 1),
    (16, 64, 2, 2048, 1),
    (16, 64, 2, 2048, 2),
    (16, 64, 2, 2048, 4),
    (16, 64, 2, 2048, 64),
    (32, 64, 2, 4096, 1),
]


def timed(fn, repeats: int) -> float:
    for _ in range(5):
        fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=100)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"machine: {machine()}; threads {args.threads}; median of {args.repeats} calls")
    print("| experts N | rank r | top-k | width | tokens | R*(d_in+d_out) | dense µs | sparse µs | sparse/dense |")
    print("|---|---|---|---|---|---|---|---|---|")
    for n, r, k, d, m in CASES:
        g = torch.Generator().manual_seed(0)
        stacked = StackedLoRA(
            torch.randn(n * r, d, generator=g), torch.randn(d, n * r, generator=g), [r] * n, [1.0] * n
        )
        state = MixState()
        layer = MixedLoRALinear(nn.Linear(d, d, bias=False), stacked, 0, state)
        x = torch.randn(1, m, d, generator=g)
        logits = torch.randn(1, m, 1, n, generator=g)
        top = logits.topk(k, -1)
        s = torch.zeros_like(logits).scatter(-1, top.indices, torch.softmax(top.values, -1))
        mult = s[..., 0, :].index_select(-1, layer.rank_expert) * layer.rank_scale
        used = [tuple(sorted(set(top.indices.flatten().tolist())))]
        dense = PreparedScalings(s, [mult])
        sparse = PreparedScalings(s, [mult], used)

        def call(layer=layer, x=x):
            layer(x)

        with torch.inference_mode():
            with state.use(dense):
                t_dense = timed(call, args.repeats)
            with state.use(sparse):
                t_sparse = timed(call, args.repeats)
        size = n * r * 2 * d
        print(
            f"| {n} | {r} | {k} | {d} | {m} | {size / 1e6:.2f}M | {t_dense:.0f} | {t_sparse:.0f} | "
            f"{t_sparse / t_dense:.2f} |"
        )


if __name__ == "__main__":
    main()
