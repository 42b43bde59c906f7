"""Small file helpers shared by checkpoints, experts, exports and training: JSON and safetensors with clear errors,
and atomic directory writes."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from .errors import CheckpointError, LoramixError

__all__ = ["atomic_directory", "read_json", "read_tensors", "save_tensors", "write_json"]


@contextlib.contextmanager
def atomic_directory(path: str | Path, *, overwrite: bool = True, marker: str | None = None) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces `path` in one rename, on failure it is removed.

    An existing `path` is replaced only if `overwrite` and (when `marker` is given) it contains that file, so a
    directory that is not ours is never deleted. Readers never see a half-written directory at `path`.
    """
    target = Path(path).expanduser().absolute()
    if target.exists():
        if not target.is_dir():
            raise CheckpointError(f"{target} exists and is not a directory")
        if any(target.iterdir()):
            if not overwrite:
                raise CheckpointError(f"{target} already exists; pass overwrite=True to replace it")
            if marker is not None and not (target / marker).exists():
                raise CheckpointError(f"{target} is a non-empty directory without {marker}; refusing to replace it")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        _fsync_tree(tmp)
        if target.exists():
            old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(target, old)
            os.rename(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _fsync_tree(root: Path) -> None:
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            with open(os.path.join(dirpath, name), "rb") as f:
                os.fsync(f.fileno())


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def save_tensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """safetensors file with contiguous CPU copies (shared or strided tensors are fine)."""
    from safetensors.torch import save_file

    save_file({k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}, str(path), metadata)


def read_tensors(
    path: Path, what: str, *, error: type[LoramixError] = CheckpointError, prefix: str = ""
) -> dict[str, torch.Tensor]:
    """A safetensors file as a dict of CPU tensors; a missing or unreadable file raises `error` naming it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise error(f"{prefix}{path} is missing ({what})")
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise error(f"{prefix}{path} is not a readable safetensors file ({str(exc).splitlines()[0]})") from None


def read_json(
    path: Path, what: str, *, error: type[LoramixError] = CheckpointError, prefix: str = ""
) -> dict[str, Any]:
    """A JSON object from `path`; a missing file, invalid JSON or another JSON type raises `error` naming the file."""
    if not path.is_file():
        raise error(f"{prefix}{path} is missing ({what})")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise error(f"{prefix}{path} is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise error(f"{prefix}{path} must hold a JSON object")
    return data
