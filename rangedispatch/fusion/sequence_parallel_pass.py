"""The sequence-parallel tier: in the ranges of the model's tier plan above the fused and
symmetric-memory sizes, each ``all_reduce -> (+ residual) -> RMSNorm (-> FP8 quant)`` site becomes

    reduce-scatter(input) -> + this rank's block of the residual -> RMSNorm (-> quant) -> all-gather

so the add and the norm run on 1/world of the tokens, and the bytes on the wire stay those of the
all-reduce (a reduce-scatter and an all-gather). The residual stream stays split: a site whose
residual is the previous site's sum takes that sum's block directly, and the whole sum is gathered
only where something else uses it (typically the last layer's output). The first residual (the
embedding output) is cut into blocks without communication. Token counts the world size does not
divide are padded inside the ops (``sequence_parallel_op.py``), so the tier covers whole ranges.

The replacement is written as a Python function over the site's operands (``replacement.py``).
"""

from __future__ import annotations

import torch
import torch.fx

from rangedispatch.fusion.matcher import FusionMatch, is_call, replace_each_site, retire_site
from rangedispatch.fusion.numerics import quantize_fp8, rms_norm
from rangedispatch.fusion.replacement import insert_replacement
from rangedispatch.fusion.sequence_parallel_op import SP_ALL_GATHER, sp_all_gather, sp_reduce_scatter, sp_shard
from rangedispatch.fusion.tier_plan import TierPass
from rangedispatch.fusion.tiers import SEQUENCE_PARALLEL
from rangedispatch.passes import PassContext


class SequenceParallel(TierPass):
    name = "sequence_parallel"
    tier = SEQUENCE_PARALLEL
    # a site's reduce-scatter, or the async-TP op that took it over (async_tp_pass.py)
    output_ops = ("torch.ops.rangedispatch.sp_reduce_scatter.default",
                  "torch.ops.rangedispatch.sp_matmul_reduce_scatter.default")

    def __call__(self, graph: torch.fx.Graph, ctx: PassContext) -> int:
        replaced = replace_each_site(graph, lambda m, anchor: self._replace(graph, m, anchor), "sequence parallelism")
        for node in list(graph.nodes):  # whole sums that no later site or other user needed
            if node.target is SP_ALL_GATHER and not node.users:
                graph.erase_node(node)
        return replaced

    def _replace(self, graph: torch.fx.Graph, m: FusionMatch, anchor: torch.fx.Node) -> bool:
        if not self.plan.sp_serves(m.group_name):
            return False
        # the previous site's sum, gathered: take its block instead
        residual_block = m.residual.args[0] if is_call(m.residual, SP_ALL_GATHER) else None
        residual = residual_block if residual_block is not None else m.residual
        operands = [n for n in (m.input, residual, m.weight, m.scale) if n is not None]
        replacement = _site_replacement(m, residual_is_block=residual_block is not None)
        out, _, whole_sum = insert_replacement(graph, replacement, operands, after=anchor)
        retire_site(graph, m, out, whole_sum)
        return True


def _site_replacement(m: FusionMatch, residual_is_block: bool):
    """``f(input, [residual], [weight], [scale]) -> (out, sum block, whole sum)`` for site ``m``."""
    group, eps, mode = m.group_name, m.eps, m.weight_mode
    has_residual, has_weight, has_scale = m.residual is not None, m.weight is not None, m.scale is not None

    def replacement(x: torch.Tensor, *rest: torch.Tensor):
        rest = list(rest)
        residual = rest.pop(0) if has_residual else None
        weight = rest.pop(0) if has_weight else None
        scale = rest.pop(0) if has_scale else None
        block = sp_reduce_scatter(x, group)
        if residual is not None:
            block = block + (residual if residual_is_block else sp_shard(residual, group))
        y = rms_norm(block, weight, eps, mode)
        if scale is not None:
            y = quantize_fp8(y, scale)
        return sp_all_gather(y, group, list(x.shape)), block, sp_all_gather(block, group, list(x.shape))

    return replacement

