"""What each router costs per decode step, on the benchmark Llama (~25M parameters, 4 random rank-8 experts).

Greedy decoding of 64 tokens after a 32-token prompt, batch 1, eager path with KV caches, interleaved rounds:
    granular, MLP gate     the scaling pass, the paper's gate (depth 1, layerwise), the mixed pass
    granular, Arrow        the scaling pass with every adapted layer scoring its input, the top-k router, the mixed pass
    granular, EMA context  the same MLP gate reading the moving average of the hidden states (GateConfig.context="ema")
    granular, attention    the same MLP gate after a one-head causal attention of width 64 over the hidden states so
                           far (context="attention"; keys/values cached)
    prompt mode            the prompt's last scalings held: no scaling pass and no gate while decoding
The gate's share of a step is measured directly too: each gate's forward on one token's hidden state (the context
gates with a static cache holding 95 earlier columns, as in the last step of a generation), and the Arrow router on
one token's probes, each timed alone against the whole granular step.

    python benchmarks/gate_cost.py --threads 1
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import torch

import loramix

from common import build_base, build_experts, interleaved, machine, ratios, workdir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    work = workdir()
    base = build_base(work)
    experts = build_experts(base, work)
    gate = loramix.GateConfig(layerwise=True, top_k=2, topk_softmax=True)
    models = {
        "mlp": loramix.from_pretrained(base, experts, loramix.MixConfig(gate=gate)),
        "arrow": loramix.from_pretrained(
            base, experts, loramix.MixConfig(gate=loramix.GateConfig(router="arrow", top_k=2))
        ),
        **{
            context: loramix.from_pretrained(
                base, experts, loramix.MixConfig(gate=dataclasses.replace(gate, context=context, context_width=64))
            )
            for context in ("ema", "attention")
        },
    }
    torch.manual_seed(0)
    ids = torch.randint(3, 32000, (1, 32))
    n = args.new_tokens

    def run(model, mode):
        return lambda: model.generate(ids, max_new_tokens=n, mode=mode, eos_token_id=[])

    variants = {
        "granular, MLP gate": run(models["mlp"], "granular"),
        "granular, Arrow": run(models["arrow"], "granular"),
        "granular, EMA context": run(models["ema"], "granular"),
        "granular, attention context": run(models["attention"], "granular"),
        "prompt mode (MLP)": run(models["mlp"], "prompt"),
    }
    with torch.no_grad():
        times = interleaved(variants, args.rounds)
        table = ratios(times, "granular, MLP gate")
        hidden = torch.randn(1, 1, models["mlp"].hidden_size)
        probes = torch.rand(1, 1, models["arrow"].n_layers, models["arrow"].n_experts)
        slots = ids.shape[1] + n
        mask = torch.ones(1, slots, dtype=torch.long)

        def with_context(context):  # one token at the last column of a static cache (the decode engine's)
            g = models[context].gate
            cache = g.new_cache(1, slots)

            def call():
                cache.offset.fill_(slots - 1)
                return g(hidden, None, mask, cache)

            return call

        alone = {}
        for name, call in (("MLP gate", lambda: models["mlp"].gate(hidden)),
                           ("EMA-context gate", with_context("ema")),
                           ("attention-context gate", with_context("attention")),
                           ("Arrow router", lambda: models["arrow"].gate(None, probes))):
            for _ in range(50):
                call()
            samples = []
            for _ in range(7):
                start = time.perf_counter()
                for _ in range(200):
                    call()
                samples.append((time.perf_counter() - start) / 200)
            alone[name] = statistics.median(samples)
    step = table["granular, MLP gate"]["median_s"] / n
    print(f"{machine()}, {args.threads} threads, {args.rounds} rounds, {n} new tokens\n")
    print("| variant | ms per token | vs granular MLP |")
    print("|---|---|---|")
    for name, row in table.items():
        print(f"| {name} | {row['median_s'] / n * 1e3:.2f} | {row['ratio']:.3f}x |")
    print()
    for name, seconds in alone.items():
        print(f"{name} alone: {seconds * 1e6:.0f} µs per token = {seconds / step:.1%} of a granular MLP step")


if __name__ == "__main__":
    main()
