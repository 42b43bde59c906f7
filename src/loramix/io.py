"""Small file helpers shared by checkpoints, experts, exports, training and reports: JSON and safetensors with clear
errors, and atomic directory writes that never replace what loramix did not write.

Ownership: every directory written through `atomic_directory` carries a manifest (`.loramix-written.json`) listing
the files that the writer put there. An existing directory is replaced only when every file in it is listed in its
manifest (or, for directories written before manifests existed, matches the writer's known names): a file a user
added, or a directory that some other tool wrote, makes the command refuse with one line instead of deleting it.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import os
import shutil
import uuid
from collections.abc import Collection, Iterator
from pathlib import Path
from typing import Any

import torch

from .errors import CheckpointError, LoramixError

__all__ = [
    "MANIFEST",
    "atomic_directory",
    "check_finite",
    "check_owned_files",
    "check_replaceable",
    "follow_umask",
    "fsync_tree",
    "read_json",
    "read_tensors",
    "save_tensors",
    "write_json",
    "write_owned_files",
    "write_text_atomic",
]

MANIFEST = ".loramix-written.json"
_TMP_TAG = ".tmp-"
_OLD_TAG = ".old-"


def _files_under(root: Path) -> list[str]:
    """Every file (or link, or other non-directory entry) under `root`, as POSIX paths relative to it."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel = Path(dirpath).relative_to(root)
        out += [(rel / name).as_posix() for name in filenames]
        out += [(rel / name).as_posix() for name in dirnames if os.path.islink(os.path.join(dirpath, name))]
    return sorted(out)


def _written_files(target: Path) -> set[str] | None:
    """The files the manifest of `target` says loramix wrote, or None if it has no readable manifest."""
    try:
        data = json.loads((target / MANIFEST).read_text())
    except (OSError, ValueError, RecursionError):
        return None
    files = data.get("files") if isinstance(data, dict) else None
    return {f for f in files if isinstance(f, str)} if isinstance(files, list) else None


def check_replaceable(
    path: str | Path, *, marker: str, owned: Collection[str] = (), overwrite: bool = True, what: str = "output"
) -> Path:
    """Raise `CheckpointError` unless `path` may be (re)written: absent, empty, or a complete directory that loramix
    wrote (its `marker` file present, and every file in it written by loramix). Returns the absolute path.

    owned: glob patterns of top-level names the writer produces, accepted for directories without a manifest (written
    by an older loramix). Call it before long work (training) so that a bad output path fails at once.
    """
    target = Path(path).expanduser().absolute()
    if not target.exists() and not target.is_symlink():
        return target
    if not target.is_dir() or target.is_symlink():
        raise CheckpointError(f"{what} {target} exists and is not a directory; choose another path")
    try:
        files = _files_under(target)
    except PermissionError:
        raise CheckpointError(f"{what} {target}: permission denied while listing it") from None
    if not files:
        return target
    if not overwrite:
        raise CheckpointError(f"{what} {target} already exists; pass overwrite=True to replace it")
    if not (target / marker).exists():
        raise CheckpointError(
            f"{what} {target} is a non-empty directory without {marker}, so loramix did not write it; refusing to "
            "replace it (choose another path)"
        )
    written = _written_files(target)
    if written is None and not owned:
        raise CheckpointError(
            f"{what} {target} was not written by this command (it has no {MANIFEST}); refusing to replace it "
            "(choose another path)"
        )
    for name in files:
        if name == MANIFEST:
            continue
        ours = name in written if written is not None else any(fnmatch.fnmatch(name.split("/")[0], p) for p in owned)
        if not ours:
            raise CheckpointError(
                f"{what} {target} holds '{name}', which loramix did not write; refusing to replace the directory "
                "(move that file away, or choose another path)"
            )
    return target


def check_owned_files(directory: str | Path, names: Collection[str], *, what: str = "output") -> Path:
    """Raise `CheckpointError` if a file of `names` exists in `directory` and loramix did not write it (it is not in
    the directory's manifest). Returns the directory's absolute path."""
    root = Path(directory).expanduser().absolute()
    if root.exists() and not root.is_dir():
        raise CheckpointError(f"{what} {root} exists and is not a directory; choose another path")
    written = _written_files(root) or set()
    for name in names:
        if (root / name).exists() and name not in written:
            raise CheckpointError(
                f"{what} {root / name} exists and loramix did not write it; refusing to overwrite it (move it away, "
                "or choose another directory)"
            )
    return root


def write_owned_files(directory: str | Path, files: dict[str, str], *, what: str = "output") -> None:
    """Write text files into `directory` (created if needed), each replaced atomically, and add them to its manifest.
    A file of the same name that loramix did not write is never overwritten (see `check_owned_files`)."""
    root = check_owned_files(directory, files, what=what)
    root.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        write_text_atomic(root / name, text)
    written = sorted((_written_files(root) or set()) | set(files))
    write_text_atomic(root / MANIFEST, json.dumps({"written_by": "loramix", "files": written}, indent=2) + "\n")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    return True


def _clean_stale(target: Path) -> None:
    """Remove the siblings a killed write to `target` left behind, once its process is gone: `.NAME.tmp-PID-*` (the
    new directory being written) and `.NAME.old-PID-*` (the previous one, renamed aside between the two renames that
    replace it; earlier versions named it `.NAME.old-XXXXXXXX`, without the process id)."""
    for tag in (_TMP_TAG, _OLD_TAG):
        prefix = f".{target.name}{tag}"
        for entry in target.parent.glob(f"{prefix}*"):
            if not entry.is_dir() or entry.is_symlink():
                continue
            rest = entry.name[len(prefix) :]
            pid, sep, _ = rest.partition("-")
            legacy = tag == _OLD_TAG and not sep and len(rest) == 8  # an old-style name: no process to ask
            if legacy or (pid.isascii() and pid.isdigit() and not _pid_alive(int(pid))):
                shutil.rmtree(entry, ignore_errors=True)


