"""The training loop shared by expert and gate training, on Accelerate.

Single process by default; `accelerate launch` with several processes (DDP, FSDP, DeepSpeed configs) runs the same
code. What it does:
    - AdamW over the trainable parameters only, a transformers schedule with warm-up, gradient clipping,
      gradient accumulation (Accelerate's `accumulate`);
    - a data order that depends only on (seed, epoch), so that a resumed run sees exactly the batches it would have;
    - a tqdm progress bar with loss and tokens/s; metrics to `run_dir/metrics.jsonl` (and to TensorBoard / W&B
      through Accelerate's trackers when asked);
    - evaluation on a held-out set, with the loss per domain;
    - periodic training checkpoints `run_dir/checkpoints/step-N/` written atomically: trainable weights
      (safetensors), optimizer state (safetensors + JSON), RNG states of every process, data position.
      `resume=True` continues from the newest complete one exactly (same final weights as an uninterrupted run).
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import re
import shutil
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError, TrainingError
from ..io import check_finite, follow_umask, fsync_tree, read_json, write_json, write_text_atomic
from .state import load_optimizer, load_rng, save_optimizer, save_rng

logger = logging.getLogger(__name__)

__all__ = ["TrainConfig", "Trainer"]

SCHEDULES = ("linear", "cosine", "constant", "constant_with_warmup")
STATE_NAME = "trainer_state.json"
CHECKPOINT_RE = re.compile(r"step-(\d+)$")
# Settings that shape the optimisation trajectory: a resume that changes one does not continue the same run.
RESUME_KEYS = ("learning_rate", "weight_decay", "schedule", "warmup_steps", "epochs", "max_steps", "batch_size",
               "grad_accum", "max_grad_norm", "seed", "max_length", "mixed_precision")


@dataclass
class TrainConfig:
    """Optimisation and bookkeeping options shared by `train_expert` and `train_gate`."""

    learning_rate: float = 1e-3
    """Peak learning rate (AdamW)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    schedule: str = "cosine"
    """transformers schedule name: linear, cosine, constant or constant_with_warmup."""
    warmup_steps: int = 0
    """Linear warm-up steps."""
    epochs: float = 1.0
    """Passes over the data (ignored when max_steps is set)."""
    max_steps: int | None = None
    """Optimizer steps; overrides `epochs` when set."""
    batch_size: int = 8
    """Examples per process per micro-batch."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    max_grad_norm: float | None = 1.0
    """Gradient clipping norm (None: no clipping)."""
    seed: int = 0
    """Seed (initialisation, data order, dropout)."""
    max_length: int = 512
    """Truncate examples to this many tokens."""
    eval_every: int | None = None
    """Evaluate every N optimizer steps (and at the end) when there is evaluation data."""
    save_every: int | None = None
    """Write a resumable training checkpoint every N optimizer steps."""
    keep_checkpoints: int = 2
    """Resumable checkpoints kept in the run directory (the newest ones)."""
    log_every: int = 10
    """Log metrics every N optimizer steps."""
    report_to: list[str] = field(default_factory=list)
    """Accelerate trackers, e.g. ["tensorboard"] or ["wandb"] (must be installed)."""
    mixed_precision: str | None = None
    """Accelerate mixed precision: no, fp16 or bf16. None: what `accelerate launch --mixed_precision` (or the
    Accelerate config) sets, else no."""
    progress: bool = True
    """Show a progress bar."""
    keep_best: bool = False
    """With evaluation data: end with the trainable weights of the evaluation with the lowest loss, not the last
    ones (early stopping without stopping; the best weights are kept in memory, so a resumed run starts tracking
    anew)."""

    def __post_init__(self) -> None:
        def check(ok: bool, message: str) -> None:
            if not ok:
                raise ConfigError(message)

        check(self.learning_rate > 0, f"learning_rate={self.learning_rate} must be > 0")
        check(self.weight_decay >= 0, f"weight_decay={self.weight_decay} must be >= 0")
        check(self.schedule in SCHEDULES, f"schedule={self.schedule!r}; expected one of {', '.join(SCHEDULES)}")
        check(self.warmup_steps >= 0, f"warmup_steps={self.warmup_steps} must be >= 0")
        check(self.epochs > 0, f"epochs={self.epochs} must be > 0")
        check(self.max_steps is None or self.max_steps >= 1, f"max_steps={self.max_steps} must be >= 1")
        check(self.batch_size >= 1, f"batch_size={self.batch_size} must be >= 1")
        check(self.grad_accum >= 1, f"grad_accum={self.grad_accum} must be >= 1")
        check(self.max_grad_norm is None or self.max_grad_norm > 0, f"max_grad_norm={self.max_grad_norm} must be > 0")
        check(self.max_length >= 2, f"max_length={self.max_length} must be >= 2")
        check(self.eval_every is None or self.eval_every >= 1, f"eval_every={self.eval_every} must be >= 1")
        check(self.save_every is None or self.save_every >= 1, f"save_every={self.save_every} must be >= 1")
        check(self.keep_checkpoints >= 1, f"keep_checkpoints={self.keep_checkpoints} must be >= 1")
        check(self.log_every >= 1, f"log_every={self.log_every} must be >= 1")
        check(0 <= self.seed < 2**63, f"seed={self.seed} must be an integer from 0 to 2**63 - 1")
        check(
            self.mixed_precision in (None, "no", "fp16", "bf16"),
            f"mixed_precision={self.mixed_precision!r}; expected no, fp16 or bf16 (or unset: the launcher's)",
        )
        check(isinstance(self.report_to, list), f"report_to={self.report_to!r} must be a list of tracker names")
        if self.report_to:
            from accelerate.tracking import get_available_trackers
            from accelerate.utils import LoggerType

            known = [t.value for t in LoggerType]
            for name in self.report_to:
                check(name in known, f"report_to={name!r} is not a tracker Accelerate knows; expected one of {known}")
                check(
                    name == "all" or name in get_available_trackers(),
                    f"report_to={name!r}: the {name} package is not installed (pip install {name})",
                )


LossFn = Callable[[nn.Module, dict[str, torch.Tensor]], tuple[torch.Tensor, dict[str, float]]]
LogitsFn = Callable[[nn.Module, dict[str, torch.Tensor]], torch.Tensor]


@dataclass
class _Window:
    """What the steps since the last log add up: loss sum, micro-batches, tokens (all processes), auxiliary terms."""

    loss: float = 0.0
    n: int = 0
    tokens: int = 0
    extras: dict[str, float] = field(default_factory=dict)
    start: float = field(default_factory=time.perf_counter)

    def add(self, loss: float, tokens: int, extras: dict[str, float]) -> None:
        self.loss += loss
        self.n += 1
        self.tokens += tokens
        for key, value in extras.items():
            self.extras[key] = self.extras.get(key, 0.0) + value


@dataclass
class _Best:
    """The evaluation with the lowest loss so far, and (with keep_best) a copy of the trainable weights then."""

    loss: float = math.inf
    step: int = 0
    weights: dict[str, torch.Tensor] | None = None

    def consider(self, metrics: dict[str, Any], step: int, trainable: dict[str, nn.Parameter], keep: bool) -> None:
        loss = metrics.get("eval_loss", math.inf)
        if loss < self.loss:
            self.loss, self.step = loss, step
            if keep:
                self.weights = {name: p.detach().clone() for name, p in trainable.items()}


class Trainer:
    """Runs the loop for `model`, updating only `trainable` (name -> parameter)."""

    def __init__(
        self,
        model: nn.Module,
        trainable: dict[str, nn.Parameter],
        train_data: torch.utils.data.Dataset,
        eval_data: torch.utils.data.Dataset | None,
        config: TrainConfig,
        run_dir: str | Path,
        *,
        loss_fn: LossFn,
        logits_fn: LogitsFn,
        pad_token_id: int,
        domains: list[str] | None = None,
        description: str = "training",
        hparams: dict[str, Any] | None = None,
        lr_scale: dict[str, float] | None = None,
    ) -> None:
        """lr_scale: trainable name -> factor on the learning rate (the others train at the configured rate)."""
        from accelerate import Accelerator

        if not trainable:
            raise ConfigError("nothing to train: no parameter requires a gradient")
        if len(train_data) == 0:
            raise ConfigError("the training data is empty")
        self.model = model
        self.trainable = trainable
        self._params = list(trainable.values())  # what the optimizer steps and the gradient clipping covers
        self.train_data = train_data
        self.eval_data = eval_data if eval_data is not None and len(eval_data) > 0 else None
        self.config = config
        self.run_dir = Path(run_dir)
        self.loss_fn = loss_fn
        self.logits_fn = logits_fn
        self.pad_token_id = pad_token_id
        self.domains = domains or []
        self.description = description
        self.hparams = hparams or {}
        if config.keep_best and (self.eval_data is None or not config.eval_every):
            raise ConfigError(
                "keep_best needs evaluation data (eval_data or eval_fraction) and eval_every (the evaluations to "
                "choose from)"
            )
        self.lr_scale = dict(lr_scale or {})
        unknown = sorted(set(self.lr_scale) - set(trainable))
        if unknown:
            raise ConfigError(f"lr_scale names parameters that do not train: {unknown[:3]}")
        self.accelerator = Accelerator(
            gradient_accumulation_steps=config.grad_accum,
            log_with=config.report_to or None,
            project_dir=str(self.run_dir),
            mixed_precision=config.mixed_precision,
        )
        self.world = self.accelerator.num_processes
        per_step = config.batch_size * self.world * config.grad_accum
        self.micro_per_epoch = math.ceil(len(train_data) / (config.batch_size * self.world))
        self.steps_per_epoch = max(1, math.ceil(self.micro_per_epoch / config.grad_accum))
        self.total_steps = config.max_steps or max(1, math.ceil(config.epochs * self.steps_per_epoch))
        self.examples_per_step = per_step
        self.global_step = 0
        self.micro_done_in_epoch = 0
        self.epoch = 0

    # ------------------------------------------------------------------ data

    def _loader(self, epoch: int, skip_micro: int) -> Any:
        from torch.utils.data import DataLoader, Subset

        order = torch.randperm(len(self.train_data), generator=torch.Generator().manual_seed(self.config.seed + epoch))
        loader = DataLoader(
            Subset(self.train_data, order.tolist()),
            batch_size=self.config.batch_size,
            shuffle=False,
            collate_fn=self._collate,
            # its own generator: a DataLoader without one draws a seed from the global RNG every time an iterator
            # starts, which would shift the dropout masks of a resumed run
            generator=torch.Generator().manual_seed(self.config.seed + epoch),
        )
        loader = self.accelerator.prepare_data_loader(loader)
        return self.accelerator.skip_first_batches(loader, skip_micro) if skip_micro else loader

    def _collate(self, batch: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        from ..data import collate

        return collate(batch, self.pad_token_id)

    # ------------------------------------------------------------------ checkpoints

    @property
    def checkpoints_dir(self) -> Path:
        return self.run_dir / "checkpoints"

    def latest_checkpoint(self) -> Path | None:
        """The newest complete training checkpoint (temporary and half-written directories are ignored)."""
        if not self.checkpoints_dir.is_dir():
            return None
        found = []
        for path in self.checkpoints_dir.iterdir():
            match = CHECKPOINT_RE.fullmatch(path.name)
            if match and path.is_dir() and (path / STATE_NAME).is_file():
                found.append((int(match.group(1)), path))
        return max(found)[1] if found else None

    def _save_checkpoint(self, optimizer: torch.optim.Optimizer) -> None:
        acc = self.accelerator
        final = self.checkpoints_dir / f"step-{self.global_step}"
        tmp = self.checkpoints_dir / f".step-{self.global_step}.tmp"
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        save_rng(tmp / f"rng_{acc.process_index}.safetensors")
        acc.wait_for_everyone()
        if acc.is_main_process:
            from safetensors.torch import save_file

            try:
                check_finite(dict(self.trainable), f"step {self.global_step}", error=TrainingError)
            except TrainingError as exc:
                raise TrainingError(f"{exc}; not saved, training stopped") from None

            save_file(
                {n: p.detach().cpu().contiguous() for n, p in self.trainable.items()},
                str(tmp / "trainable.safetensors"),
            )
            save_optimizer(optimizer, tmp, names=list(self.trainable))
            state = {
                "global_step": self.global_step,
                "epoch": self.epoch,
                "micro_done_in_epoch": self.micro_done_in_epoch,
                "world_size": self.world,
                "config": asdict(self.config),
            }
            follow_umask(tmp)  # safetensors writes 0600 whatever the umask; the rest of the run dir follows it
            fsync_tree(tmp)
            write_json(tmp / STATE_NAME, state)  # last file: marks the checkpoint complete
            if final.exists():
                shutil.rmtree(final)
            os.rename(tmp, final)
            self._prune_checkpoints()
        acc.wait_for_everyone()

    def _prune_checkpoints(self) -> None:
        found = sorted(
            (int(m.group(1)), p)
            for p in self.checkpoints_dir.iterdir()
            if (m := CHECKPOINT_RE.fullmatch(p.name)) and (p / STATE_NAME).is_file()
        )
        for _, path in found[: -self.config.keep_checkpoints]:
            shutil.rmtree(path, ignore_errors=True)
        for path in self.checkpoints_dir.glob(".step-*.tmp"):
            if path.name != f".step-{self.global_step}.tmp":
                shutil.rmtree(path, ignore_errors=True)

    def _diverged(self, value: float) -> TrainingError:
        """The error for a non-finite loss: which step, and what is kept (nothing of this run is saved as output)."""
        step = self.global_step + 1
        last = self.latest_checkpoint()
        kept = (
            f"the last good training checkpoint is {last} (--resume continues from it)"
            if last is not None
            else "no output was written (use --save-every to keep resumable checkpoints)"
        )
        return TrainingError(
            f"the loss became {value} at step {step}; training stopped: {kept}. Check the data, the experts' "
            "weights and alphas, and lower --lr"
        )

    def _check_resume_config(self, saved: dict[str, Any], path: Path, force: bool) -> None:
        """Refuse a resume whose optimisation settings differ from the checkpoint's (it would not continue the same
        run) unless `force`."""
        current = asdict(self.config)
        changed = [
            f"{key} {saved[key]!r} -> {current[key]!r}"
            for key in RESUME_KEYS
            if key in saved and key in current and saved[key] != current[key]
        ]
        if not changed:
            return
        if not force:
            raise ConfigError(
                f"{path}: --resume with changed settings ({', '.join(changed)}); use the checkpoint's settings to "
                "continue the same run, or --force to continue with the new ones"
            )
        logger.warning("resuming %s with changed settings: %s", path, ", ".join(changed))

    def _truncate_metrics(self) -> None:
        """Drop the records logged after the resumed step, so that metrics.jsonl has each step once."""
        path = self.run_dir / "metrics.jsonl"
        if not self.accelerator.is_main_process or not path.is_file():
            return
        kept = []
        for line in path.read_text().splitlines():
            try:
                step = json.loads(line).get("step")
            except (json.JSONDecodeError, AttributeError):
                continue  # a line cut by a kill
            if isinstance(step, int) and step <= self.global_step:
                kept.append(line)
        write_text_atomic(path, "".join(line + "\n" for line in kept))

    def _resume(self, path: Path, optimizer: torch.optim.Optimizer, force: bool = False) -> None:
        from safetensors.torch import load_file

        state = read_json(path / STATE_NAME, "the training state")
        self._check_resume_config(state.get("config") or {}, path, force)
        if state.get("world_size") != self.world:
            raise ConfigError(
                f"{path}: the checkpoint was written by {state.get('world_size')} process(es); resume with the same "
                f"number (this run has {self.world}) to continue exactly"
            )
        weights = load_file(str(path / "trainable.safetensors"))
        missing = sorted(set(self.trainable) - set(weights))
        if missing:
            raise ConfigError(f"{path}: trainable tensors {missing[:3]} are missing; is this the same model?")
        with torch.no_grad():
            for name, param in self.trainable.items():
                param.copy_(weights[name].to(param.device, param.dtype))
        load_optimizer(optimizer, path, names=list(self.trainable))
        self.global_step = state["global_step"]
        self.epoch = state["epoch"]
        self.micro_done_in_epoch = state["micro_done_in_epoch"]
        load_rng(path / f"rng_{self.accelerator.process_index}.safetensors")
        self._truncate_metrics()
        logger.info("resumed from %s (step %d)", path, self.global_step)

    # ------------------------------------------------------------------ evaluation

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Token-weighted loss on the evaluation data, overall and per domain."""
        from torch.utils.data import DataLoader

        if self.eval_data is None:
            return {}
        model = self.model
        was_training = model.training
        model.eval()
        loader = self.accelerator.prepare_data_loader(
            DataLoader(self.eval_data, batch_size=self.config.batch_size, collate_fn=self._collate)
        )
        n_domains = len(self.domains)
        sums = torch.zeros(n_domains + 1, dtype=torch.float64, device=self.accelerator.device)
        counts = torch.zeros(n_domains + 1, dtype=torch.float64, device=self.accelerator.device)
        for batch in loader:
            logits = self.logits_fn(model, batch)
            labels = batch["labels"][:, 1:]
            losses = torch.nn.functional.cross_entropy(
                logits[:, :-1].float().transpose(1, 2), labels, ignore_index=-100, reduction="none"
            )
            valid = (labels != -100).double()
            per_example = (losses.double() * valid).sum(-1)
            tokens = valid.sum(-1)
            domain = batch["domain"].clamp(min=-1)
            slot = torch.where(domain >= 0, domain, torch.full_like(domain, n_domains))
            sums.index_add_(0, slot, per_example)
            counts.index_add_(0, slot, tokens)
        sums = self.accelerator.reduce(sums, "sum")
        counts = self.accelerator.reduce(counts, "sum")
        if was_training:
            model.train()
        out = {"eval_loss": float(sums.sum() / counts.sum().clamp_min(1))}
        for i, name in enumerate(self.domains):
            if counts[i] > 0:
                out[f"eval_loss/{name}"] = float(sums[i] / counts[i])
        return out

    # ------------------------------------------------------------------ the loop

    def _log(self, record: dict[str, Any]) -> None:
        if self.accelerator.is_main_process:
            with (self.run_dir / "metrics.jsonl").open("a") as f:
                f.write(json.dumps(record) + "\n")
        if self.config.report_to:
            self.accelerator.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=record["step"])

    def _prepare(self, resume: bool | str | Path, force: bool) -> tuple[nn.Module, Any, Any]:
        """Seed, wrap the model and a new AdamW with Accelerate, restore a checkpoint if asked, fast-forward the
        schedule, start the trackers and write hparams.json; returns (model, optimizer, scheduler)."""
        from transformers import get_scheduler

        acc, config = self.accelerator, self.config
        if acc.is_main_process:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        acc.wait_for_everyone()
        torch.manual_seed(config.seed)
        random.seed(config.seed)
        groups: dict[float, list[nn.Parameter]] = {1.0: []}  # the configured rate first: the one logged as "lr"
        for name, p in self.trainable.items():
            groups.setdefault(self.lr_scale.get(name, 1.0), []).append(p)
        optimizer = torch.optim.AdamW(
            [{"params": params, "lr": config.learning_rate * scale} for scale, params in groups.items() if params],
            lr=config.learning_rate,
            weight_decay=config.weight_decay,
        )
        model, optimizer = acc.prepare(self.model, optimizer)
        self.model = model
        if resume:
            resume_from = Path(resume) if isinstance(resume, (str, Path)) and resume is not True else None
            resume_from = resume_from or self.latest_checkpoint()
            if resume_from is None:
                logger.warning("no complete checkpoint under %s: starting from scratch", self.checkpoints_dir)
            else:
                self._resume(resume_from, optimizer, force)
        scheduler = get_scheduler(
            config.schedule, optimizer, num_warmup_steps=config.warmup_steps, num_training_steps=self.total_steps
        )
        with warnings.catch_warnings():  # fast-forwarding a resumed schedule: no optimizer step is missing
            warnings.simplefilter("ignore", UserWarning)
            for _ in range(self.global_step):
                scheduler.step()
        if config.report_to:
            acc.init_trackers(self.description.replace(" ", "-"), config={**asdict(self.config), **self.hparams})
        if acc.is_main_process:
            hparams = {"train": asdict(self.config), **self.hparams}
            write_text_atomic(self.run_dir / "hparams.json", json.dumps(hparams, indent=2, default=str))
        return model, optimizer, scheduler

    def _micro_step(self, model: nn.Module, optimizer: Any, batch: dict[str, torch.Tensor], window: _Window) -> None:
        """Forward, backward and (when gradients sync) the optimizer step of one micro-batch; its loss goes into the
        window. A non-finite loss raises `TrainingError`."""
        acc = self.accelerator
        with acc.accumulate(model):
            loss, extras = self.loss_fn(model, batch)
            acc.backward(loss)
            if acc.sync_gradients and self.config.max_grad_norm is not None:
                acc.clip_grad_norm_(self._params, self.config.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        self.micro_done_in_epoch += 1
        value = float(loss.detach())  # the one host sync per micro-batch, shared with the logging
        if not math.isfinite(value):
            raise self._diverged(value)
        window.add(value, int(batch["attention_mask"].sum()) * self.world, extras)

    def _log_window(self, window: _Window, scheduler: Any, progress: Any) -> dict[str, Any]:
        """The training metrics of the steps since the last log (the loss averaged over processes), logged."""
        elapsed = time.perf_counter() - window.start
        mean = torch.tensor(window.loss / window.n, device=self.accelerator.device)
        record = {
            "step": self.global_step,
            "epoch": round(self.epoch + self.micro_done_in_epoch / self.micro_per_epoch, 4),
            "loss": float(self.accelerator.reduce(mean, "mean")),
            "lr": scheduler.get_last_lr()[0],
            "tokens_per_s": window.tokens / max(elapsed, 1e-9),
            "steps_per_s": (window.n / self.config.grad_accum) / max(elapsed, 1e-9),
            **{k: v / window.n for k, v in window.extras.items()},
        }
        self._log(record)
        if progress is not None:
            progress.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}")
        return record

    def _evaluate_and_log(self) -> dict[str, Any]:
        metrics = self.evaluate()
        self._log({"step": self.global_step, **metrics})
        return metrics

    def train(self, resume: bool | str | Path = False, *, force: bool = False) -> dict[str, Any]:
        """Run to `total_steps`; return the last logged training and evaluation metrics.

        resume: True (the newest complete checkpoint of the run dir) or a checkpoint path. A checkpoint written with
        other optimisation settings (`RESUME_KEYS`) is refused unless `force`. Raises `TrainingError` when the loss
        becomes NaN or Inf (the periodic checkpoints written before stay).
        """
        acc, config = self.accelerator, self.config
        model, optimizer, scheduler = self._prepare(resume, force)
        progress = None
        if config.progress and acc.is_main_process:
            from tqdm.auto import tqdm

            progress = tqdm(total=self.total_steps, initial=self.global_step, desc=self.description, dynamic_ncols=True)
        model.train()
        last: dict[str, Any] = {}
        best = _Best()
        window = _Window()
        while self.global_step < self.total_steps:
            for batch in self._loader(self.epoch, self.micro_done_in_epoch):
                self._micro_step(model, optimizer, batch, window)
                if not acc.sync_gradients:
                    continue
                scheduler.step()
                self.global_step += 1
                at_end = self.global_step >= self.total_steps
                if self.global_step % config.log_every == 0 or at_end:
                    last.update(self._log_window(window, scheduler, progress))
                    window = _Window()
                if progress is not None:
                    progress.update(1)
                if self.eval_data is not None and config.eval_every and (
                    self.global_step % config.eval_every == 0 or at_end
                ):
                    last.update(self._evaluate_and_log())
                    best.consider(last, self.global_step, self.trainable, config.keep_best)
                if config.save_every and self.global_step % config.save_every == 0 and not at_end:
                    self._save_checkpoint(optimizer)
                if at_end:
                    break
            else:
                self.epoch += 1
                self.micro_done_in_epoch = 0
        if self.eval_data is not None and not config.eval_every:
            last.update(self._evaluate_and_log())
        if config.keep_best and best.weights is not None and best.step != self.global_step:
            with torch.no_grad():
                for name, p in self.trainable.items():
                    p.copy_(best.weights[name])
            last.update({"best_step": best.step, "best_eval_loss": best.loss})
            self._log({"step": self.global_step, "restored_step": best.step, "restored_eval_loss": best.loss})
        if progress is not None:
            progress.close()
        if config.report_to:
            acc.end_training()
        model.eval()
        self.model = acc.unwrap_model(model)
        return last
