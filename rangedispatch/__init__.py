"""rangedispatch: compile a model once per token-count range and dispatch every call by its size.

Importing the package is cheap: torch and Hydra load when the names below are first used.
"""

from typing import Any

from rangedispatch.ranges import Range

__all__ = ["Range", "RangeCompiledModule", "load_config"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name == "RangeCompiledModule":
        from rangedispatch.wrapper import RangeCompiledModule

        return RangeCompiledModule
    if name == "load_config":
        from rangedispatch.config import load_config

        return load_config
    raise AttributeError(f"module 'rangedispatch' has no attribute {name!r}")
