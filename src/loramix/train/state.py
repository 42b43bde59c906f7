"""Training state on disk without pickle: optimizer and RNG states as safetensors + JSON."""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..errors import CheckpointError
from ..io import read_json, write_json

__all__ = ["load_optimizer", "load_rng", "save_optimizer", "save_rng"]


def save_optimizer(optimizer: torch.optim.Optimizer, directory: Path, names: list[str]) -> None:
    """optimizer.state_dict() as optimizer.safetensors (per-parameter state tensors, keyed by parameter name) and
    optimizer.json (param_groups and the non-tensor state)."""
    state = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, float | int]] = {}
    for index, values in state["state"].items():
        name = names[index]
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{name}::{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(name, {})[key] = value
    save_file(tensors, str(directory / "optimizer.safetensors"))
    meta = {"param_groups": state["param_groups"], "scalars": scalars, "names": names}
    write_json(directory / "optimizer.json", meta)


def load_optimizer(optimizer: torch.optim.Optimizer, directory: Path, names: list[str]) -> None:
    meta = read_json(directory / "optimizer.json", "the optimizer state")
    if meta.get("names") != names:
        raise CheckpointError(f"{directory / 'optimizer.json'}: the optimizer was saved for other parameters")
    tensors = load_file(str(directory / "optimizer.safetensors"))
    state: dict[int, dict[str, object]] = {}
    for key, tensor in tensors.items():
        name, _, field = key.rpartition("::")
        state.setdefault(names.index(name), {})[field] = tensor
    for name, values in meta["scalars"].items():
        state.setdefault(names.index(name), {}).update(values)
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def save_rng(path: Path) -> None:
    """This process's torch (CPU and CUDA) and Python RNG states."""
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = s
    version, values, gauss = random.getstate()
    save_file(tensors, str(path), {"python": json.dumps([version, list(values), gauss])})


def load_rng(path: Path) -> None:
    from safetensors import safe_open

    if not path.is_file():
        raise CheckpointError(f"{path} is missing (random states of this process)")
    tensors = load_file(str(path))
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("torch_cuda_")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    with safe_open(str(path), "pt") as f:
        version, values, gauss = json.loads(f.metadata()["python"])
    random.setstate((version, tuple(values), gauss))
