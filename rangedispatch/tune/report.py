"""The summary of a tune (summary.md): what was swept, the rule, the spread between repeats, each
series' verdicts with the size that decided them, and the profile entry. The profile part is
written from the same ``TierThresholds`` as the YAML, so the two cannot disagree."""

from __future__ import annotations

import statistics

from rangedispatch.cli._common import size_text
from rangedispatch.config.schema import TierThresholds
from rangedispatch.fusion.tiers import sweep_variants
from rangedispatch.tune import crossover, profile
from rangedispatch.tune.crossover import Comparison, SeriesResult, Thresholds

BLOCK_TIERS = tuple(sweep_variants("block", cuda=True).values())


def sweep_text(rows: list[dict], info: dict) -> str:
    """What was measured, read off the rows (a recorded sweep need not match the tune config)."""
    op = [r["bytes"] for r in rows if r["tier"] not in BLOCK_TIERS]
    block = [r["bytes"] for r in rows if r["tier"] in BLOCK_TIERS]
    repeats = len({r["repeat"] for r in rows})
    return (f"torch {info['torch']}, flashinfer {info['flashinfer']}; hidden {sorted({r['hidden'] for r in rows})}, "
            f"fp8 {sorted({r['fp8'] for r in rows})}"
            + (f", up to {size_text(max(op))} per rank" if op else "")
            + (f"; the 2-layer block up to {size_text(max(block))}" if block else "")
            + f"; {repeats} repeat{'s' if repeats > 1 else ''}.")


def spread_text(rows: list[dict]) -> str:
    """How far repeats of one point lay apart (slowest / fastest - 1), or that none were."""
    times: dict[tuple, list[float]] = {}
    for r in rows:
        times.setdefault((r["hidden"], r["fp8"], r["bytes"], r["tier"]), []).append(r["us"])
    spread = {k: max(v) / min(v) - 1 for k, v in times.items() if len(v) > 1}
    if not spread:
        return (f"One repeat: no spread between repeats was measured, so the fixed {crossover.MARGIN:.0%} margin "
                "alone separates a win from noise (tune.repeats=2 or more measures the spread).")
    (hidden, fp8, size, tier), top = max(spread.items(), key=lambda kv: kv[1])
    most = max(map(len, times.values()))
    stopped = sorted({k[0] for k, v in times.items() if len(v) < most})
    return (f"Spread between repeats (slowest / fastest - 1 of one tier at one size): median "
            f"{statistics.median(spread.values()):.1%}, largest {top:.1%} ({tier}, hidden {hidden}"
            f"{' fp8' if fp8 else ''}, {size_text(size)}). A tier wins a size only by more than the {crossover.MARGIN:.0%} "
            "margin from its slowest repeat to the other's fastest, so this spread never moves a threshold."
            + (f" The sweep stopped early: hidden {stopped} has fewer repeats." if stopped else ""))


def _gain(c: Comparison, i: int) -> str:
    """The evidence at one size: how much faster (or slower) the challenger was, and an outvoted verdict."""
    g = c.gains[i]
    vote = " (its neighbours outvoted it)" if c.took[i] != (g > crossover.MARGIN) else ""
    return f"{size_text(c.sizes[i])}: {abs(g):.1%} {'faster' if g >= 0 else 'slower'}{vote}"


def _leading(c: Comparison) -> str:
    end = c.leading_end()
    if end is None:
        return f"never ({_gain(c, 0)})"
    if end == len(c.sizes) - 1:
        return f"up to {size_text(c.sizes[end])} (the largest size measured)"
    return f"up to {size_text(c.sizes[end])} ({_gain(c, end + 1)})"


def _trailing(c: Comparison, never: str, what: str) -> str:
    start = c.trailing_start()
    if start is None:
        return f"{never} ({_gain(c, len(c.sizes) - 1)})"
    return f"{what} {size_text(c.sizes[start])}" + (f" ({_gain(c, start - 1)})" if start else " (every size)")


