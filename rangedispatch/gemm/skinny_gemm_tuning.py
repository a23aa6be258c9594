"""Which tile configuration, if any, runs the matmuls of one input in a range faster than cuBLAS.

Timed on the device at compile time, as Inductor's own autotuning is: for one group of weight shapes
(N1 + N2 ... x K, dtype, biases or not), each candidate of ``CANDIDATES`` as one launch, and cuBLAS
as one call per weight, at the first and the last token count of the range, with random values,
each inside a CUDA graph (what serving replays; the launch cost of a few-microsecond kernel would
swamp it otherwise). A candidate must be faster at both sizes and ``MIN_GAIN`` faster over both, or
cuBLAS stays. It must also give cuBLAS's results. The candidates are compiled together on
Inductor's compile threads before the first is timed. Choices are kept per process, so a group of
shapes is timed once per range whatever graph holds it.
"""

from __future__ import annotations

import logging
from typing import Optional

import torch

from rangedispatch import torch_internals
from rangedispatch.gemm.skinny_gemm_op import CANDIDATES, TileConfig, block_m_for, skinny_mm
from rangedispatch.ranges import Range

log = logging.getLogger("rangedispatch")

MIN_GAIN = 0.02  # the least speed-up over cuBLAS, summed over the range's two ends, that replaces it
_MAX_REL_ERROR = 2e-2  # a candidate farther than this from cuBLAS's result has a bug: never chosen

# (device, dtype, (N, ...), K, biases?, range, always) -> the chosen configuration (None: cuBLAS stays)
_chosen: dict[tuple, Optional[TileConfig]] = {}


def choose(device: torch.device, dtype: torch.dtype, ns: tuple[int, ...], k: int, has_bias: bool, r: Range,
           always: bool = False) -> Optional[TileConfig]:
    """The configuration for ``[M, K] x [K, N]`` matmuls of one input, one per ``N`` in ``ns``, as one
    launch at ``r``'s token counts, or None for cuBLAS. ``always``: the fastest candidate even where
    cuBLAS is faster."""
    key = (str(device), dtype, ns, k, has_bias, r, always)
    if key not in _chosen and torch.cuda.is_current_stream_capturing():
        log.info("skinny GEMM %sx%d for %s tokens: cuBLAS kept (compiled during a CUDA-graph capture, where "
                 "nothing can be timed)", "+".join(map(str, ns)), k, r)
        return None
    if key not in _chosen:
        _chosen[key] = _time_and_pick(device, dtype, ns, k, has_bias, r, always)
    return _chosen[key]


def _rel_error(outs: list[torch.Tensor], refs: list[torch.Tensor]) -> float:
    return max(((out.float() - ref).norm() / ref.norm()).item() for out, ref in zip(outs, refs))


def _time_and_pick(device: torch.device, dtype: torch.dtype, ns: tuple[int, ...], k: int, has_bias: bool,
                   r: Range, always: bool) -> Optional[TileConfig]:
    from triton.testing import do_bench_cudagraph

    from rangedispatch.gemm._skinny_gemm_triton import compile_configs

    shape = f"{'+'.join(map(str, ns))}x{k} {str(dtype).removeprefix('torch.')}{' +bias' if has_bias else ''}"
    with torch_internals.real_tensors(), torch.no_grad(), torch.cuda.device(device):
        bs = [(torch.randn(n, k, dtype=dtype, device=device) * k ** -0.5).t() for n in ns]
        biases = [torch.randn(n, dtype=dtype, device=device) for n in ns] if has_bias else []
        rows = [torch.randn(m, k, dtype=dtype, device=device) for m in sorted({r.start, r.end})]

        def cublas(a: torch.Tensor) -> list[torch.Tensor]:
            if not biases:
                return [a @ b for b in bs]
            return [torch.addmm(bias, a, b) for b, bias in zip(bs, biases)]

        def time_ms(fn) -> float:
            return do_bench_cudagraph(fn, rep=10, return_mode="median")

        base = [time_ms(lambda a=a: cublas(a)) for a in rows]
        refs = [[out.float() for out in cublas(a)] for a in rows]
        configs = [TileConfig(block_m_for(r.end), *cand) for cand in CANDIDATES]
        compile_configs(rows, bs, biases, configs)
        timed: list[tuple[float, TileConfig]] = []
        for cfg in configs:
            try:
                err = max(_rel_error(skinny_mm(a, bs, biases, list(cfg)), ref) for a, ref in zip(rows, refs))
                if not err <= _MAX_REL_ERROR:
                    log.warning("skinny GEMM %s (%s): relative error %.1e against cuBLAS; not used", cfg, shape, err)
                    continue
                times = [time_ms(lambda a=a, cfg=cfg: skinny_mm(a, bs, biases, list(cfg))) for a in rows]
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
