"""The all-reduce tiers: all-reduce + residual + RMSNorm (+ FP8 quant) fused into one kernel for
small sizes, symmetric memory above them, NCCL beyond, and sequence parallelism where the profile
says it pays at the largest sizes.

- ``tier_plan.py``: which token counts each tier takes, per all-reduce site, from the profile;
- ``allreduce_rmsnorm_pass.py`` / ``allreduce_rmsnorm_op.py``: the fusion pass (with ``matcher.py``)
  and the op it puts in the graph, whose kernels come from ``backends/``;
- ``symm_mem_pass.py`` / ``symm_mem_op.py``: the symmetric-memory pass and its op;
- ``sequence_parallel_pass.py`` / ``sequence_parallel_op.py``: the sequence-parallel tier for the
  largest sizes (reduce-scatter, norm on a block of tokens, all-gather);
- ``async_tp_pass.py`` / ``async_tp_op.py``: async tensor parallelism on top of it (those collectives
  overlapped with the matmuls next to them);
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
    """The fusion pass, the symmetric-memory pass (if on), the sequence-parallel pass and the async-TP
    pass (if on) after it, sharing one tier plan (a pass whose tier the profile leaves out applies
    nowhere)."""
    from rangedispatch.fusion.allreduce_rmsnorm_pass import AllReduceRMSNormFusion
    from rangedispatch.fusion.tier_plan import TierPlan

    backend = cfg.hardware.fused_backend if cfg.fusion.backend == "auto" else cfg.fusion.backend
    symm_backend = None if not cfg.fusion.symm_mem else "reference" if backend == "reference" else "symm_mem"
    plan = TierPlan(cfg.hardware, backend, symm_backend, cfg.dispatch.max_num_tokens, async_tp=cfg.fusion.async_tp)
    passes: list["GraphPass"] = [AllReduceRMSNormFusion(plan)]
    if symm_backend is not None:
        from rangedispatch.fusion.symm_mem_pass import SymmMemAllReduce

        passes.append(SymmMemAllReduce(plan))
    from rangedispatch.fusion.sequence_parallel_pass import SequenceParallel

    passes.append(SequenceParallel(plan))
    if cfg.fusion.async_tp:
        from rangedispatch.fusion.async_tp_pass import AsyncTensorParallel

        passes.append(AsyncTensorParallel(plan, "reference" if backend == "reference" else "symm_mem"))
    return passes
