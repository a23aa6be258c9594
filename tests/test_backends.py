"""The fused op's backend registry on CPU: FlashInfer's site checks (no FlashInfer import needed) and
the per-call fallback to the reference backend, warned once."""

import torch

from rangedispatch.cli.launch import spawn_ranks


def test_flashinfer_site_checks_without_importing_flashinfer():
    import sys

    from rangedispatch.fusion.backends.flashinfer import BACKEND

    cuda = torch.device("cuda", 0)
    assert BACKEND.site_unsupported(cuda, torch.bfloat16, 4096, 2) is None
    assert "needs CUDA tensors" in BACKEND.site_unsupported(torch.device("cpu"), torch.bfloat16, 4096, 2)
    assert "world size 3 not supported" in BACKEND.site_unsupported(cuda, torch.bfloat16, 4096, 3)
    assert "hidden size 12" in BACKEND.site_unsupported(cuda, torch.bfloat16, 12, 2)
    assert "dtype torch.float64" in BACKEND.site_unsupported(cuda, torch.float64, 4096, 2)
    assert "flashinfer" not in sys.modules


def _fallback(rank, world):
    import logging

    import rangedispatch.fusion.allreduce_rmsnorm_op  # noqa: F401
    from rangedispatch.fusion.numerics import rms_norm

    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("rangedispatch").addHandler(handler)
    group = torch.distributed.group.WORLD.group_name
    torch.manual_seed(0)
    x, w = torch.randn(4, 64), torch.randn(64)
    outs = [torch.ops.rangedispatch.fused_allreduce_rmsnorm(x, None, w, None, 1e-6, "standard", group, "flashinfer", 0, 16)
            for _ in range(2)]
    expected = rms_norm(x * world, w, 1e-6, "standard")
    warnings = [r.getMessage() for r in records if r.levelno == logging.WARNING]
    return [torch.allclose(o[0], expected) and torch.allclose(o[1], x * world) for o in outs], warnings


def test_unsupported_backend_falls_back_to_reference_with_one_warning():
    ok, warnings = spawn_ranks(_fallback, 2, backend="gloo")[0]
    assert ok == [True, True]
    assert len(warnings) == 1 and "fused backend flashinfer falls back to reference" in warnings[0]
