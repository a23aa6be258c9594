"""All-reduce + residual + RMSNorm (+ FP8 quant) fusion: the pass, its matcher, the fused op and its
backends; and the symmetric-memory all-reduce tier above the fused sizes. Nothing here imports
FlashInfer; only its backend does, lazily."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rangedispatch.config.schema import RangeDispatchConfig
    from rangedispatch.passes import GraphPass


def build_fusion_passes(cfg: "RangeDispatchConfig") -> list["GraphPass"]:
    """The fusion pass, then (if on) the symmetric-memory tier for the sizes above it."""
    from rangedispatch.fusion.allreduce_rmsnorm import AllReduceRMSNormFusion

    backend = cfg.hardware.fused_backend if cfg.fusion.backend == "auto" else cfg.fusion.backend
    fused = AllReduceRMSNormFusion(cfg.hardware, backend, cfg.dispatch.max_num_tokens)
    if not cfg.fusion.symm_mem:
        return [fused]
    from rangedispatch.fusion.symm_mem_tier import SymmMemAllReduce

    symm_backend = "reference" if backend == "reference" else "symm_mem"
    return [fused, SymmMemAllReduce(cfg.hardware, symm_backend, cfg.dispatch.max_num_tokens, fused)]
