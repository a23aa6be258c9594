"""All-reduce + residual + RMSNorm (+ FP8 quant) fusion: the pass, its patterns, the fused op."""


def build_fusion_passes(cfg):
    return []
