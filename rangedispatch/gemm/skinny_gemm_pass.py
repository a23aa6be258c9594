"""The skinny-GEMM pass: in ranges of at most ``hardware.skinny_gemm_max_tokens`` tokens, the
matmuls of linear layers (``mm``/``addmm`` of the activations and a transposed ``[N, K]`` weight)
become ``torch.ops.rangedispatch.skinny_mm`` where ``skinny_gemm_tuning`` found a tile configuration
faster than cuBLAS at that range's sizes.

Matmuls that read the same input (q/k/v, gate/up: each linear layer reshapes that input on its own)
and whose weights are inputs of the graph are tried as one launch first; where no configuration
beats cuBLAS for the group, each is tried alone.

The pass asks for split points at each power of two from 16 up to the token limit (and the limit
itself), so the decode sizes get ranges of their own, each timed at its own ends: with tiles as tall
as its end up to 64 rows, with row blocks of 64 beyond.
Matmuls it cannot take (not CUDA, other dtypes or layouts, rows that are not the token count, Triton
missing) stay with cuBLAS, said once per reason.
"""

from __future__ import annotations

import importlib.util
import logging
import operator
from pathlib import Path
from typing import NamedTuple, Optional

import torch
import torch.fx

from rangedispatch.gemm.skinny_gemm_op import MAX_WEIGHTS, SKINNY_MM_OP, TileConfig, block_m_for, unsupported
from rangedispatch.passes import RESHAPE_OPS, GraphPass, PassContext, source_digest
from rangedispatch.ranges import Range

log = logging.getLogger("rangedispatch")

_MM = torch.ops.aten.mm.default
_ADDMM = torch.ops.aten.addmm.default
_WEIGHT_VIEWS = (*RESHAPE_OPS, torch.ops.aten.t.default, torch.ops.aten.permute.default, torch.ops.aten.transpose.int)


class _Matmul(NamedTuple):
    node: torch.fx.Node
    a: torch.fx.Node
    b: torch.fx.Node
    bias: Optional[torch.fx.Node]


def _operands(node: torch.fx.Node) -> Optional[tuple[torch.fx.Node, torch.fx.Node, Optional[torch.fx.Node]]]:
    """``(a, b, bias)`` of a plain ``a @ b`` or ``bias + a @ b``; None for anything else."""
    if node.target is _MM and len(node.args) == 2 and not node.kwargs:
        a, b = node.args
        bias = None
    elif node.target is _ADDMM and len(node.args) == 3 and node.kwargs.get("beta", 1) == 1 \
            and node.kwargs.get("alpha", 1) == 1:
        bias, a, b = node.args
    else:
        return None
    if not all(isinstance(x, torch.fx.Node) and isinstance(x.meta.get("val"), torch.Tensor)
               for x in (a, b, bias) if x is not None):
        return None
    return a, b, bias


def _input_key(a: torch.fx.Node) -> tuple:
    """What a matmul reads, seen through a view: two views of one tensor with the same shape are one
    input."""
    if a.op == "call_function" and a.target in RESHAPE_OPS:
        return (a.args[0], tuple(a.args[1]))
    return (a,)


def _graph_input(node: Optional[torch.fx.Node]) -> bool:
    """Whether ``node`` is an input of the graph (a weight, a bias) or a view of one. Only such
    operands go into a group: one computed in the graph could depend on another member's output."""
    while node is not None and node.op == "call_function" and node.target in _WEIGHT_VIEWS:
        node = node.args[0]
    return node is None or node.op in ("placeholder", "get_attr")


