"""Training data: JSONL (or anything `datasets` loads) -> tokenized examples with loss masks.

Each record is one of
    {"text": "..."}                                   loss on every token
    {"prompt": "...", "completion": "..."}            loss on the completion only (and the EOS after it)
    {"messages": [{"role": ..., "content": ...}]}     the tokenizer's chat template; loss on assistant turns
plus an optional "domain" (a string), kept for per-domain evaluation and the oracle baselines.
A bad line fails with the file, the line number and the reason.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import ConfigError, LoramixError

__all__ = [
    "DataError",
    "Example",
    "TokenizedDataset",
    "collate",
    "load_records",
    "read_jsonl",
    "split_records",
    "tokenize_records",
]

IGNORE = -100


class DataError(LoramixError):
    """A training/evaluation record is malformed."""


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]
    domain: str | None = None


def _check_record(record: Any, where: str) -> dict[str, Any]:
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    kinds = [k for k in (("text",), ("prompt", "completion"), ("messages",)) if all(f in record for f in k)]
    if len(kinds) != 1:
        raise DataError(
            f"{where}: expected exactly one of {{'text'}}, {{'prompt', 'completion'}} or {{'messages'}}, "
            f"got keys {sorted(record)}"
        )
    for key in kinds[0]:
        if key == "messages":
            messages = record[key]
            if not isinstance(messages, list) or not messages:
                raise DataError(f"{where}: 'messages' must be a non-empty list of {{'role', 'content'}} objects")
            for i, m in enumerate(messages):
                if (
                    not isinstance(m, dict)
                    or not isinstance(m.get("role"), str)
                    or not isinstance(m.get("content"), str)
                ):
                    raise DataError(f"{where}: messages[{i}] must be an object with string 'role' and 'content'")
            if not any(m["role"] == "assistant" for m in messages):
                raise DataError(f"{where}: 'messages' has no assistant turn to train on")
        elif not isinstance(record[key], str):
            raise DataError(f"{where}: '{key}' must be a string, got {type(record[key]).__name__}")
    if "domain" in record and record["domain"] is not None and not isinstance(record["domain"], str):
        raise DataError(f"{where}: 'domain' must be a string, got {type(record['domain']).__name__}")
    return record


def load_records(source: str | Path | Sequence[dict[str, Any]], *, split: str = "train") -> list[dict[str, Any]]:
    """Records from a .jsonl file (validated line by line), a list of dicts, or any `datasets.load_dataset` source
    (a .json/.csv/.parquet file, a directory, or a dataset name available offline)."""
    if isinstance(source, (list, tuple)):
        return [_check_record(r, f"record {i}") for i, r in enumerate(source)]
    path = Path(str(source)).expanduser()
    if path.suffix == ".jsonl" or (path.is_file() and path.suffix == ""):
        return [r for _, r in read_jsonl(path)]
    try:
        import datasets
    except ImportError:  # pragma: no cover - datasets is a dependency of the train extra
        raise ConfigError(f"{source}: only .jsonl files can be read without the 'datasets' package") from None
    try:
        if path.is_file():
            kind = {".json": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}.get(path.suffix)
            if kind is None:
                raise DataError(f"{path}: unknown data format; use .jsonl, .json, .csv, .parquet or .txt")
            data = datasets.load_dataset(kind, data_files=str(path), split=split)
        else:
            data = datasets.load_dataset(str(source), split=split)
    except (FileNotFoundError, ValueError, OSError) as exc:
        raise DataError(f"{source}: cannot load with datasets ({str(exc).splitlines()[0]})") from None
    return [_check_record(dict(r), f"{source} row {i}") for i, r in enumerate(data)]


def read_jsonl(path: str | Path) -> list[tuple[str, dict[str, Any]]]:
    """The records of a JSONL file, validated line by line, each with where it is ("FILE:LINE", for errors that name
    the offending line); blank lines are skipped."""
    path = Path(str(path)).expanduser()
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    records = []
    try:
        f = path.open(encoding="utf-8")
    except PermissionError:
        raise DataError(f"{path}: permission denied") from None
    with f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{number}: invalid JSON ({exc.msg} at column {exc.colno})") from None
            except RecursionError:
                raise DataError(f"{path}:{number}: the JSON is nested too deeply for a record") from None
            records.append((f"{path}:{number}", _check_record(record, f"{path}:{number}")))
    if not records:
        raise DataError(f"{path}: no records")
    return records


def split_records(
    records: list[dict[str, Any]], eval_fraction: float, seed: int
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """A reproducible held-out split (shuffled by `seed`). eval_fraction 0 gives no evaluation records."""
    if not 0.0 <= eval_fraction < 1.0:
        raise ConfigError(f"eval_fraction={eval_fraction} must be in [0, 1)")
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    n_eval = round(len(records) * eval_fraction)
    if eval_fraction > 0 and n_eval == 0:
        n_eval = 1
    held = set(order[:n_eval])
    return [r for i, r in enumerate(records) if i not in held], [r for i, r in enumerate(records) if i in held]


def _ids(tokenizer: Any, text: str, special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def _chat_pieces(tokenizer: Any, messages: list[dict[str, str]], where: str) -> list[tuple[str, bool]]:
    """The conversation as (text, is_assistant_content) pieces whose concatenation is the rendered conversation."""
    from .text import PLAIN_CHAT_FORMAT

    if not getattr(tokenizer, "chat_template", None):
        pieces = []
        for m in messages:
            if m["role"] == "assistant":
                pieces.append(("assistant:", False))
                pieces.append((f" {m['content']}\n", True))
            else:
                pieces.append((PLAIN_CHAT_FORMAT.format(role=m["role"], content=m["content"]), False))
        return pieces

    def render(upto: int, generation_prompt: bool) -> str:
        return tokenizer.apply_chat_template(messages[:upto], tokenize=False, add_generation_prompt=generation_prompt)

    pieces: list[tuple[str, bool]] = []
    done = ""
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            header = render(i, True)
            full = render(i + 1, False)
            if not header.startswith(done) or not full.startswith(header):
                raise DataError(f"{where}: the chat template does not render conversations prefix by prefix")
            pieces.append((header[len(done) :], False))
            pieces.append((full[len(header) :], True))
        else:
            full = render(i + 1, False)
            if not full.startswith(done):
                raise DataError(f"{where}: the chat template does not render conversations prefix by prefix")
            pieces.append((full[len(done) :], False))
        done = full
    return pieces


def tokenize_record(record: dict[str, Any], tokenizer: Any, max_length: int, where: str = "record") -> Example:
    """One record -> Example(input_ids, labels with -100 where there is no loss, domain)."""
    eos = tokenizer.eos_token_id
    if "text" in record:
        ids = _ids(tokenizer, record["text"], True)
        if eos is not None:
            ids.append(eos)
        labels = list(ids)
    elif "prompt" in record:
        prompt = _ids(tokenizer, record["prompt"], True)
        completion = _ids(tokenizer, record["completion"], False) + ([eos] if eos is not None else [])
        ids = prompt + completion
        labels = [IGNORE] * len(prompt) + completion
    else:
        ids, labels = [], []
        for k, (text, trained) in enumerate(_chat_pieces(tokenizer, record["messages"], where)):
            piece = _ids(tokenizer, text, special=k == 0 and not getattr(tokenizer, "chat_template", None))
            ids += piece
            labels += piece if trained else [IGNORE] * len(piece)
    ids, labels = ids[:max_length], labels[:max_length]
    if all(label == IGNORE for label in labels[1:]):
        raise DataError(f"{where}: nothing to train on after truncation to max_length={max_length}")
    return Example(ids, labels, record.get("domain"))


def tokenize_records(records: Sequence[dict[str, Any]], tokenizer: Any, max_length: int) -> list[Example]:
    return [tokenize_record(r, tokenizer, max_length, f"record {i}") for i, r in enumerate(records)]


@dataclass
class TokenizedDataset(torch.utils.data.Dataset):
    """Examples plus the domain table (domain name -> id; -1 for records without a domain)."""

    examples: list[Example]
    domains: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.domains:
            self.domains = sorted({e.domain for e in self.examples if e.domain is not None})

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        e = self.examples[index]
        domain = self.domains.index(e.domain) if e.domain in self.domains else -1
        return {"input_ids": e.input_ids, "labels": e.labels, "domain": domain}


def collate(batch: list[dict[str, Any]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch: input_ids [B, T], attention_mask [B, T], labels [B, T] (-100 on padding), domain [B]."""
    width = max(len(b["input_ids"]) for b in batch)
    ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, b in enumerate(batch):
        n = len(b["input_ids"])
        ids[row, :n] = torch.tensor(b["input_ids"])
        labels[row, :n] = torch.tensor(b["labels"])
        mask[row, :n] = 1
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "labels": labels,
        "domain": torch.tensor([b["domain"] for b in batch]),
    }
