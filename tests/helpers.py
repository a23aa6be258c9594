"""Test-only graph passes and models."""

import torch
import torch.fx

from rangedispatch import Range
from rangedispatch.passes import GraphPass, PassContext


class CensusPass(GraphPass):
    """Counts ops in each range's post-grad graph (after the passes before it), and applies only
    from ``min_start`` on: shows which ranges a pass ran in and what the graph holds."""

    name = "census"

    def __init__(self, min_start: int = 1):
        self.min_start = min_start
        self.seen: dict[Range, dict[str, int]] = {}

    def applies(self, r: Range) -> bool:
        return r.start >= self.min_start

    def __call__(self, graph: torch.fx.Graph, ctx: PassContext) -> int:
        counts: dict[str, int] = {}
        for n in graph.nodes:
            if n.op == "call_function":
                name = str(getattr(n.target, "__name__", n.target))
                counts[name] = counts.get(name, 0) + 1
        self.seen[ctx.range] = counts
        return 1

    def config_key(self) -> str:
        return f"census|{self.min_start}"


class AddmmCount(GraphPass):
    """Rewrites nothing; its ``output_ops`` are the matmul Inductor emits for ``nn.Linear`` on CPU, so
    its match count is read off the generated code, on a cache hit too."""

    name = "addmm_count"
    output_ops = ("extern_kernels.addmm",)

    def __call__(self, graph: torch.fx.Graph, ctx: PassContext) -> int:
        return 0


class Mlp(torch.nn.Module):
    def __init__(self, hidden: int = 16):
        super().__init__()
        self.lin = torch.nn.Linear(hidden, hidden)
        self.w = torch.nn.Parameter(torch.randn(hidden))

    def forward(self, x, residual):
        h = self.lin(x) + residual
        v = h.float().pow(2).mean(-1, keepdim=True)
        return self.w * (h * torch.rsqrt(v + 1e-6)).to(x.dtype)
