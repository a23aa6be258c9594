"""The fusion pass: in ranges where it pays, each all-reduce -> (+ residual) -> RMSNorm (-> FP8
quant) site becomes one ``fused_allreduce_rmsnorm`` call.

Where it pays is the model's tier plan (``tier_plan.py``: the hardware profile's byte threshold
over every all-reduce site, as a token count); the pass asks for that count as a split point, so
that one range ends exactly where fusion stops paying.
"""

from __future__ import annotations

import operator

import torch
import torch.fx

from rangedispatch.fusion.allreduce_rmsnorm_op import FUSED_OP
from rangedispatch.fusion.matcher import FusionMatch, replace_each_site, retire_site
from rangedispatch.fusion.replacement import call_with_value
from rangedispatch.fusion.sites import group_size
from rangedispatch.fusion.tier_plan import TierPass
from rangedispatch.fusion.tiers import FUSED
from rangedispatch.passes import PassContext


class AllReduceRMSNormFusion(TierPass):
    name = "allreduce_rmsnorm"
    tier = FUSED
    output_ops = ("torch.ops.rangedispatch.fused_allreduce_rmsnorm.default",)

    def __call__(self, graph: torch.fx.Graph, ctx: PassContext) -> int:
        return replace_each_site(graph, lambda m, anchor: self._replace(graph, m, anchor), "fusion")

    def _replace(self, graph: torch.fx.Graph, m: FusionMatch, anchor: torch.fx.Node) -> bool:
        with graph.inserting_before(anchor.next):
            fused = call_with_value(graph, FUSED_OP, (
                m.input, m.residual, m.weight, m.scale, m.eps, m.weight_mode, m.group_name, self.backend,
                self.plan.hardware.thresholds_for(group_size(m.group_name)).oneshot_max_bytes, self.plan.fused_end))
            out = call_with_value(graph, operator.getitem, (fused, 0))
            pre_norm = call_with_value(graph, operator.getitem, (fused, 1))
        retire_site(graph, m, out, pre_norm)
        return True
