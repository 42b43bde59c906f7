"""Record scalings with their tokens as a tidy table, streamed to disk, plus running statistics.

One row per (sequence, token, layer, expert):
    sequence, domain, source ("prompt" | "completion" | "generated"), turn, token_index, token, layer, layer_name,
    expert, value
written as Parquet (pyarrow) or CSV in chunks, so memory stays bounded however long the run; the statistics
(`ScalingStats`) are aggregated on the fly and written to summary.json by `close()`.
"""

from __future__ import annotations

import csv
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data import IGNORE, tokenize_record
from ..errors import ConfigError
from ..io import write_json
from .stats import ScalingStats

__all__ = ["ScalingsRecorder", "collect_records", "token_labels"]

COLUMNS = ["sequence", "domain", "source", "turn", "token_index", "token", "layer", "layer_name", "expert", "value"]


def token_labels(tokenizer: Any, ids: Sequence[int]) -> list[str]:
    """Readable text of each token (whitespace made visible: ␣ for a space-only token, ⏎ for newlines)."""
    out = []
    for i in ids:
        text = tokenizer.decode([int(i)]) if tokenizer is not None else str(int(i))
        text = text.replace("\n", "⏎")
        out.append("␣" if text == " " else text if text else "∅")
    return out


class ScalingsRecorder:
    """Streams tidy rows to `out_dir/scalings.{parquet,csv}` and accumulates statistics."""

    def __init__(
        self,
        out_dir: str | Path,
        expert_names: list[str],
        layer_names: list[str],
        *,
        tokenizer: Any = None,
        fmt: str = "parquet",
        chunk_rows: int = 200_000,
    ) -> None:
        if fmt not in ("parquet", "csv"):
            raise ConfigError(f"table format {fmt!r}: expected parquet or csv")
        if fmt == "parquet":
            try:
                import pyarrow  # noqa: F401
            except ImportError:
                raise ConfigError("Parquet needs pyarrow (pip install pyarrow), or use the csv format") from None
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.expert_names = expert_names
        self.layer_names = layer_names
        self.tokenizer = tokenizer
        self.fmt = fmt
        self.path = self.out_dir / f"scalings.{fmt}"
        self.chunk_rows = chunk_rows
        self.stats = ScalingStats(len(layer_names), len(expert_names))
        self.sequences = 0
        self._chunks: list[dict[str, np.ndarray]] = []
        self._rows = 0
        self._writer: Any = None
        self._csv_file: Any = None

    def add(
        self,
        scalings: torch.Tensor,
        token_ids: Sequence[int],
        *,
        sequence: int | str | None = None,
        domain: str | None = None,
        sources: Sequence[str] | str = "prompt",
        turn: int | None = None,
    ) -> int | str:
        """Record one sequence: scalings [T, L, N] for its tokens `token_ids` [T]. Returns the sequence id."""
        s = scalings.detach().float().cpu()
        t, n_layers, n_experts = s.shape
        if len(token_ids) != t:
            raise ValueError(f"{len(token_ids)} token ids for scalings of {t} tokens")
        sequence = self.sequences if sequence is None else sequence
        self.sequences += 1
        labels = token_labels(self.tokenizer, token_ids)
        sources = [sources] * t if isinstance(sources, str) else list(sources)
        self.stats.add(s, domain)
        n = t * n_layers * n_experts
        token_index = np.repeat(np.arange(t), n_layers * n_experts)
        layer = np.tile(np.repeat(np.arange(n_layers), n_experts), t)
        expert = np.tile(np.arange(n_experts), t * n_layers)
        self._chunks.append(
            {
                "sequence": np.full(n, str(sequence), dtype=object),
                "domain": np.full(n, domain, dtype=object),
                "source": np.asarray(sources, dtype=object)[token_index],
                "turn": np.full(n, turn, dtype=object),
                "token_index": token_index,
                "token": np.asarray(labels, dtype=object)[token_index],
                "layer": layer,
                "layer_name": np.asarray(self.layer_names, dtype=object)[layer],
                "expert": np.asarray(self.expert_names, dtype=object)[expert],
                "value": s.reshape(-1).numpy(),
            }
        )
        self._rows += n
        if self._rows >= self.chunk_rows:
            self._flush()
        return sequence

    def _flush(self) -> None:
        if not self._chunks:
            return
        columns = {c: np.concatenate([chunk[c] for chunk in self._chunks]) for c in COLUMNS}
        self._chunks, self._rows = [], 0
        if self.fmt == "parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq

            types = {"turn": pa.int32(), "token_index": pa.int32(), "layer": pa.int32(), "value": pa.float32()}
            table = pa.table({c: pa.array(columns[c].tolist(), types.get(c, pa.string())) for c in COLUMNS})
            if self._writer is None:
                self._writer = pq.ParquetWriter(str(self.path), table.schema)
            self._writer.write_table(table)
        else:
            if self._csv_file is None:
                self._csv_file = self.path.open("w", newline="", encoding="utf-8")
                self._writer = csv.writer(self._csv_file)
                self._writer.writerow(COLUMNS)
            self._writer.writerows(zip(*(columns[c].tolist() for c in COLUMNS)))

    def close(self, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """Flush the table, write summary.json, and return the summary."""
        self._flush()
        if self.fmt == "parquet" and self._writer is not None:
            self._writer.close()
        if self._csv_file is not None:
            self._csv_file.close()
        summary = self.stats.summary(self.expert_names, self.layer_names)
        summary["sequences"] = self.sequences
        summary["table"] = self.path.name
        summary.update(extra or {})
        write_json(self.out_dir / "summary.json", summary)
        return summary


def collect_records(
    model: Any,
    records: Iterable[dict[str, Any]],
    recorder: ScalingsRecorder,
    *,
    batch_size: int = 8,
    max_length: int = 1024,
    progress: bool = True,
    keep: int = 0,
) -> list[dict[str, Any]]:
    """Run the model over data records (text / prompt+completion / messages, see loramix.data) and record the scalings
    of every real token. Returns up to `keep` examples per domain as {"ids", "scalings", "domain", "sources"} (for
    figures)."""
    from tqdm.auto import tqdm

    tokenizer = model.tokenizer
    if tokenizer is None:
        raise ConfigError("analysing data needs the model's tokenizer")
    records = list(records)
    kept: dict[str | None, list[dict[str, Any]]] = {}
    bar = tqdm(total=len(records), desc="scalings", disable=not progress, unit="seq")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    for start in range(0, len(records), batch_size):
        chunk = records[start : start + batch_size]
        examples = [tokenize_record(r, tokenizer, max_length, f"record {start + i}") for i, r in enumerate(chunk)]
        width = max(len(e.input_ids) for e in examples)
        ids = torch.full((len(examples), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, e in enumerate(examples):  # right padding: positions of real tokens are 0..n-1
            ids[row, : len(e.input_ids)] = torch.tensor(e.input_ids)
            mask[row, : len(e.input_ids)] = 1
        with torch.no_grad():
            scalings = model.compute_scalings(ids.to(model.device), mask.to(model.device)).float().cpu()
        for row, e in enumerate(examples):
            n = len(e.input_ids)
            sources = ["prompt" if label == IGNORE else "completion" for label in e.labels]
            if "text" in chunk[row]:
                sources = ["text"] * n
            recorder.add(scalings[row, :n], e.input_ids, sequence=start + row, domain=e.domain, sources=sources)
            bucket = kept.setdefault(e.domain, [])
            if len(bucket) < keep:
                bucket.append(
                    {
                        "ids": e.input_ids,
                        "scalings": scalings[row, :n],
                        "domain": e.domain,
                        "sources": sources,
                        "sequence": start + row,
                    }
                )
        bar.update(len(chunk))
    bar.close()
    return [x for bucket in kept.values() for x in bucket]
