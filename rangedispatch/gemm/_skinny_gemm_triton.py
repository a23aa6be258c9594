"""The Triton kernel behind ``torch.ops.rangedispatch.skinny_mm`` (imported on first use: the CPU
path never needs Triton).

Each program computes one ``BLOCK_M x BLOCK_N`` tile of ``a @ b`` over one share of K (all of it
without split-K), streaming ``b`` in ``BLOCK_K`` slices. With split-K the shares add up in an fp32
buffer through atomics; the caller casts it. The row blocks of one column tile are neighbours in
the grid: they run together and read the same weight slices, which the second one finds in L2, so
a weight is streamed from memory about once however many row blocks there are.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl


@triton.jit
def _skinny_mm_kernel(a, b, bias, c, M, N, K, k_share, s_am, s_ak, s_bk, s_bn, s_cm, s_cn,
                      HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    k_end = tl.minimum(K, (pid_k + 1) * k_share)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(pid_k * k_share, k_end, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        a_tile = tl.load(a + rm[:, None] * s_am + rk[None, :] * s_ak,
                         mask=(rm[:, None] < M) & (rk[None, :] < k_end), other=0.0)
        b_tile = tl.load(b + rk[:, None] * s_bk + rn[None, :] * s_bn,
                         mask=(rk[:, None] < k_end) & (rn[None, :] < N), other=0.0)
        acc += tl.dot(a_tile, b_tile)
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    c_ptrs = c + rm[:, None] * s_cm + rn[None, :] * s_cn
    if SPLIT_K == 1:
        if HAS_BIAS:
            acc += tl.load(bias + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
        tl.store(c_ptrs, acc.to(c.dtype.element_ty), mask=mask)
    else:
        tl.atomic_add(c_ptrs, acc, mask=mask, sem="relaxed")


def launch(a: torch.Tensor, b: torch.Tensor, bias: Optional[torch.Tensor], block_m: int, block_n: int,
           block_k: int, split_k: int, num_warps: int, num_stages: int) -> torch.Tensor:
    """``a @ b (+ bias)`` for ``a`` ``[M, K]`` and ``b`` ``[K, N]`` (any strides), in ``a``'s dtype."""
    (m, k), n = a.shape, b.shape[1]
    if m == 0:
        return a.new_empty(0, n)
    k_share = triton.cdiv(triton.cdiv(k, block_k), split_k) * block_k
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n), triton.cdiv(k, k_share))
    if split_k == 1:
        out = torch.empty(m, n, dtype=a.dtype, device=a.device)
    else:
        out = torch.zeros(m, n, dtype=torch.float32, device=a.device)
    _skinny_mm_kernel[grid](a, b, bias if bias is not None else a, out, m, n, k, k_share, a.stride(0), a.stride(1),
                            b.stride(0), b.stride(1), out.stride(0), out.stride(1), HAS_BIAS=bias is not None,
                            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_K=split_k,
                            num_warps=num_warps, num_stages=num_stages)
    if split_k == 1:
        return out
    return (out + bias if bias is not None else out).to(a.dtype)
