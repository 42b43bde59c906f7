"""Build every weight of the demo from scratch, through loramix's public training API, with fixed seeds.

1. a character-level tokenizer for the world (the `tokenizers` library, saved as a transformers tokenizer);
2. a tiny LlamaForCausalLM pretrained on generic text of the world (raw peptides, numbers, words; no task);
3. one LoRA expert per domain (`loramix.train.train_expert`); the forward (GRAVY) expert on peptides of every length
   and hydropathy besides the training split's, for twice the steps;
4. the gate on the mixture of the four domains, not the composite prompts (`loramix.train.train_gate`), trained with
   the experts (at 0.1x its learning rate) except the design (inverse) expert, which stays as it trained alone; and a
   second gate (with its own copy of the experts) for the truncated scaling pass (k = L/2). docs/demo.md, "Round 4",
   has the comparison that chose this recipe.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from .world import DOMAINS, World, repeat_records

logger = logging.getLogger(__name__)

__all__ = ["BuildConfig", "build", "char_tokenizer"]

ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789 .,-+=<>?:;()'/*"


@dataclass
class BuildConfig:
    """Sizes and budgets of the demo build (defaults: what the shipped weights were built with)."""

    hidden: int = 128
    layers: int = 4
    heads: int = 4
    intermediate: int = 384
    context: int = 96
    pretrain_steps: int = 3000
    pretrain_batch: int = 32
    pretrain_lr: float = 3e-3
    expert_steps: int = 1500
    forward_expert_steps: int = 3000
    """The forward (GRAVY) expert's steps (expert_steps is every other expert's but Q&A's)."""
    qa_expert_steps: int = 800
    expert_batch: int = 32
    expert_lr: float = 3e-3
    expert_rank: int = 8
    expert_alpha: int = 16
    gate_steps: int = 4500
    gate_batch: int = 32
    gate_lr: float = 1e-2
    gate_depth: int = 2
    gate_width: int = 64
    route_weight: float = 3.0
    gate_data: str = "expert"
    """The gate's training records: "split" (the training split's records, repeated: the gates shipped until round
    5), "fresh" (a new peptide in every record, `loramix.demo.fresh`; docs/demo.md, "Training recipes, compared on the
    held-out set": it did not generalise better) or "expert" (the split's, but the forward records drawn as the
    forward expert's, expert_data, with gate_split_share of them from the split; docs/demo.md, "Round 6")."""
    gate_split_share: float = 0.5
    """With gate_data "expert": the share of the gate's forward records taken from the training split."""
    expert_data: str = "tilted"
    """The forward (GRAVY) expert's training records: "split" (the training split's peptides, repeated) or "varied"
    (half of them, the other half each on a new peptide of 5-50 residues: `loramix.demo.fresh.forward_expert_records`)
    or "tilted" (the same, half of the new peptides from a hydropathy-tilted composition: every GRAVY range).
    The other experts always train on the split."""
    expert_split_share: float = 0.75
    """With expert_data "varied" or "tilted": the share of the forward expert's records taken from the training split
    (the rest are new peptides)."""
    trainable_experts: bool = True
    """Train the experts with the gate (MixConfig.trainable_experts, the paper's option), at expert_lr_scale times the
    gate's learning rate."""
    expert_lr_scale: float = 0.1
    expert_anchor_weight: float = 0.0
    """With trainable_experts: the L2 anchor to the experts' starting values (GateObjective.expert_anchor_weight)."""
    frozen_experts: tuple[str, ...] = ("inverse",)
    """With trainable_experts: the experts kept as they are (GateObjective.frozen_experts)."""
    gate_dropout: float = 0.0
    entropy_weight: float = 0.0
    gate_keep_best: bool = False
    """End with the gate of the lowest loss on the validation split's records (evaluated every 100 steps)."""
    seed: int = 0
    threads: int = 2


