"""FlashInfer's ``allreduce_fusion`` (TRT-LLM one-shot / two-shot kernels) behind the fused op.

Imported only when the flashinfer backend is asked for. The workspace is created over the model's
own process group (never WORLD: that deadlocked vLLM under DP/PP), lazily on the first call, sized
for the largest fused token count, and destroyed at exit. Multicast (MNNVL) is never used.
Numerics: FlashInfer scales by the weight in fp32 and casts once, so the LLaMA form (cast, then
scale in bf16) differs by at most one bf16 rounding; FP8 multiplies by ``1/scale``.
"""

from __future__ import annotations

import atexit
import logging
from typing import Any, Optional

import torch

from rangedispatch import torch_internals
from rangedispatch.fusion.backends import FusedCall
from rangedispatch.fusion.sites import group_size, gpu_row_unsupported

log = logging.getLogger("rangedispatch")

SUPPORTED_WORLD_SIZES = (2, 4, 8, 16)
SUPPORTED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


class FlashInferBackend:
    name = "flashinfer"

    def __init__(self) -> None:
        self._comm: Any = None
        self._import_error: Optional[str] = None
        self._workspaces: dict[tuple, Any] = {}
        self._ones: dict[tuple, torch.Tensor] = {}
        atexit.register(self.destroy)

    def _flashinfer(self) -> Any:
        if self._comm is None and self._import_error is None:
            try:
                import flashinfer.comm as comm

                self._comm = comm
            except Exception as e:  # ImportError, or its kernels failing to load
                self._import_error = f"flashinfer.comm unavailable ({type(e).__name__}: {e})"
        return self._comm

    def site_unsupported(self, device: torch.device, dtype: torch.dtype, hidden: int, world: int) -> Optional[str]:
        """Why an all-reduce site cannot use this backend (the pass then leaves it unfused), or None.
        Decided from the traced graph, without importing FlashInfer."""
        if world not in SUPPORTED_WORLD_SIZES:
            return f"flashinfer: world size {world} not supported ({SUPPORTED_WORLD_SIZES})"
        return gpu_row_unsupported("flashinfer", device, dtype, hidden, SUPPORTED_DTYPES)

    def unsupported(self, call: FusedCall) -> Optional[str]:
        x = call.input
        reason = self.site_unsupported(x.device, x.dtype, x.shape[-1], group_size(call.group_name))
        if reason is None and self._flashinfer() is None:
            reason = self._import_error
        return reason

    def _workspace(self, call: FusedCall, hidden: int) -> Any:
        x = call.input
        key = (call.group_name, hidden, x.dtype, x.device)
        ws = self._workspaces.get(key)
        if ws is None:
            group = torch_internals.resolve_process_group(call.group_name)
            max_tokens = max(call.max_tokens, x.numel() // hidden)
            ws = self._comm.create_allreduce_fusion_workspace(
                backend="trtllm", world_size=group.size(), rank=group.rank(), max_token_num=max_tokens,
                hidden_dim=hidden, dtype=x.dtype, group=group,
            )
            log.info("flashinfer workspace for group %s: %d tokens x %d, %s", call.group_name, max_tokens, hidden, x.dtype)
            self._workspaces[key] = ws
        return ws

    def run(self, call: FusedCall) -> tuple[torch.Tensor, torch.Tensor]:
        comm = self._comm
        x = call.input
        hidden = x.shape[-1]
        flat = x.reshape(-1, hidden).contiguous()
        tokens = flat.shape[0]
        ws = self._workspace(call, hidden)
        world = ws.world_size
        residual = (call.residual.reshape(-1, hidden).contiguous() if call.residual is not None
                    else torch.zeros_like(flat))
        weight, bias = self._weight(call, hidden, x)
        oneshot = tokens <= world or flat.numel() * flat.element_size() <= call.oneshot_max_bytes
        residual_out = torch.empty_like(flat)
        kwargs = dict(input=flat, workspace=ws, launch_with_pdl=False, trigger_completion_at_end=True,
                      residual_out=residual_out, residual_in=residual, rms_gamma=weight, rms_eps=call.eps,
                      use_oneshot=oneshot, fp32_acc=True, weight_bias=bias)
        if call.scale is not None:
            out = torch.empty(flat.shape, dtype=torch.float8_e4m3fn, device=x.device)
            comm.allreduce_fusion(pattern=comm.AllReduceFusionPattern.kARResidualRMSNormFP8Quant,
                                  quant_out=out, scale_factor=call.scale, **kwargs)
        else:
            out = torch.empty_like(flat)
            comm.allreduce_fusion(pattern=comm.AllReduceFusionPattern.kARResidualRMSNorm, norm_out=out, **kwargs)
        return out.view(x.shape), residual_out.view(x.shape)

    def _weight(self, call: FusedCall, hidden: int, x: torch.Tensor) -> tuple[torch.Tensor, float]:
        if call.weight_mode == "gemma":
            return call.weight, 1.0
        if call.weight is not None:
            return call.weight, 0.0
        key = (hidden, x.dtype, x.device)
        ones = self._ones.get(key)
        if ones is None:
            ones = self._ones[key] = torch.ones(hidden, dtype=x.dtype, device=x.device)
        return ones, 0.0

    def destroy(self) -> None:
        for ws in self._workspaces.values():
            try:
                ws.destroy()
            except Exception as e:  # at exit: report, never raise
                log.debug("flashinfer workspace destroy failed: %s", e)
        self._workspaces.clear()


BACKEND = FlashInferBackend()