def _umask() -> int:
    """The process's umask (read from /proc where it can be, without changing it; else set and restored)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def follow_umask(root: Path) -> None:
    """Give every file under `root` the mode a new file gets from the umask (0644 under 022): safetensors and
    `save_pretrained` write their files 0600 whatever the umask, unlike every other file of an output directory."""
    mode = 0o666 & ~_umask()
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            path = os.path.join(dirpath, name)
            if not os.path.islink(path):
                os.chmod(path, mode)


@contextlib.contextmanager
def atomic_directory(
    path: str | Path, *, marker: str, owned: Collection[str] = (), overwrite: bool = True, what: str = "output"
) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces `path` in one rename, on failure it is removed.

    `path` must pass `check_replaceable` (so a directory that is not loramix's is never deleted). The new directory
    gets a manifest of the files written into it, is created with the process's umask (its files too, see
    `follow_umask`), and readers never see it half-written. Siblings left by earlier writes that were killed are
    cleaned up first.
    """
    target = check_replaceable(path, marker=marker, owned=owned, overwrite=overwrite, what=what)
    target.parent.mkdir(parents=True, exist_ok=True)
    _clean_stale(target)
    tmp = target.parent / f".{target.name}{_TMP_TAG}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()  # not mkdtemp: its 0700 would ignore the umask
    try:
        yield tmp
        follow_umask(tmp)
        write_json(tmp / MANIFEST, {"written_by": "loramix", "files": [f for f in _files_under(tmp) if f != MANIFEST]})
        fsync_tree(tmp)
        if target.exists():
            check_replaceable(target, marker=marker, owned=owned, overwrite=overwrite, what=what)  # changed meanwhile?
            old = target.parent / f".{target.name}{_OLD_TAG}{os.getpid()}-{uuid.uuid4().hex[:8]}"
            os.rename(target, old)
            os.rename(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def fsync_tree(root: Path) -> None:
    """fsync every file under `root` (before a rename publishes it)."""
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            with open(os.path.join(dirpath, name), "rb") as f:
                os.fsync(f.fileno())


def write_json(path: Path, data: Any) -> None:
    """JSON into a file of a directory being written (inside `atomic_directory`); `write_text_atomic` elsewhere."""
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def write_text_atomic(path: Path, text: str) -> None:
    """Replace the file `path` by `text` in one rename: readers see the old or the new content, never a part."""
    tmp = path.parent / f".{path.name}{_TMP_TAG}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def save_tensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """safetensors file with contiguous CPU copies (shared or strided tensors are fine)."""
    from safetensors.torch import save_file

    save_file({k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}, str(path), metadata)


def _check_readable(path: Path, what: str, error: type[LoramixError], prefix: str) -> None:
    try:
        path.stat()
    except PermissionError:
        raise error(f"{prefix}{path}: permission denied ({what})") from None
    except OSError:
        raise error(f"{prefix}{path} is missing ({what})") from None
    if not path.is_file():
        raise error(f"{prefix}{path} is not a file ({what})")
    if not os.access(path, os.R_OK):
        raise error(f"{prefix}{path}: permission denied ({what})")


def check_finite(
    tensors: dict[str, torch.Tensor],
    where: Path | str,
    *,
    error: type[LoramixError] = CheckpointError,
    prefix: str = "",
    hint: str = "",
) -> None:
    """Raise `error` naming `where` and the tensor if a floating tensor holds NaN or Inf (it would poison every
    output)."""
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise error(f"{prefix}{where}: tensor '{name}' holds {bad} NaN/Inf value(s){hint}")


def read_tensors(
    path: Path, what: str, *, error: type[LoramixError] = CheckpointError, prefix: str = ""
) -> dict[str, torch.Tensor]:
    """A safetensors file as a dict of CPU tensors; a missing, unreadable or non-finite file raises `error`."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    _check_readable(path, what, error, prefix)
    try:
        tensors = load_file(str(path), device="cpu")
    except PermissionError:
        raise error(f"{prefix}{path}: permission denied ({what})") from None
    except (SafetensorError, OSError, ValueError) as exc:
        raise error(f"{prefix}{path} is not a readable safetensors file ({str(exc).splitlines()[0]})") from None
    check_finite(tensors, path, error=error, prefix=prefix, hint="; the file is corrupt or comes from a diverged run")
    return tensors


def read_json(
    path: Path, what: str, *, error: type[LoramixError] = CheckpointError, prefix: str = "", kind: type = dict
) -> Any:
    """A JSON value of type `kind` (an object by default) from `path`; a missing or unreadable file, invalid or too
    deeply nested JSON, or another JSON type raise `error` naming the file."""
    _check_readable(path, what, error, prefix)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except PermissionError:
        raise error(f"{prefix}{path}: permission denied ({what})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise error(f"{prefix}{path} is not valid JSON ({exc})") from None
    except RecursionError:
        raise error(f"{prefix}{path} is nested too deeply to be a {what}") from None
    if not isinstance(data, kind):
        raise error(f"{prefix}{path} must hold a JSON {'object' if kind is dict else kind.__name__}")
    return data

