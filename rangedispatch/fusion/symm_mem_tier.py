"""The symmetric-memory tier: in the ranges above the fused sizes where the profile says it pays,
each remaining all-reduce becomes one ``symm_mem_all_reduce`` call (the norm after it stays compiled).

Three tiers per all-reduce, by bytes of one rank's input: fused one-shot (small), symmetric memory
(middle), NCCL (beyond the symmetric buffer). The fusion pass asks for the split point where fusion
stops; this pass asks for the two where its own tier starts and ends, so each range is in one tier.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import TYPE_CHECKING, Optional

import torch
import torch.fx

from rangedispatch.config.schema import HardwareConfig
from rangedispatch.fusion.sites import (
    ALL_REDUCE_TARGETS,
    AllReduceSite,
    all_reduce_sites,
    group_size,
    peer_memory_unsupported,
    source_digest,
)
from rangedispatch.passes import GraphPass
from rangedispatch.ranges import Range

if TYPE_CHECKING:
    from rangedispatch.fusion.allreduce_rmsnorm import AllReduceRMSNormFusion

log = logging.getLogger("rangedispatch")

_WAIT = torch.ops._c10d_functional.wait_tensor.default


class SymmMemAllReduce(GraphPass):
    name = "symm_mem_allreduce"
    inference_only = True
    output_op = "torch.ops.rangedispatch.symm_mem_all_reduce.default"

    def __init__(self, hardware: HardwareConfig, backend: str, max_num_tokens: int,
                 fused: Optional["AllReduceRMSNormFusion"] = None):
        """``fused``: the fusion pass, if on; this tier starts after its ``max_tokens`` (known once its
        ``split_points`` ran, which the wrapper calls in pass order)."""
        import rangedispatch.fusion.symm_mem  # noqa: F401  (registers the op before any cached graph calls it)

        self.hardware = hardware
        self.backend = backend
        self.max_num_tokens = max_num_tokens
        self.fused = fused
        self.sites: dict[tuple[str, int], tuple[int, int]] = {}  # (group, bytes per token) -> token span
        self.decided: set[tuple[str, int]] = set()
        self.first: Optional[int] = None  # the tier covers ranges inside [first, last]; None: no tier
        self.last: Optional[int] = None

    def split_points(self, gm: torch.fx.GraphModule) -> list[int]:
        from rangedispatch.fusion.symm_mem import site_unsupported

        for site in all_reduce_sites(gm):
            if site.key in self.decided:
                continue  # said once, for an earlier site or graph
            self.decided.add(site.key)
            if not self.hardware.thresholds_for(site.world_size).symm_mem_max_bytes:
                continue  # the profile gives no tier for this world size
            reason = peer_memory_unsupported(site) or site_unsupported(
                self.backend, site.device, site.dtype, site.hidden, site.world_size)
            if reason is not None:
                log.info("symm_mem tier off for all-reduce %s: %s", site.node, reason)
                continue
            span = self._token_span(site)
            if span is not None:
                self.sites[site.key] = span
        if not self.sites:
            return []
        fused_end = (self.fused.max_tokens or 0) if self.fused is not None else 0
        first = max(fused_end + 1, *(lo for lo, _ in self.sites.values()))
        last = min(self.max_num_tokens, *(hi for _, hi in self.sites.values()))
        if first > last:
            self.first = self.last = None
            return []
        self.first, self.last = first, last
        return [p for p in (first - 1, last) if p >= 1]

    def _token_span(self, site: AllReduceSite) -> Optional[tuple[int, int]]:
        t = self.hardware.thresholds_for(site.world_size)
        if not t.symm_mem_max_bytes:
            return None
        bpt = site.bytes_per_token
        lo, hi = max(1, -(-t.symm_mem_min_bytes // bpt)), t.symm_mem_max_bytes // bpt
        log.info("symm_mem tier for %d..%d tokens of group %s (world size %d, %d bytes/token, hardware %s: %d..%d "
                 "bytes)", lo, hi, site.group_name, site.world_size, bpt, self.hardware.name, t.symm_mem_min_bytes,
                 t.symm_mem_max_bytes)
        return (lo, hi) if lo <= hi else None

    def applies(self, r: Range) -> bool:
        return self.first is not None and r.start >= self.first and r.end <= self.last

    def __call__(self, graph: torch.fx.Graph, r: Range) -> int:
        from rangedispatch.fusion.symm_mem import SYMM_MEM_OP, site_unsupported

        replaced = 0
        for node in list(graph.nodes):
            if node.op != "call_function" or node.target not in ALL_REDUCE_TARGETS:
                continue
            inp, op, group_name = node.args[:3]
            val = inp.meta.get("val") if isinstance(inp, torch.fx.Node) else None
            waits = list(node.users)
            if op != "sum" or not isinstance(val, torch.Tensor) or not waits or any(u.target is not _WAIT for u in waits):
                log.info("symm_mem: all-reduce %s left to the process group (not a waited sum)", node.name)
                continue
            hidden = val.shape[-1] if val.dim() and not isinstance(val.shape[-1], torch.SymInt) else 0
            world = group_size(group_name)
            reason = site_unsupported(self.backend, val.device, val.dtype, int(hidden), world)
            if reason is not None:
                log.info("symm_mem: all-reduce %s left to the process group: %s", node.name, reason)
                continue
            t = self.hardware.thresholds_for(world)
            with graph.inserting_before(node):
                new = graph.call_function(SYMM_MEM_OP, (inp, group_name, self.backend, t.symm_mem_oneshot_max_bytes,
                                                        self.last or 1))
            new.meta["val"] = waits[0].meta.get("val", node.meta.get("val"))
            for w in waits:
                w.replace_all_uses_with(new)
                graph.erase_node(w)
            graph.erase_node(node)
            replaced += 1
        return replaced

    def config_key(self) -> str:
        t = sorted((k, dataclasses.astuple(v)) for k, v in self.hardware.thresholds.items())
        return f"v{source_digest()}|{self.hardware.name}|{t}|{self.backend}|tier={self.first}..{self.last}"
