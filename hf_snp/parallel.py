"""Several processes on torch.distributed (``torchrun`` or ``accelerate launch``): which process this is, and the
few collectives a pruning run needs (docs/design.md §8.7).

A run is data-parallel over calibration batches and site-parallel over decisions. Without a process group (no
``WORLD_SIZE`` > 1 in the environment and none initialised by the caller) every function here is the
single-process identity, so a plain run is unchanged.
"""

from __future__ import annotations

import datetime
import os
from typing import Any, Callable, Sequence, TypeVar

import torch

Item = TypeVar("Item")

# a collective that waits longer than this ends the run with an error instead of a hang (a rank that failed)
_JOINED: list[bool] = []  # whether this module initialised the process group
TIMEOUT = datetime.timedelta(seconds=float(os.environ.get("HF_SNP_DIST_TIMEOUT", "600")))


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def world_size() -> int:
    """The number of processes of the run (1 without a process group)."""
    return torch.distributed.get_world_size() if _distributed() else 1


def rank() -> int:
    """This process's rank (0 without a process group)."""
    return torch.distributed.get_rank() if _distributed() else 0


def is_main() -> bool:
    """True on the one process that writes files and pushes (rank 0)."""
    return rank() == 0


def backend_for(device: torch.device) -> str:
    """NCCL for CUDA devices, gloo otherwise."""
    return "nccl" if device.type == "cuda" else "gloo"


def init_from_environment(device: torch.device) -> bool:
    """Join the process group that ``torchrun`` / ``accelerate launch`` describe in the environment (``RANK``,
    ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``), with the backend of ``device``. Returns whether the run is
    distributed. A group the caller initialised is used as it is."""
    if _distributed():
        return world_size() > 1
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not torch.distributed.is_available():
        return False
    torch.distributed.init_process_group(backend=backend_for(device), timeout=TIMEOUT)
    _JOINED.append(True)
    return True


def leave() -> None:
    """Leave the process group that :func:`init_from_environment` joined (not one the caller initialised)."""
    if _JOINED and _distributed():
        torch.distributed.destroy_process_group()
    _JOINED.clear()


def local_device(device: torch.device) -> torch.device:
    """The execution device of this rank: ``cuda:LOCAL_RANK`` when several ranks share CUDA devices and the
    device names none, else ``device``."""
    if device.type == "cuda" and device.index is None and world_size() > 1:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank() % max(torch.cuda.device_count(), 1))))
    return device


def shard(items: Sequence[Item]) -> list[Item]:
    """This rank's contiguous share of ``items`` (the first ranks take one more when they do not divide evenly):
    which rank holds which item depends on the count and the world size only."""
    size, here = world_size(), rank()
    base, extra = divmod(len(items), size)
    start = here * base + min(here, extra)
    return list(items[start:start + base + (here < extra)])


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over the ranks, in place (gloo and NCCL both reduce float64)."""
    if world_size() > 1:
        torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM)
    return tensor


def sum_over_ranks(*values: float) -> tuple[float, ...]:
    """Each of ``values`` summed over the ranks (float64)."""
    if world_size() == 1:
        return values
    return tuple(all_reduce_sum(torch.tensor(values, dtype=torch.float64)).tolist())


def broadcast_object(value: Any, source: int) -> Any:
    """``value`` as rank ``source`` holds it, on every rank (tensors travel on the CPU)."""
    if world_size() == 1:
        return value
    box = [value if rank() == source else None]
    torch.distributed.broadcast_object_list(box, src=source)
    return box[0]


def all_gather_objects(value: Any) -> list[Any]:
    """Every rank's ``value``, in rank order."""
    if world_size() == 1:
        return [value]
    gathered: list[Any] = [None] * world_size()
    torch.distributed.all_gather_object(gathered, value)
    return gathered


def barrier() -> None:
    if world_size() > 1:
        torch.distributed.barrier()


def owner(position: int) -> int:
    """The rank that decides item ``position`` of a block's sites (round-robin)."""
    return position % world_size()


def spread(function: Callable[[Item], Any], items: Sequence[Item]) -> list[Any]:
    """``function(item)`` for every item, each computed on one rank (``owner``) and broadcast to all, in order.
    Results must pickle, with their tensors on the CPU (a rank unpickles them on its own device)."""
    if world_size() == 1:
        return [function(item) for item in items]
    mine = {position: function(item) for position, item in enumerate(items) if owner(position) == rank()}
    return [broadcast_object(mine.get(position), owner(position)) for position in range(len(items))]


def raise_if_any_failed(error: BaseException | None) -> None:
    """Exchange every rank's outcome; raise on all ranks when one failed, naming the rank and its error
    (a collective: every rank calls it, failed or not)."""
    if world_size() == 1:
        if error is not None:
            raise error
        return
    outcomes = all_gather_objects(None if error is None else f"{type(error).__name__}: {error}")
    failed = [(index, message) for index, message in enumerate(outcomes) if message is not None]
    if failed:
        index, message = failed[0]
        raise RuntimeError(f"rank {index} of {world_size()} failed: {message}") from error
