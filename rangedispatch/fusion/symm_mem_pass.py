"""The symmetric-memory tier: in the ranges of the model's tier plan where it pays (above the fused
sizes), each all-reduce of a site the tier serves becomes one ``symm_mem_all_reduce`` call (the
norm after it stays compiled). The pass asks for split points at both ends of that span, so each
range is in one tier.
"""

from __future__ import annotations

import logging

import torch
import torch.fx

from rangedispatch import torch_internals
from rangedispatch.fusion.sites import group_size
from rangedispatch.fusion.symm_mem_op import SYMM_MEM_OP
from rangedispatch.fusion.tier_plan import TierPass
from rangedispatch.fusion.tiers import SYMM_MEM
from rangedispatch.passes import PassContext

log = logging.getLogger("rangedispatch")


class SymmMemAllReduce(TierPass):
    name = "symm_mem_allreduce"
    tier = SYMM_MEM
    output_ops = ("torch.ops.rangedispatch.symm_mem_all_reduce.default",)

    def __call__(self, graph: torch.fx.Graph, ctx: PassContext) -> int:
        _, last = self.plan.symm_span
        replaced = 0
        for node in list(graph.nodes):
            if node.op != "call_function" or node.target not in torch_internals.ALL_REDUCE_TARGETS:
                continue
            inp, op, group_name = node.args[:3]
            val = inp.meta.get("val") if isinstance(inp, torch.fx.Node) else None
            waits = list(node.users)
            if (op != "sum" or not isinstance(val, torch.Tensor) or not waits
                    or any(u.target is not torch_internals.FUNCTIONAL_WAIT for u in waits)):
                log.info("symm_mem: all-reduce %s left to the process group (not a waited sum)", node.name)
                continue
            hidden = val.shape[-1] if val.dim() and not isinstance(val.shape[-1], torch.SymInt) else 0
            if not self.plan.symm_serves(group_name, val.dtype, int(hidden)):
                log.info("symm_mem: all-reduce %s left to the process group (not a site the tier serves)", node.name)
                continue
            oneshot_max_bytes = self.plan.hardware.thresholds_for(group_size(group_name)).symm_mem_oneshot_max_bytes
            with graph.inserting_before(node):
                new = graph.call_function(SYMM_MEM_OP, (inp, group_name, self.backend, oneshot_max_bytes, last))
            new.meta["val"] = waits[0].meta.get("val", node.meta.get("val"))
            for w in waits:
                w.replace_all_uses_with(new)
                graph.erase_node(w)
            graph.erase_node(node)
            replaced += 1
        return replaced
