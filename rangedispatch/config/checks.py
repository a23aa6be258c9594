"""Value checks shared by the config schemas. Each raises ``ConfigError`` naming the full key, the bad
value and what is allowed, so that a typo on the command line points at itself."""

from __future__ import annotations

from typing import Any, Iterable, Optional

from rangedispatch.errors import ConfigError


def fail(key: str, value: Any, allowed: str) -> ConfigError:
    return ConfigError(f"{key}={value!r} is not allowed; expected {allowed}")


def is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_bool(key: str, v: Any) -> bool:
    if not isinstance(v, bool):
        raise fail(key, v, "true or false")
    return v


def check_int(key: str, v: Any, lo: Optional[int] = None, hi: Optional[int] = None) -> int:
    """An int in ``[lo, hi]`` (either bound optional)."""
    if not is_int(v) or (lo is not None and v < lo) or (hi is not None and v > hi):
        raise fail(key, v, _int_range_text(lo, hi))
    return v


def check_int_list(key: str, v: Any, lo: Optional[int] = None, hi: Optional[int] = None) -> list[int]:
    """A list of ints in ``[lo, hi]``, returned sorted and without duplicates (order and duplicates
    are normalized, never an error)."""
    if not isinstance(v, (list, tuple)):
        raise fail(key, v, f"a list whose elements are each {_int_range_text(lo, hi)}")
    for item in v:
        if not is_int(item) or (lo is not None and item < lo) or (hi is not None and item > hi):
            raise ConfigError(
                f"{key}={list(v)!r} is not allowed: element {item!r} is not {_int_range_text(lo, hi)}"
            )
    return sorted(set(v))


def check_choice(key: str, v: Any, choices: Iterable[str]) -> str:
    choices = list(choices)
    if v not in choices:
        raise fail(key, v, "one of " + ", ".join(choices))
    return v


def check_str(key: str, v: Any) -> str:
    if not isinstance(v, str) or not v:
        raise fail(key, v, "a non-empty string")
    return v


def _int_range_text(lo: Optional[int], hi: Optional[int]) -> str:
    if lo is not None and hi is not None:
        return f"an integer in [{lo}, {hi}]"
    if lo is not None:
        return f"an integer >= {lo}"
    if hi is not None:
        return f"an integer <= {hi}"
    return "an integer"
