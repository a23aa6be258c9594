"""Which tile configuration, if any, runs one matmul of a range faster than cuBLAS.

Timed on the device at compile time, as Inductor's own autotuning is: for one weight shape
(N x K, dtype, bias or not), each candidate of ``CANDIDATES`` and cuBLAS at the first and the last
token count of the range, with random values, each inside a CUDA graph (what serving replays; the
launch cost of a few-microsecond kernel would swamp it otherwise). A candidate must be faster at
both sizes and ``MIN_GAIN`` faster over both, or cuBLAS stays. It must also give cuBLAS's result.
Choices are kept per process, so a weight shape is timed once per range whatever graph holds it.
"""

from __future__ import annotations

import logging
from typing import Optional

import torch

from rangedispatch.gemm.skinny_gemm_op import CANDIDATES, TileConfig, block_m_for, skinny_mm
from rangedispatch.ranges import Range

log = logging.getLogger("rangedispatch")

MIN_GAIN = 0.02  # the least speed-up over cuBLAS, summed over the range's two ends, that replaces it
_MAX_REL_ERROR = 2e-2  # a candidate farther than this from cuBLAS's result has a bug: never chosen

# (device, dtype, N, K, bias?, range, always) -> the chosen configuration (None: cuBLAS stays)
_chosen: dict[tuple, Optional[TileConfig]] = {}


def choose(device: torch.device, dtype: torch.dtype, n: int, k: int, has_bias: bool, r: Range,
           always: bool = False) -> Optional[TileConfig]:
    """The configuration for an ``[M, K] x [K, N]`` matmul at ``r``'s token counts, or None for
    cuBLAS. ``always``: the fastest candidate even where cuBLAS is faster."""
    key = (str(device), dtype, n, k, has_bias, r, always)
    if key not in _chosen and torch.cuda.is_current_stream_capturing():
        log.info("skinny GEMM %dx%d for %s tokens: cuBLAS kept (compiled during a CUDA-graph capture, where "
                 "nothing can be timed)", n, k, r)
        return None
    if key not in _chosen:
        _chosen[key] = _time_and_pick(device, dtype, n, k, has_bias, r, always)
    return _chosen[key]


def _time_and_pick(device: torch.device, dtype: torch.dtype, n: int, k: int, has_bias: bool, r: Range,
                   always: bool) -> Optional[TileConfig]:
    from triton.testing import do_bench_cudagraph

    from torch._subclasses.fake_tensor import unset_fake_temporarily

    shape = f"{n}x{k} {str(dtype).removeprefix('torch.')}{' +bias' if has_bias else ''}"
    with unset_fake_temporarily(), torch.no_grad(), torch.cuda.device(device):
        weight = torch.randn(n, k, dtype=dtype, device=device) * k ** -0.5
        bias = torch.randn(n, dtype=dtype, device=device) if has_bias else None
        rows = [torch.randn(m, k, dtype=dtype, device=device) for m in sorted({r.start, r.end})]

        def cublas(a: torch.Tensor) -> torch.Tensor:
            return torch.addmm(bias, a, weight.t()) if bias is not None else a @ weight.t()

        def time_ms(fn) -> float:
            return do_bench_cudagraph(fn, rep=10, return_mode="median")

        base = [time_ms(lambda a=a: cublas(a)) for a in rows]
        refs = [cublas(a).float() for a in rows]
        timed: list[tuple[float, TileConfig]] = []
        for cand in CANDIDATES:
            cfg = TileConfig(block_m_for(r.end), *cand)
            try:
                err = max(((skinny_mm(a, weight.t(), bias, list(cfg)).float() - ref).norm() / ref.norm()).item()
                          for a, ref in zip(rows, refs))
                if not err <= _MAX_REL_ERROR:
                    log.warning("skinny GEMM %s (%s): relative error %.1e against cuBLAS; not used", cfg, shape, err)
                    continue
                times = [time_ms(lambda a=a, cfg=cfg: skinny_mm(a, weight.t(), bias, list(cfg))) for a in rows]
            except Exception as e:  # a candidate that does not compile here (shared memory)
                log.debug("skinny GEMM %s (%s) skipped: %s", cfg, shape, e)
                continue
            if always or all(t < b for t, b in zip(times, base)):
                timed.append((sum(times), cfg))
    if not timed:
        log.info("skinny GEMM %s for %s tokens: cuBLAS kept (no candidate faster at %s rows)", shape, r,
                 " and ".join(str(a.shape[0]) for a in rows))
        return None
    total, best = min(timed)
    gain = sum(base) / total
    if not always and gain < 1 + MIN_GAIN:
        log.info("skinny GEMM %s for %s tokens: cuBLAS kept (best %s only x%.3f)", shape, r, best, gain)
        return None
    log.info("skinny GEMM %s for %s tokens: %s, x%.3f over cuBLAS (%s us)", shape, r, best, gain,
             "/".join(f"{b * 1e3:.1f}" for b in base))
    return best
