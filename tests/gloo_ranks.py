"""Run a function on ``world`` spawned gloo ranks and collect what each returned (a JSON dict)."""

from __future__ import annotations

import json
import os
import socket
import time

import pytest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, fn, world: int, port: int, folder: str) -> None:
    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    results = {}
    try:
        fn(rank, world, results)
        dist.barrier()
    finally:
        with open(os.path.join(folder, f"rank{rank}.json"), "w") as f:
            json.dump(results, f)
        dist.destroy_process_group()


def run_ranks(fn, world: int, folder: str, timeout: float = 240) -> list[dict]:
    """``fn(rank, world, results)`` on each of ``world`` gloo ranks (a module-level function:
    it is pickled for ``spawn``); returns every rank's ``results``. A rank that raises keeps
    what it recorded; a hang fails the test after ``timeout`` seconds."""
    import torch.multiprocessing as mp

    ctx = mp.start_processes(
        _entry, args=(fn, world, _free_port(), folder), nprocs=world, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"the gloo ranks did not finish in {timeout} s (a hang in a collective?)")
    results = []
    for rank in range(world):
        with open(os.path.join(folder, f"rank{rank}.json")) as f:
            results.append(json.load(f))
    return results
