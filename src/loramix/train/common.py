"""Pieces shared by expert and gate training: data preparation and the per-token logits of a batch."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from ..data import TokenizedDataset, load_records, split_records, tokenize_records
from ..errors import ConfigError

logger = logging.getLogger(__name__)


def prepare_data(
    tokenizer: Any,
    data: Any,
    eval_data: Any,
    eval_fraction: float,
    max_length: int,
    seed: int,
) -> tuple[TokenizedDataset, TokenizedDataset | None]:
    """Tokenized training and evaluation sets sharing one domain table."""
    if tokenizer is None:
        raise ConfigError("training needs a tokenizer: the base model directory (or checkpoint) has none")
    records = load_records(data)
    held: list[dict[str, Any]] = []
    if eval_data is not None:
        held = load_records(eval_data)
    elif eval_fraction > 0:
        records, held = split_records(records, eval_fraction, seed)
    train = tokenize_records(records, tokenizer, max_length)
    domains = sorted({r.get("domain") for r in records + held if r.get("domain") is not None})
    train_set = TokenizedDataset(train, domains)
    eval_set = TokenizedDataset(tokenize_records(held, tokenizer, max_length), domains) if held else None
    logger.info(
        "%d training examples, %d evaluation examples, domains %s",
        len(train_set),
        len(eval_set) if eval_set else 0,
        domains,
    )
    return train_set, eval_set


def batch_logits(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def causal_lm_loss(model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
    """transformers' own next-token loss of a batch (mean over trained tokens), with no extra logged parts."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
    return out.loss, {}


def pad_id(tokenizer: Any) -> int:
    if tokenizer.pad_token_id is not None:
        return int(tokenizer.pad_token_id)
    return int(tokenizer.eos_token_id) if tokenizer.eos_token_id is not None else 0


def as_path(value: str | Path) -> Path:
    return Path(value).expanduser()


def run_dir_for(output_dir: Path, run_dir: str | Path | None = None) -> Path:
    """Where a run keeps metrics, hparams and resumable checkpoints: run_dir, or output_dir + ".run" beside it."""
    return as_path(run_dir) if run_dir else output_dir.with_name(output_dir.name + ".run")
