"""The reference backend: all-reduce through the model's process group, then eager's exact math.
Runs on any device; what CPU uses and what GPU backends fall back to."""

from __future__ import annotations

from rangedispatch import torch_internals
from rangedispatch.fusion.numerics import quantize_fp8, rms_norm


class ReferenceBackend:
    name = "reference"

    def site_unsupported(self, device, dtype, hidden, world):
        return None

    def unsupported(self, call):
        return None

    def run(self, call):
        h = torch_internals.all_reduce_sum(call.input, call.group_name)
        if call.residual is not None:
            h = h + call.residual
        out = rms_norm(h, call.weight, call.eps, call.weight_mode)
        if call.scale is not None:
            out = quantize_fp8(out, call.scale)
        return out, h


BACKEND = ReferenceBackend()
