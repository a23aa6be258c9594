"""The skinny-GEMM pass: in ranges of at most ``hardware.skinny_gemm_max_tokens`` tokens, each
matmul of a linear layer (``mm``/``addmm`` of the activations and a transposed ``[N, K]`` weight)
becomes ``torch.ops.rangedispatch.skinny_mm`` where ``skinny_gemm_tuning`` found a tile
configuration faster than cuBLAS for its weight shape at that range's sizes.

The pass asks for split points at each tile height up to the token limit (16, 32, ... and the limit
itself), so the decode sizes get ranges of their own, each timed with tiles as tall as its end.
Matmuls it cannot take (not CUDA, other dtypes or layouts, rows that are not the token count, Triton
missing) stay with cuBLAS, said once per reason.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import Optional

import torch
import torch.fx

from rangedispatch.gemm.skinny_gemm_op import SKINNY_MM_OP, block_m_for, unsupported
from rangedispatch.passes import GraphPass, source_digest
from rangedispatch.ranges import Range

log = logging.getLogger("rangedispatch")

_MM = torch.ops.aten.mm.default
_ADDMM = torch.ops.aten.addmm.default


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


class SkinnyGemm(GraphPass):
    name = "skinny_gemm"
    inference_only = True  # the op has no backward
    output_ops = ("torch.ops.rangedispatch.skinny_mm.default",)

    def __init__(self, max_tokens: int, mode: str = "tuned"):
        self.max_tokens = max_tokens  # ranges ending at or below this many tokens
        self.mode = mode  # "tuned": where faster than cuBLAS; "always": every matmul it can take
        self._said: set[str] = set()

    def split_points(self, gm: torch.fx.GraphModule) -> list[int]:
        """Where the tile height (``block_m_for``) changes, up to the limit: a range of 2-32 tokens
        would otherwise run 32-row tiles at 2 rows and give up configurations that win at 16."""
        points, height = [], block_m_for(1)
        while height < self.max_tokens:
            points.append(height)
            height *= 2
        return [*points, self.max_tokens]

    def applies(self, r: Range) -> bool:
        return r.end <= self.max_tokens

    def __call__(self, graph: torch.fx.Graph, r: Range) -> int:
        from rangedispatch.gemm.skinny_gemm_tuning import choose

        replaced = 0
        for node in list(graph.nodes):
            if node.op != "call_function" or (ops := _operands(node)) is None:
                continue
            a, b, bias = ops
            va, vb = a.meta["val"], b.meta["val"]
            reason = (_rows_beyond(va.shape[0], r) or unsupported(va, vb, bias.meta["val"] if bias is not None else None)
                      or _no_triton())
            if reason is not None:
                self._say(f"skinny GEMM: matmuls left as they are: {reason}")
                continue
            n, k = int(vb.shape[1]), int(vb.shape[0])
            cfg = choose(va.device, va.dtype, n, k, bias is not None, r, always=self.mode == "always")
            if cfg is None:
                continue
            with graph.inserting_before(node):
                new = graph.call_function(SKINNY_MM_OP, (a, b, bias, list(cfg)))
            new.meta["val"] = node.meta["val"]
            node.replace_all_uses_with(new)
            graph.erase_node(node)
            replaced += 1
        return replaced

    def _say(self, message: str) -> None:
        if message not in self._said:
            self._said.add(message)
            log.info("%s", message)

    def config_key(self) -> str:
        return f"v{source_digest(Path(__file__).parent)}|{self.max_tokens}|{self.mode}"


def _rows_beyond(rows: "int | torch.SymInt", r: Range) -> Optional[str]:
    """Why a matmul's rows are not the range's token count, or None. The tiles are timed for the
    range's sizes; rows that exceed them (``4 * tokens``, a cache length) would run a tile shape timed
    for something else. While a range compiles, the token count's size hint is the range's end."""
    at_end: Optional[int] = rows if isinstance(rows, int) else None
    if isinstance(rows, torch.SymInt):
        from rangedispatch.graph_cache import size_hints

        value = rows.node.expr.xreplace(size_hints(rows.node.shape_env))
        at_end = int(value) if value.is_number else None
    if at_end is not None and at_end <= r.end:
        return None
    return f"{rows} rows, more than the {r.end} tokens at the range's end (not the token count)"


def _no_triton() -> Optional[str]:
    return None if importlib.util.find_spec("triton") else "Triton is not installed"
