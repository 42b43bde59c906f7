"""Read PEFT LoRA adapter directories and stack them per adapted module.

An expert is a plain PEFT LoRA adapter dir: `adapter_config.json` + `adapter_model.safetensors`. For every module
of the base model that any expert adapts (the union of their targets), `stack_experts` builds one `StackedLoRA`:

    lora_A = [A_1; ...; A_N]   [R, d_in]     R = sum of the experts' ranks at this module
    lora_B = [B_1 ... B_N]     [d_out, R]
    ranks  = [r_1, ..., r_N]   an expert that does not adapt the module has rank 0 there (contributes zero)
    scales = [c_1, ..., c_N]   c_e = alpha_e / r_e, or alpha_e / sqrt(r_e) for rsLoRA

The scales stay separate from B (they are applied in rank space, see layers.py) so the stored matrices are exactly
PEFT's, whether the experts are frozen or trained.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import is_number
from .errors import AdapterError, ShapeMismatchError
from .io import check_finite, read_json, read_tensors
from .quant import compute_dtype

logger = logging.getLogger(__name__)

__all__ = [
    "MAX_SCALE",
    "ExpertInfo",
    "ExpertModule",
    "LoraExpert",
    "StackedLoRA",
    "linear_features",
    "module_rank",
    "module_scale",
    "read_adapter",
    "scale_rule",
    "stack_experts",
    "targets_module",
    "unstack_experts",
]

CONFIG_NAME = "adapter_config.json"
SAFETENSORS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"
# What loramix writes into an adapter directory (PEFT's save_pretrained adds its README.md; static exports a report).
PEFT_ADAPTER_FILES = (CONFIG_NAME, SAFETENSORS_NAME, "README.md", "loramix_static.json")

MAX_SCALE = 65504.0
"""The largest expert scale c_e (alpha / r, or alpha / sqrt(r) with rsLoRA): float16's largest value. The scales are
multiplied in the compute dtype (layers.py), so a larger one is Inf in a float16 model; no LoRA recipe comes near it
(PEFT's defaults give 2), while a hand-edited 1e30 would make every output NaN."""

# adapter_config.json options that change what a LoRA module computes: mixing them would silently give wrong outputs.
_UNSUPPORTED_OPTIONS: dict[str, str] = {
    "use_dora": "DoRA (weight-decomposed LoRA) is not a plain low-rank update",
    "lora_bias": "a trained bias on lora_B is not supported",
    "modules_to_save": "fully trained modules cannot be mixed per token",
    "layer_replication": "layer replication changes the base model's structure",
    "target_parameters": "adapters on raw parameters (nn.Parameter targets) are not supported",
    "trainable_token_indices": "trainable token embeddings are not supported",
    "alora_invocation_tokens": "activated LoRA (aLoRA) is not supported",
    "use_qalora": "QA-LoRA is not supported",
    "megatron_config": "Megatron parallel LoRA layers are not supported",
    "velora_config": "VeLoRA is not supported",
    "monteclora_config": "MonteCLoRA is not supported",
}


@dataclass
class ExpertInfo:
    """What is kept about an expert besides its tensors: its name, original adapter config, and where it came from."""

    name: str
    adapter_config: dict[str, Any] = field(default_factory=dict)
    source: str = ""


@dataclass
class ExpertModule:
    """One expert's update of one module: delta(x) = scale * B (A x)."""

    lora_A: torch.Tensor  # [r, d_in]
    lora_B: torch.Tensor  # [d_out, r]
    scale: float


@dataclass
class LoraExpert:
    """A LoRA adapter read from disk (or from a live model), keyed by module path inside the base model."""

    name: str
    source: str
    adapter_config: dict[str, Any]
    modules: dict[str, ExpertModule] = field(default_factory=dict)


@dataclass
class StackedLoRA:
    """All experts of one adapted module, stacked along the rank dimension (see the module docstring)."""

    lora_A: torch.Tensor  # [R, d_in]
    lora_B: torch.Tensor  # [d_out, R]
    ranks: list[int]
    scales: list[float]


def linear_features(module: nn.Module) -> tuple[int, int] | None:
    """(in_features, out_features) of an `nn.Linear` or a GPT-2 style `Conv1D`; None for anything else."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if type(module).__name__ == "Conv1D" and hasattr(module, "nx") and hasattr(module, "nf"):
        return int(module.nx), int(module.nf)
    return None


def _pattern_match(patterns: Mapping[str, Any], module_path: str) -> Any | None:
    """PEFT's rank/alpha pattern rule: a key matches a module path that equals it or ends with '.' + it (regex)."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module_path):
            return value
    return None


def module_rank(config: Mapping[str, Any], module: str) -> Any:
    """The rank `config` (a PEFT adapter config) gives the module at path `module`: its rank_pattern, else r."""
    return _pattern_match(config.get("rank_pattern") or {}, module) or config.get("r")


def module_scale(config: Mapping[str, Any], module: str, rank: int) -> float:
    """The scale c of a rank-`rank` update of `module` under `config`: alpha / r, or alpha / sqrt(r) with rsLoRA
    (alpha from alpha_pattern, else lora_alpha), as PEFT computes it."""
    alpha = float(_pattern_match(config.get("alpha_pattern") or {}, module) or config["lora_alpha"])
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def scale_rule(config: Mapping[str, Any]) -> str:
    """How `config` turns alpha and r into the scale, for messages."""
    return "lora_alpha / sqrt(r)" if config.get("use_rslora") else "lora_alpha / r"


def targets_module(config: Mapping[str, Any], module: str) -> bool | None:
    """Whether `config`'s target_modules name the module at path `module` (PEFT's rule: a string is a regular
    expression for the whole path, a list names modules by their last parts, "all-linear" any linear module).
    None when the config has no target_modules to check. A path may carry a prefix the adapter's did not (an adapter
    trained on the bare backbone), so a regular expression may also match a tail of the path."""
    targets = config.get("target_modules")
    if isinstance(targets, str):
        if targets == "all-linear":
            return True
        parts = module.split(".")
        try:
            return any(re.fullmatch(targets, ".".join(parts[i:])) for i in range(len(parts)))
        except re.error:
            return None
    if isinstance(targets, list) and all(isinstance(t, str) for t in targets):
        return any(module == t or module.endswith("." + t) for t in targets)
    return None


def _read_weights(directory: Path, name: str) -> dict[str, torch.Tensor]:
    st_path = directory / SAFETENSORS_NAME
    if st_path.is_file():
        return read_tensors(st_path, "the adapter's weights", error=AdapterError, prefix=f"expert '{name}': ")
    bin_path = directory / PICKLE_NAME
    if bin_path.is_file():
        # Old PEFT format. Read with weights_only=True: tensors only, no arbitrary objects are unpickled.
        logger.warning("expert '%s': reading legacy %s with torch.load(weights_only=True)", name, bin_path)
        try:
            data = torch.load(str(bin_path), map_location="cpu", weights_only=True)
        except Exception as exc:
            raise AdapterError(
                f"expert '{name}': {bin_path} is not a plain tensor file (refused to unpickle it: "
                f"{str(exc).splitlines()[0][:200]}); re-save the adapter as safetensors"
            ) from None
        if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
            raise AdapterError(f"expert '{name}': {bin_path} does not hold a name -> tensor mapping")
        return data
    raise AdapterError(
        f"expert '{name}': no {SAFETENSORS_NAME} in {directory} (expected a PEFT LoRA adapter directory)"
    )


def _read_config(directory: Path, name: str) -> dict[str, Any]:
    if not directory.is_dir():
        raise AdapterError(f"expert '{name}': {directory} is not a directory (expected a PEFT LoRA adapter directory)")
    return read_json(directory / CONFIG_NAME, "expected a PEFT LoRA adapter directory", error=AdapterError,
                     prefix=f"expert '{name}': ")


def check_adapter_config(config: Mapping[str, Any], name: str, where: str) -> None:
    """Refuse adapter kinds and options that a per-token mixture of plain LoRA updates cannot represent."""
    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise AdapterError(f"expert '{name}': {where} has peft_type={peft_type}; loramix mixes LoRA adapters only")
    for option, why in _UNSUPPORTED_OPTIONS.items():
        if config.get(option):
            raise AdapterError(f"expert '{name}': {where} sets {option}={config[option]!r}: {why}")
    bias = config.get("bias", "none")
    if bias not in (None, "none"):
        raise AdapterError(f"expert '{name}': {where} sets bias={bias!r}: trained biases are not supported; use 'none'")
    for key in ("r", "lora_alpha"):
        value = config.get(key)
        if not is_number(value) or value <= 0:
            raise AdapterError(f"expert '{name}': {where} field '{key}'={value!r} must be a finite number > 0")
    for key in ("rank_pattern", "alpha_pattern"):
        patterns = config.get(key) or {}
        if not isinstance(patterns, Mapping):
            raise AdapterError(f"expert '{name}': {where} field '{key}' must be an object of pattern -> number")
        for pattern, value in patterns.items():
            try:
                re.compile(pattern)
            except re.error as exc:
                raise AdapterError(
                    f"expert '{name}': {where} field '{key}' has the pattern {pattern!r}, which is not a valid regular "
                    f"expression ({exc})"
                ) from None
            if not is_number(value) or value <= 0:
                raise AdapterError(
                    f"expert '{name}': {where} field '{key}'[{pattern!r}]={value!r} must be a finite number > 0"
                )


def read_adapter(name: str, path: str | Path) -> LoraExpert:
    """Read one PEFT LoRA adapter directory into a `LoraExpert` (tensors on CPU, as stored)."""
    directory = Path(path).expanduser()
    config = _read_config(directory, name)
    where = str(directory / CONFIG_NAME)
    check_adapter_config(config, name, where)
    weights = _read_weights(directory, name)
    return expert_from_state_dict(name, str(directory), config, weights)


def _strip_prefix(key: str) -> str:
    return key.removeprefix("base_model.model.")


def expert_from_state_dict(
    name: str, source: str, config: Mapping[str, Any], weights: Mapping[str, torch.Tensor]
) -> LoraExpert:
    """Group PEFT adapter tensors (`...<module>.lora_A.weight` / `.lora_B.weight`) by module and compute scales."""
    check_finite(dict(weights), source, error=AdapterError, prefix=f"expert '{name}': ")
    for key in weights:
        if ".lora_embedding_" in key:
            raise AdapterError(f"expert '{name}' ({source}): embedding targets are not supported (tensor '{key}')")
        if ".lora_magnitude_vector" in key:
            raise AdapterError(f"expert '{name}' ({source}): DoRA tensors are not supported (tensor '{key}')")
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in weights.items():
        match = re.fullmatch(r"(.+)\.(lora_A|lora_B)(?:\.[^.]+)?\.weight", key)
        if match is None:
            raise AdapterError(
                f"expert '{name}' ({source}): unexpected tensor '{key}'; a LoRA adapter holds only "
                "'<module>.lora_A.weight' and '<module>.lora_B.weight'"
            )
        module = _strip_prefix(match.group(1))
        pairs.setdefault(module, {})[match.group(2)] = tensor
    if not pairs:
        raise AdapterError(f"expert '{name}' ({source}): the adapter holds no LoRA tensors")

    expert = LoraExpert(name=name, source=source, adapter_config=dict(config))
    for module, pair in pairs.items():
        if set(pair) != {"lora_A", "lora_B"}:
            missing = ({"lora_A", "lora_B"} - set(pair)).pop()
            raise AdapterError(f"expert '{name}' ({source}): module '{module}' has no {missing} tensor")
        a, b = pair["lora_A"], pair["lora_B"]
        if not (a.is_floating_point() and b.is_floating_point()):
            raise AdapterError(
                f"expert '{name}' ({source}): module '{module}' has lora_A of dtype {a.dtype} and lora_B of dtype "
                f"{b.dtype}; expected floating point"
            )
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise ShapeMismatchError(
                f"expert '{name}' ({source}): module '{module}' has lora_A {tuple(a.shape)} and lora_B "
                f"{tuple(b.shape)}; expected [r, d_in] and [d_out, r] with the same r"
            )
        rank = a.shape[0]
        expected_rank = module_rank(config, module)
        if rank != expected_rank:
            raise ShapeMismatchError(
                f"expert '{name}' ({source}): module '{module}' has rank {rank} but adapter_config.json says "
                f"r={expected_rank}"
            )
        scale = module_scale(config, module, rank)
        if scale > MAX_SCALE:
            raise AdapterError(
                f"expert '{name}' ({source}): module '{module}' has the scale {scale:g} ({scale_rule(config)}); "
                f"expected at most {MAX_SCALE:g} (float16's largest value)"
            )
        expert.modules[module] = ExpertModule(lora_A=a, lora_B=b, scale=scale)
    return expert


def _resolve_module_path(path: str, modules: Mapping[str, nn.Module], prefix: str) -> str | None:
    if path in modules:
        return path
    if prefix and f"{prefix}.{path}" in modules:  # adapter trained on the bare backbone (AutoModel)
        return f"{prefix}.{path}"
    return None


def unstack_experts(stacked: Mapping[str, StackedLoRA], n_experts: int) -> list[dict[str, torch.Tensor]]:
    """The inverse of stacking: per expert, its tensors under PEFT's names (`base_model.model.<module>.lora_A.weight`
    [r_e, d_in] and `.lora_B.weight` [d_out, r_e]) for the modules it adapts (views of the stacked tensors)."""
    out: list[dict[str, torch.Tensor]] = [{} for _ in range(n_experts)]
    for path, st in stacked.items():
        start = 0
        for e, rank in enumerate(st.ranks):
            if rank:
                out[e][f"base_model.model.{path}.lora_A.weight"] = st.lora_A[start : start + rank]
                out[e][f"base_model.model.{path}.lora_B.weight"] = st.lora_B[:, start : start + rank]
            start += rank
    return out


def stack_experts(experts: Sequence[LoraExpert], model: nn.Module) -> dict[str, StackedLoRA]:
    """Stack the experts per module of `model`, in `named_modules()` order (the layer index of the gate).

    Checks that every adapted module exists, is a Linear/Conv1D, and that each expert's tensors fit it.
    Tensors are cast to the base layer's dtype and moved to its device.
    """
    modules = dict(model.named_modules())
    prefix = getattr(model, "base_model_prefix", "") or ""
    per_expert: list[dict[str, ExpertModule]] = []
    for expert in experts:
        resolved: dict[str, ExpertModule] = {}
        for path, update in expert.modules.items():
            target = _resolve_module_path(path, modules, prefix)
            if target is None:
                raise AdapterError(
                    f"expert '{expert.name}' ({expert.source}): adapts module '{path}', which the base model "
                    f"({type(model).__name__}) does not have; was the adapter trained on another architecture?"
                )
            resolved[target] = update
        per_expert.append(resolved)

    union = set().union(*(set(r) for r in per_expert)) if per_expert else set()
    stacked: dict[str, StackedLoRA] = {}
    for path, module in modules.items():
        if path not in union:
            continue
        features = linear_features(module)
        if features is None:
            raise AdapterError(
                f"module '{path}' is a {type(module).__name__}; loramix mixes experts on nn.Linear and Conv1D only"
            )
        d_in, d_out = features
        weight = module.weight
        dtype = compute_dtype(module)  # a quantized base: the experts stay in the compute dtype
        a_parts, b_parts, ranks, scales = [], [], [], []
        for expert, resolved in zip(experts, per_expert):
            update = resolved.get(path)
            if update is None:
                ranks.append(0)
                scales.append(0.0)
                continue
            a, b = update.lora_A, update.lora_B
            if a.shape[1] != d_in or b.shape[0] != d_out:
                raise ShapeMismatchError(
                    f"expert '{expert.name}': module '{path}' has lora_A {tuple(a.shape)} and lora_B "
                    f"{tuple(b.shape)}, but the base layer maps {d_in} -> {d_out} (expected lora_A "
                    f"[{a.shape[0]}, {d_in}] and lora_B [{d_out}, {a.shape[0]}])"
                )
            a_parts.append(a.to(device=weight.device, dtype=dtype))
            b_parts.append(b.to(device=weight.device, dtype=dtype))
            ranks.append(int(a.shape[0]))
            scales.append(float(update.scale))
        stacked[path] = StackedLoRA(
            lora_A=torch.cat(a_parts, dim=0).contiguous(),
            lora_B=torch.cat(b_parts, dim=1).contiguous(),
            ranks=ranks,
            scales=scales,
        )
    return stacked
