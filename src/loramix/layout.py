"""Weight layouts for a frozen float32 base on a CPU: the wide linears (more outputs than inputs: an MLP's gate and up
projections, the LM head) stored transposed, in-features-major, so that a decode step's matrix-vector products read
them as MKL's fast path does (benchmarks/RESULTS.md, "The weight layout on a CPU": at batch 1 these products run
about 1.5-1.6x faster; the narrow ones, q/k/v/o and down, are faster as transformers stores them).

The weights keep their shapes, values and `nn.Parameter` objects (only `.data` becomes a transposed view of a
contiguous [in, out] tensor), so every module, hook and tied weight sees the same tensor. `state_dict()` still
gives contiguous tensors (safetensors and transformers' `save_pretrained` need them), and `restore_layout` puts the
row-major layout back (`LoraMixModel.unload` does).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["apply_cpu_layout", "restore_layout", "transposed_weights", "wants_cpu_layout"]

_HOOKED = "_loramix_layout_hook"


def wants_cpu_layout(weight: torch.Tensor) -> bool:
    """The layout applies to a plain float32 CPU tensor (not quantized, not a subclass), frozen."""
    return (
        type(weight) in (torch.Tensor, nn.Parameter)
        and weight.device.type == "cpu"
        and weight.dtype == torch.float32
        and not weight.requires_grad
    )


def apply_cpu_layout(model: nn.Module) -> int:
    """Store the wide `nn.Linear` weights of `model` (out_features > in_features) transposed; returns how many were
    re-laid out. Weights that are not plain frozen float32 CPU tensors are left as they are."""
    done: set[int] = set()
    for module in model.modules():
        if not isinstance(module, nn.Linear) or module.out_features <= module.in_features:
            continue
        weight = module.weight
        if id(weight) in done or not wants_cpu_layout(weight) or not weight.is_contiguous():
            continue
        weight.data = weight.data.t().contiguous().t()
        done.add(id(weight))
    if done and not getattr(model, _HOOKED, False):
        model._register_state_dict_hook(_contiguous_state)
        setattr(model, _HOOKED, True)
    return len(done)


def _transposed(model: nn.Module) -> list[nn.Parameter]:
    """The distinct 2-d parameters of `model` stored transposed (the layout of apply_cpu_layout)."""
    distinct = {id(p): p for p in model.parameters()}.values()  # parameters() already skips tied duplicates
    return [p for p in distinct if p.dim() == 2 and not p.is_contiguous() and p.t().is_contiguous()]


def transposed_weights(model: nn.Module) -> int:
    """How many distinct 2-d parameters of `model` are stored transposed."""
    return len(_transposed(model))


def restore_layout(model: nn.Module) -> int:
    """Put every transposed 2-d parameter of `model` back in row-major layout; returns how many."""
    params = _transposed(model)
    for p in params:
        p.data = p.data.contiguous()
    return len(params)


def _contiguous_state(module: nn.Module, state: dict[str, Any], prefix: str, _metadata: Any) -> None:
    """A state-dict hook: the transposed weights under `prefix` as contiguous tensors (one copy per tensor, so tied
    weights stay one tensor)."""
    copies: dict[tuple[Any, ...], torch.Tensor] = {}
    for key, value in state.items():
        if key.startswith(prefix) and isinstance(value, torch.Tensor) and not value.is_contiguous():
            same = (value.data_ptr(), value.shape, value.stride())  # state_dict detaches: a tied weight, twice
            if same not in copies:
                copies[same] = value.contiguous()
            state[key] = copies[same]
