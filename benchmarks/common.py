"""Shared set-up for the benchmarks: the ~25M-parameter random Llama, random PEFT experts, interleaved timing."""

from __future__ import annotations

import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj"]


def bench_llama_config(**overrides):
    from transformers import LlamaConfig

    kwargs = dict(
        vocab_size=32000,
        hidden_size=512,
        intermediate_size=1408,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=8,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
    )
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


def build_base(workdir: Path, seed: int = 0, **overrides) -> Path:
    """Save the benchmark Llama to workdir/base (random weights)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(bench_llama_config(**overrides))
    model.save_pretrained(workdir / "base")
    return workdir / "base"


def build_experts(base_dir: Path, workdir: Path, n: int = 4, rank: int = 8, targets=TARGETS) -> list[Path]:
    """n PEFT LoRA adapters with random non-zero weights, saved as plain adapter dirs."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    out = []
    for i in range(n):
        torch.manual_seed(100 + i)
        model = AutoModelForCausalLM.from_pretrained(base_dir)
        config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(targets), init_lora_weights=False)
        peft_model = get_peft_model(model, config)
        with torch.no_grad():
            for name, p in peft_model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.02)
        path = workdir / f"expert{i}"
        peft_model.save_pretrained(path)
        out.append(path)
    return out


def sharp_mixture(base_dir: Path, workdir: Path) -> object:
    """4 random rank-8 experts on TARGETS and a depth-1 layer-wise gate with N(0, 1) weights (scalings that change
    from token to token), over `base_dir`: the mixture vs_mistralrs.py and profile_step.py time."""
    import loramix

    experts = build_experts(base_dir, workdir, n=4, rank=8, targets=TARGETS)
    mix = loramix.from_pretrained(
        base_dir,
        {f"expert{i}": p for i, p in enumerate(experts)},  # names that are no substring of another file name
        loramix.MixConfig(gate=loramix.GateConfig(depth=1, layerwise=True)),
    ).eval()
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in mix.gate.named_parameters():
            if name.endswith("weight"):
                p.normal_(0.0, 1.0)
    return mix


def workdir() -> Path:
    """A scratch directory for models and experts, removed when the benchmark exits."""
    import atexit
    import shutil

    path = Path(tempfile.mkdtemp(prefix="loramix-bench-"))
    atexit.register(shutil.rmtree, path, True)
    return path


def interleaved(variants: dict[str, Callable[[], object]], repeats: int, warmup: int = 2) -> dict[str, list[float]]:
    """Run each variant once per round, rotating the order every round; return the seconds of every run."""
    names = list(variants)
    for _ in range(warmup):
        for name in names:
            variants[name]()
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            start = time.perf_counter()
            variants[name]()
            times[name].append(time.perf_counter() - start)
    return times


def ratios(times: dict[str, list[float]], baseline: str) -> dict[str, dict[str, float]]:
    """Median seconds, and the median of per-round ratios to the baseline (paired: robust to drift)."""
    out = {}
    for name, ts in times.items():
        paired = [t / b for t, b in zip(ts, times[baseline])]
        out[name] = {"median_s": statistics.median(ts), "ratio": statistics.median(paired)}
    return out


def machine() -> str:
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"