def _cells(s: SeriesResult) -> list[str]:
    c = s.comparisons
    fused = _leading(c["fused"])
    if not s.fused_max_bytes:
        twoshot = "no fused sizes"
    elif not c["twoshot"].sizes:
        twoshot = "not measured"
    else:
        twoshot = _trailing(c["twoshot"], "one-shot throughout", "from")
    symm = c["symm"]
    if s.symm_band is None:
        symm_text = "not measured" if not symm.sizes else "not measured above the fused sizes"
    elif s.symm_band[0] is None:
        first = next(i for i, b in enumerate(symm.sizes) if b > s.fused_max_bytes)
        symm_text = f"lost above the fused sizes ({_gain(symm, first)})"
    else:
        symm_text = f"{size_text(s.symm_band[0])}..{size_text(s.symm_band[1])}"
    sp = [_trailing(c[k], "never", "from") if c[k].sizes else "not measured" for k in ("sp", "async_tp")]
    return [str(s.hidden), str(s.fp8), fused, twoshot, symm_text, *sp]


def _sizes_by_hidden(by_hidden: dict[str, int], other: int, never: str) -> str:
    each = ", ".join(f"hidden {h}: {size_text(b) if b else never}" for h, b in by_hidden.items())
    return f"{each}; other hidden sizes: {size_text(other) if other else never}" if each else \
        (size_text(other) if other else never)


def _one_or_two(oneshot_max: int, tier_max: int) -> str:
    if oneshot_max >= tier_max:
        return "one-shot throughout"
    return f"one-shot up to {size_text(oneshot_max)}, two-shot above" if oneshot_max else "two-shot throughout"


def profile_text(t: TierThresholds, tiers: set[str]) -> list[str]:
    """The entry in words, one line per tier; ``tiers``: those the sweep measured."""
    fused_max = max(t.fused_max_bytes, *t.fused_max_bytes_by_hidden.values())
    if not fused_max:
        oneshot = "none (no fused sizes)"
    elif "twoshot" not in tiers:
        oneshot = "one-shot throughout (two-shot not measured)"
    else:
        oneshot = _one_or_two(t.oneshot_max_bytes, fused_max)
    if t.symm_mem_max_bytes:
        symm = (f"from {size_text(t.symm_mem_min_bytes)} to {size_text(t.symm_mem_max_bytes)} where the fused "
                f"tier does not run, {_one_or_two(t.symm_mem_oneshot_max_bytes, t.symm_mem_max_bytes)}")
    else:
        symm = "off" + ("" if tiers & set(crossover.SYMM_TIERS) else " (not measured)")
    sp, async_tp = (_sizes_by_hidden(by_hidden, other, "never") if tier in tiers else "off (not measured)"
                    for tier, by_hidden, other in ((crossover.SP_TIER, t.sp_min_bytes_by_hidden, t.sp_min_bytes),
                                                   (crossover.ASYNC_TP_TIER, t.async_tp_min_bytes_by_hidden,
                                                    t.async_tp_min_bytes)))
    return [f"- Fused kernels up to: {_sizes_by_hidden(t.fused_max_bytes_by_hidden, t.fused_max_bytes, 'never')}.",
            f"- Within the fused sizes: {oneshot}.", f"- Symmetric memory: {symm}.",
            f"- Sequence parallelism from: {sp}.", f"- Async TP on top of it, from: {async_tp}."]


def summary(rows: list[dict], info: dict, measured: Thresholds, entry: TierThresholds, name: str) -> str:
    lines = [f"# rangedispatch-tune: {info['card']} x{info['world_size']}, {info['date']}", "",
             sweep_text(rows, info), "", f"Rule: {crossover.RULE}", "", spread_text(rows), "",
             "| hidden | fp8 | fused vs NCCL | two-shot vs one-shot | symm-mem vs NCCL | sequence parallelism vs "
             "NCCL (2-layer block) | async TP vs sequence parallelism |", "|---|---|---|---|---|---|---|"]
    lines += ["| " + " | ".join(_cells(s)) + " |" for s in measured.series]
    lines += ["", "In brackets: the size next to each run and how the tier did there.", "",
              f"## Profile: hardware/{name}.yaml, world size {info['world_size']}", "",
              *profile_text(entry, {r['tier'] for r in rows}), "", "```yaml", f'"{info["world_size"]}":',
              *profile.entry_lines(entry), "```"]
    return "\n".join(lines) + "\n"

