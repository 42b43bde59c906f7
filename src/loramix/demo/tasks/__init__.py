"""The protein world's domains as lm-evaluation-harness tasks, offline (docs/evaluation.md, "The protein tasks").

The task YAMLs sit next to this module, inside the installed package, so that one `--include_path` works from a
source checkout and from a pip install alike; `python -m loramix.demo.tasks` prints that folder. The documents are
not files: `load` builds them from the shipped peptides with the demo's own generators (`World`, `ChatWorld`), the
same records `loramix demo` scores (its fixed test subset by default), so no dataset is downloaded and the numbers
are comparable with the demo's table. Answers are scored by the project's own scorers (`loramix.scoring`,
`loramix.demo.scoring`) through lm-eval's `process_results` and per-metric aggregations: each document contributes
(record, answer), and every metric is the scorer's value over all of them (R^2 is a corpus-level metric).

Task names:
    protein_forward, protein_design, protein_compare, protein_qa            generate_until, the mini-world's prompts
    protein_compare_choice, protein_qa_choice                               multiple choice (loglikelihood)
    protein_chat_*                                                          the same six in the SmolLM2 demo's chat
                                                                            phrasing (`loramix.demo.chat_world`)
    protein_turns_forward, protein_turns_design, protein_turns_qa           the chat phrasing as the user turn alone,
                                                                            for `local-chat-completions`
    tags: protein (the mini-world's six), protein_chat (the chat world's six), protein_turns (the three)

The chat tasks render each prompt with the evaluated model's own chat template: `load` takes the tokenizer from
the model arguments that lm-eval passes to it as metadata (`checkpoint=DIR` of the native "loramix" model, or
`tokenizer=DIR` of `local-completions`). The protein_turns tasks leave the template to the server (lm-eval's
`--apply_chat_template` with `local-chat-completions`, which has no log probabilities); compare has no turn task: its
prompt ends with the assistant's own "A>B?", which a chat API cannot take.
Composite prompts (two segments: the harness appends ">B?" after the model's own first answer) are not one lm-eval
request and stay in `loramix eval`.

Metadata (`--metadata '{"protein_n": 300}'`): protein_n, the documents per task (default: the demo's test subset);
protein_split, test (default) or val.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

from ...errors import ConfigError
from ...scoring import scorer_of

__all__ = ["TASKS_DIR", "load", "process_results", "tasks_dir"]

TASKS_DIR = Path(__file__).resolve().parent
"""The folder of the task YAMLs: what `--include_path` needs."""

WORLDS = ("mini", "chat", "turns")
SPLITS = ("test", "val")


def tasks_dir() -> Path:
    """The folder of the task YAMLs (lm-eval's `--include_path`)."""
    return TASKS_DIR


@cache
def _world() -> Any:
    from ..world import World

    return World()


def _qa_kind(answer: str) -> str:
    """The fact kind (code, name, three, charge, class, mass) whose values include `answer`."""
    from ..world import QA_TEMPLATES

    for kind in QA_TEMPLATES:
        if any(fact[kind] == answer for fact in _world().facts):
            return kind
    raise ConfigError(f"Q&A answer {answer!r} is none of the amino-acid table's facts")


def _choices(kind: str) -> list[str]:
    """Every value of one fact kind in the amino-acid table, in table order: the options of a Q&A question."""
    return list(dict.fromkeys(fact[kind] for fact in _world().facts))


def _tokenizer(metadata: dict[str, Any]) -> Any:
    """The evaluated model's tokenizer, from the model arguments lm-eval passes as metadata."""
    from ...base import load_tokenizer
    from ...checkpoint import TOKENIZER_DIR

    if metadata.get("checkpoint"):
        path = Path(str(metadata["checkpoint"])) / TOKENIZER_DIR
    elif metadata.get("tokenizer"):
        path = Path(str(metadata["tokenizer"]))
    else:
        raise ConfigError(
            "the protein_chat tasks render prompts with the model's chat template: pass checkpoint=DIR (--model "
            "loramix) or tokenizer=DIR (local-completions) in --model_args"
        )
    if not path.is_dir():
        raise ConfigError(f"the protein_chat tasks need the model's tokenizer: {path} is not a directory")
    return load_tokenizer(path)


def _chat_world(world: str, tokenizer: Any) -> Any:
    """The SmolLM2 demo's world: prompts rendered with `tokenizer`'s chat template ("chat"), or left as the user
    turn for a chat API to render ("turns": the same records, drawn with the same random numbers)."""
    from ..chat_world import ChatWorld

    class Turns(ChatWorld):
        def chat_prompt(self, user: str) -> str:
            return user

    return ChatWorld(tokenizer) if world == "chat" else Turns(None)


def records(
    domain: str, world: str = "mini", n: int | None = None, split: str = "test", tokenizer: Any = None
) -> list[dict[str, Any]]:
    """The records of one domain, as `loramix demo` (world "mini") or `loramix demo --model smollm2` (world "chat",
    prompts rendered with `tokenizer`) builds them: the first `n` of the shuffled split (default: the demo's test
    subset). Q&A records also carry their fact `kind` and `choices`."""
    from ..run import EVAL_SIZES
    from ..smollm2_run import SMOLLM2_EVAL_SIZES

    if world not in WORLDS:
        raise ConfigError(f"protein_world={world!r}; expected one of {', '.join(WORLDS)}")
    if split not in SPLITS:
        raise ConfigError(f"protein_split={split!r}; expected one of {', '.join(SPLITS)}")
    if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n < 1):
        raise ConfigError(f"protein_n={n!r} must be an integer >= 1")
    if world == "turns" and domain == "compare":
        raise ConfigError("compare has no turns task: its prompt ends inside the assistant's turn (A>B?)")
    if world == "mini":
        out = _world().domain_records(domain, split, n or EVAL_SIZES[domain])
    else:
        out = _chat_world(world, tokenizer).domain_records(domain, split, n or SMOLLM2_EVAL_SIZES[domain])
    if domain == "qa":
        out = [{**r, "kind": _qa_kind(r["completion"])} for r in out]
        out = [{**r, "choices": _choices(r["kind"])} for r in out]
    return out


