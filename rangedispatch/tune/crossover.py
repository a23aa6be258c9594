"""From a sweep of timings to byte thresholds, by one rule.

The rule (``RULE`` below, quoted in every summary): a tier takes a size from the tier it would
replace only if it is faster there by more than ``MARGIN``, counted from its slowest repeat to the
other's fastest, so that a gap inside the spread between repeats never moves a threshold (with one
repeat no spread is measured and the margin alone decides). A size whose two neighbours both
disagree with it takes their verdict, so one odd point neither ends nor extends a run. The tier
serves the unbroken run of sizes it took from the end it is built for, and the profile gives it
only the sizes that every series measuring it gave it. Everywhere else the tier it would replace
stays.

A sweep is rows ``{repeat, hidden, fp8, tokens, bytes, tier, us}``; a series is one hidden size with
or without FP8. The comparisons, each ``challenger`` against ``incumbent``:

- fused (the faster of ``oneshot``/``twoshot`` on GPUs, ``reference`` on CPU) against ``nccl``
  (NCCL + compiled norm), from the smallest size: ``fused_max_bytes_by_hidden`` is the least over a
  hidden size's series, ``fused_max_bytes`` (for hidden sizes not measured) the least over all.
- ``twoshot`` against ``oneshot`` inside a series' fused sizes, from the largest of them: one-shot
  keeps the sizes below two-shot's run; ``oneshot_max_bytes`` is the largest of those limits.
- symmetric memory (the faster of ``symm_oneshot``/``symm_twoshot``: its all-reduce + compiled norm)
  against ``nccl``, around the first size above the series' fused limit (the sizes it is for): the
  profile's band runs from the highest start to the lowest end (a series that lost there ends it at
  its fused limit); ``symm_twoshot`` against ``symm_oneshot`` inside it as for the fused kernels.
- sequence parallelism (the faster of ``block_sp``/``block_async_tp``: a 2-layer TP block with it,
  plain or with async TP on top) against ``block_nccl`` (the block without it), from the largest
  size; ``block_async_tp`` against ``block_sp`` the same way. Per hidden size and, for hidden sizes
  not measured, over all: the latest start, and no tier if one series never won.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Optional

from rangedispatch.fusion import tiers


def _labels(tier: tiers.Tier) -> tuple[str, ...]:
    """The sweep labels of a tier's variants, on GPUs and CPUs."""
    return tuple(dict.fromkeys(label for cuda in (True, False) for _, label in tier.sweep.variants(cuda)))


NCCL = tiers.NCCL_BASELINES["op"][1]
FUSED_TIERS, SYMM_TIERS = _labels(tiers.FUSED), _labels(tiers.SYMM_MEM)
SP_BASE = tiers.NCCL_BASELINES["block"][1]
(SP_TIER,), (ASYNC_TP_TIER,) = _labels(tiers.SEQUENCE_PARALLEL), _labels(tiers.ASYNC_TP)
MARGIN = 0.03  # more than the recorded H200 sweeps' repeats lay apart at 9 sizes in 10 (under 2%)
RULE = (f"A tier takes a size from the tier it would replace only if it is faster there by more than "
        f"{MARGIN:.0%}, counted from its slowest repeat to the other's fastest (so a gap inside the spread "
        f"between repeats never moves a threshold; with one repeat the margin alone decides). A size whose "
        f"two neighbours both disagree with it takes their verdict. The tier serves the unbroken run of "
        f"sizes it took from the end it is built for (fused kernels: the smallest size; symmetric "
        f"memory: the first size above the fused limit; two-shot, sequence parallelism, async TP: the "
        f"largest), and the profile gives it only the sizes that every series measuring it gave it. "
        f"Everywhere else the tier it would replace stays.")