def char_tokenizer() -> Any:
    """One token per character of the world's alphabet, plus <pad> (0), <s> (1), </s> (2); no BOS is added."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{c: i + 3 for i, c in enumerate(ALPHABET)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        padding_side="left",
        model_max_length=10_000,
    )


def _train_config(cfg: BuildConfig, lr: float, steps: int, batch: int, warmup: int, progress: bool) -> Any:
    from ..train import TrainConfig

    return TrainConfig(
        learning_rate=lr,
        max_steps=steps,
        batch_size=batch,
        warmup_steps=warmup,
        seed=cfg.seed,
        max_length=cfg.context,
        progress=progress,
        log_every=50,
    )


def _pretrain(base_dir: Path, world: World, cfg: BuildConfig, progress: bool) -> dict[str, Any]:
    """Full training of a fresh tiny Llama on the generic corpus, with the same Trainer as expert/gate training."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from ..data import TokenizedDataset, tokenize_records
    from ..train import Trainer
    from ..train.common import batch_logits, causal_lm_loss, run_dir_for

    tokenizer = char_tokenizer()
    torch.manual_seed(cfg.seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden,
        intermediate_size=cfg.intermediate,
        num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads,
        num_key_value_heads=cfg.heads,
        max_position_embeddings=cfg.context,
        tie_word_embeddings=True,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        rope_theta=10000.0,
    )
    model = LlamaForCausalLM(config)
    n_records = cfg.pretrain_steps * cfg.pretrain_batch
    data = TokenizedDataset(tokenize_records(world.generic_corpus(n_records, seed=cfg.seed), tokenizer, cfg.context))
    train = _train_config(cfg, cfg.pretrain_lr, cfg.pretrain_steps, cfg.pretrain_batch, 50, progress)

    trainable = dict(model.named_parameters())
    trainer = Trainer(
        model,
        trainable,
        data,
        None,
        train,
        run_dir_for(base_dir),
        loss_fn=causal_lm_loss,
        logits_fn=batch_logits,
        pad_token_id=0,
        description="base (pretraining)",
    )
    metrics = trainer.train()
    model = trainer.model.eval()
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = 2
    model.generation_config.bos_token_id = None
    model.save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    return metrics


def domain_training_data(world: World, domain: str, n: int, expert_data: str = "split",
                         split_share: float = 0.5) -> list[dict[str, Any]]:
    """n training records of one domain for its expert (expert_data, split_share: BuildConfig.expert_data,
    .expert_split_share)."""
    if expert_data not in ("split", "varied", "tilted"):
        raise ValueError(f"expert_data={expert_data!r}; expected 'split', 'varied' or 'tilted'")
    if domain == "forward" and expert_data != "split":
        from .fresh import forward_expert_records

        return forward_expert_records(world, n, seed=world.seed, split_share=split_share,
                                      tilted=expert_data == "tilted")
    records = world.domain_records(domain, "train", n=None if domain != "compare" else n)
    return repeat_records(records, n, f"{world.seed}-repeat-{domain}")  # small domains (QA) are repeated


def gate_training_data(world: World, cfg: BuildConfig) -> list[dict[str, Any]]:
    """The gate's training records (cfg.gate_data): the four domains in equal shares, gate_steps x gate_batch."""
    n = cfg.gate_steps * cfg.gate_batch
    if cfg.gate_data == "fresh":
        from .fresh import fresh_mixture

        return fresh_mixture(world, n, seed=cfg.seed)
    if cfg.gate_data not in ("split", "expert"):
        raise ValueError(f"gate_data={cfg.gate_data!r}; expected 'split', 'fresh' or 'expert'")
    per_domain = n // len(DOMAINS) + 1
    mixture = [r for d in DOMAINS for r in (
        domain_training_data(world, d, per_domain, cfg.expert_data, cfg.gate_split_share)
        if cfg.gate_data == "expert" and d == "forward" else domain_training_data(world, d, per_domain))]
    random.Random(cfg.seed).shuffle(mixture)
    return mixture


def train_demo_expert(
    base_dir: Path, world: World, domain: str, out: Path, cfg: BuildConfig, progress: bool
) -> dict[str, Any]:
    """Train one domain's LoRA expert over the base in `base_dir` (cfg's sizes and data) into `out`."""
    from ..train import train_expert

    steps = {"qa": cfg.qa_expert_steps, "forward": cfg.forward_expert_steps}.get(domain, cfg.expert_steps)
    train = _train_config(cfg, cfg.expert_lr, steps, cfg.expert_batch, 30, progress)
    return train_expert(
        base_dir,
        domain_training_data(world, domain, steps * cfg.expert_batch, cfg.expert_data, cfg.expert_split_share),
        out,
        rank=cfg.expert_rank,
        alpha=cfg.expert_alpha,
        dropout=0.0,
        train=train,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    )


