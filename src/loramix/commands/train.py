"""`loramix train-expert`, `train-gate` and `mix`: experts and mixtures, their options from the config dataclasses
(TrainConfig, GateConfig, MixConfig, GateObjective)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import typer

from ..options import config_options, field_docs
from ..settings import LoadConfig
from .common import Command, check_quantize, console, err_console, interactive, load_model, parse_experts

app = typer.Typer(add_completion=False)

QUANTIZE = typer.Option(None, "--quantize", help=field_docs(LoadConfig)["quantize"].replace("[", "\\["))


def off_terminal(train: Any) -> Any:
    """No progress bar when stderr is not a terminal (a log file would get its every redraw); metrics.jsonl and
    the printed metrics say how training went."""
    return train if interactive() else dataclasses.replace(train, progress=False)


def print_metrics(metrics: dict[str, Any], out: Path) -> None:
    from accelerate import PartialState

    if not PartialState().is_main_process:
        return
    shown = {k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()}
    console.print(f"[green]saved[/green] {out}")
    console.print(json.dumps(shown))


# Options shared by train-expert and train-gate besides TrainConfig's fields.
_EVAL = typer.Option(None, "--eval-data", help="Held-out JSONL (default: --eval-fraction of --data).")
_EVAL_FRACTION = typer.Option(0.0, "--eval-fraction", help="Share of --data held out for evaluation.")
_RUN_DIR = typer.Option(None, "--run-dir", help="Metrics and resumable checkpoints (default: OUT.run).")
_RESUME = typer.Option(False, "--resume", help="Continue from the newest complete checkpoint in the run dir.")
_FORCE = typer.Option(
    False,
    "--force",
    help="With --resume: continue although the settings differ from the checkpoint's (refused otherwise).",
)
_DATA = typer.Option(..., help="Training data: JSONL ({text} | {prompt, completion} | {messages}).")


def _train_options(command: Any) -> Any:
    """Every TrainConfig field as an option of a training command, which receives `train: TrainConfig`."""
    from ..train.loop import TrainConfig

    return config_options(
        TrainConfig,
        "train",
        names={"learning_rate": "--lr", "report_to": "--report-to"},
        help={"report_to": "Accelerate tracker: tensorboard or wandb (repeatable)."},
    )(command)


@app.command("train-expert", cls=Command)
@_train_options
def train_expert_cmd(
    base: str = typer.Option(..., help="Base model id or directory."),
    data: str = _DATA,
    out: Path = typer.Option(..., "--out", "-o", help="Where to write the PEFT adapter directory."),
    rank: int = typer.Option(8, "--rank", "-r", help="LoRA rank."),
    alpha: float = typer.Option(16.0, help="LoRA alpha."),
    dropout: float = typer.Option(0.05, help="LoRA dropout."),
    target: list[str] = typer.Option(None, "--target", help="Target module name (repeatable); default: projections."),
    rslora: bool = typer.Option(False, "--rslora", help="rsLoRA scaling alpha/sqrt(r)."),
    eval_data: str | None = _EVAL,
    eval_fraction: float = _EVAL_FRACTION,
    run_dir: Path | None = _RUN_DIR,
    resume: bool = _RESUME,
    force: bool = _FORCE,
    train: Any = None,
) -> None:
    """Train one LoRA expert with PEFT; the output is a plain PEFT adapter directory."""
    from ..train import train_expert

    metrics = train_expert(
        base,
        data,
        out,
        rank=rank,
        alpha=alpha,
        dropout=dropout,
        target_modules=target or None,
        use_rslora=rslora,
        train=off_terminal(train),
        eval_data=eval_data,
        eval_fraction=eval_fraction,
        run_dir=run_dir,
        resume=resume,
        force_resume=force,
    )
    print_metrics(metrics, out)


def _gate_options(command: Any) -> Any:
    """Every field of GateConfig, MixConfig and GateObjective as an option of train-gate."""
    from ..config import GateConfig, MixConfig
    from ..train.gate import GateObjective

    names = {"dropout": "--gate-dropout", "layerwise": "--layerwise/--shared"}
    command = config_options(GateConfig, "gate", names=names, skip=("hidden_size",))(command)
    command = config_options(MixConfig, "mix", skip=("gate",))(command)
    return config_options(GateObjective, "objective", names={"frozen_experts": "--frozen-expert"})(command)


FROM_INIT = ("gate", "scaling_layer", "trainable_experts")  # what train-gate --init may change of the mixture


def _settings_from_init(given: dict[str, Any]) -> None:
    """With --init the mixture comes from the checkpoint: refuse mixture or gate options that would be ignored."""
    from ..config import GateConfig, MixConfig

    for config, default in ((given["gate"], GateConfig()), (given["mix"], MixConfig())):
        for f in dataclasses.fields(config):
            if f.name not in FROM_INIT and getattr(config, f.name) != getattr(default, f.name):
                raise typer.BadParameter(
                    f"{f.name} comes from the --init checkpoint; only --scaling-layer and --trainable-experts can "
                    "be changed with it",
                    param_hint="--init",
                )


@app.command("train-gate", cls=Command)
@_gate_options
@_train_options
def train_gate_cmd(
    data: str = _DATA,
    out: Path = typer.Option(..., "--out", "-o", help="Where to write the loramix checkpoint."),
    base: str | None = typer.Option(None, help="Base model id or directory (with --expert)."),
    expert: list[str] = typer.Option(None, "--expert", "-e", help="NAME=ADAPTER_DIR (repeatable)."),
    init: Path | None = typer.Option(None, help="Start from this loramix checkpoint instead of --base/--expert."),
    include_base: bool = typer.Option(False, "--include-base", help="Copy the base model into the checkpoint."),
    quantize: str | None = QUANTIZE,
    eval_data: str | None = _EVAL,
    eval_fraction: float = _EVAL_FRACTION,
    run_dir: Path | None = _RUN_DIR,
    resume: bool = _RESUME,
    force: bool = _FORCE,
    train: Any = None,
    gate: Any = None,
    mix: Any = None,
    objective: Any = None,
) -> None:
    """Train the gate of a mixture (base + experts frozen); the output is a self-contained loramix checkpoint."""
    from ..train import train_gate

    if init is not None:
        if base or expert:
            raise typer.BadParameter("use either --init or --base/--expert", param_hint="--init")
        _settings_from_init({"gate": gate, "mix": mix})
        model = load_model(init, LoadConfig(quantize=quantize))
        if mix.scaling_layer is not None:
            model.config.scaling_layer = mix.scaling_layer
            model.config.validate_for(hidden_size=model.hidden_size, n_experts=model.n_experts, n_blocks=model.n_blocks)
        model.config.trainable_experts = model.config.trainable_experts or mix.trainable_experts
        new_mixture: dict[str, Any] = {}
    else:
        if not base or not expert:
            raise typer.BadParameter(
                "give --base and at least one --expert NAME=DIR (or --init CKPT)", param_hint="--base"
            )
        check_quantize(quantize)
        config = dataclasses.replace(mix, gate=gate)
        new_mixture = {"base": base, "experts": parse_experts(expert), "config": config, "quantize": quantize}
        model = None
    metrics = train_gate(
        model,
        data,
        out,
        **new_mixture,
        train=off_terminal(train),
        eval_data=eval_data,
        eval_fraction=eval_fraction,
        objective=objective,
        run_dir=run_dir,
        resume=resume,
        force_resume=force,
        include_base=include_base,
    )
    print_metrics(metrics, out)


def _mix_options(command: Any) -> Any:
    from ..config import GateConfig, MixConfig

    mlp_only = ("hidden_size", "depth", "width", "dropout", "softmax", "topk_softmax", "layerwise", "bias", "context")
    mlp_only += ("context_decay", "context_width")
    command = config_options(
        GateConfig, "gate", skip=mlp_only, help={"router": "arrow (needs no training)."}, defaults={"router": "arrow"}
    )(command)
    return config_options(MixConfig, "mix", skip=("gate", "trainable_experts", "scaling_layer"))(command)


@app.command("mix", cls=Command)
@_mix_options
def mix_cmd(
    base: str = typer.Option(..., help="Base model id or directory."),
    expert: list[str] = typer.Option(..., "--expert", "-e", help="NAME=ADAPTER_DIR (repeatable)."),
    out: Path = typer.Option(..., "--out", "-o", help="Where to write the loramix checkpoint."),
    include_base: bool = typer.Option(False, "--include-base", help="Copy the base model into the checkpoint."),
    gate: Any = None,
    mix: Any = None,
) -> None:
    """Build a mixture that needs no training (the Arrow router: each layer routes every token to the experts whose
    prototypes match its input; docs/gates.md) and save it as a loramix checkpoint."""
    from ..checkpoint import CHECKPOINT_FILES, CONFIG_NAME
    from ..io import check_replaceable
    from ..model import from_pretrained

    if gate.router == "mlp":
        raise typer.BadParameter(
            "an MLP gate must be trained: use 'loramix train-gate', or --router arrow here", param_hint="--router"
        )
    experts = parse_experts(expert)
    check_replaceable(out, marker=CONFIG_NAME, owned=CHECKPOINT_FILES, what="--out")  # before loading anything
    with err_console.status("building the mixture"):
        model = from_pretrained(base, experts, dataclasses.replace(mix, gate=gate))
        path = model.save(out, include_base=include_base)
    console.print(
        f"[green]saved[/green] {path}: {model.n_experts} experts over {model.n_layers} adapted layers, "
        f"router {gate.router} (top-k {gate.top_k or model.n_experts}, temperature {gate.temperature})"
    )
