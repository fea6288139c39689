"""Running a function on N gloo processes of this machine, for the distributed tests."""

from __future__ import annotations

import os
import tempfile
from typing import Any, Callable

import torch
import torch.multiprocessing as mp


def _entry(index: int, world: int, init_file: str, out_dir: str, fn: Callable, args: tuple) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=index, world_size=world)
    try:
        torch.save(fn(*args), os.path.join(out_dir, f"rank{index}.pt"))
    finally:
        torch.distributed.destroy_process_group()


def run_ranks(world: int, fn: Callable, *args: Any) -> list[Any]:
    """``fn(*args)`` on ``world`` processes joined in one gloo group; each rank's return value, in rank order."""
    with tempfile.TemporaryDirectory() as out_dir:
        init_file = os.path.join(out_dir, "init")
        mp.start_processes(_entry, args=(world, init_file, out_dir, fn, args), nprocs=world, join=True,
                           start_method="spawn")
        return [torch.load(os.path.join(out_dir, f"rank{i}.pt"), weights_only=False) for i in range(world)]
