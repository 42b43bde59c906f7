"""The attention of a compiled CPU decode step: plain tensor operations that inductor fuses, in place of SDPA.

Inside a step compiled for a CPU, `torch.nn.functional.scaled_dot_product_attention` stays one opaque call per layer
(its flash kernel for CPU), which for one query row costs far more than the arithmetic: about 0.23 ms a layer for
SmolLM2-135M, a large share of a step once the products stream at memory speed (benchmarks/RESULTS.md, "One-row
products as reductions, and plain attention in the compiled step"). Written as two matmuls and a softmax, inductor
fuses it with its neighbours.

`use_step_attention(model)` registers an attention implementation with transformers (`AttentionInterface`, with SDPA's
boolean masks) that runs SDPA itself, unchanged, whenever it is not being compiled, and the plain form while dynamo
traces it; it then sets it on a model that used "sdpa". Anything the plain form does not cover (dropout, soft-capping,
position biases, transformers' paged cache, attention weights asked for) goes to SDPA in both cases.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["STEP_ATTENTION", "step_attention", "use_step_attention"]

STEP_ATTENTION = "loramix_sdpa"
"""The name the implementation is registered under with transformers."""

_SDPA_ONLY = ("softcap", "position_bias", "cache", "output_attentions", "sinks", "s_aux")


def step_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """SDPA (transformers' `sdpa_attention_forward`) outside dynamo; under it, on a CPU, the same attention as plain
    operations: softmax(q k^T * scaling + mask) v with the key/value heads repeated for grouped queries."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    plain = (
        torch.compiler.is_compiling()
        and query.device.type == "cpu"
        and not dropout
        and not any(kwargs.get(k) for k in _SDPA_ONLY)
    )
    if not plain:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
        )
    groups = query.shape[1] // key.shape[1]
    if groups > 1:
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    scores = torch.matmul(query, key.transpose(2, 3)) * scale  # [B, H, T, S]
    q_len, kv_len = query.shape[2], key.shape[2]
    lowest = torch.finfo(scores.dtype).min
    if attention_mask is not None:
        mask = attention_mask[:, :, :, :kv_len]
        scores = scores.masked_fill(~mask, lowest) if mask.dtype == torch.bool else scores + mask
    elif q_len > 1 and (is_causal if is_causal is not None else getattr(module, "is_causal", True)):
        rows = torch.arange(q_len, device=query.device)[:, None] + (kv_len - q_len)
        scores = scores.masked_fill(rows < torch.arange(kv_len, device=query.device)[None, :], lowest)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    return torch.matmul(probs, value).transpose(1, 2).contiguous(), None


def use_step_attention(model: Any) -> bool:
    """Give `model` (a transformers model using "sdpa") the step attention; True if it now has it. Models on another
    implementation, and transformers without `AttentionInterface`, are left as they are."""
    config = getattr(model, "config", None)
    if getattr(config, "_attn_implementation", None) == STEP_ATTENTION:
        return True
    if getattr(config, "_attn_implementation", None) != "sdpa" or not hasattr(model, "set_attn_implementation"):
        return False
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    except ImportError:
        return False
    AttentionInterface.register(STEP_ATTENTION, step_attention)
    AttentionMaskInterface.register(STEP_ATTENTION, sdpa_mask)
    model.set_attn_implementation(STEP_ATTENTION)
    return model.config._attn_implementation == STEP_ATTENTION
