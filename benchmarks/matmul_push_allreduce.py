"""An all-reduce hidden inside the matmul that produces its input: a Triton GEMM whose epilogue
stores each output tile into every rank's symmetric buffer (one slot per sender), then, after a
barrier, one kernel per row that sums the slots, adds the residual and applies RMSNorm.

The NVLink stores leave as the tiles finish, so the transfer runs under the rest of the matmul;
what stays exposed is the barrier and the sum. Its cost: a Triton GEMM instead of cuBLAS, and
``world`` stores per tile. Used by ``tp_overlap_forms.py`` (the ``matmul_push_*`` forms).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

def _set_block_shapes(nargs: dict) -> None:
    """The TMA descriptors' block shapes follow the configuration being run."""
    nargs["a_desc"].block_shape = [nargs["BLOCK_M"], nargs["BLOCK_K"]]
    nargs["b_desc"].block_shape = [nargs["BLOCK_K"], nargs["BLOCK_N"]]


_CONFIGS = [
    triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=64, GROUP_M=8), num_warps=w, num_stages=st,
                  pre_hook=_set_block_shapes)
    for bm, bn, w, st in ((128, 256, 8, 3), (128, 256, 8, 4), (128, 128, 8, 4), (128, 128, 4, 4), (256, 128, 8, 3))
]


@triton.autotune(configs=_CONFIGS, key=["M", "N", "K", "DESTS"])
@triton.jit
def _matmul_push_kernel(a_desc, b_desc, dests, M, N, K, slot_offset, RANK: tl.constexpr, DESTS: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """C = A @ B (TMA loads), each tile of C stored at ``slot_offset`` of each of the DESTS buffers
    in the tuple ``dests``, the next rank's first. Tensor arguments rather than loaded addresses, so
    that Triton knows their alignment and vectorizes the stores."""
    pid = tl.program_id(0)
    tiles_m, tiles_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    group_size = GROUP_M * tiles_n
    first_m = (pid // group_size) * GROUP_M
    rows_in_group = min(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group_size) % rows_in_group
    pid_n = (pid % group_size) // rows_in_group
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        acc = tl.dot(a_desc.load([pid_m * BLOCK_M, k * BLOCK_K]), b_desc.load([k * BLOCK_K, pid_n * BLOCK_N]), acc)
    c = acc.to(tl.bfloat16)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    offs_c = slot_offset + offs_m[:, None].to(tl.int64) * N + offs_n[None, :]
    for i in tl.static_range(DESTS):
        tl.store(dests[(RANK + 1 + i) % DESTS] + offs_c, c, mask=mask)


@triton.jit
def _sum_add_rms_norm_kernel(slots_ptr, residual_ptr, weight_ptr, residual_out_ptr, out_ptr, slot_numel,
                             N, eps, SLOTS: tl.constexpr, BLOCK_N: tl.constexpr):
    """Per row: y = sum of the SLOTS partial sums (fp32, rounded to bf16 as an all-reduce returns
    it), residual_out = y + residual, out = RMSNorm(residual_out) * weight."""
    row = tl.program_id(0).to(tl.int64) * N
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    y = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for s in tl.static_range(SLOTS):
        y += tl.load(slots_ptr + s * slot_numel + row + cols, mask=mask, other=0.0).to(tl.float32)
    residual = tl.load(residual_ptr + row + cols, mask=mask, other=0.0).to(tl.float32)
    r = (y.to(tl.bfloat16).to(tl.float32) + residual).to(tl.bfloat16)
    tl.store(residual_out_ptr + row + cols, r, mask=mask)
    rf = r.to(tl.float32)
    inv_rms = tl.rsqrt(tl.sum(rf * rf, axis=0) / N + eps)
    w = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row + cols, (rf * inv_rms * w).to(tl.bfloat16), mask=mask)


def matmul_push(a: torch.Tensor, b: torch.Tensor, dests: tuple[torch.Tensor, ...], slot_offset: int, rank: int) -> None:
    """``a @ b`` (bf16, row-major) stored at ``slot_offset`` (elements) of each tensor in ``dests``."""
    (m, k), n = a.shape, b.shape[1]
    # the block shapes are placeholders until the configuration's pre-hook sets them
    a_desc, b_desc = TensorDescriptor.from_tensor(a, [64, 64]), TensorDescriptor.from_tensor(b, [64, 64])

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)

    _matmul_push_kernel[grid](a_desc, b_desc, dests, m, n, k, slot_offset, RANK=rank % len(dests), DESTS=len(dests))


def triton_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The same GEMM into a local tensor: the kernel's speed without the pushes."""
    out = torch.empty((a.shape[0], b.shape[1]), device=a.device, dtype=torch.bfloat16)
    matmul_push(a, b, (out,), 0, 0)
    return out


def sum_add_rms_norm(slots: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                     eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """(RMSNorm(sum(slots) + residual), sum(slots) + residual) for ``slots`` [S, rows, N]."""
    s, rows, n = slots.shape
    out, residual_out = torch.empty_like(residual), torch.empty_like(residual)
    _sum_add_rms_norm_kernel[(rows,)](slots, residual, weight, residual_out, out, rows * n, n, eps,
                                      SLOTS=s, BLOCK_N=triton.next_power_of_2(n), num_warps=8)
    return out, residual_out


class MatmulPushAllReduce:
    """``RMSNorm(all_reduce(act @ weight) + residual)`` with the all-reduce in the GEMM's epilogue.

    Two symmetric buffers, used by alternate calls: a peer that has passed the barrier of call i+1
    may write call i+2's tiles, and this rank reached that barrier only after its sum of call i."""

    def __init__(self, group_name: str, rank: int, world: int, max_rows: int, cols: int):
        import torch.distributed._symmetric_memory as symm_mem

        self.rank, self.world, self.cols = rank, world, cols
        self.buffers = [symm_mem.empty(world * max_rows * cols, dtype=torch.bfloat16, device="cuda") for _ in range(2)]
        self.handles = [symm_mem.rendezvous(b, group_name) for b in self.buffers]
        self.dests = [tuple(h.get_buffer(p, (world * max_rows * cols,), torch.bfloat16, 0) for p in range(world))
                      for h in self.handles]

    def __call__(self, act: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor,
                 norm_weight: torch.Tensor, parity: int) -> tuple[torch.Tensor, torch.Tensor]:
        rows = act.shape[0]
        matmul_push(act, weight, self.dests[parity], self.rank * rows * self.cols, self.rank)
        self.handles[parity].barrier(channel=0)
        slots = self.buffers[parity][:self.world * rows * self.cols].view(self.world, rows, self.cols)
        return sum_add_rms_norm(slots, residual, norm_weight)
