"""Train one LoRA expert with PEFT. The result is a plain PEFT adapter directory that PEFT itself loads."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from ..base import load_base_model, load_tokenizer
from ..config import is_number
from ..errors import ConfigError
from ..experts import PEFT_ADAPTER_FILES
from ..io import atomic_directory, check_replaceable
from .common import as_path, batch_logits, causal_lm_loss, pad_id, prepare_data, run_dir_for
from .loop import TrainConfig, Trainer

logger = logging.getLogger(__name__)

__all__ = ["train_expert"]

DEFAULT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _check_lora_options(rank: Any, alpha: Any, dropout: Any) -> None:
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise ConfigError(f"rank={rank!r} must be an integer >= 1")
    if not is_number(alpha) or alpha <= 0:
        raise ConfigError(f"alpha={alpha!r} must be a finite number > 0")
    if not is_number(dropout) or not 0 <= dropout < 1:
        raise ConfigError(f"dropout={dropout!r} must be a number in [0, 1)")


def train_expert(
    base: Any,
    data: Any,
    output_dir: str | Path,
    *,
    rank: int = 8,
    alpha: float = 16,
    dropout: float = 0.05,
    target_modules: list[str] | str | None = None,
    use_rslora: bool = False,
    train: TrainConfig | None = None,
    eval_data: Any = None,
    eval_fraction: float = 0.0,
    tokenizer: Any = None,
    run_dir: str | Path | None = None,
    resume: bool | str | Path = False,
    force_resume: bool = False,
    dtype: Any = None,
) -> dict[str, Any]:
    """Train a LoRA adapter on `data` (JSONL records, see loramix.data) and save it to `output_dir`.

    base: model id, directory, or a loaded PreTrainedModel (it is wrapped by PEFT, not copied).
    target_modules: module names (PEFT's matching); default: the attention and MLP projections present in the model.
    run_dir: metrics, hparams and resumable checkpoints (default: output_dir + ".run").
    resume / force_resume: continue from the newest checkpoint of run_dir; changed settings need force_resume.
    Returns the last training/evaluation metrics.
    """
    from peft import LoraConfig, get_peft_model

    train = train or TrainConfig()
    _check_lora_options(rank, alpha, dropout)
    out_dir = as_path(output_dir)
    check_replaceable(out_dir, marker="adapter_config.json", owned=PEFT_ADAPTER_FILES, what="--out")  # before training
    model, _ = load_base_model(base, dtype=dtype)
    tokenizer = (
        tokenizer
        if tokenizer is not None
        else load_tokenizer(base if isinstance(base, (str, Path)) else getattr(model.config, "_name_or_path", None))
    )
    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    if target_modules is None:
        target_modules = [t for t in DEFAULT_TARGETS if t in present] or "all-linear"
    elif isinstance(target_modules, (list, tuple)):
        missing = [t for t in target_modules if t not in present]
        if missing:
            raise ConfigError(
                f"target module(s) {missing} are not in the base model ({type(model).__name__}); module names it "
                f"has include {sorted(p for p in present if p)[:12]}"
            )
    train_set, eval_set = prepare_data(tokenizer, data, eval_data, eval_fraction, train.max_length, train.seed)
    torch.manual_seed(train.seed)
    lora = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=target_modules,
        use_rslora=use_rslora,
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, lora)
    trainable = {n: p for n, p in peft_model.named_parameters() if p.requires_grad}

    trainer = Trainer(
        peft_model,
        trainable,
        train_set,
        eval_set,
        train,
        run_dir_for(out_dir, run_dir),
        loss_fn=causal_lm_loss,
        logits_fn=batch_logits,
        pad_token_id=pad_id(tokenizer),
        domains=train_set.domains,
        description=f"expert {out_dir.name}",
        hparams={
            "rank": rank,
            "alpha": alpha,
            "dropout": dropout,
            "target_modules": target_modules,
            "use_rslora": use_rslora,
        },
    )
    metrics = trainer.train(resume=resume, force=force_resume)
    if trainer.accelerator.is_main_process:
        with atomic_directory(out_dir, marker="adapter_config.json", owned=PEFT_ADAPTER_FILES, what="--out") as tmp:
            trainer.model.save_pretrained(str(tmp))
        logger.info("saved the expert to %s", out_dir)
    trainer.accelerator.wait_for_everyone()
    return metrics
