"""Train the gate (and optionally the experts) of a mixture; the result is a self-contained loramix checkpoint."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import CHECKPOINT_FILES, CONFIG_NAME
from ..config import MixConfig
from ..errors import ConfigError
from ..io import check_replaceable
from ..model import LoraMixModel, from_pretrained
from .common import as_path, batch_logits, pad_id, prepare_data, run_dir_for
from .loop import TrainConfig, Trainer

logger = logging.getLogger(__name__)

__all__ = ["GateObjective", "example_mean_loss", "gate_loss", "train_gate"]


def example_mean_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy averaged within each example, then over examples: every example weighs the same,
    however long its answer (the token mean lets long answers dominate a mixture of domains)."""
    shift_logits, shift_labels = logits[:, :-1].float(), labels[:, 1:]
    losses = torch.nn.functional.cross_entropy(
        shift_logits.transpose(1, 2), shift_labels, ignore_index=-100, reduction="none"
    )
    valid = (shift_labels != -100).to(losses.dtype)
    per_example = (losses * valid).sum(-1) / valid.sum(-1).clamp_min(1)
    has_tokens = valid.sum(-1) > 0
    return per_example[has_tokens].mean()


@dataclass
class GateObjective:
    """What the gate is trained on: the mixed pass's next-token loss, plus optional auxiliary terms (all off by
    default; docs/training.md says when each helps)."""

    loss_weighting: str = "token"
    """How the loss averages: "token" (over all trained tokens, as transformers does) or "example" (within each
    example, then over examples: every example weighs the same however long its answer)."""

    entropy_weight: float = 0.0
    """Weight of H, the mean entropy of each (token, layer) scaling distribution. Positive weights push the gate
    towards decisive routing (one expert per token), negative ones towards mixing."""

    balance_weight: float = 0.0
    """Weight of N * sum_e u_e^2, with u_e the mean scaling of expert e over the batch's real tokens and layers: 1
    when usage is uniform, N when one expert takes everything (Switch-style balance)."""

    route_weight: float = 0.0
    """Weight of the cross-entropy between each token's layer-averaged scalings and the expert that its record's
    "domain" names (records whose domain names no expert are left out): domain supervision of the router."""

    route_tokens: str = "all"
    """Tokens the routing term covers: "all" real tokens of the record, or "answer" only, the positions that predict
    a trained token (the last prompt token and the completion)."""

    shared_prefix_expert: str | None = None
    """With route_weight: the expert the routing term sends the tokens that every training record starts with (a chat
    template's system turn: their hidden states are the same in every prompt, so no gate can route them by domain),
    e.g. a zero expert that stands for the base, so that no expert training with the gate rewrites the keys and values
    every answer reads there (docs/demo-smollm2.md). None: they take their record's domain like its other tokens."""

    expert_lr_scale: float = 1.0
    """With trainable_experts: the experts' learning rate relative to the gate's (lower keeps them near what they
    learnt alone)."""

    expert_anchor_weight: float = 0.0
    """With trainable_experts: weight of an L2 anchor to the experts' starting values, sum ||W - W0||^2 / sum ||W0||^2
    over their LoRA matrices."""

    frozen_experts: list[str] = field(default_factory=list)
    """With trainable_experts: an expert that stays as it is while the others train with the gate (its rows of every
    stacked LoRA matrix get no gradient); repeat for several."""

    context_lr_scale: float = 1.0
    """With gate.context="attention": the attention's learning rate relative to the MLP's (docs/gates.md)."""

    def __post_init__(self) -> None:
        if self.loss_weighting not in ("token", "example"):
            raise ConfigError(f"loss_weighting={self.loss_weighting!r}; expected 'token' or 'example'")
        for name in ("entropy_weight", "balance_weight", "route_weight"):
            if not math.isfinite(getattr(self, name)):
                raise ConfigError(f"{name}={getattr(self, name)} must be a finite number")
        if self.route_weight < 0:
            raise ConfigError(f"route_weight={self.route_weight} must be >= 0")
        if self.route_tokens not in ("all", "answer"):
            raise ConfigError(f"route_tokens={self.route_tokens!r}; expected 'all' or 'answer'")
        if self.shared_prefix_expert is not None and (not self.route_weight or self.route_tokens != "all"):
            raise ConfigError(f"shared_prefix_expert={self.shared_prefix_expert!r} routes prompt tokens: it needs "
                              "route_weight > 0 and route_tokens='all'")
        if not (math.isfinite(self.expert_lr_scale) and self.expert_lr_scale > 0):
            raise ConfigError(f"expert_lr_scale={self.expert_lr_scale} must be a finite number > 0")
        if not (math.isfinite(self.context_lr_scale) and self.context_lr_scale > 0):
            raise ConfigError(f"context_lr_scale={self.context_lr_scale} must be a finite number > 0")
        if not (math.isfinite(self.expert_anchor_weight) and self.expert_anchor_weight >= 0):
            raise ConfigError(f"expert_anchor_weight={self.expert_anchor_weight} must be a finite number >= 0")
        self.frozen_experts = list(self.frozen_experts or ())


