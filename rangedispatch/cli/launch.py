"""Run a function on N local ranks with a real process group (gloo on CPU, NCCL on GPUs).

Used by the CLIs and the tests: ``spawn_ranks(fn, 2, *args)`` starts 2 processes with
``torch.multiprocessing``, initializes the default process group in each, calls
``fn(rank, world_size, *args)`` and returns each rank's result. ``torch.multiprocessing.spawn``
alone returns nothing, so results come back through a queue that is drained while the ranks run
(a rank blocks on a full pipe until it is read). The ranks meet through a file store in a temporary
folder: no port to pick. Under ``torchrun`` (RANK/WORLD_SIZE set) use ``init_from_env`` instead.
"""

from __future__ import annotations

import os
import queue
import tempfile
import time
import traceback
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from rangedispatch.cudagraphs import release_cuda_graphs


def _rank_entry(rank: int, world_size: int, store: str, backend: str, fn: Callable, args: tuple, results: Any) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, init_method=f"file://{store}", rank=rank, world_size=world_size)
    try:
        results.put((rank, True, fn(rank, world_size, *args)))
    except BaseException:
        results.put((rank, False, traceback.format_exc()))  # in order of failure: the first is the cause
        raise
    finally:
        if torch.cuda.is_initialized():  # destroying the group hangs while a graph holds its collectives
            torch.cuda.synchronize()
            release_cuda_graphs()
        dist.destroy_process_group()


def spawn_ranks(fn: Callable, world_size: int, *args: Any, backend: Optional[str] = None,
                timeout: Optional[float] = None) -> list:
    """``[fn(0, ws, *args), ..., fn(ws-1, ws, *args)]``, each in its own process. A failing rank
    stops the others; the error names the first rank that failed, with its traceback (the others
    usually fail after it, of a lost peer). ``timeout`` (seconds): ranks still running then are
    stopped and ``TimeoutError`` names them (a hang fails instead of blocking)."""
    backend = backend or ("nccl" if torch.cuda.is_available() and torch.cuda.device_count() >= world_size else "gloo")
    results_queue = mp.get_context("spawn").Queue()
    results: dict[int, Any] = {}
    failures: list[str] = []

    def drain() -> None:
        while True:
            try:
                rank, ok, value = results_queue.get_nowait()
            except queue.Empty:
                return
            if ok:
                results[rank] = value
            else:
                failures.append(f"rank {rank} failed first:\n{value}")

    with tempfile.TemporaryDirectory(prefix="rangedispatch-") as folder:
        ranks = mp.start_processes(_rank_entry, nprocs=world_size, join=False, start_method="spawn",
                                   args=(world_size, os.path.join(folder, "store"), backend, fn, args, results_queue))
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            while not ranks.join(timeout=0.1):
                drain()
                if deadline is not None and time.monotonic() > deadline:
                    running = [r for r, p in enumerate(ranks.processes) if p.is_alive()]
                    for p in ranks.processes:
                        p.kill()
                    raise TimeoutError(f"ranks {running} still running after {timeout:g} s (finished: "
                                       f"{sorted(results)}); killed")
        except (mp.ProcessRaisedException, mp.ProcessExitedException) as e:
            drain()
            raise RuntimeError(failures[0] if failures else str(e)) from None
    drain()
    return [results[r] for r in range(world_size)]


def init_from_env(backend: Optional[str] = None) -> tuple[int, int]:
    """Initialize from torchrun's environment; ``(rank, world_size)``."""
    if not dist.is_initialized():
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend)
    return dist.get_rank(), dist.get_world_size()
