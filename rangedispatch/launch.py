"""Run a function on N local ranks with a real process group (gloo on CPU, NCCL on GPUs).

Used by the demo and the tests: ``spawn_ranks(fn, 2, *args)`` starts 2 processes, initializes the
default process group in each, calls ``fn(rank, world_size, *args)`` and returns each rank's result.
Under ``torchrun`` (RANK/WORLD_SIZE set) use ``init_from_env`` instead.
"""

from __future__ import annotations

import os
import socket
import traceback
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world_size: int, port: int, backend: str, fn: Callable, args: tuple, queue: Any) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    try:
        if backend == "nccl":
            torch.cuda.set_device(rank)
        dist.init_process_group(backend, rank=rank, world_size=world_size)
        result = fn(rank, world_size, *args)
        queue.put((rank, "ok", result))
    except BaseException:
        queue.put((rank, "error", traceback.format_exc()))
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def spawn_ranks(fn: Callable, world_size: int, *args: Any, backend: Optional[str] = None) -> list:
    """``[fn(0, ws, *args), ..., fn(ws-1, ws, *args)]``, each in its own process."""
    backend = backend or ("nccl" if torch.cuda.is_available() and torch.cuda.device_count() >= world_size else "gloo")
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(r, world_size, port, backend, fn, args, queue)) for r in range(world_size)]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    errors = []
    for _ in procs:
        rank, status, value = queue.get()
        (results.__setitem__(rank, value) if status == "ok" else errors.append(f"rank {rank}:\n{value}"))
        if errors:
            break
    for p in procs:
        p.join(timeout=None if not errors else 10)
        if p.is_alive():
            p.terminate()
    if errors:
        raise RuntimeError("a rank failed\n" + "\n".join(errors))
    return [results[r] for r in range(world_size)]


def init_from_env(backend: Optional[str] = None) -> tuple[int, int]:
    """Initialize from torchrun's environment; ``(rank, world_size)``."""
    if not dist.is_initialized():
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend)
    return dist.get_rank(), dist.get_world_size()
