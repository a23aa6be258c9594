"""One tier plan per wrapped model: for each all-reduce site of its traced graphs, the token counts
each tier (``tiers.py``) takes, and the rest, which stay with NCCL.

Every tier pass reads the plan rather than deciding for itself. The sites of a graph are
scanned once, every reason a tier cannot serve a site is checked (and said) once per site, and the
symmetric-memory tier starts after the fused one whatever order the passes run in.

Per site (process group x bytes per token), from the hardware profile at the group's world size::

    fused:  1 .. fused_max_bytes(hidden) // bytes_per_token tokens       (0: never)
    symm:   ceil(symm_mem_min_bytes / bpt) .. symm_mem_max_bytes // bpt  (None: never)
    sp:     ceil(sp_min_bytes(hidden) / bpt) .. max_num_tokens            (None: never)
    async:  ceil(async_tp_min_bytes(hidden) / bpt) .. max_num_tokens, inside sp   (None: never)

A range runs one tier for all of its sites, so the model's spans are the most restrictive ones:
fused ranges end at the smallest fused limit (a site that cannot be fused turns fusion off); the
symmetric-memory ranges lie after that and inside the span of every site that can use the tier
(the others stay with NCCL there); the sequence-parallel ranges lie after both, from the largest
start of the sites that can use it; async tensor parallelism, on top of it, from the largest start of
its sites. Split points at the span ends make each range fall in one tier.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.fx

from rangedispatch.config.schema import HardwareConfig
from rangedispatch.fusion.sites import (
    AllReduceSite,
    all_reduce_sites,
    collective_counts,
    collective_graph,
    peer_memory_unsupported,
)
from rangedispatch.fusion.tiers import ASYNC_TP, FUSED, SEQUENCE_PARALLEL, SYMM_MEM, Tier
from rangedispatch.passes import GraphPass, PassContext, source_digest
from rangedispatch.ranges import Range

log = logging.getLogger("rangedispatch")


@dataclass(frozen=True)
class SiteTiers:
    """What the profile and the backends allow for one site."""

    site: AllReduceSite
    fused_tokens: int  # fused up to this many tokens; 0: never
    symm_tokens: Optional[tuple[int, int]]  # where symmetric memory pays; None: never
    sp_from: Optional[int]  # sequence parallelism from this many tokens; None: never
    async_tp_from: Optional[int]  # async TP on top of it from this many tokens; None: never


class TierPlan:
    """The tiers of every all-reduce site one wrapped model traced. ``backends``: the tiers the
    config leaves on, each with the backend its op runs (``tiers.backend_for``); a tier left out
    (``fusion.symm_mem=false``, ``fusion.async_tp=false``) takes no sizes."""

    def __init__(self, hardware: HardwareConfig, backends: dict[Tier, str], max_num_tokens: int):
        self.hardware = hardware
        self.backends = backends
        self.max_num_tokens = max_num_tokens
        self.sites: dict[tuple[str, int], SiteTiers] = {}
        self._observed: set[int] = set()
        self._said_no_all_reduce = False

    # -- reading traced graphs ---------------------------------------------------------------
    def observe(self, gm: torch.fx.GraphModule, ctx: PassContext) -> None:
        """Add the sites of a traced graph (each graph once, each site decided once)."""
        if id(gm) in self._observed:
            return
        self._observed.add(id(gm))
        graph = collective_graph(gm, ctx)
        sites = list(all_reduce_sites(graph))
        if not sites:
            self._say_no_all_reduce(graph)
        for site in sites:
            if site.key not in self.sites:
                sp_from, fused = self._sp_from(site), self._fused_tokens(site)
                self.sites[site.key] = SiteTiers(site, fused, self._symm_tokens(site, fused), sp_from,
                                                 self._async_tp_from(site, sp_from) if sp_from is not None else None)

    def _fused_tokens(self, site: AllReduceSite) -> int:
        from rangedispatch.fusion import backends

        if site.world_size < 2:
            reason = f"world size {site.world_size} has nothing to all-reduce across"
        else:
            reason = peer_memory_unsupported(site) or backends.get(self.backends[FUSED]).site_unsupported(
                site.device, site.dtype, site.hidden, site.world_size)
        if reason is not None:
            log.info("fusion off for all-reduce %s: %s", site.node, reason)
            return 0
        max_bytes = self.hardware.thresholds_for(site.world_size).fused_max_bytes_for(site.hidden)
        limit = max_bytes // site.bytes_per_token
        where = "at every size" if limit >= self.max_num_tokens else f"up to {limit} tokens"
        log.info("fusion pays %s for group %s (world size %d, hidden %d, %d bytes/token, hardware %s: %d bytes)",
                 where, site.group_name, site.world_size, site.hidden, site.bytes_per_token, self.hardware.name,
                 max_bytes)
        return limit

    def _symm_tokens(self, site: AllReduceSite, fused: int) -> Optional[tuple[int, int]]:
        t = self.hardware.thresholds_for(site.world_size)
        if SYMM_MEM not in self.backends or not t.symm_mem_max_bytes:
            return None
        from rangedispatch.fusion.symm_mem_op import site_unsupported

        reason = peer_memory_unsupported(site) or site_unsupported(
            self.backends[SYMM_MEM], site.device, site.dtype, site.hidden, site.world_size)
        if reason is not None:
            log.info("symm_mem tier off for all-reduce %s: %s", site.node, reason)
            return None
        bpt = site.bytes_per_token
        lo, hi = max(1, -(-t.symm_mem_min_bytes // bpt)), t.symm_mem_max_bytes // bpt
        where = f"for {max(lo, fused + 1)}..{hi} tokens" if hi > fused else f"unused: its {lo}..{hi} tokens are fused"
        log.info("symm_mem tier %s of group %s (world size %d, %d bytes/token, hardware %s: %d..%d bytes)", where,
                 site.group_name, site.world_size, bpt, self.hardware.name, t.symm_mem_min_bytes, t.symm_mem_max_bytes)
        return (lo, hi) if lo <= hi else None

    def _sp_from(self, site: AllReduceSite) -> Optional[int]:
        min_bytes = self.hardware.thresholds_for(site.world_size).sp_min_bytes_for(site.hidden)
        if not min_bytes or site.world_size < 2:
            return None
        start = max(1, -(-min_bytes // site.bytes_per_token))
        log.info("sequence-parallel tier from %d tokens for group %s (world size %d, %d bytes/token, hardware %s: "
                 "from %d bytes)", start, site.group_name, site.world_size, site.bytes_per_token, self.hardware.name,
                 min_bytes)
        return start

    def _async_tp_from(self, site: AllReduceSite, sp_from: int) -> Optional[int]:
        min_bytes = self.hardware.thresholds_for(site.world_size).async_tp_min_bytes_for(site.hidden)
        if ASYNC_TP not in self.backends or not min_bytes:
            return None
        reason = peer_memory_unsupported(site)
        if reason is not None:
            log.info("async TP off for all-reduce %s: %s", site.node, reason)
            return None
        start = max(1, -(-min_bytes // site.bytes_per_token))
        log.info("async TP from %d tokens for group %s (with the sequence-parallel tier; hardware %s: from %d bytes)",
                 max(start, sp_from), site.group_name, self.hardware.name, min_bytes)
        return start

    def _say_no_all_reduce(self, graph: torch.fx.Graph) -> None:
        import torch.distributed as dist

        if self._said_no_all_reduce or not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return
        self._said_no_all_reduce = True
        counts = collective_counts(graph)
        seen = ", ".join(f"{k} x{v}" for k, v in sorted(counts.items())) or "none"
        note = ("; reduce-scatter sites (sequence parallelism) are not fused: their norm runs on a token shard"
                if any("reduce_scatter" in k for k in counts) else "")
        log.info("no all-reduce in a graph of this model (running on %d ranks): nothing to fuse; collectives: %s%s",
                 dist.get_world_size(), seen, note)

    # -- the spans ---------------------------------------------------------------------------
    @property
    def fused_end(self) -> int:
        """Ranges ending at or below this are fused; 0: none (no sites yet, or one cannot be fused)."""
        if not self.sites:
            return 0
        return min(self.max_num_tokens, *(s.fused_tokens for s in self.sites.values()))

    @property
    def symm_span(self) -> Optional[tuple[int, int]]:
        """``[first, last]``: ranges inside it use symmetric memory; None: no such range."""
        spans = [s.symm_tokens for s in self.sites.values() if s.symm_tokens is not None]
        if not spans:
            return None
        first = max(self.fused_end + 1, *(lo for lo, _ in spans))
        last = min(self.max_num_tokens, *(hi for _, hi in spans))
        return (first, last) if first <= last else None

    @property
    def sp_span(self) -> Optional[tuple[int, int]]:
        """``[first, max_num_tokens]``: ranges inside it use sequence parallelism; None: none."""
        starts = [s.sp_from for s in self.sites.values() if s.sp_from is not None]
        if not starts:
            return None
        symm = self.symm_span
        # every rank's block holds at least 2 rows: Inductor compiles a symbolic size as >= 2 (0/1
        # specialization), so a range whose blocks may hold 1 row would run with broken guards
        two_rows = 1 + max(s.site.world_size for s in self.sites.values() if s.sp_from is not None)
        first = max(self.fused_end + 1, symm[1] + 1 if symm else 0, two_rows, *starts)
        return (first, self.max_num_tokens) if first <= self.max_num_tokens else None

    @property
    def async_tp_span(self) -> Optional[tuple[int, int]]:
        """``[first, max_num_tokens]``: ranges inside it add async TP to sequence parallelism; None: none."""
        sp, starts = self.sp_span, [s.async_tp_from for s in self.sites.values() if s.async_tp_from is not None]
        if sp is None or not starts:
            return None
        first = max(sp[0], *starts)
        return (first, sp[1]) if first <= sp[1] else None

    def span(self, tier: Tier) -> Optional[tuple[int, int]]:
        """The token counts ``[first, last]`` of ``tier`` (one of ``tiers.TIERS``); None: none."""
        if tier is FUSED:
            return (1, self.fused_end) if self.fused_end >= 1 else None
        return {SYMM_MEM: self.symm_span, SEQUENCE_PARALLEL: self.sp_span, ASYNC_TP: self.async_tp_span}[tier]

    def sp_serves(self, group_name: str) -> bool:
        """Whether the all-reduces of this group are sites the sequence-parallel tier serves."""
        return any(s.sp_from is not None and s.site.group_name == group_name for s in self.sites.values())

    def async_tp_serves(self, group_name: str) -> bool:
        """Whether the sequence-parallel collectives of this group may be overlapped with their matmuls."""
        return any(s.async_tp_from is not None and s.site.group_name == group_name for s in self.sites.values())

    def symm_serves(self, group_name: str, dtype: torch.dtype, hidden: int) -> bool:
        """Whether the all-reduce of a compiled graph (group, dtype, row size) is a site the
        symmetric-memory tier serves."""
        return any(s.symm_tokens is not None and s.site.group_name == group_name and s.site.dtype == dtype
                   and s.site.hidden == hidden for s in self.sites.values())

    def key(self) -> str:
        """Everything that changes the rewritten graphs: thresholds, backends and the spans."""
        t = sorted((k, dataclasses.astuple(v)) for k, v in self.hardware.thresholds.items())
        backends = {tier.name: backend for tier, backend in self.backends.items()}
        return (f"{self.hardware.name}|{t}|{backends}|fused<={self.fused_end}"
                f"|symm={self.symm_span}|sp={self.sp_span}|async_tp={self.async_tp_span}")


class TierPass(GraphPass):
    """A pass that replaces all-reduces in the ranges the model's tier plan gives its ``tier``: it
    asks for split points at the ends of that span and applies to the ranges inside it. Its ops
    have no backward, and they replace the model's collectives: calls that record gradients are
    refused in its ranges."""

    inference_only = True
    replaces_collectives = True
    tier: Tier  # its entry in ``tiers.TIERS``

    def __init__(self, plan: TierPlan):
        self.plan = plan

    @property
    def backend(self) -> str:
        """The backend its op runs (the plan's, for this tier)."""
        return self.plan.backends[self.tier]

    def split_points(self, gm: torch.fx.GraphModule, ctx: PassContext) -> list[int]:
        self.plan.observe(gm, ctx)
        span = self.plan.span(self.tier)
        if span is None:
            return []
        first, last = span
        return [p for p in (first - 1, last) if 1 <= p < self.plan.max_num_tokens]

    def applies(self, r: Range) -> bool:
        span = self.plan.span(self.tier)
        return span is not None and span[0] <= r.start and r.end <= span[1]

    def config_key(self) -> str:
        return f"v{source_digest(Path(__file__).parent)}|{self.plan.key()}"
