"""The op-level unit: out-of-place all_reduce -> + residual -> RMSNorm [-> static FP8], as a row-
parallel layer's output would see it."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import nn

from rangedispatch.fusion.numerics import quantize_fp8
from rangedispatch.models import RMSNormForm


class AllReduceNorm(nn.Module):
    def __init__(self, hidden: int, fp8: bool, dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.norm = RMSNormForm(hidden, "functional", 1e-6, dtype)
        self.fp8 = fp8
        self.register_buffer("scale", torch.tensor([0.05]))

    def forward(self, x: torch.Tensor, residual: torch.Tensor):
        x = funcol.all_reduce(x, "sum", dist.group.WORLD)
        h = x + residual
        y = self.norm(h)
        if self.fp8:
            y = quantize_fp8(y, self.scale)
        return y, h
