"""`load`: a LoraMixModel from a checkpoint directory (checkpoint.py reads and checks the files; this module builds
the model on the base they name, checked against its fingerprint)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from .base import load_base_model, load_tokenizer
from .checkpoint import (
    BASE_DIR,
    CONFIG_NAME,
    EXPERTS_NAME,
    FORMAT_VERSION,
    GATE_NAME,
    TOKENIZER_DIR,
    check_expert_configs,
    check_fingerprint,
    expert_infos,
    layer_table,
)
from .config import MixConfig
from .errors import BaseModelMismatchError, CheckpointError, ConfigError, LoramixError
from .experts import StackedLoRA
from .io import read_json, read_tensors
from .model import LoraMixModel
from .quant import compute_dtype, describe_quantization, quantization_from_record, same_quantization

logger = logging.getLogger(__name__)

__all__ = ["load", "load_gate_state"]


def load(
    path: str | Path,
    base: Any = None,
    *,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device | None = None,
    tokenizer: Any = None,
    check_base: bool = True,
    quantize: Any = None,
    **model_kwargs: Any,
) -> LoraMixModel:
    """Load a checkpoint written by `LoraMixModel.save`. The expert directories it was built from are not needed.

    base: override the recorded base (id, directory or loaded PreTrainedModel). The base is checked against the
    checkpoint's fingerprint; a different base raises `BaseModelMismatchError` (check_base=False skips that).
    quantize: how to quantize the base ("int8", "int4", "nf4", a transformers quantization config, or "none" for a
    float base). Default: the quantization the checkpoint records (none for a checkpoint made over a float base).
    A base quantized otherwise than the checkpoint's loads with a warning.
    """
    root = Path(path).expanduser()
    if not root.is_dir():
        raise CheckpointError(f"{root} is not a directory (expected a loramix checkpoint)")
    config_path = root / CONFIG_NAME
    meta, config = _read_meta(config_path)
    infos = expert_infos(meta, config_path)
    table = layer_table(meta, config_path, len(infos))
    base_meta = meta.get("base") or {}
    if base is None:
        base = _recorded_base(root, base_meta, config_path)
    # The reference is where the base was read from (a bundled base: its absolute path), so that a re-save elsewhere
    # or an export names a base that exists, never the bare "base" relative to the current directory.
    recorded = base_meta.get("quantization")
    restore = recorded is not None and "quantization_config" not in model_kwargs and isinstance(base, (str, Path))
    if quantize is None and restore:
        quantize = quantization_from_record(recorded, str(config_path))
    model, reference = load_base_model(base, dtype=dtype, device=device, quantize=quantize, **model_kwargs)
    actual = describe_quantization(model)
    if not same_quantization(recorded, actual):
        logger.warning(
            "%s: the checkpoint was made over a %s base, this base is %s; the gate was trained on the other one's "
            "hidden states",
            config_path,
            (recorded or {}).get("name", "float"),
            (actual or {}).get("name", "float"),
        )
    if check_base and base_meta.get("fingerprint"):
        check_fingerprint(
            base_meta["fingerprint"], model, [m for m, _, _ in table], str(config_path), (recorded, actual)
        )
    stacked = _stacked_experts(root / EXPERTS_NAME, model, table, config_path)
    if tokenizer is None:
        tok_dir = root / TOKENIZER_DIR
        tokenizer = load_tokenizer(tok_dir) if tok_dir.is_dir() else None
        if tokenizer is None and isinstance(base, (str, Path)):
            tokenizer = load_tokenizer(base)
    try:
        mix = LoraMixModel(model, stacked, infos, config, tokenizer=tokenizer, base_reference=reference)
    except LoramixError as exc:
        raise type(exc)(f"{config_path}: {exc}") from None
    check_expert_configs(infos, table, config_path)  # once the tensors are known to fit the recorded ranks
    gate_meta = meta.get("gate") or {}
    for key, actual in (("hidden_size", mix.hidden_size), ("n_layers", mix.n_layers), ("n_experts", mix.n_experts)):
        if key in gate_meta and gate_meta[key] != actual:
            raise BaseModelMismatchError(
                f"{config_path}: gate.{key}={gate_meta[key]} but the model gives {actual}; wrong base model?"
            )
    load_gate_state(mix, read_tensors(root / GATE_NAME, "the gate weights"), root / GATE_NAME)
    return mix


def _read_meta(config_path: Path) -> tuple[dict[str, Any], MixConfig]:
    """The checkpoint's config file (format version and keys checked) and its `MixConfig`."""
    meta = read_json(config_path, "the checkpoint's config")
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"{config_path}: format_version={version!r}, this loramix reads format_version {FORMAT_VERSION}"
        )
    known = {"format_version", "loramix_version", "mix_config", "gate", "experts", "layers", "base"}
    unknown = sorted(set(meta) - known)
    if unknown:
        raise CheckpointError(f"{config_path}: unknown key(s) {unknown}; expected some of {sorted(known)}")
    try:
        return meta, MixConfig.from_dict(meta.get("mix_config", {}), where="mix_config")
    except ConfigError as exc:
        raise CheckpointError(f"{config_path}: {exc}") from None


