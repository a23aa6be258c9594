"""Timing a callable on GPUs the way serving runs it: inside a CUDA graph of several calls, median
over replays, slowest rank. Falls back to CUDA events around eager calls where capture fails.

Each timed replay follows an untimed one on the same stream, so it starts when the previous one ends
on the device: the host's launch skew between ranks (after the barrier) is not timed. Collective
kernels wait for their peers, so timing from a host-side start added that skew, a few us per call
of noise at 10 calls per graph."""

from __future__ import annotations

import logging
import statistics
import time
from typing import Any, Callable

import torch
import torch.distributed as dist

log = logging.getLogger("rangedispatch")


def time_us(fn: Callable[[], Any], calls: int = 10, replays: int = 20) -> tuple[float, str]:
    """(microseconds per call, "cudagraph" | "events" | "cpu")."""
    if not torch.cuda.is_available():
        return _time_cpu(fn, calls, replays), "cpu"
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    try:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(calls):
                fn()
        run, method = graph.replay, "cudagraph"
    except Exception as e:  # some variants cannot be captured: time them eagerly, and say so
        log.warning("CUDA graph capture failed (%s: %s); timing with events", type(e).__name__, str(e)[:200])
        torch.cuda.synchronize()
        graph = None

        def run() -> None:
            for _ in range(calls):
                fn()

        method = "events"
    for _ in range(3):
        run()
    torch.cuda.synchronize()
    samples = []
    for _ in range(replays):
        if dist.is_initialized():
            dist.barrier()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        run()  # absorbs the ranks' launch skew; the timed replay queues right behind it
        start.record()
        run()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) * 1000 / calls)
    t = torch.tensor([statistics.median(samples)], device="cuda")
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    del graph
    return t.item(), method


def _time_cpu(fn: Callable[[], Any], calls: int, replays: int) -> float:
    for _ in range(3):
        fn()
    samples = []
    for _ in range(replays):
        if dist.is_initialized():
            dist.barrier()
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        samples.append((time.perf_counter() - start) * 1e6 / calls)
    t = torch.tensor([statistics.median(samples)])
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()