@dataclass
class Comparison:
    """A challenger against the tier it would replace, in one series: per size, the gain of the
    challenger's slowest repeat over the incumbent's fastest (0.1: 10% faster), and whether it
    took the size (the margin, then the neighbours' vote)."""

    sizes: list[int]
    gains: list[float]
    took: list[bool]

    def leading_end(self) -> Optional[int]:
        """The index of the last size of the leading run of taken sizes; None: it lost the first."""
        end = None
        for i, took in enumerate(self.took):
            if not took:
                break
            end = i
        return end

    def trailing_start(self) -> Optional[int]:
        """The index of the first size of the trailing run of taken sizes; None: it lost the last."""
        if not self.took or not self.took[-1]:
            return None
        start = len(self.took) - 1
        while start > 0 and self.took[start - 1]:
            start -= 1
        return start

    def around(self, at: int) -> Optional[tuple[int, int]]:
        """The indices of the run of taken sizes around ``at``; None: it lost there."""
        if not self.took[at]:
            return None
        lo = hi = at
        while lo > 0 and self.took[lo - 1]:
            lo -= 1
        while hi < len(self.took) - 1 and self.took[hi + 1]:
            hi += 1
        return lo, hi


@dataclass
class SeriesResult:
    hidden: int
    fp8: bool
    fused_max_bytes: int  # 0: fusion lost at the smallest size
    oneshot_max_bytes: Optional[int]  # None: two-shot took no fused size (or was not measured)
    # where symm-mem took sizes around the first size above the fused ones: (start, end); start None:
    # it lost there (end = the fused limit); band None: nothing measured above the fused sizes
    symm_band: Optional[tuple[Optional[int], int]] = None
    symm_oneshot_max_bytes: Optional[int] = None  # None: symm two-shot took no size in the band
    sp_from: Optional[int] = None  # sequence parallelism from here to the largest size; 0: lost there; None: not measured
    async_tp_from: Optional[int] = None  # async TP (vs plain sequence parallelism) from here; same codes
    # the evidence, by comparison: "fused", "twoshot", "symm", "sp", "async_tp"
    comparisons: dict[str, Comparison] = field(default_factory=dict)


@dataclass
class Thresholds:
    fused_max_bytes: int  # the least over all series: for hidden sizes not measured
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


# one series: {bytes: {tier: {repeat: us}}}
Points = dict[int, dict[str, dict[int, float]]]


def _repeats(point: dict[str, dict[int, float]], tiers: tuple[str, ...]) -> list[float]:
    """Per repeat, the fastest of ``tiers`` at one size."""
    by_repeat: dict[int, float] = {}
    for tier in tiers:
        for repeat, us in point.get(tier, {}).items():
            by_repeat[repeat] = min(us, by_repeat.get(repeat, us))
    return list(by_repeat.values())


def compare(points: Points, challenger: tuple[str, ...], incumbent: tuple[str, ...],
            sizes: Optional[Iterable[int]] = None) -> Comparison:
    """The rule's verdict at each size (of ``sizes``, default all) where both were measured."""
    sizes = [b for b in sorted(points if sizes is None else sizes)
             if _repeats(points[b], challenger) and _repeats(points[b], incumbent)]
    gains = [1 - max(_repeats(points[b], challenger)) / min(_repeats(points[b], incumbent)) for b in sizes]
    won = [g > MARGIN for g in gains]
    took = [w if i in (0, len(won) - 1) else sum(won[i - 1:i + 2]) >= 2 for i, w in enumerate(won)]
    return Comparison(sizes, gains, took)


def _oneshot_limit(c: Comparison) -> Optional[int]:
    """One-shot keeps the sizes below two-shot's trailing run: the size below it; 0 if two-shot took
    them all; None if it took none."""
    start = c.trailing_start()
    if start is None:
        return None
    return c.sizes[start - 1] if start else 0


