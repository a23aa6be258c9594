"""From a sweep of timings to byte thresholds, robust to noise.

A sweep is rows ``{hidden, tokens, bytes, fp8, tier, us}`` with tier ``nccl`` (NCCL + compiled norm)
and fused tiers (``oneshot``, ``twoshot`` on GPUs; ``reference`` on CPU). Per series (hidden size x FP8 or not), sorted by bytes, the
ratio fused / nccl is smoothed with a median of each inner point and its neighbours (one noisy
point neither ends nor extends a run; the end points count as measured: a loss at the smallest size
means never, at the largest it stops the run); fusion pays up to the last point of the leading run
of wins. The
profile takes the most restrictive series, never a size beyond the sweep. One-shot vs two-shot is
decided the same way inside the fused sizes.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Iterable, Optional

TIERS = ("nccl", "oneshot", "twoshot")


@dataclass
class SeriesResult:
    hidden: int
    fp8: bool
    fused_max_bytes: int
    oneshot_max_bytes: Optional[int]  # None: one-shot never lost to two-shot inside the fused sizes
    capped_by_sweep: bool  # fusion still paid at the largest size measured


@dataclass
class Thresholds:
    fused_max_bytes: int  # the most restrictive over all hidden sizes: for hidden sizes not measured
    oneshot_max_bytes: int
    series: list[SeriesResult] = field(default_factory=list)
    by_hidden: dict[int, int] = field(default_factory=dict)  # fused_max_bytes per measured hidden size


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


def _series(rows: list[dict]) -> dict[tuple[int, bool], dict[int, dict[str, float]]]:
    out: dict[tuple[int, bool], dict[int, dict[str, float]]] = {}
    for r in rows:
        out.setdefault((r["hidden"], r["fp8"]), {}).setdefault(r["bytes"], {})[r["tier"]] = r["us"]
    return out


def thresholds(rows: Iterable[dict]) -> Thresholds:
    results = []
    for (hidden, fp8), by_bytes in sorted(_series(list(rows)).items()):
        sizes = sorted(b for b, t in by_bytes.items() if "nccl" in t and len(t) > 1)
        if not sizes:
            continue
        fused = [min(v for k, v in by_bytes[b].items() if k != "nccl") for b in sizes]
        ratios = [f / by_bytes[b]["nccl"] for f, b in zip(fused, sizes)]
        fused_max = leading_run_end(sizes, ratios) or 0
        both = [b for b in sizes if b <= fused_max and "oneshot" in by_bytes[b] and "twoshot" in by_bytes[b]]
        oneshot_max = None
        if both:
            one_two = [by_bytes[b]["oneshot"] / by_bytes[b]["twoshot"] for b in both]
            end = leading_run_end(both, one_two) or 0
            oneshot_max = None if end == both[-1] else end
        results.append(SeriesResult(hidden, fp8, fused_max, oneshot_max, capped_by_sweep=fused_max == sizes[-1]))
    if not results:
        return Thresholds(0, 0, [])
    by_hidden: dict[int, int] = {}
    for s in results:
        by_hidden[s.hidden] = min(by_hidden.get(s.hidden, s.fused_max_bytes), s.fused_max_bytes)
    crossovers = [s.oneshot_max_bytes for s in results if s.oneshot_max_bytes is not None]
    oneshot_max = min(crossovers) if crossovers else max(by_hidden.values())
    return Thresholds(min(by_hidden.values()), oneshot_max, results, by_hidden)
