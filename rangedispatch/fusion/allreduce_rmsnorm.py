"""The fusion pass: in ranges where it pays, each all-reduce -> (+ residual) -> RMSNorm (-> FP8
quant) site becomes one ``fused_allreduce_rmsnorm`` call.

Where it pays comes from the hardware profile, in bytes of one rank's all-reduce input. The pass
reads bytes per token (hidden x dtype size) and the process group of every all-reduce in the
traced graphs, turns the most restrictive threshold into a token count and asks for it as a split
point, so that one range ends exactly where fusion stops paying.
"""

from __future__ import annotations

import logging
import operator
from typing import Optional

import torch
import torch.fx

from rangedispatch.config.schema import HardwareConfig
from rangedispatch.fusion.matcher import FusionMatch, find_matches
from rangedispatch.fusion.sites import (
    AllReduceSite,
    all_reduce_sites,
    collective_counts,
    group_size,
    peer_memory_unsupported,
    source_digest,
)
from rangedispatch.passes import GraphPass
from rangedispatch.ranges import Range

log = logging.getLogger("rangedispatch")


class AllReduceRMSNormFusion(GraphPass):
    name = "allreduce_rmsnorm"
    inference_only = True
    output_op = "torch.ops.rangedispatch.fused_allreduce_rmsnorm.default"

    def __init__(self, hardware: HardwareConfig, backend: str, max_num_tokens: int):
        import rangedispatch.fusion.op  # noqa: F401  (registers the op before any cached graph calls it)

        self.hardware = hardware
        self.backend = backend
        self.max_num_tokens = max_num_tokens
        self.max_tokens: Optional[int] = None  # fuse ranges ending at or below this; None: not known yet
        self.sites: dict[tuple[str, int], int] = {}  # (group, bytes per token) -> fused token limit
        self.said_no_sites = False

    # -- before ranges are final -------------------------------------------------------------
    def split_points(self, gm: torch.fx.GraphModule) -> list[int]:
        sites = list(all_reduce_sites(gm))
        if not sites:
            self._say_no_all_reduce(gm)
        for site in sites:
            if site.key in self.sites:
                continue  # decided (and said) for an earlier site or graph
            reason = peer_memory_unsupported(site) or self._backend().site_unsupported(
                site.device, site.dtype, site.hidden, site.world_size)
            if reason is not None:
                log.info("fusion off for all-reduce %s: %s", site.node, reason)
                self.sites[site.key] = 0
                continue
            self.sites[site.key] = self._token_limit(site)
        if not self.sites:
            return []
        self.max_tokens = min(min(self.sites.values()), self.max_num_tokens)
        return [self.max_tokens] if self.max_tokens >= 1 else []

    def _say_no_all_reduce(self, gm: torch.fx.GraphModule) -> None:
        import torch.distributed as dist

        if self.said_no_sites or not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return
        self.said_no_sites = True
        counts = collective_counts(gm)
        seen = ", ".join(f"{k} x{v}" for k, v in sorted(counts.items())) or "none"
        note = ("; reduce-scatter sites (sequence parallelism) are not fused: their norm runs on a token shard"
                if any("reduce_scatter" in k for k in counts) else "")
        log.info("no all-reduce in a graph of this model (running on %d ranks): nothing to fuse; collectives: %s%s",
                 dist.get_world_size(), seen, note)

    def _backend(self):
        from rangedispatch.fusion import backends

        return backends.get(self.backend)

    def _token_limit(self, site: AllReduceSite) -> int:
        if site.world_size < 2:
            log.info("fusion off for group %s: world size %d has nothing to all-reduce across", site.group_name,
                     site.world_size)
            return 0
        max_bytes = self.hardware.thresholds_for(site.world_size).fused_max_bytes_for(site.hidden)
        limit = max_bytes // site.bytes_per_token
        log.info("fusion pays up to %d tokens for group %s (world size %d, hidden %d, %d bytes/token, hardware %s: "
                 "%d bytes)", limit, site.group_name, site.world_size, site.hidden, site.bytes_per_token,
                 self.hardware.name, max_bytes)
        return limit

    def applies(self, r: Range) -> bool:
        return self.max_tokens is not None and r.end <= self.max_tokens

    # -- inside Inductor -----------------------------------------------------------------------
    def __call__(self, graph: torch.fx.Graph, r: Range) -> int:
        # one site at a time: a rewrite replaces nodes (the next layer's residual) that later
        # matches would still point at
        fused, refused = 0, set()
        while True:
            matches, skipped = find_matches(graph)
            todo = [m for m in matches if m.out not in refused]
            if not todo:
                break
            if self._replace(graph, todo[0]):
                fused += 1
            else:
                refused.add(todo[0].out)
        for reason in skipped:
            log.info("not fused: %s", reason)
        return fused

    def _replace(self, graph: torch.fx.Graph, m: FusionMatch) -> bool:
        from rangedispatch.fusion.op import FUSED_OP

        order = {n: i for i, n in enumerate(graph.nodes)}
        args_at = max(order[a] for a in (m.input, m.residual, m.weight, m.scale) if isinstance(a, torch.fx.Node))
        site = set(m.dead)
        first_use = min((order[u] for n in (m.pre_norm, m.out) for u in n.users if u not in site), default=len(order))
        if args_at >= first_use:
            log.info("not fused: %s: an operand is computed after the fused outputs are used", m.input.name)
            return False
        anchor = next(n for n in graph.nodes if order[n] == args_at)
        with graph.inserting_after(anchor):
            fused = graph.call_function(
                FUSED_OP,
                (m.input, m.residual, m.weight, m.scale, m.eps, m.weight_mode, m.group_name, self.backend,
                 self.hardware.thresholds_for(group_size(m.group_name)).oneshot_max_bytes, self.max_tokens or 1),
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

    def config_key(self) -> str:
        t = sorted((k, v.fused_max_bytes, v.oneshot_max_bytes, sorted(v.fused_max_bytes_by_hidden.items()))
                   for k, v in self.hardware.thresholds.items())
        return f"v{source_digest()}|{self.hardware.name}|{t}|{self.backend}|max_tokens={self.max_tokens}"


def _fake_outputs(node: torch.fx.Node):
    args = [a.meta["val"] if isinstance(a, torch.fx.Node) else a for a in node.args]
    fake_mode = torch._guards.detect_fake_mode([a for a in args if isinstance(a, torch.Tensor)])
    with fake_mode:
        return node.target(*args)
