"""PEFT interop: build a loramix model from a live PEFT `XLoraModel` (base, experts and gate copied)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..config import GateConfig, MixConfig
from ..errors import ConfigError
from ..experts import StackedLoRA
from ..model import ExpertInfo, LoraMixModel

__all__ = ["from_peft"]


def _xlora_parts(peft_model: nn.Module) -> Any:
    from peft.tuners.xlora.model import XLoraModel

    candidate = peft_model
    for _ in range(3):
        if isinstance(candidate, XLoraModel):
            return candidate
        candidate = getattr(candidate, "base_model", None)
        if candidate is None:
            break
    raise ConfigError(
        f"from_peft expects a PEFT XLoraModel (or the PeftModel around one), got {type(peft_model).__name__}"
    )


def _plain_base(inner: nn.Module) -> nn.Module:
    """A new transformers model with the base weights of a LoRA-injected one (sharing their storage)."""
    from peft.tuners.lora import LoraLayer

    state = {}
    for key, tensor in inner.state_dict(keep_vars=True).items():
        if ".lora_" in key or "internal_xlora_classifier" in key:
            continue
        state[key.replace(".base_layer.", ".")] = tensor
    lora_modules = [m for m in inner.modules() if isinstance(m, LoraLayer)]
    with torch.device("meta"):
        base = type(inner)(inner.config)
    missing, unexpected = base.load_state_dict(state, strict=False, assign=True)
    if unexpected:
        raise ConfigError(f"from_peft: unexpected base tensors {unexpected[:5]} (lora layers: {len(lora_modules)})")
    if hasattr(base, "tie_weights"):
        base.tie_weights()
    still_meta = [n for n, p in base.named_parameters() if p.device.type == "meta"]
    still_meta += [n for n, b in base.named_buffers() if b.device.type == "meta"]
    if still_meta:
        # non-persistent buffers (rotary tables) are not in the state dict: take them from the live model
        live = dict(inner.named_buffers())
        for name in still_meta:
            key = name if name in live else name.replace(".", ".base_layer.", 1)
            if key not in live:
                raise ConfigError(f"from_peft: cannot recover base tensor '{name}' (missing: {missing[:5]})")
            parent, _, attr = name.rpartition(".")
            module = base.get_submodule(parent) if parent else base
            module._buffers[attr] = live[key]
    if hasattr(inner, "generation_config"):
        base.generation_config = inner.generation_config
    base.eval()
    return base


def from_peft(peft_model: nn.Module, *, tokenizer: Any = None) -> LoraMixModel:
    """A `LoraMixModel` equal to a live PEFT X-LoRA model: same base weights (shared, not copied), the experts'
    LoRA matrices and scales, the classifier's weights and every config option.

    Expert names are taken from the `adapters` mapping of the `XLoraConfig`, in its order (PEFT names them "0".."n-1"
    internally).
    """
    from peft.tuners.lora import Linear as LoraLinear

    xlora = _xlora_parts(peft_model)
    conf = xlora.xlora_config
    inner = xlora.lora_model.model
    names = list(conf.adapters.keys())
    internal = [str(i) for i in range(len(names))]

    stacked: dict[str, StackedLoRA] = {}
    for path, module in inner.named_modules():
        if not isinstance(module, LoraLinear):
            continue
        a_parts, b_parts, ranks, scales = [], [], [], []
        for key in internal:
            if key in module.lora_A:
                a = module.lora_A[key].weight.detach()
                b = module.lora_B[key].weight.detach()
                a_parts.append(a)
                b_parts.append(b)
                ranks.append(a.shape[0])
                scales.append(float(module.scaling[key]))
            else:
                ranks.append(0)
                scales.append(0.0)
        if not a_parts:
            continue
        dtype = module.base_layer.weight.dtype
        stacked[path] = StackedLoRA(
            torch.cat(a_parts, 0).to(dtype).clone(), torch.cat(b_parts, 1).to(dtype).clone(), ranks, scales
        )

    classifier = xlora.internal_xlora_classifier
    linears = [m for m in classifier.layers if isinstance(m, nn.Linear)]
    depth = int(conf.xlora_depth)
    gate = GateConfig(
        depth=depth,
        width=int(conf.xlora_size) if depth > 1 else None,
        dropout=float(conf.xlora_dropout_p),
        softmax=bool(conf.enable_softmax),
        temperature=float(conf.softmax_temperature),
        top_k=conf.top_k_lora,
        topk_softmax=bool(conf.enable_softmax_topk),
        layerwise=bool(conf.layerwise_scalings),
        bias=linears[-1].bias is not None,
        hidden_size=int(conf.hidden_size),
    )
    config = MixConfig(
        gate=gate,
        scaling_pass_value=float(classifier.override_scaling_pass_value),
        global_scaling_weight=float(conf.global_scaling_weight),
        trainable_experts=bool(conf.use_trainable_adapters),
    )
    lora_configs = getattr(xlora.lora_model, "peft_config", {})
    experts = []
    for name, key in zip(names, internal):
        adapter_config = lora_configs.get(key)
        as_dict = adapter_config.to_dict() if hasattr(adapter_config, "to_dict") else {}
        experts.append(ExpertInfo(name, _jsonable(as_dict), str(conf.adapters[name])))

    base = _plain_base(inner)
    # the stacked tensors were taken from the live model; move them next to the new base's layers
    mix = LoraMixModel(
        base,
        stacked,
        experts,
        config,
        tokenizer=tokenizer,
        base_reference=getattr(inner.config, "_name_or_path", None) or None,
    )
    gate_state = {}
    for i, linear in enumerate(linears[:-1]):
        gate_state[f"inner.{i}.weight"] = linear.weight
        if linear.bias is not None:
            gate_state[f"inner.{i}.bias"] = linear.bias
    gate_state["last.weight"] = linears[-1].weight
    if linears[-1].bias is not None:
        gate_state["last.bias"] = linears[-1].bias
    mix.gate.load_state_dict({k: v.detach().to(mix.dtype) for k, v in gate_state.items()})
    return mix


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)
