"""Train the gate (and optionally the experts) of a mixture; the result is a self-contained loramix checkpoint."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..config import MixConfig
from ..errors import ConfigError
from ..model import LoraMixModel, from_pretrained
from .common import as_path, batch_logits, pad_id, prepare_data
from .loop import TrainConfig, Trainer

logger = logging.getLogger(__name__)

__all__ = ["gate_loss", "train_gate"]


def gate_loss(
    model: Any, batch: dict[str, torch.Tensor], entropy_weight: float = 0.0, balance_weight: float = 0.0
) -> tuple[torch.Tensor, dict[str, float]]:
    """Next-token loss of the mixed pass, plus the optional auxiliary terms:

    entropy_weight * H:  the mean entropy of each (token, layer) scaling distribution. Positive weights push the gate
                         towards decisive routing (one expert per token), negative ones towards mixing.
    balance_weight * B:  N * sum_e u_e^2 with u_e the mean scaling of expert e over the batch's real tokens (and
                         layers): 1 when usage is uniform, N when one expert takes everything (Switch-style balance).
    """
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
    loss = out.loss
    extras = {"lm_loss": float(out.loss.detach())}
    if entropy_weight or balance_weight:
        s = out.scalings  # [B, T, L, N]
        mask = batch["attention_mask"].to(s.dtype)[:, :, None]
        p = s.clamp_min(1e-9) / s.sum(-1, keepdim=True).clamp_min(1e-9)
        if entropy_weight:
            entropy = -(p * p.log()).sum(-1)  # [B, T, L]
            h = (entropy * mask).sum() / (mask.sum() * s.shape[2]).clamp_min(1)
            loss = loss + entropy_weight * h
            extras["entropy"] = float(h.detach())
        if balance_weight:
            usage = (p * mask[..., None]).sum((0, 1, 2)) / (mask.sum() * s.shape[2]).clamp_min(1)  # [N]
            b = s.shape[-1] * (usage**2).sum()
            loss = loss + balance_weight * b
            extras["balance"] = float(b.detach())
    return loss, extras


def train_gate(
    model: LoraMixModel | None = None,
    data: Any = None,
    output_dir: str | Path = "gate-checkpoint",
    *,
    base: Any = None,
    experts: Mapping[str, str | Path] | None = None,
    config: MixConfig | None = None,
    train: TrainConfig | None = None,
    eval_data: Any = None,
    eval_fraction: float = 0.0,
    entropy_weight: float = 0.0,
    balance_weight: float = 0.0,
    run_dir: str | Path | None = None,
    resume: bool | str | Path = False,
    include_base: bool = False,
) -> dict[str, Any]:
    """Train the gate of `model` (or of a new mixture of `base` + `experts` with `config`) on `data`.

    Base and experts stay frozen unless `config.trainable_experts`. The scaling pass runs without gradients; the loss
    is the mixed pass's next-token loss (+ optional auxiliary terms, see `gate_loss`). `config.scaling_layer` trains
    a gate for the truncated scaling pass. Saves a loramix checkpoint to `output_dir`; returns the last metrics.
    """
    train = train or TrainConfig()
    if model is None:
        if base is None or not experts:
            raise ConfigError("train_gate needs a LoraMixModel, or a base and experts to build one")
        torch.manual_seed(train.seed)
        model = from_pretrained(base, experts, config)
    elif config is not None:
        raise ConfigError("pass either a model or a config (the model already has its config)")
    tokenizer = model.tokenizer
    train_set, eval_set = prepare_data(tokenizer, data, eval_data, eval_fraction, train.max_length, train.seed)
    model.freeze()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}

    def loss_fn(m, batch):
        return gate_loss(m, batch, entropy_weight, balance_weight)

    out_dir = as_path(output_dir)
    hparams = {
        "mix_config": model.config.to_dict(),
        "experts": model.expert_names,
        "entropy_weight": entropy_weight,
        "balance_weight": balance_weight,
    }
    trainer = Trainer(
        model,
        trainable,
        train_set,
        eval_set,
        train,
        as_path(run_dir) if run_dir else out_dir.with_name(out_dir.name + ".run"),
        loss_fn=loss_fn,
        logits_fn=batch_logits,
        pad_token_id=pad_id(tokenizer),
        domains=train_set.domains,
        description=f"gate {out_dir.name}",
        hparams=hparams,
    )
    metrics = trainer.train(resume=resume)
    if trainer.accelerator.is_main_process:
        trainer.model.save(out_dir, include_base=include_base)
        logger.info("saved the mixture to %s", out_dir)
    trainer.accelerator.wait_for_everyone()
    return metrics
