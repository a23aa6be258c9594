"""``torch.ops.rangedispatch.skinny_mm``: ``[a @ b (+ bias) for each b]`` in one launch of the
Triton skinny GEMM.

The op takes the matmuls that read one input as Inductor's post-grad graph has them (each ``b`` is
the ``[K, N]`` transposed view of a linear layer's ``[N, K]`` weight; up to ``MAX_WEIGHTS`` of them)
plus one tile configuration, fixed when the pass picked it. Any M is correct (the grid covers all row
blocks); the configuration was timed for the range's sizes. CUDA, bf16 and fp16 only:
``unsupported`` says why a matmul stays with cuBLAS.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

SUPPORTED_DTYPES = (torch.bfloat16, torch.float16)
MAX_WEIGHTS = 4  # weights one launch takes
_MAX_ELEMENTS = 2 ** 31 - 1  # the kernel's offsets are 32-bit


class TileConfig(NamedTuple):
    """One launch configuration of the kernel."""

    block_m: int  # rows of ``a`` per program (16 at least: the tensor-core tile)
    block_n: int  # columns of the output per program
    block_k: int  # the slice of K each step streams
    split_k: int  # programs sharing one tile's K (> 1: fp32 atomics, then a cast)
    num_warps: int
    num_stages: int  # software pipeline depth of the K loop

    def __str__(self) -> str:
        return (f"{self.block_m}x{self.block_n}x{self.block_k} split_k={self.split_k} warps={self.num_warps} "
                f"stages={self.num_stages}")


# (block_n, block_k, split_k, num_warps, num_stages): the configurations that came out best for
# one rank's Llama weights at TP=2, hidden 4096 and 8192, at 16 and 32 rows, on H200
# (benchmarks/results/h200x1_2026-11-28/skinny_gemm_sweep_16.txt, skinny_rows_32.txt); the split-K
# ones for short weights.
CANDIDATES: tuple[tuple[int, int, int, int, int], ...] = (
    (64, 128, 1, 4, 4),
    (64, 128, 1, 4, 6),
    (32, 128, 1, 4, 6),
    (32, 256, 1, 4, 6),
    (64, 256, 1, 4, 4),
    (128, 128, 1, 4, 4),
    (64, 256, 1, 8, 4),
    (64, 512, 1, 4, 3),
    (32, 512, 1, 4, 4),
    (32, 128, 4, 4, 3),
    (64, 128, 4, 4, 3),
)


MAX_BLOCK_M = 64  # more rows run as more row blocks, next to each other on the grid


def block_m_for(max_rows: int) -> int:
    """The row block for up to ``max_rows`` rows: the power of two that covers them, from 16 to
    ``MAX_BLOCK_M``."""
    return min(MAX_BLOCK_M, max(16, 1 << (max(1, max_rows) - 1).bit_length()))


def unsupported(a: torch.Tensor, b: torch.Tensor, bias: Optional[torch.Tensor]) -> Optional[str]:
    """Why this matmul (fake or real values) cannot use the op, or None."""
    if a.device.type != "cuda":
        return f"not CUDA ({a.device.type})"
    if a.dtype not in SUPPORTED_DTYPES or b.dtype != a.dtype:
        return f"{a.dtype} x {b.dtype} (the kernel takes bf16 or fp16 on both sides)"
    if a.dim() != 2 or b.dim() != 2:
        return f"operands of rank {a.dim()} and {b.dim()}"
    if isinstance(b.shape[0], torch.SymInt) or isinstance(b.shape[1], torch.SymInt):
        return "a weight of symbolic shape"
    if b.stride(0) != 1:
        return f"b has strides {tuple(b.stride())} (the kernel streams a [N, K] row-major weight along K)"
    if b.shape[1] * b.stride(1) > _MAX_ELEMENTS:
        return f"a weight of {b.shape[1]} x {b.stride(1)} elements (the kernel's offsets are 32-bit)"
    if bias is not None and (bias.dim() != 1 or bias.dtype != a.dtype or bias.stride(0) != 1):
        return f"a bias of shape {tuple(bias.shape)}, {bias.dtype}"
    return None


@torch.library.custom_op("rangedispatch::skinny_mm", mutates_args=())
def skinny_mm(a: torch.Tensor, bs: list[torch.Tensor], biases: list[torch.Tensor],
              config: list[int]) -> list[torch.Tensor]:
    """``[a @ b (+ bias) for each b]`` with the tile configuration ``config`` (a ``TileConfig`` as a
    list); ``biases``: one per ``b``, or none."""
    from rangedispatch.gemm._skinny_gemm_triton import launch

    return launch(a, bs, biases, *TileConfig(*config))


@skinny_mm.register_fake
def _(a, bs, biases, config):
    return [a.new_empty(a.shape[0], b.shape[1]) for b in bs]


SKINNY_MM_OP = torch.ops.rangedispatch.skinny_mm.default
