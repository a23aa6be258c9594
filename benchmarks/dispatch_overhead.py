"""Per-call overhead of RangeCompiledModule over calling the compiled artifact directly.

    python benchmarks/dispatch_overhead.py [--calls 20000] [--out benchmarks/results/dispatch_overhead.md]

A tiny module (one add on a [tokens, 16] tensor) keeps the compute negligible, so the difference is
what the wrapper costs: token count, range lookup, Dynamo's guards and our graph dispatch.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import time

import torch

from rangedispatch import RangeCompiledModule, load_config


class Tiny(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + 1.0


def _median_us(fn, calls: int, repeats: int = 7) -> float:
    for _ in range(calls // 10):
        fn()
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        samples.append((time.perf_counter() - t0) / calls * 1e6)
    return statistics.median(samples)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=20000)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--out", default=None, help="append a result row to this markdown file")
    args = ap.parse_args()
    torch.set_num_threads(1)

    m = RangeCompiledModule(Tiny(), load_config(["hardware=cpu", "fusion.enabled=false", "dispatch.split_points=[8,32]"]))
    x = torch.randn(args.tokens, 16)
    m(x)
    m(x)  # compiles the range
    r = m.range_for(args.tokens)
    graph = m.graphs[0]
    artifact = graph.artifacts[r]
    captured = []  # the graph's flattened inputs, as Dynamo's bytecode passes them
    original = type(graph).__call__
    type(graph).__call__ = lambda self, *a: captured.append(a) or original(self, *a)
    m._state.range = r
    m._compiled(x)  # Dynamo's guarded path reaches the graph through RangeGraph.__call__
    m._state.range = None
    type(graph).__call__ = original
    graph_args = captured[0]

    direct = _median_us(lambda: artifact(*graph_args), args.calls)
    wrapped = _median_us(lambda: m(x), args.calls)
    plain_compile = torch.compile(Tiny())
    torch._dynamo.mark_dynamic(x, 0)
    plain_compile(x)
    plain = _median_us(lambda: plain_compile(x), args.calls)
    overhead = wrapped - direct
    row = (
        f"| {datetime.date.today()} | {platform.processor() or platform.machine()} | torch {torch.__version__} | "
        f"{args.tokens} | {direct:.2f} | {wrapped:.2f} | {overhead:.2f} | {plain:.2f} |"
    )
    print("direct artifact call: %.2f us, RangeCompiledModule: %.2f us, overhead: %.2f us "
          "(plain torch.compile: %.2f us)" % (direct, wrapped, overhead, plain))
    if args.out:
        with open(args.out, "a") as f:
            f.write(row + "\n")
        print("appended to", args.out)


if __name__ == "__main__":
    main()
