import pytest

from rangedispatch import Range
from rangedispatch.ranges import RangeTable, ranges_from_split_points


def test_split_points_give_inclusive_ranges():
    assert ranges_from_split_points([32, 64], 8192) == [Range(1, 32), Range(33, 64), Range(65, 8192)]
    assert ranges_from_split_points([64, 32, 32], 8192) == [Range(1, 32), Range(33, 64), Range(65, 8192)]
    assert ranges_from_split_points([], 100) == [Range(1, 100)]


def test_range_basics():
    r = Range(1, 8)
    assert 1 in r and 8 in r and 9 not in r and 0 not in r
    assert str(r) == "[1,8]" and not r.is_single_size and Range(4, 4).is_single_size
    assert {Range(1, 8): 1}[Range(1, 8)] == 1
    assert sorted([Range(9, 32), Range(1, 8)]) == [Range(1, 8), Range(9, 32)]
    with pytest.raises(ValueError):
        Range(5, 4)


def test_lookup_single_sizes_win_and_bounds():
    t = RangeTable([8, 32], [4, 100], 8192)
    assert t.lookup(1) == Range(1, 8)
    assert t.lookup(4) == Range(4, 4)
    assert t.lookup(8) == Range(1, 8)
    assert t.lookup(9) == Range(9, 32)
    assert t.lookup(33) == Range(33, 8192)
    assert t.lookup(100) == Range(100, 100)
    assert t.lookup(8192) == Range(33, 8192)
    assert t.lookup(8193) is None and t.lookup(0) is None
    assert t.ranges == [Range(1, 8), Range(4, 4), Range(9, 32), Range(33, 8192), Range(100, 100)]


def test_every_count_maps_to_the_range_holding_it():
    t = RangeTable([3, 10, 11, 50], [7], 64)
    for n in range(1, 65):
        r = t.lookup(n)
        assert n in r
        assert (r == Range(7, 7)) == (n == 7)


def test_a_shape_guard_is_reported_unless_it_holds_over_the_whole_range():
    import sympy

    from rangedispatch.torch_internals import holds_over

    def _holds_over(relation, symbol, r):
        return holds_over(relation, symbol, r.start, r.end)

    s = sympy.Symbol("s0", integer=True, positive=True)
    index_bound = sympy.Le(8192 * s, 2**31 - 1)  # Inductor's 32-bit indexing guard
    assert _holds_over(index_bound, s, Range(1, 4096))
    assert not _holds_over(index_bound, s, Range(1, 1 << 20))  # breaks at the range's end
    assert not _holds_over(sympy.Ne(s, 3), s, Range(1, 8))  # holds at both ends, not at 3
    assert _holds_over(sympy.Ne(s, 3), s, Range(4, 8))
    from torch.utils._sympy.functions import FloorDiv

    block = FloorDiv(s + 1, 2)  # the token block of 2 ranks
    assert _holds_over(sympy.Ge(block, 2), s, Range(513, 4096)) and not _holds_over(sympy.Ge(block, 2), s, Range(1, 8))
