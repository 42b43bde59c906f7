"""Quantized bases: memory and decode speed of a mixture over an int8 / int4 / NF4 base against the float32 one.

The 25M-body benchmark Llama of common.py (42M weights with its tied 32000 x 512 embeddings), 4 random rank-8
experts on q/k/v/o/gate_proj, a layerwise gate.

Memory, one fresh process per variant (`--memory-child`): the RSS after importing every variant's libraries and a
warm-up run of the variant (dropped) is the process's floor; reported above it (MiB): the peak RSS while loading
(transformers reads the float checkpoint and quantizes it tensor by tensor), the RSS held after loading (freed heap
handed back with malloc_trim), and the peak RSS (VmHWM, reset after loading) while generating; plus the bytes of the
model's tensors as stored. A float32 base is memory-mapped from its checkpoint: its pages count once touched.
Speed, in one process, interleaved rounds: greedy decode in granular mode (two KV caches), batch 1, --prompt-tokens
then --new-tokens; tokens/s and the paired ratio of decode times to float32's.

    python benchmarks/quant.py --threads 1
    python benchmarks/quant.py --threads 1 --variants float32,int8 --rounds 3    # fewer variants / rounds
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

import loramix  # first: it drops torchao's CPU-only loader noise before transformers imports torchao

from common import build_base, build_experts, interleaved, machine, ratios, workdir

VARIANTS = ("float32", "int8", "int4", "nf4")


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def tensor_bytes(model: torch.nn.Module) -> int:
    """Bytes of every parameter and buffer as stored (a torchao tensor subclass: its inner tensors), shared once."""
    seen: set[int] = set()
    total = 0
    for t in [*model.parameters(), *model.buffers()]:
        data = t.data if isinstance(t, torch.nn.Parameter) else t
        if type(data) is torch.Tensor or not hasattr(data, "__tensor_flatten__"):
            parts = [data]
        else:
            names, _ = data.__tensor_flatten__()
            parts = [getattr(data, n) for n in names]
        for part in parts:
            if part.data_ptr() not in seen:
                seen.add(part.data_ptr())
                total += part.numel() * part.element_size()
    return total


def build(base_dir: Path, experts: list[Path], variant: str) -> loramix.LoraMixModel:
    torch.manual_seed(0)
    return loramix.from_pretrained(
        base_dir,
        {f"e{i}": p for i, p in enumerate(experts)},
        loramix.MixConfig(gate=loramix.GateConfig(layerwise=True)),
        quantize=None if variant == "float32" else variant,
    )


def prompt(args) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randint(10, 1000, (1, args.prompt_tokens), generator=g)


def _trim() -> None:
    """Hand freed heap back to the OS (glibc keeps it otherwise), so that RSS shows what the process still holds."""
    import ctypes
    import gc

    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def memory_child(args) -> None:
    torch.set_num_threads(args.threads)
    experts = [Path(p) for p in args.experts.split(",")]
    # every variant's libraries before the floor: their code is the process's, not the model's
    import importlib

    for name in ("transformers", "torchao.quantization", "bitsandbytes", "torch._inductor.config"):
        importlib.import_module(name)  # torch._inductor: torchao's int8 config sets inductor options

    # a warm-up of the same variant, then dropped: the library code its run touches (file-backed pages of libtorch,
    # torchao, bitsandbytes) and the allocator's arenas are then the process's floor, not the model's
    warm = build(Path(args.base_dir), experts, args.memory_child)
    with torch.inference_mode():
        warm.generate(prompt(args)[:, :8], max_new_tokens=2, eos_token_id=[])
    del warm
    _trim()
    floor = _status_kb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM: the load's own peak from here
    mix = build(Path(args.base_dir), experts, args.memory_child)
    load_peak = _status_kb("VmHWM")
    _trim()
    loaded = _status_kb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")
    with torch.inference_mode():
        mix.generate(prompt(args), max_new_tokens=args.new_tokens, eos_token_id=[])
    peak = _status_kb("VmHWM")
    print(json.dumps({"floor_kb": floor, "load_peak_kb": load_peak, "loaded_kb": loaded, "peak_kb": peak,
                      "tensor_bytes": tensor_bytes(mix)}))  # fmt: skip


def memory(args, base_dir: Path, experts: list[Path]) -> dict[str, dict]:
    out = {}
    for variant in args.variants:
        result = subprocess.run(
            [
                sys.executable, __file__, "--memory-child", variant, "--base-dir", str(base_dir),
                "--experts", ",".join(map(str, experts)), "--threads", str(args.threads),
                "--prompt-tokens", str(args.prompt_tokens), "--new-tokens", str(args.new_tokens),
            ],
            capture_output=True, text=True, check=True, cwd=Path(__file__).parent,
        )  # fmt: skip
        out[variant] = json.loads(result.stdout.strip().splitlines()[-1])
    return out


def speed(args, base_dir: Path, experts: list[Path]) -> dict[str, dict]:
    ids = prompt(args)
    models = {v: build(base_dir, experts, v) for v in args.variants}

    def run(model):
        def go():
            with torch.inference_mode():
                model.generate(ids, max_new_tokens=args.new_tokens, eos_token_id=[])

        return go

    times = interleaved({v: run(m) for v, m in models.items()}, repeats=args.rounds, warmup=1)
    result = ratios(times, "float32")
    for r in result.values():
        r["tokens_per_s"] = args.new_tokens / r["median_s"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated, float32 first")
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)
    parser.add_argument("--base-dir", help=argparse.SUPPRESS)
    parser.add_argument("--experts", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        memory_child(args)
        return
    args.variants = args.variants.split(",")
    if args.variants[0] != "float32" or not set(args.variants) <= set(VARIANTS):
        sys.exit(f"--variants: float32 first, then some of {VARIANTS[1:]}")
    torch.set_num_threads(args.threads)
    work = workdir()
    with contextlib.redirect_stdout(sys.stderr):
        base_dir = build_base(work)
        experts = build_experts(base_dir, work)
    start = time.time()
    mem = memory(args, base_dir, experts)
    fast = speed(args, base_dir, experts)
    ref = mem["float32"]
    ref_peak = ref["peak_kb"] - ref["floor_kb"]
    print(
        f"\n25M-body Llama (42M weights), 4 experts rank 8, layerwise gate; batch 1, {args.prompt_tokens} prompt + "
        f"{args.new_tokens} new tokens, granular; {args.threads} thread(s); {machine()}; {time.time() - start:.0f} s"
    )
    print(
        "| base | model tensors (MiB) | peak while loading (MiB) | held after load (MiB) | peak while generating "
        "(MiB) | generating peak vs float32 | decode tokens/s | decode time vs float32 (paired median) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for v in args.variants:
        m, s = mem[v], fast[v]
        peak = m["peak_kb"] - m["floor_kb"]
        print(
            f"| {v} | {m['tensor_bytes'] / 2**20:.1f} | {(m['load_peak_kb'] - m['floor_kb']) / 1024:.0f} | "
            f"{(m['loaded_kb'] - m['floor_kb']) / 1024:.0f} | {peak / 1024:.0f} | {peak / ref_peak:.2f}x | "
            f"{s['tokens_per_s']:.1f} | {s['ratio']:.2f}x |"
        )
    print(json.dumps({"memory": mem, "speed": fast}))


if __name__ == "__main__":
    main()
