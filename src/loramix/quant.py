"""Quantized base models: what `--quantize NAME` means, what a checkpoint records about a base's quantization, and the
dense view of a quantized weight (for the base fingerprint).

loramix quantizes nothing itself: transformers does it while loading the base, from one of its own quantization
configs (torchao `TorchAoConfig`, bitsandbytes `BitsAndBytesConfig`). The quantized linears stay what transformers
made them (`nn.Linear` holding a torchao tensor subclass, bitsandbytes `Linear8bitLt` / `Linear4bit`), and a
`MixedLoRALinear` wraps each adapted one without dequantizing it: the base output is the quantized layer's own
forward, the experts and the gate add their terms in the compute dtype and are never quantized.

    NAME   transformers config                                        storage of an adapted weight
    int8   TorchAoConfig(Int8WeightOnlyConfig())                      int8 + one scale per output row
    int4   TorchAoConfig(IntxWeightOnlyConfig(int4, PerGroup(32)))    int4 values held in int8 bytes + group scales
    nf4    BitsAndBytesConfig(load_in_4bit, nf4)                      two 4-bit NF4 codes per byte + block absmax

The input embeddings and the LM head stay in the compute dtype (transformers' default). Quantizing them through
torchao's CPU path (`include_input_output_embeddings=True`) dequantizes the whole table at every step: on the benchmark
Llama it cut the model's tensors to 0.28x of float32 but made decoding 8x slower and raised the peak while generating
above float32's (benchmarks/RESULTS.md).

torchao and bitsandbytes are optional (`pip install 'loramix[quant]'`) and imported only when a quantized base is
asked for. transformers imports torchao by itself whenever it is installed, and on a CPU-only torch torchao's
loader logs that its CUDA kernels do not load; `quiet_backend_noise` drops exactly those lines (and two other
known import-time notes) so that the CLI's errors stay one line.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import torch
from torch import nn

from .errors import ConfigError

__all__ = [
    "QUANTIZE_CHOICES",
    "compute_dtype",
    "dense_weight",
    "describe_quantization",
    "is_quantized",
    "quantization_config",
    "quantization_from_record",
    "quiet_backend_noise",
    "release_checkpoint_map",
    "same_quantization",
]


QUANTIZE_CHOICES = ("int8", "int4", "nf4")
"""The names `--quantize` / `quantize=` accept ("none" loads a float base even where a checkpoint records one)."""

# (logger name, start of a message) of import-time notes that say nothing actionable to a loramix user.
_NOISE = (
    ("torchao", "Failed to load "),  # torchao's CUDA kernels (.so) on a CPU-only torch: the Python paths still work
    ("torch.utils._pytree", ""),  # "<enum ...> is an Enum subclass and is now natively supported" (torchao's import)
    ("torchao.kernel.intmm", "Warning: Detected no triton"),  # CPU: torchao's Python paths need no triton
    ("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward"),  # optional `kernels` package
)


class _DropNoise(logging.Filter):
    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if self.prefix:
            return not message.startswith(self.prefix)
        return "is an Enum subclass and is now natively supported" not in message


def quiet_backend_noise() -> None:
    """Drop the known import-time log lines of torchao / bitsandbytes (idempotent; other records pass)."""
    for name, prefix in _NOISE:
        target = logging.getLogger(name)
        if not any(isinstance(f, _DropNoise) for f in target.filters):
            target.addFilter(_DropNoise(prefix))


def _need(module: str, what: str) -> Any:
    import importlib

    quiet_backend_noise()
    package = module.split(".")[0]
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        named = exc.name if isinstance(exc, ModuleNotFoundError) else None  # the module that was not found
        if named is not None and (module + ".").startswith(named + "."):  # the backend itself (or its parent)
            raise ConfigError(
                f"{what} needs the '{package}' package, which is not installed: pip install 'loramix[quant]'"
            ) from None
        # installed, but something inside it fails (built for another torch, a missing dependency of its own)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(
            f"{what}: the '{package}' package is installed but importing it fails ({first}); reinstall it: "
            "pip install --force-reinstall 'loramix[quant]'"
        ) from None


def quantization_config(name: Any, compute_dtype: torch.dtype | None = None) -> Any:
    """The transformers quantization config for `name` (see the module docstring), or `name` itself when it already
    is a transformers quantization config. None / "none" -> None (a float base)."""
    if name is None or (isinstance(name, str) and name.lower() == "none"):
        return None
    if not isinstance(name, str):
        if hasattr(name, "quant_method") and hasattr(name, "to_dict"):
            return name
        raise ConfigError(
            f"quantize={name!r}: expected one of {', '.join(QUANTIZE_CHOICES)}, 'none', or a transformers "
            "quantization config (TorchAoConfig, BitsAndBytesConfig)"
        )
    key = name.lower()
    if key not in QUANTIZE_CHOICES:
        raise ConfigError(f"quantize={name!r}: expected one of {', '.join(QUANTIZE_CHOICES)} or none")
    if key == "nf4":
        _need("bitsandbytes", "quantize=nf4")
        from transformers import BitsAndBytesConfig

        return BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype or torch.float32
        )
    ao = _need("torchao.quantization", f"quantize={key}")
    from transformers import TorchAoConfig

    if key == "int8":
        return TorchAoConfig(ao.Int8WeightOnlyConfig())
    # int4: the portable torchao layout (runs on CPU; torchao's packed int4 kernels need CUDA libraries)
    return TorchAoConfig(ao.IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=ao.PerGroup(32)))


def _hf_config(model: nn.Module) -> Any:
    quantizer = getattr(model, "hf_quantizer", None)
    config = getattr(quantizer, "quantization_config", None)
    return config if config is not None else getattr(getattr(model, "config", None), "quantization_config", None)


def is_quantized(model: nn.Module) -> bool:
    """Whether transformers loaded `model` with a quantization config."""
    return _hf_config(model) is not None


def _short_name(config: dict[str, Any]) -> str:
    method = str(config.get("quant_method", "")).lower()
    if method == "bitsandbytes":
        if config.get("load_in_4bit") or config.get("_load_in_4bit"):
            return f"bnb-{config.get('bnb_4bit_quant_type', '4bit')}"
        return "bnb-int8"
    if method == "torchao":
        quant_type = config.get("quant_type")
        inner = quant_type.get("default", quant_type) if isinstance(quant_type, dict) else quant_type
        kind = inner.get("_type") if isinstance(inner, dict) else str(inner)
        data = inner.get("_data", {}) if isinstance(inner, dict) else {}
        if kind == "FqnToConfig" and isinstance(data.get("fqn_to_config"), dict):  # name it after its linears
            inner = data["fqn_to_config"].get("_default") or {}
            kind, data = inner.get("_type"), inner.get("_data", {})
        if kind == "Int8WeightOnlyConfig":
            return "int8"
        if kind == "IntxWeightOnlyConfig":
            weight = (data.get("weight_dtype") or {}).get("_data") if isinstance(data, dict) else None
            return str(weight or "intx")
        return f"torchao-{kind}"
    return method or "unknown"


def describe_quantization(model: nn.Module) -> dict[str, Any] | None:
    """What a checkpoint records about the base's quantization: {"name", "method", "config"} (config: transformers'
    `to_dict()`, JSON-safe), or None for a float base."""
    config = _hf_config(model)
    if config is None:
        return None
    as_dict = json.loads(json.dumps(config.to_dict(), default=str))
    return {"name": _short_name(as_dict), "method": str(as_dict.get("quant_method")), "config": as_dict}


def quantization_from_record(record: dict[str, Any], where: str) -> Any:
    """The transformers quantization config a checkpoint recorded (`describe_quantization`), rebuilt."""
    config = record.get("config") if isinstance(record, dict) else None
    if not isinstance(config, dict):
        raise ConfigError(f"{where}: base.quantization must be an object with a 'config' object")
    method = str(config.get("quant_method", "")).lower()
    package = {"torchao": "torchao.quantization", "bitsandbytes": "bitsandbytes"}.get(method)
    if package is None:
        raise ConfigError(f"{where}: base.quantization has quant_method={method!r}; expected torchao or bitsandbytes")
    _need(package, f"the checkpoint's {record.get('name', method)} base")
    from transformers.quantizers.auto import AutoQuantizationConfig

    try:
        return AutoQuantizationConfig.from_dict(dict(config))
    except Exception as exc:  # transformers/torchao raise assorted types for a config they cannot rebuild
        raise ConfigError(f"{where}: cannot rebuild the base's quantization config ({exc})") from None


def same_quantization(a: dict[str, Any] | None, b: dict[str, Any] | None) -> bool:
    """Whether two `describe_quantization` records mean the same quantization (None: float)."""
    if a is None or b is None:
        return a is None and b is None
    return a.get("name") == b.get("name")


def dense_weight(module: nn.Module) -> torch.Tensor | None:
    """The weight a (possibly quantized) linear computes with, as a plain float tensor; None where there is none.

    torchao tensor subclasses: `dequantize()`. bitsandbytes `Params4bit` / `Int8Params`: PEFT's
    `dequantize_bnb_weight`. Plain tensors are returned as they are (no copy).
    """
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor):
        return None
    kind = type(weight).__name__
    if kind == "Params4bit" and getattr(weight.quant_state, "packing_format_for_cpu", False):
        # bitsandbytes repacks 4-bit weights in place at the first CPU forward (AVX512-BF16 kernels): unpack a copy
        import copy

        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse, dequantize_4bit

        data, state = _convert_weight_packed_for_cpu_inverse(weight.data, copy.deepcopy(weight.quant_state))
        return dequantize_4bit(data, state).float()
    if kind in ("Params4bit", "Int8Params"):
        from peft.utils.integrations import dequantize_bnb_weight

        return dequantize_bnb_weight(weight, state=getattr(module, "state", None))
    data = weight.data if isinstance(weight, nn.Parameter) else weight
    if type(data) is not torch.Tensor and hasattr(data, "dequantize"):
        return data.dequantize()
    return weight


def compute_dtype(module: nn.Module) -> torch.dtype:
    """The float dtype a linear computes in (experts and gate are kept in it): its weight's dtype, a bitsandbytes
    layer's `compute_dtype`, else float32."""
    weight = getattr(module, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.is_floating_point():
        return weight.dtype
    dtype = getattr(module, "compute_dtype", None)
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else torch.float32


def release_checkpoint_map(model: nn.Module) -> None:
    """Copy the float tensors that stayed unquantized (embeddings, norms, biases, a float LM head) out of the
    checkpoint's memory map, so that the map closes. transformers maps safetensors files and keeps them mapped while
    any tensor views them; after quantizing, the pages of every float weight it read for quantizing would otherwise
    stay resident (benchmark Llama, int8: 98 MiB of the map stayed resident; the private copy of its float
    embeddings and norms costs 63 MiB, RSS after loading falls by 35 MiB)."""
    seen: set[int] = set()
    with torch.no_grad():
        for module in model.modules():
            for group in (module._parameters, module._buffers):
                for name, tensor in list(group.items()):
                    if tensor is None or id(tensor) in seen or tensor.device.type != "cpu":
                        continue
                    seen.add(id(tensor))
                    data = tensor.data
                    if type(data) is not torch.Tensor or not data.is_floating_point():
                        continue  # quantized storage: already the quantizer's own memory
                    if isinstance(tensor, nn.Parameter):
                        tensor.data = data.clone()
                    else:
                        group[name] = data.clone()