def _recorded_base(root: Path, base_meta: dict[str, Any], config_path: Path) -> str | Path:
    """The base the checkpoint names: bundled inside it, next to it (a relative reference), or an id/absolute path
    (which must still exist)."""
    reference = base_meta.get("name_or_path")
    if base_meta.get("bundled"):
        base: str | Path = root / BASE_DIR
    elif reference and not Path(reference).is_absolute() and (root / reference).is_dir():
        base = (root / reference).resolve()  # a base next to the checkpoint, referenced relatively
    elif reference:
        base = reference
    else:
        raise CheckpointError(
            f"{config_path}: the checkpoint records no base model (it was built on an in-memory model); "
            "pass one with load(path, base=...)"
        )
    if Path(str(base)).is_absolute() and not Path(str(base)).exists():
        raise CheckpointError(
            f"{config_path}: the base model directory {base} no longer exists; pass the base with load(path, base=...)"
        )
    return base


def _stacked_experts(
    path: Path, model: torch.nn.Module, table: list[tuple[str, list[int], list[float]]], config_path: Path
) -> dict[str, StackedLoRA]:
    """The stacked expert weights of every adapted module in `table`, checked (present, floating point, nothing
    left over), on the module's device in its compute dtype."""
    tensors = read_tensors(path, "the stacked expert weights")
    modules = dict(model.named_modules())
    stacked: dict[str, StackedLoRA] = {}
    for module, ranks, scales in table:
        if module not in modules:
            raise BaseModelMismatchError(
                f"{config_path}: adapted module '{module}' does not exist in the base model "
                f"({type(model).__name__}); pass the right base with load(path, base=...)"
            )
        try:
            a, b = tensors.pop(f"{module}.lora_A"), tensors.pop(f"{module}.lora_B")
        except KeyError as exc:
            raise CheckpointError(f"{path}: tensor {exc} is missing") from None
        for name, tensor in ((f"{module}.lora_A", a), (f"{module}.lora_B", b)):
            if not tensor.is_floating_point():
                raise CheckpointError(f"{path}: tensor '{name}' has dtype {tensor.dtype}; expected floating point")
        weight, dtype_ = modules[module].weight, compute_dtype(modules[module])
        stacked[module] = StackedLoRA(a.to(weight.device, dtype_), b.to(weight.device, dtype_), ranks, scales)
    if tensors:
        raise CheckpointError(f"{path}: unexpected tensor(s) {sorted(tensors)[:5]}")
    return stacked


def load_gate_state(mix: LoraMixModel, state: dict[str, torch.Tensor], where: Path | str) -> None:
    """Check gate tensors read from `where` against `mix.gate` (names, shapes, float dtype) and load them."""
    expected = mix.gate.state_dict()
    if mix.gate.reads_probes and not any(k.startswith("prototypes.") for k in state):
        state = {**state, **expected}  # an Arrow checkpoint saved before routers trained: Arrow's own prototypes
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{where}: missing tensors {missing}, unexpected tensors {unexpected}")
    for key, value in state.items():
        if tuple(value.shape) != tuple(expected[key].shape):
            raise CheckpointError(
                f"{where}: tensor '{key}' has shape {tuple(value.shape)}, the gate for {mix.n_experts} experts and "
                f"{mix.n_layers} adapted modules expects {tuple(expected[key].shape)}"
            )
        if not value.is_floating_point():
            raise CheckpointError(f"{where}: tensor '{key}' has dtype {value.dtype}; expected floats")
    mix.gate.load_state_dict({k: v.to(mix.dtype) for k, v in state.items()})
