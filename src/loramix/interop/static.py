"""Static export: one fixed mixture baked into a single plain PEFT LoRA adapter.

For fixed scalings s [L, N] (per adapted layer and expert), every adapted module l computes
    W x + g * sum_e s[l, e] * c_e * B_e A_e x  =  W x + B' (A' x)
with A' = A_cat [R, d_in] and B' = B_cat * (g * s[l, expert(j)] * c[expert(j)])_j [d_out, R]: a LoRA of rank
R = sum of the experts' ranks at that module, with scale 1 (lora_alpha = r). This is exact, not an approximation.
`rank=k` instead keeps the best rank-k approximation of each module's update B'A' (truncated SVD, computed from the
factors without forming B'A') and reports the relative error it measured.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError
from ..experts import PEFT_ADAPTER_FILES
from ..io import atomic_directory, read_json, read_tensors, save_tensors, write_json

logger = logging.getLogger(__name__)

__all__ = ["export_static", "fixed_scalings_from_prompt", "read_scalings_file"]


def read_scalings_file(path: str | Path, n_layers: int, n_experts: int) -> torch.Tensor:
    """Scalings [L, N] from JSON (a list of L lists of N numbers, or one list of N for every layer) or safetensors
    (one tensor named "scalings")."""
    path = Path(path)
    what = f"scalings: {n_layers} lists of {n_experts} numbers, or one list of {n_experts}"
    if path.suffix == ".safetensors":
        tensors = read_tensors(path, what, error=ConfigError)
        if "scalings" not in tensors:
            raise ConfigError(f"{path}: expected a tensor named 'scalings', found {sorted(tensors)}")
        s = tensors["scalings"].double()
    else:
        data = read_json(path, what, error=ConfigError, kind=list)
        try:
            s = torch.tensor(data, dtype=torch.float64)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise ConfigError(f"{path}: expected {what} ({exc})") from None
    return check_fixed_scalings(s, n_layers, n_experts, str(path))


def check_fixed_scalings(s: torch.Tensor, n_layers: int, n_experts: int, where: str) -> torch.Tensor:
    if s.dim() == 1:
        s = s.expand(n_layers, -1)
    if s.shape != (n_layers, n_experts):
        raise ConfigError(
            f"{where}: scalings of shape {tuple(s.shape)}; expected [{n_layers}, {n_experts}] (layers x experts) "
            f"or [{n_experts}]"
        )
    if not torch.isfinite(s).all():
        raise ConfigError(f"{where}: the scalings contain NaN or infinite values")
    return s.clone()


@torch.no_grad()
def fixed_scalings_from_prompt(model: Any, prompt: str) -> torch.Tensor:
    """The gate's scalings on `prompt`, averaged over its tokens: [L, N] (a per-prompt router's mixture)."""
    if model.tokenizer is None:
        raise ConfigError("--prompt needs the checkpoint's tokenizer")
    ids = model.tokenizer(prompt, return_tensors="pt").input_ids.to(model.device)
    return model.compute_scalings(ids)[0].mean(0).double().cpu()


def _svd_factors(a: torch.Tensor, b: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Best rank-k factors of b @ a (b [d_out, R], a [R, d_in]) and the relative Frobenius error of the result."""
    qb, rb = torch.linalg.qr(b)  # b = qb rb
    qa, ra = torch.linalg.qr(a.T)  # a = ra^T qa^T
    u, s, vh = torch.linalg.svd(rb @ ra.T)  # small R x R
    total = float((s**2).sum())
    kept = float((s[:k] ** 2).sum())
    root = s[:k].sqrt()
    new_b = (qb @ u[:, :k]) * root
    new_a = root[:, None] * (vh[:k] @ qa.T)
    error = ((total - kept) / total) ** 0.5 if total > 0 else 0.0
    return new_a, new_b, error


def export_static(
    model: Any, scalings: torch.Tensor, out_dir: str | Path, *, rank: int | None = None
) -> dict[str, Any]:
    """Write a PEFT LoRA adapter equal to `model` held at `scalings` [L, N] (or [N]); returns a report
    {"rank": ..., "modules": L, "max_relative_error": ..., "mean_relative_error": ...} (errors 0 when exact)."""
    s = check_fixed_scalings(
        torch.as_tensor(scalings, dtype=torch.float64), model.n_layers, model.n_experts, "scalings"
    )
    if rank is not None and rank < 1:
        raise ConfigError(f"rank={rank} must be >= 1")
    g = model.global_scaling_weight
    tensors: dict[str, torch.Tensor] = {}
    rank_pattern: dict[str, int] = {}
    errors: list[float] = []
    for index, (path, layer) in enumerate(zip(model.layer_names, model.mixed_layers())):
        st = layer.stacked()
        mult = s[index].index_select(0, layer.rank_expert.cpu()) * layer.rank_scale.double().cpu() * g  # [R]
        a = st.lora_A.double().cpu()
        b = st.lora_B.double().cpu() * mult
        keep = mult != 0  # experts at scaling 0 contribute nothing: drop their rank rows
        a, b = a[keep], b[:, keep]
        if a.shape[0] == 0:  # nothing to add at this module: a zero update of rank 1 keeps PEFT's layout simple
            a, b = (
                torch.zeros(1, st.lora_A.shape[1], dtype=torch.float64),
                torch.zeros(st.lora_B.shape[0], 1, dtype=torch.float64),
            )
        if rank is not None and rank < a.shape[0]:
            a, b, error = _svd_factors(a, b, rank)
            errors.append(error)
        else:
            errors.append(0.0)
        dtype = st.lora_A.dtype
        tensors[f"base_model.model.{path}.lora_A.weight"] = a.to(dtype)
        tensors[f"base_model.model.{path}.lora_B.weight"] = b.to(dtype)
        rank_pattern[path] = int(a.shape[0])
    r = max(rank_pattern.values())
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": model.base_reference,
        "r": r,
        "lora_alpha": r,
        # keys are regular expressions for PEFT (and loramix): escape the dots of the module paths
        "rank_pattern": {re.escape(k): v for k, v in rank_pattern.items() if v != r},
        "alpha_pattern": {re.escape(k): v for k, v in rank_pattern.items() if v != r},
        "target_modules": list(model.layer_names),
        "lora_dropout": 0.0,
        "bias": "none",
        "use_rslora": False,
        "fan_in_fan_out": any(type(layer.base_layer).__name__ == "Conv1D" for layer in model.mixed_layers()),
        "init_lora_weights": True,
        "inference_mode": True,
    }
    report = {
        "rank": rank if rank is not None else "exact",
        "modules": model.n_layers,
        "max_rank": r,
        "max_relative_error": max(errors),
        "mean_relative_error": sum(errors) / len(errors),
        "scalings": s.tolist(),
        "experts": model.expert_names,
    }
    with atomic_directory(out_dir, marker="adapter_config.json", owned=PEFT_ADAPTER_FILES, what="--out") as tmp:
        save_tensors(tensors, tmp / "adapter_model.safetensors", {"format": "pt"})
        write_json(tmp / "adapter_config.json", config)
        write_json(tmp / "loramix_static.json", report)
    logger.info("static export to %s: %s", out_dir, report)
    return report
