"""Data parallelism for evaluation under `accelerate launch` (one machine or several): every process answers a
contiguous share of the items and every process gets all the answers back, in the items' order.

    items [0, n) ──split_between_processes──► process 0: [0, k)    process 1: [k, n)    ...
                                                   │ fn                   │ fn
                                                   └──── gather_object ───┘──► fn's results for [0, n), everywhere

Accelerate's `PartialState` does the work (no process-group code here). A plain `python` run is a world of one, where
`split_map(fn, items)` is `fn(items)`. Every process must call the same functions with the same items, in the same
order (they are collective operations): loramix's callers load the same records on every process.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch

from .errors import ConfigError

logger = logging.getLogger(__name__)

__all__ = ["agree", "finish", "processes", "same_on_every_process", "split_map", "threads_for_processes"]

T = TypeVar("T")
U = TypeVar("U")


def processes(state: Any = None) -> Any:
    """Accelerate's `PartialState`: the processes of this run (under `accelerate launch`, torchrun or a cluster
    launcher that sets RANK / WORLD_SIZE), or a world of one. `state` is returned as it is when given.

    On a machine without a GPU (or with ACCELERATE_USE_CPU set) the processes are CPU processes talking over gloo:
    a bare `PartialState()` there ignores the launch and every process believes it is alone (each would evaluate
    every record)."""
    if state is not None:
        return state
    from accelerate import PartialState

    state = PartialState(cpu=_cpu_only())
    if state.num_processes == 1 and _truthy("ACCELERATE_USE_CPU") and "MASTER_ADDR" in os.environ:
        logger.warning(
            "accelerate launch --cpu started one process: Accelerate runs several CPU processes only through mpirun "
            "(--mpirun_hostfile). For N CPU processes use `torchrun --nproc_per_node N -m loramix ...`, or "
            "`accelerate launch --multi_gpu --num_processes N` on a machine without GPUs (docs/scaling.md)"
        )
    return state


def _truthy(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _cpu_only() -> bool:
    """No accelerator that torch.distributed can use here, or the launcher asked for the CPU."""
    if _truthy("ACCELERATE_USE_CPU"):
        return True
    api = getattr(torch, "accelerator", None)
    if api is not None and hasattr(api, "current_accelerator"):
        device = api.current_accelerator()
        return device is None or device.type == "mps"
    return not torch.cuda.is_available()  # pragma: no cover (torch < 2.6)


def split_map(fn: Callable[[list[T]], Sequence[U]], items: Sequence[T], state: Any = None) -> list[U]:
    """`fn` over this process's contiguous share of `items` (Accelerate's `split_between_processes`: shares differ by
    one item at most, the first processes take the extra ones; a process may get none), one result per item; returns
    every process's results concatenated in process order, which is the items' order, on every process.
    `state=None` is a world of one (no split, no communication)."""
    items = list(items)
    if state is None or state.num_processes == 1:
        return _checked(fn(items), len(items))
    from accelerate.utils import gather_object

    with state.split_between_processes(items) as mine:
        mine = list(mine)
        mine_out = _checked(fn(mine), len(mine))
    gathered = gather_object(mine_out)
    if len(gathered) != len(items):  # pragma: no cover (a process called with other items)
        raise ConfigError(
            f"process {state.process_index}: gathered {len(gathered)} results for {len(items)} items; every process "
            "must evaluate the same records"
        )
    return gathered


def _checked(out: Sequence[U], n: int) -> list[U]:
    out = list(out)
    if len(out) != n:
        raise ValueError(f"split_map: fn returned {len(out)} results for {n} items; it must return one per item")
    return out


def same_on_every_process(value: T, state: Any = None) -> T:
    """The main process's `value`, on every process (Accelerate's `broadcast_object_list`); `value` itself in a
    world of one. For decisions only the main process can make, such as whether an output directory is writable."""
    if state is None or state.num_processes == 1:
        return value
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([value])[0]


def agree(settings: dict[str, Any], state: Any = None) -> None:
    """Every process's `settings` (option name -> value, any picklable values) must equal the main process's: each
    process gathers all of them (Accelerate's `gather_object`) and raises the same `ConfigError`, naming the first
    option that differs and both values, when one differs. A data-parallel command whose processes got different
    options would otherwise mix their answers under one label. Nothing to check in a world of one."""
    if state is None or state.num_processes == 1:
        return
    from accelerate.utils import gather_object

    everyone = gather_object([settings])
    for index, theirs in enumerate(everyone[1:], start=1):
        for name, value in everyone[0].items():
            if theirs.get(name) != value:
                raise ConfigError(
                    f"{name}: process {index} has {theirs.get(name)!r}, the main process {value!r}; every process of "
                    "a data-parallel run must get the same options"
                )


def threads_for_processes(state: Any = None) -> None:
    """Under a launch of several processes, 1 torch thread per process unless OMP_NUM_THREADS sets the number
    (`accelerate launch` and torchrun set it; other launchers may not, and N processes x all cores oversubscribe the
    CPU). A world of one keeps torch's default."""
    if state is not None and state.num_processes > 1 and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)
        logger.info("%d processes: 1 torch thread each (set OMP_NUM_THREADS to change it)", state.num_processes)


def finish(state: Any = None) -> None:
    """The end of a data-parallel command: wait for every process (the main one writes the results), then take the
    process group down. A gloo group left up when the interpreter exits can abort a process ("terminate called
    without an active exception", exit code -6) and fail the launch after the work is done."""
    if state is None or state.num_processes == 1:
        return
    state.wait_for_everyone()
    state.destroy_process_group()
