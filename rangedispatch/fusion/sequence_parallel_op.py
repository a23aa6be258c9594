"""The ops of the sequence-parallel tier: the token rows of an activation split over the ranks.

``sp_reduce_scatter`` sums the ranks' inputs and keeps this rank's block of token rows;
``sp_shard`` takes that block of a tensor every rank holds whole (no communication); ``sp_all_gather``
puts the blocks back together. Tokens are the rows of the input flattened to ``[-1, hidden]``; a
token count that the world size does not divide is padded with zero rows up to the next multiple
(the padding rows only ever hold zeros and the norm of zeros, and are cut off by the gather), so
every range of token counts can use the tier. The collectives run through the process group
(NCCL on GPUs, gloo on CPU).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from rangedispatch import torch_internals
from rangedispatch.fusion.sites import group_size


def token_rows(x: torch.Tensor, world: int) -> torch.Tensor:
    """``x`` as ``[tokens, hidden]``, padded with zero rows to a multiple of ``world``."""
    flat = x.reshape(-1, x.shape[-1])
    pad = -flat.shape[0] % world
    return torch.nn.functional.pad(flat, (0, 0, 0, pad)) if pad else flat


def _block_rows(tokens, world):
    """Rows of one rank's block: the token count over the world size, rounded up."""
    return (tokens + world - 1) // world


@torch.library.custom_op("rangedispatch::sp_reduce_scatter", mutates_args=())
def sp_reduce_scatter(input: torch.Tensor, group_name: str) -> torch.Tensor:
    """The sum over the group of ``input``, this rank's block of token rows."""
    world = group_size(group_name)
    return torch_internals.reduce_scatter_sum(token_rows(input, world), world, group_name)


@torch.library.custom_op("rangedispatch::sp_shard", mutates_args=())
def sp_shard(input: torch.Tensor, group_name: str) -> torch.Tensor:
    """This rank's block of token rows of ``input`` (which every rank holds whole)."""
    group = torch_internals.resolve_process_group(group_name)
    flat = input.reshape(-1, input.shape[-1])
    block = _block_rows(flat.shape[0], group.size())
    start = dist.get_rank(group) * block
    part = flat[start:start + block]  # the last ranks' blocks may run past the tokens: zero rows there
    short = block - part.shape[0]
    return torch.nn.functional.pad(part, (0, 0, 0, short)) if short else part.clone()


@torch.library.custom_op("rangedispatch::sp_all_gather", mutates_args=())
def sp_all_gather(shard: torch.Tensor, group_name: str, shape: list[int]) -> torch.Tensor:
    """Every rank's block put back together, cut to the tokens of ``shape`` and viewed as it."""
    full = torch_internals.all_gather(shard.contiguous(), group_size(group_name), group_name)
    return full[:math.prod(shape[:-1])].view(shape)  # a view of the gathered tensor, not of an input


def _block_like(input, group_name):
    world = group_size(group_name)
    return input.new_empty((_block_rows(input.numel() // input.shape[-1], world), input.shape[-1]))


sp_reduce_scatter.register_fake(_block_like)
sp_shard.register_fake(_block_like)


@sp_all_gather.register_fake
def _(shard, group_name, shape):
    return shard.new_empty(shape)


SP_REDUCE_SCATTER = torch.ops.rangedispatch.sp_reduce_scatter.default
SP_SHARD = torch.ops.rangedispatch.sp_shard.default
SP_ALL_GATHER = torch.ops.rangedispatch.sp_all_gather.default