def freeze_experts(model: Any, names: Sequence[str]) -> list[Any]:
    """Keep the experts `names` of `model` (trainable experts) as they are: a gradient hook zeroes their rows of every
    layer's stacked lora_A and their columns of lora_B. An unknown name is refused. Returns the hooks' handles."""
    frozen = torch.tensor([_expert_index(model.expert_names, n, "frozen_experts") for n in names])
    handles = []
    for layer in model.mixed_layers():
        # rank_expert: the expert of each stacked rank row
        keep = (~torch.isin(layer.rank_expert, frozen.to(layer.rank_expert.device))).to(layer.lora_A.dtype)
        handles.append(layer.lora_A.register_hook(lambda g, keep=keep: g * keep[:, None]))
        handles.append(layer.lora_B.register_hook(lambda g, keep=keep: g * keep))
    return handles


def _expert_index(names: Sequence[str], name: str, field: str) -> int:
    """names.index(name); an unknown name is refused naming the objective's field and the experts."""
    if name not in names:
        raise ConfigError(f"{field}: no expert {name!r} (the experts: {', '.join(names)})")
    return list(names).index(name)


def shared_prefix_length(examples: Sequence[Any]) -> int:
    """The number of first tokens every example's input_ids share (0 for none, or no examples)."""
    if not examples:
        return 0
    first = examples[0].input_ids
    n = min(len(e.input_ids) for e in examples)
    for e in examples[1:]:
        n = next((i for i, (a, b) in enumerate(zip(first[:n], e.input_ids[:n], strict=True)) if a != b), n)
    return n


class ExpertAnchor:
    """The trainable experts' starting values, and how far they have moved: sum ||W - W0||^2 / sum ||W0||^2 over
    their LoRA matrices (the denominator is fixed, computed once)."""

    def __init__(self, params: Mapping[str, torch.nn.Parameter]) -> None:
        self.pairs = [(p, p.detach().clone()) for p in params.values()]
        self.norm = sum(float((p0**2).sum()) for _, p0 in self.pairs)

    def distance(self) -> torch.Tensor:
        return sum(((p - p0) ** 2).sum() for p, p0 in self.pairs) / self.norm


