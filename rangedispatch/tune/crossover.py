"""From a sweep of timings to byte thresholds, robust to noise.

A sweep is rows ``{hidden, tokens, bytes, fp8, tier, us}`` with tier ``nccl`` (NCCL + compiled norm)
and fused tiers (``oneshot``, ``twoshot`` on GPUs; ``reference`` on CPU). Per series (hidden size x FP8 or not), sorted by bytes, the
ratio fused / nccl is smoothed with a median of each inner point and its neighbours (one noisy
point neither ends nor extends a run; the end points count as measured: a loss at the smallest size
means never, at the largest it stops the run); fusion pays up to the last point of the leading run
of wins. The
profile takes the most restrictive series, never a size beyond the sweep. One-shot vs two-shot is
decided the same way inside the fused sizes.

The symmetric-memory tiers (``symm_oneshot``, ``symm_twoshot``: its all-reduce + compiled norm)
only serve sizes the fused tier leaves, so per series they are judged from the first size above that
series' fused limit: the run of wins around it gives the series' band (the run may reach below the
fused limit: the band is in bytes, and hidden sizes with a lower fused limit use that part); a loss
there caps the tier at the fused limit (it is never used at that hidden size). The profile takes the
highest start and lowest end over the series: ``[symm_mem_min_bytes, symm_mem_max_bytes]``.

The sequence-parallel tier is timed on its own unit (``block_nccl`` vs ``block_sp``: a 2-layer TP
block without and with it; ``block_async_tp``: with async TP on top). It serves the largest sizes,
so per series it pays (in its better form) from the start of the trailing run of wins; a loss at
the largest size means never. The profile keeps each hidden size's start (``sp_min_bytes_by_hidden``,
0: never) and, for hidden sizes not measured, the latest start over the series (``sp_min_bytes``;
no tier if any measured series never wins). Async TP is judged the same way against plain sequence
parallelism, per hidden size (``async_by_hidden``) and, for hidden sizes not measured, the latest
start (``async_tp_min_bytes``; none if any measured series never wins).
Both add collectives and workspaces, so a win there means at least ``SP_MIN_GAIN`` faster: a
0.1% edge at one size is within the spread between repeats.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Iterable, Optional

FUSED_TIERS = ("oneshot", "twoshot", "reference")
SYMM_TIERS = ("symm_oneshot", "symm_twoshot")
SP_BASE, SP_TIER, ASYNC_TP_TIER = "block_nccl", "block_sp", "block_async_tp"
SP_MIN_GAIN = 0.01  # the sequence-parallel forms win where they are at least 1% faster


@dataclass
class SeriesResult:
    hidden: int
    fp8: bool
    fused_max_bytes: int
    oneshot_max_bytes: Optional[int]  # None: one-shot never lost to two-shot inside the fused sizes
    capped_by_sweep: bool  # fusion still paid at the largest size measured
    # where symm-mem beat NCCL, around the first size above the fused ones: (start, end); start None:
    # it lost there (end = the fused limit); band None: nothing measured above the fused sizes
    symm_band: Optional[tuple[Optional[int], int]] = None
    symm_oneshot_max_bytes: Optional[int] = None  # None: symm one-shot never lost to two-shot in the band
    sp_from: Optional[int] = None  # sequence parallelism pays from here to the largest size; 0: lost there; None: not measured
    async_tp_from: Optional[int] = None  # async TP beats plain sequence parallelism from here; same codes


@dataclass
class Thresholds:
    fused_max_bytes: int  # the most restrictive over all hidden sizes: for hidden sizes not measured
    oneshot_max_bytes: int
    series: list[SeriesResult] = field(default_factory=list)
    by_hidden: dict[int, int] = field(default_factory=dict)  # fused_max_bytes per measured hidden size
    symm_mem_min_bytes: int = 0  # the symmetric-memory tier; max 0: none
    symm_mem_max_bytes: int = 0
    symm_mem_oneshot_max_bytes: int = 0
    sp_min_bytes: int = 0  # the sequence-parallel tier from here up (for hidden sizes not measured); 0: none
    sp_by_hidden: dict[int, int] = field(default_factory=dict)  # per measured hidden size; 0: never there
    async_tp_min_bytes: int = 0  # async TP on top of sequence parallelism from here up; 0: none
    async_by_hidden: dict[int, int] = field(default_factory=dict)  # per measured hidden size; 0: never there


def smoothed(values: list[float]) -> list[float]:
    """Median of each inner value and its two neighbours; the end values as they are."""
    return [v if i in (0, len(values) - 1) else statistics.median(values[i - 1:i + 2]) for i, v in enumerate(values)]


def leading_run_end(sizes: list[int], ratios: list[float]) -> Optional[int]:
    """The last size of the leading run where the smoothed ratio is <= 1 (None if the first loses)."""
    end = None
    for size, ratio in zip(sizes, smoothed(ratios)):
        if ratio > 1.0:
            break
        end = size
    return end


def run_around(sizes: list[int], ratios: list[float], at: int) -> Optional[tuple[int, int]]:
    """The run of sizes around ``sizes[at]`` where the smoothed ratio is <= 1, or None if it loses there."""
    wins = [r <= 1.0 for r in smoothed(ratios)]
    if not wins[at]:
        return None
    lo = hi = at
    while lo > 0 and wins[lo - 1]:
        lo -= 1
    while hi < len(sizes) - 1 and wins[hi + 1]:
        hi += 1
    return sizes[lo], sizes[hi]


def _one_vs_two(by_bytes: dict[int, dict[str, float]], sizes: list[int], one: str, two: str) -> Optional[int]:
    """Inside ``sizes``: one-shot up to the end of its leading run of wins over two-shot; None if
    it never lost (or nothing to compare), 0 if it lost from the start."""
    both = [b for b in sizes if one in by_bytes[b] and two in by_bytes[b]]
    if not both:
        return None
    end = leading_run_end(both, [by_bytes[b][one] / by_bytes[b][two] for b in both]) or 0
    return None if end == both[-1] else end


def _symm_band(by_bytes: dict[int, dict[str, float]], fused_max: int) -> Optional[tuple[Optional[int], int]]:
    sizes = sorted(b for b, t in by_bytes.items() if "nccl" in t and any(k in t for k in SYMM_TIERS))
    above = [i for i, b in enumerate(sizes) if b > fused_max]
    if not above:
        return None
    ratios = [min(v for k, v in by_bytes[b].items() if k in SYMM_TIERS) / by_bytes[b]["nccl"] for b in sizes]
    return run_around(sizes, ratios, above[0]) or (None, fused_max)


def _sp_from(by_bytes: dict[int, dict[str, float]]) -> Optional[int]:
    sizes = sorted(b for b, t in by_bytes.items() if SP_BASE in t and SP_TIER in t)
    best = [min(v for k, v in by_bytes[b].items() if k in (SP_TIER, ASYNC_TP_TIER)) for b in sizes]
    return trailing_run_start(sizes, [v / by_bytes[b][SP_BASE] for v, b in zip(best, sizes)])


def _async_tp_from(by_bytes: dict[int, dict[str, float]]) -> Optional[int]:
    sizes = sorted(b for b, t in by_bytes.items() if SP_TIER in t and ASYNC_TP_TIER in t)
    return trailing_run_start(sizes, [by_bytes[b][ASYNC_TP_TIER] / by_bytes[b][SP_TIER] for b in sizes])


def trailing_run_start(sizes: list[int], ratios: list[float]) -> Optional[int]:
    """The first size of the trailing run of (smoothed) wins by ``SP_MIN_GAIN``; 0: lost at the
    largest size; None: no sizes."""
    if not sizes:
        return None
    wins = [r <= 1.0 - SP_MIN_GAIN for r in smoothed(ratios)]
    if not wins[-1]:
        return 0
    start = len(sizes) - 1
    while start > 0 and wins[start - 1]:
        start -= 1
    return sizes[start]


def latest_start(starts: Iterable[int]) -> int:
    """The latest of the measured starts; 0 (never) if there are none or one never won."""
    starts = list(starts)
    return max(starts) if starts and all(starts) else 0


def latest_start_by_hidden(per_repeat: list[dict[int, int]]) -> dict[int, int]:
    """Per hidden size: the latest start over the repeats that measured it; 0 (never) if one never won."""
    hidden = sorted({h for r in per_repeat for h in r})
    return {h: latest_start(r[h] for r in per_repeat if h in r) for h in hidden}


def _series(rows: list[dict]) -> dict[tuple[int, bool], dict[int, dict[str, float]]]:
    out: dict[tuple[int, bool], dict[int, dict[str, float]]] = {}
    for r in rows:
        out.setdefault((r["hidden"], r["fp8"]), {}).setdefault(r["bytes"], {})[r["tier"]] = r["us"]
    return out


def thresholds(rows: Iterable[dict]) -> Thresholds:
    results = []
    for (hidden, fp8), by_bytes in sorted(_series(list(rows)).items()):
        sizes = sorted(b for b, t in by_bytes.items() if "nccl" in t and any(k in t for k in FUSED_TIERS))
        if not sizes:
            continue
        fused = [min(v for k, v in by_bytes[b].items() if k in FUSED_TIERS) for b in sizes]
        ratios = [f / by_bytes[b]["nccl"] for f, b in zip(fused, sizes)]
        fused_max = leading_run_end(sizes, ratios) or 0
        oneshot_max = _one_vs_two(by_bytes, [b for b in sizes if b <= fused_max], "oneshot", "twoshot")
        band = _symm_band(by_bytes, fused_max)
        symm_oneshot = _one_vs_two(by_bytes, [b for b in sizes if band and band[0] <= b <= band[1]],
                                   "symm_oneshot", "symm_twoshot") if band and band[0] is not None else None
        results.append(SeriesResult(hidden, fp8, fused_max, oneshot_max, capped_by_sweep=fused_max == sizes[-1],
                                    symm_band=band, symm_oneshot_max_bytes=symm_oneshot, sp_from=_sp_from(by_bytes),
                                    async_tp_from=_async_tp_from(by_bytes)))
    if not results:
        return Thresholds(0, 0, [])
    by_hidden: dict[int, int] = {}
    for s in results:
        by_hidden[s.hidden] = min(by_hidden.get(s.hidden, s.fused_max_bytes), s.fused_max_bytes)
    crossovers = [s.oneshot_max_bytes for s in results if s.oneshot_max_bytes is not None]
    oneshot_max = min(crossovers) if crossovers else max(by_hidden.values())
    out = Thresholds(min(by_hidden.values()), oneshot_max, results, by_hidden)
    out.sp_by_hidden = {s.hidden: s.sp_from for s in results if s.sp_from is not None}
    out.sp_min_bytes = latest_start(out.sp_by_hidden.values())
    out.async_by_hidden = {s.hidden: s.async_tp_from for s in results if s.async_tp_from is not None}
    out.async_tp_min_bytes = latest_start(out.async_by_hidden.values())
    bands = [s.symm_band for s in results if s.symm_band is not None]
    starts = [b[0] for b in bands if b[0] is not None]
    if starts:
        lo, hi = max(starts), min(b[1] for b in bands)
        if lo <= hi:
            symm_crossovers = [s.symm_oneshot_max_bytes for s in results if s.symm_oneshot_max_bytes is not None]
            out.symm_mem_min_bytes, out.symm_mem_max_bytes = lo, hi
            out.symm_mem_oneshot_max_bytes = min(symm_crossovers) if symm_crossovers else hi
    return out
