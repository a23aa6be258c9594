"""All-reduce + residual + RMSNorm (+ FP8 quant) fusion: the pass, its matcher, the fused op and its
backends. Nothing here imports FlashInfer; only its backend does, lazily."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rangedispatch.config.schema import RangeDispatchConfig
    from rangedispatch.passes import GraphPass


def build_fusion_passes(cfg: "RangeDispatchConfig") -> list["GraphPass"]:
    from rangedispatch.fusion.allreduce_rmsnorm import AllReduceRMSNormFusion

    backend = cfg.hardware.fused_backend if cfg.fusion.backend == "auto" else cfg.fusion.backend
    return [AllReduceRMSNormFusion(cfg.hardware, backend, cfg.dispatch.max_num_tokens)]