class SkinnyGemm(GraphPass):
    name = "skinny_gemm"
    inference_only = True  # the op has no backward
    output_ops = ("torch.ops.rangedispatch.skinny_mm.default",)

    def __init__(self, max_tokens: int, mode: str = "tuned"):
        self.max_tokens = max_tokens  # ranges ending at or below this many tokens
        self.mode = mode  # "tuned": where faster than cuBLAS; "always": every matmul it can take
        self._said: set[str] = set()

    def split_points(self, gm: torch.fx.GraphModule, ctx: PassContext) -> list[int]:
        """Powers of two from the smallest tile height up to the limit: a range of 2-32 tokens would
        otherwise run 32-row tiles at 2 rows and give up configurations that win at 16."""
        points, height = [], block_m_for(1)
        while height < self.max_tokens:
            points.append(height)
            height *= 2
        return [*points, self.max_tokens]

    def applies(self, r: Range) -> bool:
        return r.end <= self.max_tokens

    def __call__(self, graph: torch.fx.Graph, ctx: PassContext) -> int:
        from torch._inductor.pattern_matcher import stable_topological_sort

        r = ctx.range
        launches = 0
        groups = self._groups(graph, ctx)
        if groups and not importlib.util.find_spec("triton"):
            self._say("skinny GEMM: matmuls left as they are: Triton is not installed")
            return 0
        for group in groups:
            for chunk in (group[i:i + MAX_WEIGHTS] for i in range(0, len(group), MAX_WEIGHTS)):
                if (cfg := self._choose(chunk, r)) is not None:
                    _replace(graph, chunk, cfg)
                    launches += 1
                elif len(chunk) > 1:  # no launch of the whole group beats cuBLAS: each matmul alone
                    for matmul in chunk:
                        if (cfg := self._choose([matmul], r)) is not None:
                            _replace(graph, [matmul], cfg)
                            launches += 1
        if launches:
            stable_topological_sort(graph)  # a group's op needs every member's weight before it
        return launches  # matches are launches, as output_ops counts them in the generated code

    def _groups(self, graph: torch.fx.Graph, ctx: PassContext) -> list[list[_Matmul]]:
        """The matmuls the op can take, grouped by the input they read (and bias or not); a matmul
        whose weight or bias the graph computes stays alone."""
        groups: dict[tuple, list[_Matmul]] = {}
        for node in graph.nodes:
            if node.op != "call_function" or (ops := _operands(node)) is None:
                continue
            a, b, bias = ops
            va, vb = a.meta["val"], b.meta["val"]
            reason = _rows_beyond(va.shape[0], ctx) or unsupported(va, vb, bias.meta["val"] if bias is not None else None)
            if reason is not None:
                self._say(f"skinny GEMM: matmuls left as they are: {reason}")
                continue
            key = (_input_key(a), bias is not None) if _graph_input(b) and _graph_input(bias) else (node,)
            groups.setdefault(key, []).append(_Matmul(node, a, b, bias))
        return list(groups.values())

    def _choose(self, matmuls: list[_Matmul], r: Range) -> Optional[TileConfig]:
        from rangedispatch.gemm.skinny_gemm_tuning import choose

        va, vb = matmuls[0].a.meta["val"], matmuls[0].b.meta["val"]
        ns = tuple(int(m.b.meta["val"].shape[1]) for m in matmuls)
        return choose(va.device, va.dtype, ns, int(vb.shape[0]), matmuls[0].bias is not None, r,
                      always=self.mode == "always")

    def _say(self, message: str) -> None:
        if message not in self._said:
            self._said.add(message)
            log.info("%s", message)

    def config_key(self) -> str:
        return f"v{source_digest(Path(__file__).parent)}|{self.max_tokens}|{self.mode}"


def _replace(graph: torch.fx.Graph, matmuls: list[_Matmul], cfg: TileConfig) -> None:
    """One ``skinny_mm`` for ``matmuls`` (which read one input); each one's users read its item."""
    first = matmuls[0]
    biases = [m.bias for m in matmuls] if first.bias is not None else []
    with graph.inserting_before(first.node):
        op = graph.call_function(SKINNY_MM_OP, (first.a, [m.b for m in matmuls], biases, list(cfg)))
        op.meta["val"] = [m.node.meta["val"] for m in matmuls]
        for i, m in enumerate(matmuls):
            item = graph.call_function(operator.getitem, (op, i))
            item.meta["val"] = m.node.meta["val"]
            m.node.replace_all_uses_with(item)
    for m in matmuls:
        graph.erase_node(m.node)


def _rows_beyond(rows: "int | torch.SymInt", ctx: PassContext) -> Optional[str]:
    """Why a matmul's rows are not the range's token count, or None. The tiles are timed for the
    range's sizes; rows that exceed them (``4 * tokens``, a cache length) would run a tile shape timed
    for something else. While a range compiles, the token count's size hint is the range's end."""
    at_end = ctx.size_hint(rows)
    if at_end is not None and at_end <= ctx.range.end:
        return None
    return f"{rows} rows, more than the {ctx.range.end} tokens at the range's end (not the token count)"
