"""The all-reduces of a traced graph, as the tier passes see them before ranges are final: which
process group, how many bytes per token, on what device and dtype."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
import torch.fx

from rangedispatch import torch_internals
from rangedispatch.hosts import hosts_of_group
from rangedispatch.passes import PassContext


@dataclass(frozen=True)
class AllReduceSite:
    node: str
    group_name: str
    world_size: int
    device: torch.device
    dtype: torch.dtype
    hidden: int  # the last dim when static, else 0
    bytes_per_token: int  # product of the static dims x dtype size
    hosts: int  # hosts the group's ranks live on

    @property
    def key(self) -> tuple[str, int]:
        return (self.group_name, self.bytes_per_token)


def group_size(group_name: str) -> int:
    """The size of the process group a traced collective names."""
    return torch_internals.resolve_process_group(group_name).size()


VECTOR_BYTES = 16  # the GPU kernels move rows in 16-byte vectors
_DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def gpu_row_unsupported(kernel: str, device: torch.device, dtype: torch.dtype, hidden: int,
                        dtypes: tuple[torch.dtype, ...]) -> Optional[str]:
    """Why a GPU all-reduce kernel cannot take rows of ``hidden`` x ``dtype`` on ``device``, or None."""
    if device.type != "cuda":
        return f"{kernel} needs CUDA tensors; this all-reduce is on {device}"
    if dtype not in dtypes:
        return f"{kernel}: dtype {dtype} not supported ({', '.join(_DTYPE_NAMES[d] for d in dtypes)})"
    if hidden <= 0 or (hidden * torch.finfo(dtype).bits // 8) % VECTOR_BYTES:
        return f"{kernel}: hidden size {hidden} x {dtype} is not a multiple of {VECTOR_BYTES} bytes"
    return None


def collective_graph(gm: torch.fx.GraphModule, ctx: PassContext) -> torch.fx.Graph:
    """Where ``gm``'s collectives are: the graph itself, or, for DTensor graphs, its post-grad graph."""
    return ctx.post_grad_graph or gm.graph


def all_reduce_sites(graph: torch.fx.Graph) -> Iterator[AllReduceSite]:
    """Every all-reduce of a traced graph whose input has a known fake value."""
    for node in graph.nodes:
        if node.op != "call_function" or node.target not in torch_internals.ALL_REDUCE_TARGETS:
            continue
        val = node.args[0].meta.get("example_value", node.args[0].meta.get("val"))
        if not isinstance(val, torch.Tensor):
            continue
        static = [s for s in val.shape if not isinstance(s, torch.SymInt)]
        hidden = val.shape[-1] if val.dim() and not isinstance(val.shape[-1], torch.SymInt) else 0
        yield AllReduceSite(node.name, node.args[2], group_size(node.args[2]), val.device, val.dtype, int(hidden),
                            math.prod(static) * val.element_size(), hosts_of_group(node.args[2]))


def peer_memory_unsupported(site: AllReduceSite) -> Optional[str]:
    """Why the peer-memory tiers (fused kernels, symmetric memory) cannot serve ``site``, or None."""
    if site.hosts > 1:
        return (f"group {site.group_name} spans {site.hosts} hosts; the one/two-shot kernels and symmetric memory "
                "need every rank on one host (peer memory): NCCL at every size")
    return None


def collective_counts(graph: torch.fx.Graph) -> dict[str, int]:
    """How many of each functional collective a traced graph holds (for log lines)."""
    counts: dict[str, int] = {}
    for node in graph.nodes:
        name = torch_internals.functional_collective(node.target) if node.op == "call_function" else None
        if name is not None:
            counts[name] = counts.get(name, 0) + 1
    return counts
