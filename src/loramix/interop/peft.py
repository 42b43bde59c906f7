"""PEFT interop: build a loramix model from a live PEFT `XLoraModel` (base, experts and gate copied)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import XLORA_NAMES, from_xlora, to_xlora
from ..errors import ConfigError
from ..experts import PEFT_ADAPTER_FILES, ExpertInfo, StackedLoRA, unstack_experts
from ..io import atomic_directory, save_tensors, write_json
from ..model import LoraMixModel

__all__ = ["clone_sharing_weights", "from_peft", "to_peft"]


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


def clone_sharing_weights(model: nn.Module, state: dict[str, torch.Tensor] | None = None) -> nn.Module:
    """A new model of the same class and config whose parameters are the tensors of `state` (default: `model`'s own),
    shared, not copied. Non-persistent buffers (e.g. rotary tables) are taken from `model`."""
    import copy

    state = state if state is not None else dict(model.state_dict(keep_vars=True))
    with torch.device("meta"):
        clone = type(model)(copy.deepcopy(model.config))
    _, unexpected = clone.load_state_dict(state, strict=False, assign=True)
    if unexpected:
        raise ConfigError(f"cannot rebuild {type(model).__name__}: unexpected tensors {unexpected[:5]}")
    if hasattr(clone, "tie_weights"):
        clone.tie_weights()
    live = dict(model.named_buffers())
    for name, buffer in list(clone.named_buffers()):
        if buffer.device.type != "meta":
            continue
        key = name if name in live else name.replace(".", ".base_layer.", 1)
        if key not in live:
            raise ConfigError(f"cannot rebuild {type(model).__name__}: buffer '{name}' is missing")
        parent, _, attr = name.rpartition(".")
        (clone.get_submodule(parent) if parent else clone)._buffers[attr] = live[key]
    missing = [n for n, p in clone.named_parameters() if p.device.type == "meta"]
    if missing:
        raise ConfigError(f"cannot rebuild {type(model).__name__}: parameters {missing[:5]} are missing")
    if hasattr(model, "generation_config"):
        clone.generation_config = copy.deepcopy(model.generation_config)
    return clone.eval()


def _plain_base(inner: nn.Module) -> nn.Module:
    """The base model inside a LoRA-injected one, as a new model sharing its weights."""
    state = {}
    for key, tensor in inner.state_dict(keep_vars=True).items():
        if ".lora_" in key or "internal_xlora_classifier" in key:
            continue
        state[key.replace(".base_layer.", ".")] = tensor
    return clone_sharing_weights(inner, state)


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
    values = {name: getattr(conf, name) for name in XLORA_NAMES.values()}
    values["scaling_pass_value"] = float(classifier.override_scaling_pass_value)  # what the classifier really uses
    width = int(conf.xlora_size) if int(conf.xlora_depth) > 1 else None
    config = from_xlora(values, width=width, bias=linears[-1].bias is not None)
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


def to_peft(model: LoraMixModel, adapter_dir: str | Path | None = None) -> nn.Module:
    """A live PEFT `XLoraModel` (inside a `PeftModel`) equal to `model`: the same base weights (shared), experts and
    gate; its logits match loramix's (tested within 1e-4 in float32).

    PEFT's XLoRA loads experts from adapter directories and needs them named "0".."n-1": the experts are written
    there (to `adapter_dir`, or a temporary directory) in loramix's expert order. What PEFT cannot represent is
    refused: a base without a `.model` backbone (GPT-2), and a gate trained on a truncated scaling pass (PEFT always
    runs the full one). Experts with different target modules per expert are fine (PEFT injects the union).
    """
    import tempfile

    from peft import XLoraConfig, get_peft_model

    if model.config.gate.router != "mlp":
        raise ConfigError(
            f"gate.router={model.config.gate.router!r}: PEFT's XLoraModel runs the MLP gate only (PEFT's own Arrow "
            "routing lives in LoraConfig(arrow_config=...), with one rank for every expert); export to a static LoRA "
            "instead"
        )
    if model.config.gate.context != "none":
        raise ConfigError(
            f"gate.context={model.config.gate.context!r}: PEFT's XLoraModel runs the per-token MLP gate only (no "
            "context); export to a static LoRA instead"
        )
    if model.config.scaling_layer is not None:
        raise ConfigError(
            f"scaling_layer={model.config.scaling_layer}: PEFT's XLoraModel always runs the full scaling pass, and a "
            "gate trained on a truncated one would route differently there; export to a static LoRA instead"
        )

    if getattr(model.model, "base_model_prefix", None) != "model":
        raise ConfigError(
            f"PEFT's XLoraModel only loads bases whose backbone is '.model' ({type(model.model).__name__} has "
            f"'.{model.model.base_model_prefix}'); export to a static LoRA or to mistral.rs instead"
        )
    folder = Path(adapter_dir) if adapter_dir is not None else Path(tempfile.mkdtemp(prefix="loramix-peft-"))
    write_peft_experts(model, folder)
    with model.plain_model() as plain:
        base = clone_sharing_weights(plain)
    base.config.use_cache = False
    config = XLoraConfig(
        task_type="CAUSAL_LM",
        adapters={str(i): str(folder / str(i)) for i in range(model.n_experts)},
        **to_xlora(model.config, model.hidden_size, model.n_experts),
    )
    peft_model = get_peft_model(base, config).eval()
    classifier = peft_model.base_model.internal_xlora_classifier
    linears = [m for m in classifier.layers if isinstance(m, nn.Linear)]
    ours = [*model.gate.inner, model.gate.last]
    with torch.no_grad():
        for theirs, mine in zip(linears, ours, strict=True):
            theirs.weight.copy_(mine.weight)
            if mine.bias is not None:
                theirs.bias.copy_(mine.bias)
            else:
                theirs.bias.zero_()
    return peft_model


def write_peft_experts(model: LoraMixModel, folder: str | Path, names: list[str] | None = None) -> list[Path]:
    """Write each expert as a plain PEFT LoRA adapter directory folder/<name> (default names "0".."n-1")."""
    folder = Path(folder)
    names = names or [str(i) for i in range(model.n_experts)]
    stacked = model.stacked_experts()
    per_expert = unstack_experts(stacked, model.n_experts)
    targets: list[set[str]] = [set() for _ in range(model.n_experts)]
    ranks: list[dict[str, int]] = [{} for _ in range(model.n_experts)]
    alphas: list[dict[str, float]] = [{} for _ in range(model.n_experts)]
    for path, st in stacked.items():
        for e, (r, c) in enumerate(zip(st.ranks, st.scales)):
            if r:
                targets[e].add(path)
                ranks[e][path] = r
                alphas[e][path] = c * r  # plain LoRA scale alpha / r
    written = []
    for e, name in enumerate(names):
        out = folder / name
        r = max(ranks[e].values())
        alpha = max(alphas[e].values(), key=list(alphas[e].values()).count)
        config = {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "r": r,
            "lora_alpha": alpha,
            "rank_pattern": {re.escape(p): v for p, v in ranks[e].items() if v != r},
            "alpha_pattern": {re.escape(p): v for p, v in alphas[e].items() if v != alpha},
            "target_modules": sorted(targets[e]),
            "lora_dropout": 0.0,
            "bias": "none",
            "use_rslora": False,
            "init_lora_weights": True,
        }
        with atomic_directory(out, marker="adapter_config.json", owned=PEFT_ADAPTER_FILES, what="adapter_dir") as tmp:
            save_tensors(per_expert[e], tmp / "adapter_model.safetensors", {"format": "pt"})
            write_json(tmp / "adapter_config.json", config)
        written.append(out)
    return written