def series_result(hidden: int, fp8: bool, points: Points) -> Optional[SeriesResult]:
    fused = compare(points, FUSED_TIERS, (NCCL,))
    if not fused.sizes:
        return None
    end = fused.leading_end()
    fused_max = 0 if end is None else fused.sizes[end]
    twoshot = compare(points, ("twoshot",), ("oneshot",), [b for b in fused.sizes if b <= fused_max])
    out = SeriesResult(hidden, fp8, fused_max, _oneshot_limit(twoshot), comparisons=dict(fused=fused, twoshot=twoshot))
    symm = compare(points, SYMM_TIERS, (NCCL,))
    above = [i for i, b in enumerate(symm.sizes) if b > fused_max]
    if above:
        run = symm.around(above[0])
        out.symm_band = (symm.sizes[run[0]], symm.sizes[run[1]]) if run else (None, fused_max)
        if run:
            inside = compare(points, ("symm_twoshot",), ("symm_oneshot",), symm.sizes[run[0]:run[1] + 1])
            out.symm_oneshot_max_bytes = _oneshot_limit(inside)
    out.comparisons["symm"] = symm
    for key, challenger, incumbent in (("sp", (SP_TIER, ASYNC_TP_TIER), SP_BASE),
                                       ("async_tp", (ASYNC_TP_TIER,), SP_TIER)):
        c = compare(points, challenger, (incumbent,))
        out.comparisons[key] = c
        if c.sizes:
            start = c.trailing_start()
            setattr(out, "sp_from" if key == "sp" else "async_tp_from", 0 if start is None else c.sizes[start])
    return out


def latest_start(starts: Iterable[int]) -> int:
    """The latest of the measured starts; 0 (never) if there are none or one never won."""
    starts = list(starts)
    return max(starts) if starts and all(starts) else 0


def _by_hidden(results: list[SeriesResult], pick, combine) -> dict[int, int]:
    values: dict[int, list[int]] = {}
    for s in results:
        if pick(s) is not None:
            values.setdefault(s.hidden, []).append(pick(s))
    return {h: combine(v) for h, v in sorted(values.items())}


def thresholds(rows: Iterable[dict]) -> Thresholds:
    """The rule applied to every series of ``rows`` (repeats are told apart by ``repeat``, default 0)."""
    series: dict[tuple[int, bool], Points] = {}
    for r in rows:
        point = series.setdefault((r["hidden"], r["fp8"]), {}).setdefault(r["bytes"], {})
        point.setdefault(r["tier"], {})[r.get("repeat", 0)] = r["us"]
    results = [s for (hidden, fp8), points in sorted(series.items()) if (s := series_result(hidden, fp8, points))]
    if not results:
        return Thresholds(0, 0)
    by_hidden = _by_hidden(results, lambda s: s.fused_max_bytes, min)
    # two-shot only where every series gave it the size: one-shot up to the largest limit
    oneshot = max(s.fused_max_bytes if s.oneshot_max_bytes is None else s.oneshot_max_bytes for s in results)
    out = Thresholds(min(by_hidden.values()), oneshot, results, by_hidden)
    out.sp_by_hidden = _by_hidden(results, lambda s: s.sp_from, latest_start)
    out.sp_min_bytes = latest_start(s.sp_from for s in results if s.sp_from is not None)
    out.async_by_hidden = _by_hidden(results, lambda s: s.async_tp_from, latest_start)
    out.async_tp_min_bytes = latest_start(s.async_tp_from for s in results if s.async_tp_from is not None)
    bands = [s for s in results if s.symm_band is not None]
    won = [s for s in bands if s.symm_band[0] is not None]
    if won:
        lo, hi = max(s.symm_band[0] for s in won), min(s.symm_band[1] for s in bands)
        if lo <= hi:
            out.symm_mem_min_bytes, out.symm_mem_max_bytes = lo, hi
            out.symm_mem_oneshot_max_bytes = min(hi, max(s.symm_band[1] if s.symm_oneshot_max_bytes is None
                                                         else s.symm_oneshot_max_bytes for s in won))
    return out
