"""Per-call overhead of RangeCompiledModule, both dispatch modes, against torch.compile.

    python benchmarks/dispatch_overhead.py [--calls 2000] [--out benchmarks/results/dispatch_overhead.md]

Small modules on a [16, 64] input keep the compute small, so the differences are what each path
costs per call. "artifact" calls the range's compiled Inductor graph directly with the inputs
Dynamo's bytecode passes it: the floor every mode pays. Overhead = time - artifact time.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import time

import torch
from torch import nn

from rangedispatch import RangeCompiledModule, load_config

HIDDEN = 64


class TwoLayerMlp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(HIDDEN, 4 * HIDDEN)
        self.down = nn.Linear(4 * HIDDEN, HIDDEN)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.relu(self.up(x)))


MODELS = {
    "nn.Linear": lambda: nn.Linear(HIDDEN, HIDDEN),
    "nn.Sequential": lambda: nn.Sequential(nn.Linear(HIDDEN, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, HIDDEN)),
    "2-layer MLP": TwoLayerMlp,
}


def _interleaved_medians_us(fns: dict, calls: int, rounds: int = 15) -> dict:
    """Median us per call of each function, timed in interleaved rounds so that the machine's
    drift (other load, frequency) hits every variant alike."""
    for fn in fns.values():
        for _ in range(calls // 10):
            fn()
    samples: dict = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            samples[name].append((time.perf_counter() - t0) / calls * 1e6)
    return {name: statistics.median(v) for name, v in samples.items()}


def _artifact_call(m: RangeCompiledModule, x: torch.Tensor):
    """The range's artifact with the flat inputs Dynamo's bytecode hands the graph."""
    graph = next(g for g in m.graphs if g.is_symbolic)
    artifact = graph.artifacts[m.range_for(x.shape[0])]
    captured = []
    original = type(graph).__call__
    type(graph).__call__ = lambda self, *a: captured.append(a) or original(self, *a)
    try:
        m(x)
    finally:
        type(graph).__call__ = original
    graph_args = captured[0]
    return lambda: artifact(*graph_args)


def measure(name: str, calls: int, tokens: int) -> dict:
    torch.manual_seed(0)
    model = MODELS[name]().eval()
    x = torch.randn(tokens, HIDDEN)
    fns = {}
    with torch.no_grad():
        for mode, guard_free in (("guards", False), ("guard_free", True)):
            m = RangeCompiledModule(model, load_config(["hardware=cpu", "fusion.enabled=false",
                                                        f"dispatch.skip_dynamo_guards={guard_free}"]))
            m(x)
            m(x)  # compiles the range; the guard-free path binds it
            fns[mode] = (lambda m: lambda: m(x))(m)
            if not guard_free:
                fns["artifact"] = _artifact_call(m, x)
        plain = torch.compile(model, dynamic=True)
        plain(x)
        fns["torch_compile"] = lambda: plain(x)
        return {"model": name, **_interleaved_medians_us(fns, calls)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--out", default=None, help="append the result rows to this markdown file")
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = [measure(name, args.calls, args.tokens) for name in MODELS]
    lines = []
    for r in rows:
        base = r["artifact"]
        compile_cost = r["torch_compile"] - base
        lines.append(
            f"| {datetime.date.today()} | {platform.machine()} | torch {torch.__version__} | {r['model']} | "
            f"{base:.2f} | {r['torch_compile']:.2f} | {r['guards']:.2f} | {r['guard_free']:.2f} | "
            f"{r['guards'] - r['torch_compile']:+.2f} | {(r['guard_free'] - base) / compile_cost:.2f} |")
    header = ("| date | cpu | torch | model | artifact us | torch.compile us | guards us | guard-free us | "
              "guards - torch.compile us | guard-free overhead / torch.compile overhead |")
    print(header)
    print("\n".join(lines))
    if args.out:
        with open(args.out, "a") as f:
            f.write("\n".join(lines) + "\n")
        print("appended to", args.out)


if __name__ == "__main__":
    main()
