"""The Triton kernel behind ``torch.ops.rangedispatch.skinny_mm`` (imported on first use: the CPU
path never needs Triton).

One launch multiplies the activations by up to ``MAX_WEIGHTS`` weights (the projections that read the
same input, such as q/k/v): their column tiles share one grid, so a short weight (k/v) fills SMs the
long one leaves idle instead of paying a launch and a ramp of its own. Each program computes one
``BLOCK_M x BLOCK_N`` tile of one product over one share of K (all of it without split-K), streaming
that weight in ``BLOCK_K`` slices. With split-K the shares add up in fp32 outputs through atomics;
the caller casts them. The row blocks of one column tile are neighbours in the grid: they run
together and read the same weight slices, which the second one finds in L2, so a weight is streamed
from memory about once however many row blocks there are.
"""

from __future__ import annotations

import itertools
import torch
import triton
import triton.language as tl

from rangedispatch import torch_internals
from rangedispatch.gemm.skinny_gemm_op import MAX_WEIGHTS  # the kernel has a pointer argument per weight


@triton.jit
def _sizes_if(take, n, ld, start, n_else, ld_else, start_else):
    """The new weight's sizes where ``take``. Through ``tl.where``, not an ``if``: Triton keeps what it
    knows of their divisibility (vector loads), and a size it specialized to 1 stays a valid value."""
    return tl.where(take, n, n_else), tl.where(take, ld, ld_else), tl.where(take, start, start_else)


@triton.jit
def _skinny_mm_kernel(a, b0, b1, b2, b3, bias0, bias1, bias2, bias3, c0, c1, c2, c3, n0, n1, n2, n3,
                      start1, start2, start3, ld0, ld1, ld2, ld3, M, K, k_share, s_am, s_ak,
                      NUM_WEIGHTS: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    # which weight this column tile belongs to: weight i owns tiles [start_i, start_i+1)
    b, bias, c, N, ld, start = b0, bias0, c0, n0, ld0, 0
    if NUM_WEIGHTS > 1:
        if pid_n >= start1:
            b, bias, c = b1, bias1, c1
        N, ld, start = _sizes_if(pid_n >= start1, n1, ld1, start1, N, ld, start)
    if NUM_WEIGHTS > 2:
        if pid_n >= start2:
            b, bias, c = b2, bias2, c2
        N, ld, start = _sizes_if(pid_n >= start2, n2, ld2, start2, N, ld, start)
    if NUM_WEIGHTS > 3:
        if pid_n >= start3:
            b, bias, c = b3, bias3, c3
        N, ld, start = _sizes_if(pid_n >= start3, n3, ld3, start3, N, ld, start)
    tile = pid_n - start
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    k_end = tl.minimum(K, (pid_k + 1) * k_share)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(pid_k * k_share, k_end, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        a_tile = tl.load(a + rm[:, None] * s_am + rk[None, :] * s_ak,
                         mask=(rm[:, None] < M) & (rk[None, :] < k_end), other=0.0)
        # b is the [K, N] view of an [N, K] row-major weight: element (k, n) sits at n * ld + k
        b_tile = tl.load(b + rk[:, None] + rn[None, :] * ld, mask=(rk[:, None] < k_end) & (rn[None, :] < N),
                         other=0.0)
        acc += tl.dot(a_tile, b_tile)
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    c_ptrs = c + rm[:, None] * N + rn[None, :]
    if SPLIT_K == 1:
        if HAS_BIAS:
            acc += tl.load(bias + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
        tl.store(c_ptrs, acc.to(c.dtype.element_ty), mask=mask)
    else:
        tl.atomic_add(c_ptrs, acc, mask=mask, sem="relaxed")


def launch(a: torch.Tensor, bs: list[torch.Tensor], biases: list[torch.Tensor], block_m: int,
           block_n: int, block_k: int, split_k: int, num_warps: int, num_stages: int,
           compile_only: bool = False) -> list[torch.Tensor]:
    """``[a @ b (+ bias) for each b]`` in ``a``'s dtype, for ``a`` ``[M, K]`` (any strides) and each
    ``b`` a ``[K, N]`` view with unit stride along K (a transposed row-major weight); ``biases``: one
    per ``b``, or none. ``compile_only``: compile the kernel these arguments launch, and launch
    nothing (the outputs are left unwritten)."""
    assert 1 <= len(bs) <= MAX_WEIGHTS and all(b.stride(0) == 1 for b in bs) and len(biases) in (0, len(bs))
    (m, k), ns = a.shape, [b.shape[1] for b in bs]
    if m == 0:
        return [a.new_empty(0, n) for n in ns]
    new = torch.empty if split_k == 1 else torch.zeros
    outs = [new(m, n, dtype=a.dtype if split_k == 1 else torch.float32, device=a.device) for n in ns]
    tile_ends = list(itertools.accumulate(triton.cdiv(n, block_n) for n in ns))
    k_share = triton.cdiv(triton.cdiv(k, block_k), split_k) * block_k
    grid = (triton.cdiv(m, block_m), tile_ends[-1], triton.cdiv(k, k_share))
    unused = MAX_WEIGHTS - len(bs)
    args = (a, *bs, *[bs[0]] * unused, *(biases or [a] * len(bs)), *[a] * unused, *outs, *[outs[0]] * unused,
            *ns, *[0] * unused, *(tile_ends[:-1] + [0] * unused), *[b.stride(1) for b in bs], *[0] * unused,
            m, k, k_share, a.stride(0), a.stride(1))
    meta = dict(NUM_WEIGHTS=len(bs), HAS_BIAS=bool(biases), BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
                SPLIT_K=split_k, num_warps=num_warps, num_stages=num_stages)
    if compile_only:
        _skinny_mm_kernel.warmup(*args, grid=grid, **meta)
        return outs
    _skinny_mm_kernel[grid](*args, **meta)
    if split_k == 1:
        return outs
    if biases:
        outs = [out + bias for out, bias in zip(outs, biases)]
    return [out.to(a.dtype) for out in outs]


def compile_configs(rows: list[torch.Tensor], bs: list[torch.Tensor], biases: list[torch.Tensor],
                    configs: list[tuple[int, ...]]) -> None:
    """Compile the kernel for each configuration and each input of ``rows`` (their sizes specialize
    it) on Inductor's ``compile_threads`` threads, before any is timed: one at a time, a cold cache
    spent most of the tuning's seconds compiling. A configuration that fails here fails again, with
    its reason, when it is launched."""
    from concurrent.futures import ThreadPoolExecutor

    device = rows[0].device

    def compile_one(cfg: tuple[int, ...]) -> None:
        with torch.cuda.device(device):  # the current device is per thread; Triton caches kernels by it
            for a in rows:
                try:
                    launch(a, bs, biases, *cfg, compile_only=True)
                except Exception:  # reported, with its reason, by the launch that follows
                    return

    with ThreadPoolExecutor(max(1, min(len(configs), torch_internals.compile_threads()))) as pool:
        list(pool.map(compile_one, configs))
