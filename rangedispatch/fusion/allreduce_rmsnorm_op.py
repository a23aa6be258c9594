"""``torch.ops.rangedispatch.fused_allreduce_rmsnorm``: the op the fusion pass puts in the graph.

One op for the whole family: with or without residual (pass None), any weight mode, optional static
FP8 quant (pass the scale tensor). It returns ``(out, residual_out)``: the normed (or quantized)
output and the pre-norm sum ``all_reduce(input) + residual`` (just ``all_reduce(input)`` without a
residual), which the next layer uses as its residual. The kernel comes from a backend chosen per
call (``backend``), falling back to ``reference`` where the chosen one cannot run.
"""

from __future__ import annotations

from typing import Optional

import torch

from rangedispatch.fusion.numerics import FP8_DTYPE


@torch.library.custom_op("rangedispatch::fused_allreduce_rmsnorm", mutates_args=())
def fused_allreduce_rmsnorm(
    input: torch.Tensor,
    residual: Optional[torch.Tensor],
    weight: Optional[torch.Tensor],
    scale: Optional[torch.Tensor],
    eps: float,
    weight_mode: str,
    group_name: str,
    backend: str,
    oneshot_max_bytes: int,
    max_tokens: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``oneshot_max_bytes``: GPU backends use their one-shot kernel up to this input size (bytes per
    rank) and two-shot above. ``max_tokens``: the largest token count fused, which sizes their
    workspace. The reference backend ignores both."""
    from rangedispatch.fusion.backends import FusedCall, run_fused

    call = FusedCall(input, residual, weight, scale, eps, weight_mode, group_name, oneshot_max_bytes, max_tokens)
    return run_fused(backend, call)


@fused_allreduce_rmsnorm.register_fake
def _(input, residual, weight, scale, eps, weight_mode, group_name, backend, oneshot_max_bytes, max_tokens):
    out_dtype = FP8_DTYPE if scale is not None else input.dtype
    return torch.empty_like(input, dtype=out_dtype), torch.empty_like(input)


FUSED_OP = torch.ops.rangedispatch.fused_allreduce_rmsnorm.default
