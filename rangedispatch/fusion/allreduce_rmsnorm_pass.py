"""The fusion pass: in ranges where it pays, each all-reduce -> (+ residual) -> RMSNorm (-> FP8
quant) site becomes one ``fused_allreduce_rmsnorm`` call.

Where it pays is the model's tier plan (``tier_plan.py``: the hardware profile's byte threshold
over every all-reduce site, as a token count); the pass asks for that count as a split point, so
that one range ends exactly where fusion stops paying.
"""

from __future__ import annotations

import logging
import operator

import torch
import torch.fx

from rangedispatch.fusion.allreduce_rmsnorm_op import FUSED_OP
from rangedispatch.fusion.matcher import FusionMatch, insertion_point, replace_each_site
from rangedispatch.fusion.sites import group_size
from rangedispatch.fusion.tier_plan import TierPass
from rangedispatch.ranges import Range

log = logging.getLogger("rangedispatch")


class AllReduceRMSNormFusion(TierPass):
    name = "allreduce_rmsnorm"
    output_op = "torch.ops.rangedispatch.fused_allreduce_rmsnorm.default"

    def split_points(self, gm: torch.fx.GraphModule) -> list[int]:
        self.plan.observe(gm)
        return [self.plan.fused_end] if self.plan.fused_end >= 1 else []

    def applies(self, r: Range) -> bool:
        return self.plan.fuses(r)

    # -- inside Inductor -----------------------------------------------------------------------
    def __call__(self, graph: torch.fx.Graph, r: Range) -> int:
        return replace_each_site(graph, lambda m: self._replace(graph, m), "fusion")

    def _replace(self, graph: torch.fx.Graph, m: FusionMatch) -> bool:
        anchor = insertion_point(graph, m)
        if anchor is None:
            log.info("not fused: %s: an operand is computed after the fused outputs are used", m.input.name)
            return False
        with graph.inserting_after(anchor):
            fused = graph.call_function(
                FUSED_OP,
                (m.input, m.residual, m.weight, m.scale, m.eps, m.weight_mode, m.group_name, self.plan.fused_backend,
                 self.plan.hardware.thresholds_for(group_size(m.group_name)).oneshot_max_bytes, self.plan.fused_end),
            )
        with graph.inserting_after(fused):
            out = graph.call_function(operator.getitem, (fused, 0))
        with graph.inserting_after(out):
            pre_norm = graph.call_function(operator.getitem, (fused, 1))
        fake_vals = _fake_outputs(fused)
        fused.meta["val"] = fake_vals
        out.meta["val"], pre_norm.meta["val"] = fake_vals
        m.out.replace_all_uses_with(out)
        m.pre_norm.replace_all_uses_with(pre_norm)
        for node in reversed(m.dead):
            if not node.users:
                graph.erase_node(node)
        return True


def _fake_outputs(node: torch.fx.Node):
    args = [a.meta["val"] if isinstance(a, torch.fx.Node) else a for a in node.args]
    fake_mode = torch._guards.detect_fake_mode([a for a in args if isinstance(a, torch.Tensor)])
    with fake_mode:
        return node.target(*args)