def load(
    protein_domain: str,
    protein_world: str = "mini",
    protein_n: int | None = None,
    protein_split: str = "test",
    **metadata: Any,
) -> Any:
    """lm-eval's `custom_dataset` hook: a DatasetDict with one split, "test", of the domain's records. lm-eval
    calls it with the task's `dataset_kwargs` (protein_domain, protein_world) and its metadata (the model
    arguments, `--metadata`, the YAML's own)."""
    import datasets

    tokenizer = _tokenizer(metadata) if protein_world == "chat" else None
    rows = records(protein_domain, protein_world, protein_n, protein_split, tokenizer)
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


# ---------------------------------------------------------------------------------------------- scoring hooks


def process_results(doc: dict[str, Any], results: list[str]) -> dict[str, Any]:
    """One generate_until document: (record, answer) under every metric of the record's scorer, aggregated by the
    scorer itself (below)."""
    record = {k: v for k, v in doc.items() if v is not None}
    how = scorer_of(record)
    names = how.score([record], [results[0]], _context())
    return {name: (record, results[0]) for name in names}


@cache
def _context() -> dict[str, Any]:
    """What the scorers know besides the records: the training peptides (design novelty)."""
    return {"train_peptides": _world().train_set}


def _aggregate(metric: str) -> Callable[[list[tuple[dict[str, Any], str]]], float]:
    def aggregate(items: list[tuple[dict[str, Any], str]]) -> float:
        recs = [r for r, _ in items]
        value = scorer_of(recs[0]).score(recs, [a for _, a in items], _context())[metric]
        return float(value) if math.isfinite(value) else math.nan

    aggregate.__name__ = metric
    return aggregate


# one aggregation per metric name the YAMLs list (lm-eval's `!function` needs module-level names)
r2 = _aggregate("r2")
mae = _aggregate("mae")
exact_match = _aggregate("exact_match")
parsed = _aggregate("parsed")
within_tolerance = _aggregate("within_tolerance")
validity = _aggregate("validity")
novelty = _aggregate("novelty")
length_mae = _aggregate("length_mae")
