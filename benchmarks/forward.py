"""Forward-pass cost of loramix and of PEFT XLoRA, as ratios to the plain base model.

~25M-parameter random Llama (hidden 512, 8 layers, intermediate 1408, 32k vocabulary), 4 experts of rank 8 on
q,k,v,o,gate_proj, batch 4 x 128 tokens, float32, torch threads fixed, interleaved repetitions.

    python benchmarks/forward.py --threads 2 --repeats 30
"""

from __future__ import annotations

import argparse
import json

import torch

from common import TARGETS, build_base, build_experts, interleaved, machine, ratios, workdir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--no-peft", action="store_true", help="skip PEFT XLoRA")
    parser.add_argument("--json", type=str, default=None, help="also write the numbers to this file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from peft import XLoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    import loramix

    work = workdir()
    base_dir = build_base(work)
    experts = build_experts(base_dir, work, n=4, rank=8, targets=TARGETS)

    base = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    n_params = sum(p.numel() for p in base.parameters())
    mix = loramix.from_pretrained(
        base_dir,
        {f"e{i}": p for i, p in enumerate(experts)},
        loramix.MixConfig(gate=loramix.GateConfig(layerwise=True)),
    )
    variants = {}
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, base.config.vocab_size, (args.batch, args.tokens), generator=g)
    mask = torch.ones_like(ids)

    def run_base():
        base(input_ids=ids, attention_mask=mask)

    def run_mix():
        mix(ids, attention_mask=mask)

    variants = {"base": run_base, "loramix": run_mix}
    if not args.no_peft:
        pbase = AutoModelForCausalLM.from_pretrained(base_dir)
        pbase.config.use_cache = False
        xcfg = XLoraConfig(
            task_type="CAUSAL_LM",
            hidden_size=512,
            layerwise_scalings=True,
            adapters={str(i): str(p) for i, p in enumerate(experts)},
        )
        peft_model = get_peft_model(pbase, xcfg).eval()

        def run_peft():
            peft_model(input_ids=ids, attention_mask=mask)

        variants["peft_xlora"] = run_peft

    with torch.inference_mode():
        times = interleaved(variants, args.repeats)
    result = ratios(times, "base")
    print(
        f"machine: {machine()}; threads {args.threads}; base parameters {n_params / 1e6:.1f}M; "
        f"batch {args.batch} x {args.tokens} tokens; float32; {args.repeats} interleaved rounds"
    )
    print("| model | median ms | ratio to base (median of paired rounds) |")
    print("|---|---|---|")
    for name, r in result.items():
        print(f"| {name} | {r['median_s'] * 1e3:.1f} | {r['ratio']:.3f}x |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"threads": args.threads, "params": n_params, "results": result}, f, indent=2)


if __name__ == "__main__":
    main()
