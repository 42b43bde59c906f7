"""`loramix info` and `loramix export`: a checkpoint summarised, or written for mistral.rs or as one PEFT LoRA."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from ..options import config_options
from ..settings import LoadConfig
from .common import Command, console, err_console, load_model, read_checkpoint_meta

app = typer.Typer(add_completion=False)


@app.command("info", cls=Command)
def info(checkpoint: Path = typer.Argument(..., help="A loramix checkpoint directory.")) -> None:
    """Summarise a checkpoint: base, experts, adapted layers and gate (reads the JSON only)."""
    from ..checkpoint import CONFIG_NAME, expert_infos
    from ..errors import CheckpointError

    meta = read_checkpoint_meta(checkpoint)
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


@app.command("export", cls=Command)
@config_options(LoadConfig, "load", skip=("device", "dtype", "quantize"))
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
    load: Any = None,
) -> None:
    """Export a checkpoint: to mistral.rs's X-LoRA layout, or bake one fixed mixture into a plain PEFT LoRA."""
    if format_ == "static":
        from ..interop.static import export_static, fixed_scalings_from_prompt, read_scalings_file

        if (scalings is None) == (prompt is None):
            raise typer.BadParameter("give exactly one of --scalings FILE or --prompt TEXT", param_hint="--scalings")
        model = load_model(checkpoint, load)
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
        from ..interop.mistralrs import export_mistralrs

        model = load_model(checkpoint, load, quantize="none")  # mistral.rs gets the float base (it quantizes itself)
        recorded = (read_checkpoint_meta(checkpoint).get("base") or {}).get("quantization")
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
