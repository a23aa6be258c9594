"""An all-reduce hidden inside the matmul that produces its input: a Triton GEMM whose epilogue
stores each output tile into every rank's symmetric buffer (one slot per sender), then, after a
barrier, one kernel per row that sums the slots, adds the residual and applies RMSNorm.

The NVLink stores leave as the tiles finish, so the transfer runs under the rest of the matmul;
what stays exposed is the barrier and the sum. Its cost: a Triton GEMM instead of cuBLAS, and
``world`` stores per tile (``world - 1`` of them over NVLink).

The sequence-parallel form sends each tile only to the rank that owns its rows (a reduce-scatter,
1/world of the NVLink bytes), sums and normalizes that rank's rows, and stores the normalized rows
into every rank's gather buffer (an all-gather, exposed) for the next matmul.

Used by ``tp_overlap_forms.py`` (the ``matmul_push_*`` forms).
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


@triton.autotune(configs=_CONFIGS, key=["M", "N", "K", "DESTS", "SCATTER"])
@triton.jit
def _matmul_push_kernel(a_desc, b_desc, dests, M, N, K, slot_offset, rows_per_dest, RANK: tl.constexpr,
                        DESTS: tl.constexpr, SCATTER: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """C = A @ B (TMA loads), each tile of C stored at ``slot_offset`` of each of the DESTS buffers
    in the tuple ``dests``, the next rank's first; with SCATTER, only in the buffer of the rank that
    owns its rows (``rows_per_dest`` rows each, a multiple of BLOCK_M), at the rows' offset there.
    Tensor arguments rather than loaded addresses, so that Triton knows their alignment and
    vectorizes the stores."""
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
    if SCATTER:
        owner = (pid_m * BLOCK_M) // rows_per_dest
        offs_c = slot_offset + (offs_m - owner * rows_per_dest)[:, None].to(tl.int64) * N + offs_n[None, :]
        for d in tl.static_range(DESTS):
            if d == owner:
                tl.store(dests[d] + offs_c, c, mask=mask)
    else:
        offs_c = slot_offset + offs_m[:, None].to(tl.int64) * N + offs_n[None, :]
        for i in tl.static_range(DESTS):
            tl.store(dests[(RANK + 1 + i) % DESTS] + offs_c, c, mask=mask)


@triton.jit
def _sum_add_rms_norm_kernel(slots_ptr, residual_ptr, weight_ptr, residual_out_ptr, outs, out_row_offset,
                             slot_numel, N, eps, SLOTS: tl.constexpr, OUTS: tl.constexpr, BLOCK_N: tl.constexpr):
    """Per row: y = sum of the SLOTS partial sums (fp32, rounded to bf16 as an all-reduce returns
    it), residual_out = y + residual, RMSNorm(residual_out) * weight stored ``out_row_offset`` rows
    down in each of the OUTS tensors of ``outs``."""
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
    out = (rf * inv_rms * w).to(tl.bfloat16)
    for i in tl.static_range(OUTS):
        tl.store(outs[i] + out_row_offset * N + row + cols, out, mask=mask)


def matmul_push(a: torch.Tensor, b: torch.Tensor, dests: tuple[torch.Tensor, ...], slot_offset: int, rank: int,
                rows_per_dest: int = 0) -> None:
    """``a @ b`` (bf16, row-major) stored at ``slot_offset`` (elements) of each tensor in ``dests``;
    with ``rows_per_dest``, each block of that many rows only in its owner's tensor."""
    (m, k), n = a.shape, b.shape[1]
    if rows_per_dest % 256:
        raise ValueError(f"rows_per_dest={rows_per_dest}: a multiple of 256 (every BLOCK_M) or 0")
    # the block shapes are placeholders until the configuration's pre-hook sets them
    a_desc, b_desc = TensorDescriptor.from_tensor(a, [64, 64]), TensorDescriptor.from_tensor(b, [64, 64])

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)

    _matmul_push_kernel[grid](a_desc, b_desc, dests, m, n, k, slot_offset, rows_per_dest, RANK=rank % len(dests),
                              DESTS=len(dests), SCATTER=rows_per_dest > 0)


def triton_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The same GEMM into a local tensor: the kernel's speed without the pushes."""
    out = torch.empty((a.shape[0], b.shape[1]), device=a.device, dtype=torch.bfloat16)
    matmul_push(a, b, (out,), 0, 0)
    return out


def sum_add_rms_norm(slots: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6,
                     outs: tuple[torch.Tensor, ...] = (), out_row_offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(RMSNorm(sum(slots) + residual), sum(slots) + residual) for ``slots`` [S, rows, N]; with
    ``outs``, the first is stored ``out_row_offset`` rows down in each of them instead (and None
    is returned in its place)."""
    s, rows, n = slots.shape
    out, residual_out = (None if outs else torch.empty_like(residual)), torch.empty_like(residual)
    _sum_add_rms_norm_kernel[(rows,)](slots, residual, weight, residual_out, outs or (out,), out_row_offset,
                                      rows * n, n, eps, SLOTS=s, OUTS=len(outs or (out,)),
                                      BLOCK_N=triton.next_power_of_2(n), num_warps=8)
    return out, residual_out


class MatmulPushAllReduce:
    """``RMSNorm(all_reduce(act @ weight) + residual)`` with the all-reduce in the GEMM's epilogue.

    Two symmetric buffers, used by alternate calls (the caller alternates ``parity``, also across
    CUDA-graph replays): a peer that has passed the barrier of call i+1 may write call i+2's tiles,
    and this rank reached that barrier only after its sum of call i."""

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


class MatmulPushSequenceParallel:
    """The same with a reduce-scatter in the epilogue and an all-gather in the norm's stores: takes
    this rank's residual rows, returns (the normalized rows of all ranks, this rank's new residual
    rows). One buffer of each kind suffices: a peer writes this rank's slots only after the
    all-gather barrier, which this rank passes after its sum, and its gather buffer only after the
    reduce-scatter barrier, which this rank passes after the matmul that read it."""

    def __init__(self, group_name: str, rank: int, world: int, max_rows: int, cols: int):
        import torch.distributed._symmetric_memory as symm_mem

        self.rank, self.world, self.cols = rank, world, cols
        self.slots, self.gather = (symm_mem.empty(max_rows * cols, dtype=torch.bfloat16, device="cuda") for _ in range(2))
        self.slots_handle, self.gather_handle = (symm_mem.rendezvous(b, group_name) for b in (self.slots, self.gather))
        self.slot_dests, self.gather_dests = (
            tuple(h.get_buffer(p, (max_rows * cols,), torch.bfloat16, 0) for p in range(world))
            for h in (self.slots_handle, self.gather_handle))

    def __call__(self, act: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor,
                 norm_weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rows = act.shape[0]
        block = rows // self.world
        matmul_push(act, weight, self.slot_dests, self.rank * block * self.cols, self.rank, rows_per_dest=block)
        self.slots_handle.barrier(channel=0)
        slots = self.slots[:rows * self.cols].view(self.world, block, self.cols)
        _, residual_out = sum_add_rms_norm(slots, residual, norm_weight, outs=self.gather_dests,
                                           out_row_offset=self.rank * block)
        self.gather_handle.barrier(channel=0)
        return self.gather[:rows * self.cols].view(rows, self.cols), residual_out
