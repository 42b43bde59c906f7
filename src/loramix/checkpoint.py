"""The checkpoint format: its layout, the base fingerprint, `save_checkpoint`, and the checks of what is read back
(loading.py builds the model from them). Self-contained: config JSON + safetensors, written atomically.

    ckpt/
      loramix_config.json    format_version, mix config, experts (names + original adapter configs),
                             adapted layers (module path, per-expert ranks and scales), base reference + fingerprint
      gate.safetensors       the ScalingHead (inner.{i}.weight/bias ..., last.weight/bias), or the Arrow router's
                             prototypes.{l} [N, d_in] per adapted layer
      experts.safetensors    per adapted module: "<module>.lora_A" [R, d_in], "<module>.lora_B" [d_out, R]
      tokenizer/             the tokenizer, when the model has one
      base/                  a copy of the base model, only with save(include_base=True)

The base weights are referenced (hub id or absolute path), not copied. docs/checkpoint-format.md has the details.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .base import text_config
from .config import is_number
from .errors import BaseModelMismatchError, CheckpointError
from .experts import MAX_SCALE, ExpertInfo, module_rank, module_scale, scale_rule, targets_module
from .io import atomic_directory, check_finite, save_tensors, write_json
from .quant import dense_weight, describe_quantization
from .version import __version__

logger = logging.getLogger(__name__)

__all__ = [
    "base_fingerprint",
    "check_expert_configs",
    "check_fingerprint",
    "expert_infos",
    "layer_table",
    "save_checkpoint",
]

FORMAT_VERSION = 1
CONFIG_NAME = "loramix_config.json"
GATE_NAME = "gate.safetensors"
EXPERTS_NAME = "experts.safetensors"
TOKENIZER_DIR = "tokenizer"
BASE_DIR = "base"
_SAMPLE = 64
CHECKPOINT_FILES = (CONFIG_NAME, GATE_NAME, EXPERTS_NAME, TOKENIZER_DIR, BASE_DIR)  # what save_checkpoint may write


# ---------------------------------------------------------------------- base fingerprint


def _weight_of(model: nn.Module, path: str) -> torch.Tensor | None:
    """The weight the base layer at `path` computes with: dequantized where the base is quantized."""
    try:
        module = model.get_submodule(path)
    except AttributeError:
        return None  # reported with a clear message when the layers are built
    return dense_weight(getattr(module, "base_layer", module))


def sample_index(numel: int) -> torch.Tensor:
    """The evenly spaced positions that the fingerprint samples in a tensor of `numel` elements. Beyond 2**24
    elements float32 cannot hold every position (the last one rounded past the end, an IndexError on a real
    model's embeddings), so those are computed exactly in integers; smaller tensors keep the float positions that
    earlier checkpoints recorded."""
    n = min(_SAMPLE, numel)
    if numel <= 2**24 or n < 2:
        return torch.linspace(0, numel - 1, n).round().long()
    return (torch.arange(n, dtype=torch.int64) * (numel - 1) + (n - 1) // 2) // (n - 1)


def _sample(t: torch.Tensor) -> list[float]:
    flat = t.detach().reshape(-1)
    index = sample_index(flat.numel()).to(flat.device)
    return [float(f"{v:.6g}") for v in flat.index_select(0, index).float().cpu().tolist()]


def base_fingerprint(model: nn.Module, layer_names: list[str]) -> dict[str, Any]:
    """Shapes and a few sampled values of the input embeddings and the first/last adapted base weights.

    Sampled values (not a byte hash) so that the same base loaded in another dtype still matches. Over a quantized
    base the weights are sampled dequantized (the values the layers compute with; the quantized storage differs
    between backends and versions), so the same base matches within the rounding of its quantization.
    """
    config = model.config
    text = text_config(model)
    tensors: dict[str, torch.Tensor | None] = {}
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    tensors["input_embeddings"] = dense_weight(embeddings) if embeddings is not None else None
    for path in dict.fromkeys([layer_names[0], layer_names[-1]]):
        tensors[f"{path}.weight"] = _weight_of(model, path)
    fingerprint: dict[str, Any] = {
        "architecture": type(model).__name__,
        "model_type": getattr(config, "model_type", None),
        "hidden_size": getattr(text, "hidden_size", None),
        "num_hidden_layers": getattr(text, "num_hidden_layers", None),
        "vocab_size": getattr(text, "vocab_size", None),
        "tensors": {},
    }
    for name, t in tensors.items():
        if t is None or t.device.type == "meta":
            continue
        fingerprint["tensors"][name] = {"shape": list(t.shape), "sample": _sample(t)}
    return fingerprint


# How far a sampled weight may move (relative to the sample's largest value) and still be the same base:
# a dtype change (fp32 <-> bf16) or int8 per-row rounding (at most max|row| / 254) stays well inside 1e-2;
# 4-bit rounding (int4 groups: half a step, max / 14; NF4 blocks: half the widest code gap, 0.14 x absmax) needs more.
_SAME_BASE = 1e-2
_SAME_BASE_4BIT = 0.2


def _is_4bit(record: dict[str, Any] | None) -> bool:
    name = str((record or {}).get("name", ""))
    return "4" in name and "int8" not in name


def check_fingerprint(
    expected: dict[str, Any],
    model: nn.Module,
    layer_names: list[str],
    where: str,
    quantization: tuple[dict[str, Any] | None, dict[str, Any] | None] = (None, None),
) -> None:
    """Raise `BaseModelMismatchError` if `model` is not the base the checkpoint was made for.

    quantization: (recorded, actual) `describe_quantization` records; a 4-bit side widens the weights' tolerance.
    """
    actual = base_fingerprint(model, layer_names)
    weight_tolerance = _SAME_BASE_4BIT if any(_is_4bit(q) for q in quantization) else _SAME_BASE
    for key in ("model_type", "hidden_size", "num_hidden_layers", "vocab_size"):
        if expected.get(key) is not None and actual.get(key) != expected.get(key):
            raise BaseModelMismatchError(
                f"{where}: the checkpoint was made for a base with {key}={expected.get(key)!r}, but this base has "
                f"{key}={actual.get(key)!r}; pass the right base (load(..., base=...))"
            )
    for name, info in (expected.get("tensors") or {}).items():
        got = actual["tensors"].get(name)
        if got is None:
            continue
        if got["shape"] != info["shape"]:
            raise BaseModelMismatchError(
                f"{where}: base tensor '{name}' has shape {got['shape']}, the checkpoint expects {info['shape']}; "
                "this is a different base model"
            )
        a = torch.tensor(got["sample"], dtype=torch.float64)
        b = torch.tensor(info["sample"], dtype=torch.float64)
        relative = _SAME_BASE if name == "input_embeddings" else weight_tolerance  # embeddings: int8 at most
        tolerance = relative * float(b.abs().max().clamp_min(1e-12))
        if a.shape != b.shape or float((a - b).abs().max()) > tolerance:
            raise BaseModelMismatchError(
                f"{where}: base weights differ from the ones the checkpoint was made for (tensor '{name}'); "
                "this is a different base model. Pass the right one with load(..., base=...), or check_base=False "
                "if you really mean to mix these experts into another base"
            )


# ---------------------------------------------------------------------- save


def save_checkpoint(
    model: Any, path: str | Path, *, include_base: bool = False, overwrite: bool = True
) -> Path:
    """Write `model` to the directory `path` atomically and return its path."""
    layers = []
    expert_tensors: dict[str, torch.Tensor] = {}
    for name, layer in zip(model.layer_names, model.mixed_layers()):
        st = layer.stacked()
        layers.append({"module": name, "ranks": st.ranks, "scales": st.scales})
        expert_tensors[f"{name}.lora_A"] = st.lora_A
        expert_tensors[f"{name}.lora_B"] = st.lora_B
    quantization = describe_quantization(model.model)
    if include_base and quantization is not None:
        raise CheckpointError(
            f"include_base=True over a {quantization['name']} base: loramix bundles float bases only; save without "
            "it (the checkpoint records the base and its quantization, and load() quantizes it again)"
        )
    base_info = {
        "name_or_path": model.base_reference,
        "bundled": include_base,
        "dtype": str(model.dtype).removeprefix("torch."),
        "fingerprint": base_fingerprint(model.model, model.layer_names),
    }
    if quantization is not None:
        base_info["quantization"] = quantization
    if include_base:
        base_info["name_or_path"] = BASE_DIR
    meta = {
        "format_version": FORMAT_VERSION,
        "loramix_version": __version__,
        "mix_config": model.config.to_dict(),
        "gate": {"hidden_size": model.hidden_size, "n_layers": model.n_layers, "n_experts": model.n_experts},
        "experts": [{"name": e.name, "source": e.source, "adapter_config": e.adapter_config} for e in model.experts],
        "layers": layers,
        "base": base_info,
    }
    check_finite(dict(model.gate.state_dict()), "the gate", prefix="refusing to save: ")
    check_finite(expert_tensors, "the experts", prefix="refusing to save: ")
    try:
        json.dumps(meta)
    except TypeError as exc:
        raise CheckpointError(f"cannot serialise the checkpoint config: {exc}") from None
    written = atomic_directory(path, overwrite=overwrite, marker=CONFIG_NAME, owned=CHECKPOINT_FILES, what="checkpoint")
    with written as tmp:
        save_tensors(dict(model.gate.state_dict()), tmp / GATE_NAME, {"format": "pt"})
        save_tensors(expert_tensors, tmp / EXPERTS_NAME, {"format": "pt"})
        if model.tokenizer is not None and hasattr(model.tokenizer, "save_pretrained"):
            model.tokenizer.save_pretrained(str(tmp / TOKENIZER_DIR))
        if include_base:
            with model.plain_model() as base:
                base.save_pretrained(str(tmp / BASE_DIR))
        write_json(tmp / CONFIG_NAME, meta)  # last: a directory with this file is complete
    logger.info("saved loramix checkpoint to %s", path)
    return Path(path)


# ---------------------------------------------------------------------- load


def expert_infos(meta: dict[str, Any], where: Path | str) -> list[ExpertInfo]:
    """The checked 'experts' list of a checkpoint config: unique non-empty string names, object adapter configs."""
    experts = meta.get("experts")
    if not isinstance(experts, list) or not experts:
        raise CheckpointError(f"{where}: field 'experts' must be a non-empty list")
    infos = []
    for i, e in enumerate(experts):
        name = e.get("name") if isinstance(e, dict) else None
        config = e.get("adapter_config") or {} if isinstance(e, dict) else None
        if not isinstance(name, str) or not name.strip() or not isinstance(config, dict):
            raise CheckpointError(
                f"{where}: experts[{i}] needs a non-empty string 'name' (got {name!r}) and an 'adapter_config' object"
            )
        infos.append(ExpertInfo(name, dict(config), str(e.get("source", ""))))
    names = [info.name for info in infos]
    if len(set(names)) != len(names):
        raise CheckpointError(f"{where}: expert names must be unique, got {names}")
    return infos


def layer_table(meta: dict[str, Any], where: Path, n_experts: int) -> list[tuple[str, list[int], list[float]]]:
    layers = meta.get("layers")
    if not isinstance(layers, list) or not layers:
        raise CheckpointError(f"{where}: field 'layers' must be a non-empty list of adapted modules")
    out = []
    for i, entry in enumerate(layers):
        try:
            module, ranks, scales = entry["module"], entry["ranks"], entry["scales"]
        except (KeyError, TypeError):
            raise CheckpointError(f"{where}: layers[{i}] must have 'module', 'ranks' and 'scales'") from None
        if (
            not isinstance(module, str)
            or not isinstance(ranks, list)
            or not isinstance(scales, list)
            or len(ranks) != n_experts
            or len(scales) != n_experts
            or not all(isinstance(r, int) and r >= 0 for r in ranks)
            or not all(is_number(s) for s in scales)
        ):
            raise CheckpointError(
                f"{where}: layers[{i}] ('{module}') needs a module path and {n_experts} non-negative integer ranks "
                f"and {n_experts} finite numeric scales"
            )
        for e, (rank, scale) in enumerate(zip(ranks, scales)):
            if not (0 < scale <= MAX_SCALE or (rank == 0 and scale == 0)):
                raise CheckpointError(
                    f"{where}: layers[{i}] ('{module}'): scales[{e}]={float(scale)!r} must be in (0, {MAX_SCALE:g}] "
                    "(alpha / r of the expert; 0 where its rank is 0)"
                )
        out.append((module, ranks, [float(s) for s in scales]))
    return out


def check_expert_configs(
    infos: list[ExpertInfo], table: list[tuple[str, list[int], list[float]]], where: Path | str
) -> None:
    """Refuse a checkpoint whose experts' adapter configs contradict its tensors: the rank (r, rank_pattern) and the
    targets (target_modules) of every module an expert adapts, and its scale (lora_alpha, alpha_pattern, use_rslora)
    against the recorded one. The exports write these configs, so a contradiction would change the model on the way
    out. Fields a config lacks (an X-LoRA model built in memory may record none) are not checked."""
    for e, info in enumerate(infos):
        config, label = info.adapter_config, f"{where}: experts[{e}] ('{info.name}')"
        for i, (module, ranks, scales) in enumerate(table):
            rank = ranks[e]
            if rank == 0:
                continue
            if targets_module(config, module) is False:
                raise CheckpointError(
                    f"{label}: has tensors at '{module}', which its adapter_config target_modules "
                    f"{config.get('target_modules')!r} does not match"
                )
            expected = module_rank(config, module)
            if not is_number(expected):
                continue
            if expected != rank:
                raise CheckpointError(
                    f"{label}: its adapter_config gives rank {expected!r} at '{module}', but its tensors there have "
                    f"rank {rank}"
                )
            if not is_number(config.get("lora_alpha")):
                continue
            scale = module_scale(config, module, rank)
            if not math.isclose(scale, scales[e], rel_tol=1e-6):
                raise CheckpointError(
                    f"{label}: its adapter_config gives the scale {scale!r} ({scale_rule(config)}) at '{module}', "
                    f"but layers[{i}] records {scales[e]!r}"
                )
