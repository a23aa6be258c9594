"""The op-level unit: all_reduce -> + residual -> RMSNorm [-> static FP8].

In a model the all-reduce input is a dead intermediate (the row-parallel matmul's output), so NCCL
reduces it in place. Here the input is a graph input: ``inplace=True`` (``dist.all_reduce``) lets
Inductor reduce it in place, as in a model; the out-of-place functional form would add a full copy
(~55 us at 64 MiB on H100) and flatter the fused kernel. The fused variants replace the whole
pattern, so they take the out-of-place form (the in-place one also writes the sum back to the input,
which the fused op does not produce)."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import nn

from rangedispatch.fusion.numerics import quantize_fp8
from rangedispatch.bench.models import RMSNormForm


class AllReduceNorm(nn.Module):
    def __init__(self, hidden: int, fp8: bool, dtype: torch.dtype = torch.bfloat16, inplace: bool = False):
        super().__init__()
        self.inplace = inplace
        self.norm = RMSNormForm(hidden, "functional", 1e-6, dtype)
        self.fp8 = fp8
        self.register_buffer("scale", torch.tensor([0.05]))

    def forward(self, x: torch.Tensor, residual: torch.Tensor):
        if self.inplace:
            dist.all_reduce(x)
        else:
            x = funcol.all_reduce(x, "sum", dist.group.WORLD)
        h = x + residual
        y = self.norm(h)
        if self.fp8:
            y = quantize_fp8(y, self.scale)
        return y, h
