"""`loramix generate`: text from prompts, optionally streamed, with the dominant expert per token."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from ..options import config_options
from ..settings import GenerateConfig, LoadConfig, SamplingOptions
from .common import Command, console, err_console, load_model, read_prompts, read_schema

app = typer.Typer(add_completion=False)

EXPERT_COLOURS = ["cyan", "magenta", "green", "yellow", "blue", "red", "bright_cyan", "bright_magenta"]


def show_scalings(tokenizer: Any, tokens: list[int], scalings: Any, names: list[str]) -> None:
    """One row per generated token: the token, the dominant expert (mean over layers) and every expert's share."""
    from ..analysis.stats import dominant_experts

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


@app.command("generate", cls=Command)
@config_options(LoadConfig, "load")
@config_options(SamplingOptions, "sampling")
@config_options(GenerateConfig, "run", names={"max_new_tokens": "--max-new-tokens -n", "compile": "--compile"})
def generate(
    checkpoint: Path = typer.Argument(..., help="A loramix checkpoint directory (with its tokenizer)."),
    prompt: list[str] = typer.Option(None, "--prompt", "-p", help="A prompt; repeat for several."),
    file: Path | None = typer.Option(None, "--file", "-f", help="Prompts, one per line (or .jsonl with 'prompt')."),
    chat: bool = typer.Option(False, "--chat", help="Wrap each prompt as a user message in the chat template."),
    stream_: bool = typer.Option(False, "--stream", help="Print tokens as they are generated."),
    show: bool = typer.Option(False, "--show-scalings", help="Per token: the dominant expert and shares."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object per line and prompt."),
    json_schema: Path | None = typer.Option(
        None, "--json-schema", help="A JSON schema file: every answer is JSON valid against it (structured output)."
    ),
    run: Any = None,
    sampling: Any = None,
    load: Any = None,
) -> None:
    """Generate text from prompts with a checkpoint, optionally streaming and showing the dominant expert per token."""
    from ..sampling import SamplingSettings
    from ..text import render_chat

    prompts = read_prompts(prompt, file)
    schema = read_schema(json_schema, "--json-schema")
    model = load_model(checkpoint, load)
    tokenizer = model.tokenizer
    if tokenizer is None:
        from ..errors import CheckpointError

        raise CheckpointError(f"{checkpoint}: the checkpoint has no tokenizer and its base provides none")
    texts = [render_chat(tokenizer, [{"role": "user", "content": p}]) for p in prompts] if chat else prompts
    settings = SamplingSettings(**vars(sampling))
    options = dict(
        max_new_tokens=run.max_new_tokens,
        sampling=settings,
        stop_strings=run.stop or None,
        mode=run.mode,
        compile=run.compile,
        json_schema=schema,
    )
    if stream_:
        _stream(model, prompts, texts, chat, options)
        return
    failed = 0
    for start in range(0, len(texts), run.batch_size):
        failed += _batch(
            model,
            prompts[start : start + run.batch_size],
            texts[start : start + run.batch_size],
            chat,
            options,
            show=show,
            as_json=as_json,
        )
    if failed:  # every other answer was printed; the failures were named as they came
        raise typer.Exit(1)


def _stream(model: Any, prompts: list[str], texts: list[str], chat: bool, options: dict[str, Any]) -> None:
    from ..generate import stream as stream_text
    from ..text import encode_prompts

    for original, text in zip(prompts, texts):
        ids, _ = encode_prompts(model.tokenizer, [text], templated=chat)
        console.print(f"[bold]{original}[/bold]", end="\n" if chat else "")  # a chat answer is not a continuation
        for piece in stream_text(model, ids, **options):
            console.print(piece, end="", highlight=False, markup=False)
        console.print()


def _batch(
    model: Any, prompts: list[str], texts: list[str], chat: bool, options: dict[str, Any], *, show: bool, as_json: bool
) -> int:
    """One batch of prompts: generate, print each answer (text or a JSON line; its text and finish reason as
    `generate()` gives them, stop strings cut) and the throughput; a failed row is one red line. How many failed."""
    from ..text import encode_prompts

    tokenizer = model.tokenizer
    ids, mask = encode_prompts(tokenizer, texts, templated=chat)
    out = model.generate(ids, mask, return_scalings=show, **options)
    seconds = out.timings["seconds"]
    for row, original in enumerate(prompts):
        keep = out.new_tokens[row, : out.lengths[row]].tolist()
        completion = out.texts[row]
        if out.errors[row]:
            err_console.print(f"[red]error:[/red] prompt {prompts[row]!r}: {out.errors[row]}", highlight=False)
        if as_json:
            record = {
                "prompt": original,
                "completion": completion,
                "mode": out.mode,
                "finish_reason": out.finish_reasons[row],
                **({"error": out.errors[row]} if out.errors[row] else {}),
                "new_tokens": len(keep),
                "tokens_per_s": round(out.new_tokens.numel() / seconds, 2) if seconds else None,
            }
            print(json.dumps(record), flush=True)  # JSON lines: one object per prompt
        elif not out.errors[row]:
            gap = "\n" if chat else ""  # a chat answer is not a continuation of the prompt
            console.print(f"[bold]{original}[/bold]{gap}[green]{completion}[/green]", highlight=False)
        if show and out.scalings is not None:
            show_scalings(tokenizer, keep, out.scalings[row, : len(keep)], model.expert_names)
    if not as_json:
        err_console.print(
            f"[dim]{out.new_tokens.numel()} tokens in {seconds:.2f}s "
            f"({out.new_tokens.numel() / max(seconds, 1e-9):.1f} tokens/s), mode {out.mode}[/dim]"
        )
    return sum(error is not None for error in out.errors)
