"""Every error rangedispatch raises on purpose, in one place.

Catching ``RangeDispatchError`` catches them all; ``ConfigError`` is also a ``ValueError`` so that
code which validates its own inputs with ``except ValueError`` keeps working.
"""


class RangeDispatchError(Exception):
    """Base class of all rangedispatch errors."""


class ConfigError(RangeDispatchError, ValueError):
    """A configuration value is invalid; the message names the full key, the value and what is allowed."""


class OutOfRangeError(RangeDispatchError, ValueError):
    """A call's token count lies outside every compiled range and ``dispatch.out_of_range`` is ``error``."""


class NotTracedError(RangeDispatchError, RuntimeError):
    """An operation needs the traced model (ranges, graphs) but no call or warmup has traced it yet."""



class GradientsUnsupportedError(RangeDispatchError, RuntimeError):
    """A call that records gradients reached a range whose passes have no backward and replace the
    model's collectives (every rank must run the same collectives, and grad mode is per rank)."""
