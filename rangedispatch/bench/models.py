"""A tensor-parallel MLP block written the way users write models: plain ``dist.all_reduce``, a
residual add and an RMSNorm in one of the forms found in the wild. Used by the demo, the
benchmarks and the tests; nothing in rangedispatch depends on it."""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from rangedispatch.fusion.numerics import dequantize_fp8, quantize_fp8

NORM_FORMS = ("llama", "functional", "module", "gemma")


class RMSNormForm(nn.Module):
    """RMSNorm as written in LLaMA (``llama``), via ``F.rms_norm`` (``functional``), ``nn.RMSNorm``
    (``module``) or Gemma's ``(1 + w)`` (``gemma``)."""

    def __init__(self, hidden: int, form: str, eps: float, dtype: torch.dtype, weight_dtype: Optional[torch.dtype] = None):
        super().__init__()
        if form not in NORM_FORMS:
            raise ValueError(f"form={form!r}; allowed: {', '.join(NORM_FORMS)}")
        self.form, self.eps, self.hidden = form, eps, hidden
        wd = weight_dtype or dtype
        if form == "module":
            self.norm = nn.RMSNorm(hidden, eps=eps, dtype=wd)
            nn.init.normal_(self.norm.weight, 1.0, 0.1)
        else:
            init = torch.randn(hidden, dtype=torch.float32) * 0.1 + (0.0 if form == "gemma" else 1.0)
            self.weight = nn.Parameter(init.to(wd))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if self.form == "llama":
            hf = h.float()
            var = hf.pow(2).mean(-1, keepdim=True)
            return self.weight * (hf * torch.rsqrt(var + self.eps)).to(h.dtype)
        if self.form == "functional":
            return F.rms_norm(h, (self.hidden,), self.weight, self.eps)
        if self.form == "module":
            return self.norm(h)
        hf = h.float()
        out = hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (out * (1.0 + self.weight.float())).to(h.dtype)


class TPMLPBlock(nn.Module):
    """``layers`` x (column-parallel up -> SiLU -> row-parallel down -> all_reduce -> + residual ->
    RMSNorm [-> static FP8 quant -> dequant]). Each rank holds 1/world_size of the intermediate dim.

    ``forward(x)`` returns ``(out, residual)``; with ``residual=False`` the residual add is left out
    and the second output is the last all-reduced value. With ``return_residual=False`` it returns
    ``out`` alone, as a decoder's last norm does (its residual sum is used by nothing after it).
    """

    def __init__(self, hidden: int = 64, intermediate: int = 128, layers: int = 2, norm: str = "llama",
                 residual: bool = True, fp8: bool = False, dtype: torch.dtype = torch.float32,
                 group: Optional[dist.ProcessGroup] = None, eps: float = 1e-6,
                 norm_weight_dtype: Optional[torch.dtype] = None, seed: int = 0, return_residual: bool = True):
        super().__init__()
        self.group = group
        world = dist.get_world_size(group) if dist.is_initialized() else 1
        rank = dist.get_rank(group) if dist.is_initialized() else 0
        if intermediate % world:
            raise ValueError(f"intermediate={intermediate} is not divisible by the world size {world}")
        shard = intermediate // world
        gen = torch.Generator().manual_seed(seed)
        self.residual = residual
        self.return_residual = return_residual
        self.fp8 = fp8
        self.up = nn.ParameterList()
        self.down = nn.ParameterList()
        for _ in range(layers):
            up = torch.randn(intermediate, hidden, generator=gen) / hidden ** 0.5
            down = torch.randn(hidden, intermediate, generator=gen) / intermediate ** 0.5
            self.up.append(nn.Parameter(up[rank * shard:(rank + 1) * shard].to(dtype)))
            self.down.append(nn.Parameter(down[:, rank * shard:(rank + 1) * shard].contiguous().to(dtype)))
        self.norms = nn.ModuleList(RMSNormForm(hidden, norm, eps, dtype, norm_weight_dtype) for _ in range(layers))
        self.register_buffer("fp8_scale", torch.tensor([0.05], dtype=torch.float32))

    def forward(self, x: torch.Tensor):
        residual = x
        y = x
        for up, down, norm in zip(self.up, self.down, self.norms):
            y = F.linear(F.silu(F.linear(x, up)), down)
            dist.all_reduce(y, group=self.group)
            if self.residual:
                y = y + residual
                residual = y
            x = norm(y)
            if self.fp8:
                x = dequantize_fp8(quantize_fp8(x, self.fp8_scale), self.fp8_scale, y.dtype)
        if not self.return_residual:
            return x
        return x, (residual if self.residual else y)
