"""``torch.ops.rangedispatch.symm_mem_all_reduce``: the middle all-reduce tier.

PyTorch's symmetric-memory kernels (one-shot: every rank reads every peer's buffer; two-shot:
reduce-scatter then all-gather through peer memory) beat NCCL at mid sizes over NVLink, but their
input must sit in a buffer every rank of the group has mapped. The op copies its input into one such
buffer per (group, dtype, device), sized for the tier's largest token count and made (collectively,
with a rendezvous) on first use, so that a CUDA-graph capture never allocates one, and writes the sum
to a fresh tensor: the norm after it stays in the Inductor graph. Sum only, bf16 and fp32 (the
kernels' dtypes); multicast (``multimem_*``) is never used.

``backend="reference"`` reduces through the process group instead (CPU, tests); a ``symm_mem`` call
that cannot run (not CUDA, another dtype, the kernels failing) does the same, with one warning.
"""

from __future__ import annotations

import logging
from typing import Optional

import torch

from rangedispatch import torch_internals
from rangedispatch.fusion.tiers import REFERENCE
from rangedispatch.logs import warn_once

log = logging.getLogger("rangedispatch")

SUPPORTED_DTYPES = (torch.bfloat16, torch.float32)


def site_unsupported(backend: str, device: torch.device, dtype: torch.dtype, hidden: int, world: int) -> Optional[str]:
    """Why an all-reduce cannot use this tier at all (it stays with NCCL), or None."""
    if world < 2:
        return f"world size {world} has nothing to all-reduce across"
    if backend == REFERENCE:
        return None
    from rangedispatch.fusion.sites import gpu_row_unsupported

    return gpu_row_unsupported("symm_mem", device, dtype, hidden, SUPPORTED_DTYPES)


class SymmMemBuffers:
    """One symmetric buffer per (group, dtype, device), grown only outside CUDA-graph capture."""

    def __init__(self) -> None:
        self._buffers: dict[tuple, torch.Tensor] = {}

    def get(self, group_name: str, dtype: torch.dtype, device: torch.device, numel: int) -> torch.Tensor:
        key = (group_name, dtype, device)
        buf = self._buffers.get(key)
        if buf is None or buf.numel() < numel:
            if torch.cuda.is_current_stream_capturing():
                raise RuntimeError(
                    f"symm_mem_all_reduce: the symmetric buffer for group {group_name} holds "
                    f"{0 if buf is None else buf.numel()} elements, {numel} are needed, and it cannot be made "
                    "during CUDA-graph capture: run one call of the largest size before capturing")
            buf = torch_internals.symmetric_buffer(numel, dtype, device, group_name)
            log.info("symm_mem buffer for group %s: %d x %s (%.1f MiB)", group_name, numel, dtype,
                     numel * buf.element_size() / 2**20)
            self._buffers[key] = buf
        return buf


BUFFERS = SymmMemBuffers()


def _call_unsupported(backend: str, input: torch.Tensor, group_name: str) -> Optional[str]:
    from rangedispatch.fusion.sites import group_size

    return site_unsupported(backend, input.device, input.dtype, input.shape[-1] if input.dim() else 0,
                            group_size(group_name))


def _symm_mem_all_reduce(input: torch.Tensor, group_name: str, oneshot_max_bytes: int, max_tokens: int) -> torch.Tensor:
    flat = input.reshape(-1)
    row = input.shape[-1]
    buf = BUFFERS.get(group_name, input.dtype, input.device, max(max_tokens * row, flat.numel()))[: flat.numel()]
    out = torch.empty_like(flat)
    ops = torch.ops.symm_mem
    if flat.numel() * flat.element_size() <= oneshot_max_bytes:
        if hasattr(ops, "one_shot_all_reduce_copy_out"):  # copies in inside the kernel
            ops.one_shot_all_reduce_copy_out(buf, flat, "sum", group_name, out)
        else:
            buf.copy_(flat)
            ops.one_shot_all_reduce_out(buf, "sum", group_name, out)
    else:
        buf.copy_(flat)
        if hasattr(ops, "two_shot_all_reduce_out"):
            ops.two_shot_all_reduce_out(buf, "sum", group_name, out)
        else:
            out.copy_(ops.two_shot_all_reduce_(buf, "sum", group_name))
    return out.view(input.shape)


@torch.library.custom_op("rangedispatch::symm_mem_all_reduce", mutates_args=())
def symm_mem_all_reduce(input: torch.Tensor, group_name: str, backend: str, oneshot_max_bytes: int,
                        max_tokens: int) -> torch.Tensor:
    """Sum of ``input`` over the group. ``oneshot_max_bytes``: one-shot up to this input size (bytes
    per rank), two-shot above. ``max_tokens``: the tier's largest token count, which sizes the buffer."""
    if backend != REFERENCE:
        reason = _call_unsupported(backend, input, group_name)
        if reason is None:
            try:
                return _symm_mem_all_reduce(input, group_name, oneshot_max_bytes, max_tokens)
            except (RuntimeError, AttributeError, ImportError) as e:
                if torch.cuda.is_current_stream_capturing():
                    raise
                reason = f"{type(e).__name__}: {e}"
        warn_once(f"symm_mem all-reduce falls back to the process group: {reason}")
    return torch_internals.all_reduce_sum(input, group_name)


@symm_mem_all_reduce.register_fake
def _(input, group_name, backend, oneshot_max_bytes, max_tokens):
    return torch.empty_like(input)


SYMM_MEM_OP = torch.ops.rangedispatch.symm_mem_all_reduce.default
