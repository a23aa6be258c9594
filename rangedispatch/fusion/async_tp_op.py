"""The ops of async tensor parallelism: the sequence-parallel tier's collectives overlapped with the
matmuls next to them.

``sp_all_gather_matmul`` gathers the token blocks of a norm output and multiplies the whole by one or
more weights (the column-parallel projections that read it); ``sp_matmul_reduce_scatter`` multiplies
and reduce-scatters (the row-parallel projection before a site). On CUDA, ``backend="symm_mem"``
runs them as PyTorch's symmetric-memory ``fused_all_gather_matmul`` / ``fused_matmul_reduce_scatter``,
which split the matmul by rank block and move each block over NVLink while the others multiply.
Token counts the world size does not divide are padded with zero rows, as in
``sequence_parallel_op.py`` (whose blocks these are); the padding rows are cut off after the gather.

The symmetric workspace both ops share is sized for the range's largest token count on first use,
outside any CUDA-graph capture, so that a graph captured later never sees it reallocated. The
gathered input is always returned (``return_A``), which keeps PyTorch off its multicast variant.

``backend="reference"`` (CPU, tests), or a call that cannot use the kernels (not CUDA, the kernels
failing outside a capture), runs the same math through the process group, saying so once.
"""

from __future__ import annotations

import math

import torch

from rangedispatch import torch_internals
from rangedispatch.fusion.sequence_parallel_op import token_rows, sp_all_gather, sp_reduce_scatter
from rangedispatch.fusion.sites import group_size
from rangedispatch.fusion.tiers import REFERENCE
from rangedispatch.logs import warn_once


def _block_bytes(max_tokens: int, world: int, row: int, dtype: torch.dtype) -> int:
    """Bytes of one rank's block of ``max_tokens`` rows of ``row`` elements."""
    return -(-max_tokens // world) * row * dtype.itemsize


def _fast_path(backend: str, device: torch.device, what: str) -> bool:
    if backend != REFERENCE and device.type != "cuda":
        warn_once(f"async TP {what} runs through the process group: its kernels need CUDA, not {device.type}")
    return backend != REFERENCE and device.type == "cuda"


def _fall_back(what: str, error: Exception) -> None:
    if torch.cuda.is_current_stream_capturing():
        raise error
    warn_once(f"async TP {what} falls back to the process group: {type(error).__name__}: {error}")


@torch.library.custom_op("rangedispatch::sp_all_gather_matmul", mutates_args=())
def sp_all_gather_matmul(shard: torch.Tensor, weights: list[torch.Tensor], group_name: str, shape: list[int],
                         backend: str, max_tokens: int) -> list[torch.Tensor]:
    """``[gathered, gathered @ w for w in weights]``: the gathered tensor cut to the tokens of
    ``shape`` and viewed as it; each product as ``[tokens, w.shape[1]]``."""
    tokens = math.prod(shape[:-1])
    if _fast_path(backend, shard.device, "all-gather + matmul"):
        world = group_size(group_name)
        try:
            block = _block_bytes(max_tokens, world, shard.shape[-1], shard.dtype)
            torch_internals.reserve_symm_mem_workspace(group_name, block)
            full, products = torch.ops.symm_mem.fused_all_gather_matmul(
                shard.contiguous(), weights, 0, group_name, return_A=True)
            return [full[:tokens].view(shape), *(p[:tokens] for p in products)]
        except (RuntimeError, AttributeError, ImportError) as e:
            _fall_back("all-gather + matmul", e)
    gathered = sp_all_gather(shard, group_name, shape)
    flat = gathered.reshape(tokens, shard.shape[-1])
    return [gathered, *(flat @ w for w in weights)]


@sp_all_gather_matmul.register_fake
def _(shard, weights, group_name, shape, backend, max_tokens):
    tokens = math.prod(shape[:-1])
    return [shard.new_empty(shape), *(shard.new_empty((tokens, w.shape[1])) for w in weights)]


@torch.library.custom_op("rangedispatch::sp_matmul_reduce_scatter", mutates_args=())
def sp_matmul_reduce_scatter(input: torch.Tensor, weight: torch.Tensor, group_name: str, backend: str,
                             max_tokens: int) -> torch.Tensor:
    """This rank's block of token rows of the sum over the group of ``input @ weight`` (``input``:
    ``[tokens, k]``)."""
    if _fast_path(backend, input.device, "matmul + reduce-scatter"):
        world = group_size(group_name)
        try:
            block = _block_bytes(max_tokens, world, weight.shape[1], input.dtype)
            torch_internals.reserve_symm_mem_workspace(group_name, 2 * block)
            return torch.ops.symm_mem.fused_matmul_reduce_scatter(token_rows(input, world), weight, "sum", 0, group_name)
        except (RuntimeError, AttributeError, ImportError) as e:
            _fall_back("matmul + reduce-scatter", e)
    return sp_reduce_scatter(input @ weight, group_name)


@sp_matmul_reduce_scatter.register_fake
def _(input, weight, group_name, backend, max_tokens):
    block = (input.shape[0] + group_size(group_name) - 1) // group_size(group_name)  # as sp_reduce_scatter
    return input.new_empty((block, weight.shape[1]))


SP_ALL_GATHER_MATMUL = torch.ops.rangedispatch.sp_all_gather_matmul.default
SP_MATMUL_REDUCE_SCATTER = torch.ops.rangedispatch.sp_matmul_reduce_scatter.default
