"""Token-count ranges and the table that maps a token count to its range.

Ranges are inclusive on both ends. Lookup runs on every forward call, so it is a dict hit for the
single-size ranges and a bisect over range ends otherwise; never a linear scan.
"""

from __future__ import annotations

import bisect
from typing import Iterable, NamedTuple, Optional


class _RangeBounds(NamedTuple):
    start: int
    end: int


class Range(_RangeBounds):
    """Token counts ``start..end``, both included. A tuple underneath: ranges key the per-call
    dicts (artifacts, call counts), and a tuple hashes in C."""

    __slots__ = ()

    def __new__(cls, start: int, end: int) -> "Range":
        if not (isinstance(start, int) and isinstance(end, int)):
            raise TypeError(f"Range bounds must be int, got {start!r}, {end!r}")
        if not 1 <= start <= end:
            raise ValueError(f"Range needs 1 <= start <= end, got [{start},{end}]")
        return super().__new__(cls, start, end)

    def __contains__(self, n: object) -> bool:
        return isinstance(n, int) and self.start <= n <= self.end

    @property
    def is_single_size(self) -> bool:
        return self.start == self.end

    def __str__(self) -> str:
        return f"[{self.start},{self.end}]"

    __repr__ = __str__


def ranges_from_split_points(split_points: Iterable[int], max_num_tokens: int) -> list[Range]:
    """``[8, 32]`` with max 8192 -> ``[1,8] [9,32] [33,8192]``. Points outside [1, max) are dropped
    (a pass may ask for its threshold beyond max_num_tokens), duplicates and order normalized."""
    ends = sorted({p for p in split_points if 1 <= p < max_num_tokens}) + [max_num_tokens]
    out, start = [], 1
    for end in ends:
        out.append(Range(start, end))
        start = end + 1
    return out


class RangeTable:
    """The final set of ranges: contiguous ranges from split points, plus single-size ranges that
    win over the range containing them."""

    def __init__(self, split_points: Iterable[int], compile_sizes: Iterable[int], max_num_tokens: int):
        self.max_num_tokens = max_num_tokens
        self.split_points = sorted(set(split_points))
        self.contiguous = ranges_from_split_points(self.split_points, max_num_tokens)
        self._ends = [r.end for r in self.contiguous]
        self.single: dict[int, Range] = {s: Range(s, s) for s in sorted(set(compile_sizes))}

    @property
    def ranges(self) -> list[Range]:
        """All ranges in order (a single-size range sorts right before the range containing it)."""
        return sorted([*self.contiguous, *self.single.values()], key=lambda r: (r.start, r.end))

    def lookup(self, n: int) -> Optional[Range]:
        """The range that serves ``n`` tokens, or None when ``n`` is outside ``[1, max_num_tokens]``
        and no single-size range was added for it."""
        r = self.single.get(n)
        if r is not None:
            return r
        if n < 1 or n > self.max_num_tokens:
            return None
        return self.contiguous[bisect.bisect_left(self._ends, n)]

    def add_single_size(self, n: int) -> Range:
        r = self.single.get(n)
        if r is None:
            r = self.single[n] = Range(n, n)
        return r
