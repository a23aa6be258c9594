"""The math the fused op must reproduce, written once: RMSNorm in each weight form, and static FP8.

Numerics as eager PyTorch computes them: the residual add in the input dtype, norm statistics in
fp32, the weight applied where the model's code applies it (see ``WEIGHT_MODES``), the quantized
value ``clamp(y / scale, fp8 min, fp8 max)`` cast to ``float8_e4m3fn``.
"""

from __future__ import annotations

from typing import Optional

import torch

FP8_DTYPE = torch.float8_e4m3fn

# How the norm weight is applied, for norm statistics ``n = h32 * rsqrt(mean(h32^2) + eps)``:
WEIGHT_MODES = {
    "llama": "w * n.to(dtype)  (hand-written LLaMA RMSNorm: cast first, scale in the input dtype)",
    "standard": "(n * w).to(dtype)  (F.rms_norm, nn.RMSNorm: scale in fp32, then cast)",
    "gemma": "(n * (w.float() + 1)).to(dtype)  (Gemma: weight stored as an offset from 1)",
    "none": "n.to(dtype)  (no weight)",
}


def rms_norm(h: torch.Tensor, weight: Optional[torch.Tensor], eps: float, weight_mode: str) -> torch.Tensor:
    dtype = h.dtype
    h32 = h.float()
    n = h32 * torch.rsqrt(h32.pow(2).mean(-1, keepdim=True) + eps)
    if weight_mode == "llama":
        return weight * n.to(dtype)
    if weight_mode == "standard":
        return (n * weight).to(dtype)
    if weight_mode == "gemma":
        return (n * (weight.float() + 1.0)).to(dtype)
    if weight_mode == "none":
        return n.to(dtype)
    raise ValueError(f"weight_mode={weight_mode!r}; allowed: {', '.join(WEIGHT_MODES)}")


def quantize_fp8(y: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    info = torch.finfo(FP8_DTYPE)
    return (y.float() / scale).clamp(info.min, info.max).to(FP8_DTYPE)


def dequantize_fp8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (q.float() * scale).to(dtype)
