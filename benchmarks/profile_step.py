"""Where one decode step of loramix spends its time on the CPU, eager and compiled (issue 41).

    python benchmarks/profile_step.py --model smollm2 --threads 2          # SmolLM2-135M, as vs_mistralrs.py
    python benchmarks/profile_step.py --model 25m --threads 2              # the 25M benchmark Llama
    python benchmarks/profile_step.py --model tiny --steps 3 --rounds 1    # a smoke run (tests/test_benchmarks.py)

The mixture is vs_mistralrs.py's: 4 random rank-8 PEFT experts on q/k/v/o/gate_proj, a depth-1 layer-wise gate.
Variants: eager granular; compiled granular with torch.compile's inductor defaults (what `compile=True` did before
issue 41); compiled granular and prompt mode as `compile=True` does now (decode.CPU_INDUCTOR_OPTIONS). With inductor,
every variant runs on the model as `compile=True` leaves it (`decode.prepare_cpu_step`: row-major weights, the step
attention), so that one variant's compile does not invalidate another's.
One decoder row (batch 1), a 1-token prompt, a 64-column bucket; each timed step is a real `Decoder.step` (the cache
grows). Three tables (markdown on stdout):

1. The step, split: `Decoder.step` wall time; the compiled `decode_step` call inside it; then under torch.profiler
   (which adds its own cost to every op): dynamo's guard check before the call, the compiled code's own Python
   (the wrapper inductor generates), the matmuls it calls out to, its generated C++ kernels, other aten ops; what is
   left is the decoder's host work around the call, sampling and dispatch.
2. What the step computes (the same compiled machinery, one piece at a time): the mixed pass with the experts off
   (the base model), the mixed pass with the experts (a held step, prompt mode), the whole granular step
   (scaling pass + gate + mixed pass), and the LM head alone (the scaling pass skips it).
3. Per adapted module of the first block (eager, batch 1, `--calls` calls each): the base matmul, the experts'
   A matmul, the rank multiply and the B matmul, against their share of the FLOPs.

Timings are medians over --rounds rounds of --steps steps, variants interleaved within a round. Each compiled variant
is compiled once first (with --freezing: inductor's `freezing`, the weights as constants, as `compile=True` does on
a CPU); the compile seconds are printed.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import TARGETS, build_base, machine, sharp_mixture, workdir


def build(model: str):
    work = workdir()
    if model == "smollm2":
        from generate import smollm2_base

        base_dir = smollm2_base(work)
    elif model == "tiny":
        base_dir = build_base(
            work, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=256,
        )  # fmt: skip
    else:
        base_dir = build_base(work)
    return sharp_mixture(base_dir, work)


def new_decoder(mix, granular: bool, compile):
    from loramix.decode import Decoder, RowSpec

    decoder = Decoder(mix, 1, 256, granular=granular, compile=compile)
    decoder.place(1, 250)
    ids = torch.tensor([[1]])
    spec = RowSpec(mode="granular" if granular else "prompt", max_new_tokens=10**6)
    decoder.join([0], ids, torch.ones_like(ids), [spec])
    return decoder


MATMULS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::linear", "mkl::_mkl_linear", "mkldnn::_linear_pointwise")


def profiled(step, steps: int) -> dict[str, float]:
    """Per-step milliseconds under torch.profiler: extern matmuls, inductor's C++ kernels, other aten ops."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    out = {"guards": 0.0, "wrapper": 0.0, "matmuls": 0.0, "inductor kernels": 0.0, "other ops": 0.0}
    top: list[tuple[float, str]] = []
    for e in prof.key_averages():
        ms = e.self_cpu_time_total / 1e3 / steps
        if e.key == "TorchDynamo Cache Lookup":  # dynamo's guard check before each compiled call
            out["guards"] += ms
        elif e.key.startswith("Torch-Compiled Region"):  # its self time: the Python of the compiled code
            out["wrapper"] += ms
        elif e.key in MATMULS:
            out["matmuls"] += ms
        elif e.key.startswith(("cpp_fused", "graph_", "kernel_cpp")):
            out["inductor kernels"] += ms
        elif e.key.startswith(("aten::", "mkl", "mkldnn", "inductor::", "quantized::")):
            out["other ops"] += ms
        top.append((ms, e.key))
    out["top"] = sorted(top, reverse=True)[:12]
    return out