def gate_loss(
    model: Any,
    batch: dict[str, torch.Tensor],
    objective: GateObjective | None = None,
    expert_of_domain: torch.Tensor | None = None,
    anchor: ExpertAnchor | None = None,
    shared_prefix: tuple[int, int] | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The training loss of the gate for one batch (see `GateObjective`), and the logged parts.

    expert_of_domain: [number of domains] expert index of each domain id of the batch ("domain"), -1 for none;
    needed by route_weight. anchor: the trainable experts' starting values; needed by expert_anchor_weight.
    shared_prefix: (n, e): the routing term sends the first n tokens of every (right-padded) row to expert e
    (GateObjective.shared_prefix_expert).
    """
    objective = objective or GateObjective()
    if objective.loss_weighting == "example":
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        loss = example_mean_loss(out.logits, batch["labels"])
    else:
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
        loss = out.loss
    extras = {"lm_loss": float(loss.detach())}
    s = out.scalings  # [B, T, L, N]
    mask = batch["attention_mask"].to(s.dtype)[:, :, None]
    p = s.clamp_min(1e-9) / s.sum(-1, keepdim=True).clamp_min(1e-9)
    if objective.entropy_weight:
        entropy = -(p * p.log()).sum(-1)  # [B, T, L]
        h = (entropy * mask).sum() / (mask.sum() * s.shape[2]).clamp_min(1)
        loss = loss + objective.entropy_weight * h
        extras["entropy"] = float(h.detach())
    if objective.balance_weight:
        usage = (p * mask[..., None]).sum((0, 1, 2)) / (mask.sum() * s.shape[2]).clamp_min(1)  # [N]
        b = s.shape[-1] * (usage**2).sum()
        loss = loss + objective.balance_weight * b
        extras["balance"] = float(b.detach())
    if objective.route_weight:
        if expert_of_domain is None:
            raise ConfigError("route_weight needs the experts of the domains (train_gate provides them)")
        domain = batch["domain"].to(expert_of_domain.device)
        target = torch.where(domain >= 0, expert_of_domain[domain.clamp_min(0)], torch.full_like(domain, -1))
        target = target.to(s.device)[:, None].repeat(1, s.shape[1])  # [B, T]; expert_of_domain lives on the CPU
        if shared_prefix is not None:
            target[:, : shared_prefix[0]] = shared_prefix[1]
        keep = (target >= 0).to(s.dtype) * batch["attention_mask"].to(s.dtype)  # [B, T]
        if objective.route_tokens == "answer":  # positions whose next token is trained
            predicts = torch.zeros_like(keep)
            predicts[:, :-1] = (batch["labels"][:, 1:] != -100).to(s.dtype)
            keep = keep * predicts
        log_p = p.mean(2).clamp_min(1e-9).log()  # [B, T, N]
        nll = -log_p.gather(-1, target.clamp_min(0)[..., None]).squeeze(-1)
        r = (nll * keep).sum() / keep.sum().clamp_min(1)
        loss = loss + objective.route_weight * r
        extras["route"] = float(r.detach())
    if objective.expert_anchor_weight and anchor is not None:
        a = anchor.distance()
        loss = loss + objective.expert_anchor_weight * a
        extras["anchor"] = float(a.detach())
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
    objective: GateObjective | None = None,
    run_dir: str | Path | None = None,
    resume: bool | str | Path = False,
    force_resume: bool = False,
    include_base: bool = False,
    quantize: Any = None,
) -> dict[str, Any]:
    """Train the gate of `model` (or of a new mixture of `base` + `experts` with `config`) on `data`.

    Base and experts stay frozen unless `config.trainable_experts`. The scaling pass runs without gradients; the loss
    is the mixed pass's next-token loss (+ optional auxiliary terms, see `gate_loss`). `config.scaling_layer` trains
    a gate for the truncated scaling pass. Saves a loramix checkpoint to `output_dir` (checked before training: a
    directory holding files loramix did not write is refused); returns the last metrics. `resume` with changed
    optimisation settings is refused unless `force_resume`. `quantize`: load `base` quantized (see
    `loramix.from_pretrained`); the gate (and trainable experts) train in the compute dtype over the quantized base.
    """
    train = train or TrainConfig()
    objective = objective or GateObjective()
    out_dir = as_path(output_dir)
    check_replaceable(out_dir, marker=CONFIG_NAME, owned=CHECKPOINT_FILES, what="--out")  # before any training step
    if model is None:
        if base is None or not experts:
            raise ConfigError("train_gate needs a LoraMixModel, or a base and experts to build one")
        torch.manual_seed(train.seed)
        model = from_pretrained(base, experts, config, quantize=quantize)
    elif config is not None:
        raise ConfigError("pass either a model or a config (the model already has its config)")
    tokenizer = model.tokenizer
    train_set, eval_set = prepare_data(tokenizer, data, eval_data, eval_fraction, train.max_length, train.seed)
    model.freeze()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}

    names = model.expert_names
    expert_of_domain = torch.tensor([names.index(d) if d in names else -1 for d in train_set.domains] or [-1],
                                    device=model.device)
    if objective.route_weight and not (expert_of_domain >= 0).any():
        raise ConfigError(
            f"route_weight needs records whose 'domain' names an expert (experts {names}, domains {train_set.domains})"
        )

    shared_prefix = None
    if objective.shared_prefix_expert is not None:
        shared_prefix = (shared_prefix_length(train_set.examples), _expert_index(names, objective.shared_prefix_expert,
                                                                         "shared_prefix_expert"))
        if shared_prefix[0] == 0:
            raise ConfigError(f"shared_prefix_expert={objective.shared_prefix_expert!r}: the training records share "
                              "no first token (a chat template's system turn, for instance)")

    experts = {n: p for n, p in trainable.items() if n.endswith((".lora_A", ".lora_B"))}
    if (objective.expert_lr_scale != 1.0 or objective.expert_anchor_weight) and not experts:
        raise ConfigError("expert_lr_scale and expert_anchor_weight apply to trainable experts: set trainable_experts")
    hooks: list[Any] = []
    if objective.frozen_experts:
        if not experts:
            raise ConfigError("frozen_experts applies to trainable experts: set trainable_experts")
        if train.weight_decay:
            raise ConfigError("frozen_experts needs weight_decay=0 (decay would move the frozen experts)")
        hooks = freeze_experts(model, objective.frozen_experts)
    anchor = ExpertAnchor(experts) if objective.expert_anchor_weight else None
    context = {n: p for n, p in trainable.items() if n.startswith("gate.context.")}
    if objective.context_lr_scale != 1.0 and not context:
        raise ConfigError("context_lr_scale applies to a gate with weights of its own context: set gate.context "
                          "'attention'")

    def loss_fn(m, batch):
        return gate_loss(m, batch, objective, expert_of_domain, anchor, shared_prefix)

    hparams = {"mix_config": model.config.to_dict(), "experts": model.expert_names, "objective": asdict(objective)}
    if shared_prefix is not None:
        hparams["shared_prefix_tokens"] = shared_prefix[0]
    trainer = Trainer(
        model,
        trainable,
        train_set,
        eval_set,
        train,
        run_dir_for(out_dir, run_dir),
        loss_fn=loss_fn,
        logits_fn=batch_logits,
        pad_token_id=pad_id(tokenizer),
        domains=train_set.domains,
        description=f"gate {out_dir.name}",
        hparams=hparams,
        lr_scale={**{n: objective.expert_lr_scale for n in experts},
                  **{n: objective.context_lr_scale for n in context}},
    )
    try:
        metrics = trainer.train(resume=resume, force=force_resume)
    finally:
        for hook in hooks:
            hook.remove()
    if trainer.accelerator.is_main_process:
        trainer.model.save(out_dir, include_base=include_base)
        logger.info("saved the mixture to %s", out_dir)
    trainer.accelerator.wait_for_everyone()
    return metrics
