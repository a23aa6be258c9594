"""The all-reduce tiers: all-reduce + residual + RMSNorm (+ FP8 quant) fused into one kernel for
small sizes, symmetric memory above them, NCCL beyond, and sequence parallelism (with async tensor
parallelism on top) where the profile says it pays at the largest sizes.

- ``tiers.py``: each tier as one object, in the order the passes run: its pass, its op, its kernel
  backends (and the one rule that picks the backend), its profile keys, what tune measures;
- ``tier_plan.py``: which token counts each tier takes, per all-reduce site, from the profile, and
  ``TierPass``, the base of the tier passes;
- per tier, a pass and the op it puts in the graph: ``allreduce_rmsnorm_pass.py`` (with
  ``matcher.py``) / ``allreduce_rmsnorm_op.py``, whose kernels come from ``backends/``;
  ``symm_mem_pass.py`` / ``symm_mem_op.py``; ``sequence_parallel_pass.py`` /
  ``sequence_parallel_op.py`` (reduce-scatter, norm on a block of tokens, all-gather);
  ``async_tp_pass.py`` / ``async_tp_op.py`` (those collectives overlapped with the matmuls next to them);
- ``replacement.py``: new nodes with the fake values Inductor needs;
- ``sites.py``: the all-reduces of a traced graph; ``numerics.py``: the reference math.

Nothing here imports FlashInfer; only its backend does, lazily.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rangedispatch.config.schema import RangeDispatchConfig
    from rangedispatch.passes import GraphPass


def build_fusion_passes(cfg: "RangeDispatchConfig") -> list["GraphPass"]:
    """One pass per tier that the config leaves on (``Tier.switch``), in the registry's order,
    sharing one tier plan (a pass whose tier the profile leaves out applies nowhere)."""
    from rangedispatch.fusion.tier_plan import TierPlan
    from rangedispatch.fusion.tiers import TIERS, backend_for

    configured = cfg.hardware.fused_backend if cfg.fusion.backend == "auto" else cfg.fusion.backend
    on = [t for t in TIERS if t.switch is None or getattr(cfg.fusion, t.switch)]
    plan = TierPlan(cfg.hardware, {t: backend_for(t, configured) for t in on}, cfg.dispatch.max_num_tokens)
    return [t.pass_type()(plan) for t in on]