def timed(variants: dict, steps: int, rounds: int) -> dict[str, float]:
    """Median seconds per step of each variant, interleaved rounds."""
    times: dict[str, list[float]] = {name: [] for name in variants}
    for r in range(rounds):
        names = list(variants)
        names = names[r % len(names) :] + names[: r % len(names)]
        for name in names:
            start = time.perf_counter()
            for _ in range(steps):
                variants[name]()
            times[name].append((time.perf_counter() - start) / steps)
    return {name: statistics.median(ts) for name, ts in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2", choices=["smollm2", "25m", "tiny"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20, help="steps per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--calls", type=int, default=200, help="calls per module timing (table 3)")
    parser.add_argument("--backend", default="inductor")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from torch._inductor import config as inductor_config

    inductor_config.cpp.enable_kernel_profile = True  # inductor's kernels appear in the profiler's table

    from loramix import decode

    mix = build(args.model)
    backend = True if args.backend == "inductor" else args.backend
    if args.backend == "inductor":  # before any variant compiles: every variant sees the model compile=True leaves
        decode.prepare_cpu_step(mix)  # (row-major weights, the step attention), so none is invalidated by another
    print(f"{args.model}, 4 rank-8 experts on {','.join(TARGETS)}, batch 1, {args.threads} threads; {machine()}")
    decoders = {}
    from torch._inductor.compile_fx import compile_fx

    variants = [("eager granular", True, False)]
    if args.backend == "inductor":  # inductor as a callable: torch.compile's defaults, without CPU_INDUCTOR_OPTIONS
        variants.append(("compiled granular, inductor defaults (before)", True, compile_fx))
    variants += [("compiled granular", True, backend), ("compiled prompt mode", False, backend)]
    for name, granular, compile in variants:
        start = time.perf_counter()
        with torch.no_grad():
            decoders[name] = new_decoder(mix, granular, compile)
            decoders[name].step()
        print(f"  {name}: first step (compile) {time.perf_counter() - start:.1f} s", flush=True)

    # ------------------------------------------------------------ table 1: the step, split
    for d in decoders.values():
        for _ in range(2):
            d.step()
    steps = {name: d.step for name, d in decoders.items()}
    calls = {}
    for name, d in decoders.items():
        if d.backend is None:
            continue

        def call(d=d):
            k = 1
            b = d._view(k, d._columns(d.occupied))
            b.held = not d.granular
            with torch.no_grad():
                decode.compiled_step(mix, k, b.mask.shape[1], b.held, d.backend)(mix, b)

        calls[name + " (decode_step call only)"] = call
    medians = timed({**steps, **calls}, args.steps, args.rounds)
    print("\n| per step (ms) | " + " | ".join(decoders) + " |")
    print("|---|" + "---|" * len(decoders))
    rows: dict[str, list[str]] = {
        k: []
        for k in [
            "Decoder.step (wall)",
            "compiled decode_step call (wall)",
            "guard check (profiler: TorchDynamo Cache Lookup)",
            "compiled code's Python (profiler: Torch-Compiled Region, self)",
            "matmuls (profiler)",
            "inductor C++ kernels (profiler)",
            "other aten ops (profiler)",
            "the rest: the decoder's host work, sampling, dispatch (wall - the above)",
        ]
    }
    profiles = {}
    for name, d in decoders.items():
        step_ms = medians[name] * 1e3
        call_ms = medians.get(name + " (decode_step call only)", float("nan")) * 1e3
        p = profiles[name] = profiled(d.step, args.steps)
        parts = [p[k] for k in ("guards", "wrapper", "matmuls", "inductor kernels", "other ops")]
        for key, value in zip(rows, [step_ms, call_ms, *parts, step_ms - sum(parts)]):
            rows[key].append("" if value != value else f"{value:.2f}")
    for key, values in rows.items():
        print(f"| {key} | " + " | ".join(values) + " |")
    for name, p in profiles.items():
        print(f"\ntop ops, {name} (self CPU ms per step): " + "; ".join(f"{k} {ms:.2f}" for ms, k in p["top"]))

    # ------------------------------------------------------------ table 2: what the step computes
    head = mix.model.get_output_embeddings()
    x = torch.randn(1, 1, head.weight.shape[1])
    pieces = {
        "granular step (scaling pass + gate + mixed pass)": steps["compiled granular"],
        "held step (mixed pass with experts)": steps["compiled prompt mode"],
    }
    base_decoder = new_decoder(mix, False, backend)
    base_buffers = base_decoder._view(1, 64)

    def base_forward(model, b):  # the mixed pass of decode_step with the experts off: the base model's step
        b.mask.index_fill_(1, b.column, 1)
        with model.state.use(None):
            out = model.model(
                input_ids=b.ids, attention_mask=b.mask, position_ids=b.positions,
                past_key_values=b.cache.mixed, use_cache=True, return_dict=True,
            )  # fmt: skip
        return out.logits[:, -1]

    compiled_base = decode.compile_function(base_forward, mix, args.backend)

    def base_step():
        with torch.no_grad():
            compiled_base(mix, base_buffers)

    def lm_head():
        with torch.no_grad():
            head(x)

    print("\n(compiling the experts-off step ...)", flush=True)
    base_step()  # compile: the state's scalings None is a guard, so this is a graph of its own
    pieces["base step (experts off, mixed pass only)"] = base_step
    pieces["LM head alone (eager)"] = lm_head
    medians = timed(pieces, args.steps, args.rounds)
    print("\n| compiled piece | ms per step |")
    print("|---|---|")
    for name, seconds in medians.items():
        print(f"| {name} | {seconds * 1e3:.2f} |")
    g, h, b0 = (medians[k] for k in list(pieces)[:3])
    print(
        f"\nexperts in the mixed pass: {1e3 * (h - b0):.2f} ms; scaling pass + gate: {1e3 * (g - h):.2f} ms "
        f"(a pass without the LM head: {1e3 * (b0 - medians['LM head alone (eager)']):.2f} ms by difference)"
    )

    # ------------------------------------------------------------ table 3: the mixing per module
    from loramix.layers import MixedLoRALinear

    adapted = sorted((m for m in mix.modules() if isinstance(m, MixedLoRALinear)), key=lambda m: m.layer_index)
    layers = adapted[: len(TARGETS)]  # the first block's q, k, v, o, gate_proj
    print("\n| module (block 0) | d_in x d_out, R | base matmul (us) | A x (us) | rank multiply (us) | B z (us) | "
          "experts / base time | experts / base FLOPs |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for m in layers:
        w, a, bt = m.base_layer.weight, m.lora_A, m.lora_B.t()
        xin = torch.randn(1, m.in_features)
        mult = torch.rand(1, m.n_rank_rows)
        z = torch.nn.functional.linear(xin, a)
        out = torch.nn.functional.linear(xin, w)
        ops = {
            "base": lambda xin=xin, w=w: torch.nn.functional.linear(xin, w),
            "A": lambda xin=xin, a=a: torch.nn.functional.linear(xin, a),
            "mult": lambda z=z, mult=mult: z.mul_(mult),
            "B": lambda out=out, z=z, bt=bt: out.addmm_(z, bt),
        }
        us = {k: v * 1e6 for k, v in timed(ops, args.calls, args.rounds).items()}
        lora = us["A"] + us["mult"] + us["B"]
        flops = (m.n_rank_rows * (m.in_features + m.out_features)) / (m.in_features * m.out_features)
        name = next(n for n, mod in mix.named_modules() if mod is m)
        print(
            f"| {name.rsplit('.', 1)[-1]} | {m.in_features} x {m.out_features}, {m.n_rank_rows} | {us['base']:.1f} | "
            f"{us['A']:.1f} | {us['mult']:.1f} | {us['B']:.1f} | {lora / us['base']:.2f} | {flops:.2f} |"
        )


if __name__ == "__main__":
    main()
