"""Loopback helpers for the tests that start servers or process groups."""

from __future__ import annotations

import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rank_worker(rank: int, world: int, port: int, folder: str, compute: Callable) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        torch.save(compute(rank), f"{folder}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def run_on_ranks(compute: Callable[[int], Any], world: int, folder: Path) -> list[Any]:
    """``compute(rank)`` in ``world`` processes joined by a gloo process group on loopback;
    the results, by rank. ``compute`` must be a module-level function (it is pickled)."""
    mp.spawn(_rank_worker, args=(world, free_port(), str(folder), compute), nprocs=world, join=True)
    return [torch.load(Path(folder) / f"rank{r}.pt") for r in range(world)]