def train_demo_gate(
    model: Any, world: World, mixture: list[dict[str, Any]], out: Path, cfg: BuildConfig, progress: bool,
    *, include_base: bool,
) -> dict[str, Any]:
    """Train `model`'s gate on `mixture` with the demo's objective (cfg) and save the checkpoint to `out`."""
    from ..train import GateObjective, train_gate

    train = _train_config(cfg, cfg.gate_lr, cfg.gate_steps, cfg.gate_batch, 20, progress)
    eval_data = None
    if cfg.gate_keep_best:
        train.eval_every, train.keep_best = 100, True
        eval_data = [r for d in DOMAINS for r in world.domain_records(d, "val", 50)]
    # every example weighs the same (design answers are 5x longer than the others), and the records' domains
    # supervise the router (docs/training.md, docs/demo.md)
    joint = (
        {"expert_lr_scale": cfg.expert_lr_scale, "expert_anchor_weight": cfg.expert_anchor_weight,
         "frozen_experts": cfg.frozen_experts}
        if cfg.trainable_experts
        else {}
    )
    objective = GateObjective(
        loss_weighting="example", route_weight=cfg.route_weight, entropy_weight=cfg.entropy_weight, **joint
    )
    return train_gate(
        model, mixture, out, train=train, eval_data=eval_data, objective=objective, include_base=include_base
    )


def build(out_dir: str | Path, cfg: BuildConfig | None = None, *, progress: bool = True) -> dict[str, Any]:
    """Build base, experts and gates into out_dir (base/, experts/<domain>/, checkpoint/, checkpoint-truncated/).
    Returns a record of the configuration, the metrics of every stage, and the time taken."""
    from ..config import GateConfig, MixConfig
    from ..model import from_pretrained
    from ..train.common import run_dir_for

    cfg = cfg or BuildConfig()
    torch.set_num_threads(cfg.threads)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    world = World(seed=cfg.seed)
    record: dict[str, Any] = {"config": asdict(cfg), "stages": {}}
    start = time.perf_counter()

    base_dir = out / "base"
    stage = time.perf_counter()
    record["stages"]["base"] = {"metrics": _pretrain(base_dir, world, cfg, progress)}
    record["stages"]["base"]["seconds"] = time.perf_counter() - stage

    experts = {}
    for domain in DOMAINS:
        stage = time.perf_counter()
        metrics = train_demo_expert(base_dir, world, domain, out / "experts" / domain, cfg, progress)
        experts[domain] = out / "experts" / domain
        record["stages"][f"expert {domain}"] = {"metrics": metrics, "seconds": time.perf_counter() - stage}

    mixture = gate_training_data(world, cfg)
    for name, k in (("checkpoint", None), ("checkpoint-truncated", max(1, cfg.layers // 2))):
        stage = time.perf_counter()
        torch.manual_seed(cfg.seed)
        config = MixConfig(
            gate=GateConfig(depth=cfg.gate_depth, width=cfg.gate_width, layerwise=True, dropout=cfg.gate_dropout),
            scaling_layer=k,
            trainable_experts=cfg.trainable_experts,
        )
        model = from_pretrained(base_dir, experts, config)
        metrics = train_demo_gate(model, world, mixture, out / name, cfg, progress, include_base=k is None)
        record["stages"][f"gate {name}"] = {"metrics": metrics, "seconds": time.perf_counter() - stage}
    record["seconds"] = time.perf_counter() - start
    (out / "build.json").write_text(json.dumps(record, indent=2, default=str))
    shutil.rmtree(run_dir_for(base_dir), ignore_errors=True)  # the pretraining run: not part of the demo
    return record


def ship(build_dir: str | Path, weights: str | Path) -> None:
    """Copy a build's two checkpoints into the package's weights folder: `checkpoint/` (with its base and tokenizer)
    and `checkpoint-truncated/`, whose base is referenced relatively as ../checkpoint/base."""
    build_dir, weights = Path(build_dir), Path(weights)
    if weights.exists():
        shutil.rmtree(weights)
    weights.mkdir(parents=True)
    shutil.copytree(build_dir / "checkpoint", weights / "checkpoint")
    shutil.copytree(build_dir / "checkpoint-truncated", weights / "checkpoint-truncated")
    config_path = weights / "checkpoint-truncated" / "loramix_config.json"
    meta = json.loads(config_path.read_text())
    meta["base"]["name_or_path"] = "../checkpoint/base"
    for expert in meta["experts"]:
        expert["source"] = f"experts/{expert['name']}"
    config_path.write_text(json.dumps(meta, indent=2) + "\n")
    main_config = weights / "checkpoint" / "loramix_config.json"
    meta = json.loads(main_config.read_text())
    for expert in meta["experts"]:
        expert["source"] = f"experts/{expert['name']}"
    main_config.write_text(json.dumps(meta, indent=2) + "\n")
    (weights / "build.json").write_text((build_dir / "build.json").read_text())
