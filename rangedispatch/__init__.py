"""rangedispatch: compile a model once per token-count range and dispatch every call by its size.

The life of a wrapped model (``wrapper.py`` reads in this order):

1. config (``config/``): split points in tokens, the hardware profile's byte thresholds;
2. trace: the first call runs under Dynamo with symbolic token dims (``dynamic_dims.py``);
3. plan: the passes read each traced graph's all-reduces; the tier plan (``fusion/tier_plan.py``)
   turns the thresholds into token counts, which become split points (as does the profile's
   decode limit, below which ``gemm/`` swaps cuBLAS for a skinny GEMM where it is faster);
4. ranges (``ranges.py``): the split points and ``compile_sizes`` give the final ranges;
5. compile (``graph_cache.py``): each range compiles on its first call, with its passes;
6. dispatch: each call counts its tokens (``token_count.py``) and runs its range's graph.

Library: the modules above, ``passes.py``, ``fusion/``, ``gemm/``, ``cudagraphs.py``,
``guardless.py``. Tools (not imported by the library): ``cli/`` (demo, bench, tune; ``cli/launch.py``
starts local ranks), ``bench/`` (sweeps and the example TP models), ``tune/`` (crossovers, profile
writer).
Importing the package is cheap: torch and Hydra load when the names below are first used.
"""

from typing import Any

from rangedispatch.errors import (
    ConfigError,
    GradientsUnsupportedError,
    NotTracedError,
    OutOfRangeError,
    RangeDispatchError,
)
from rangedispatch.ranges import Range

__all__ = ["Range", "RangeCompiledModule", "load_config", "release_cuda_graphs", "RangeDispatchError", "ConfigError",
           "OutOfRangeError", "NotTracedError", "GradientsUnsupportedError"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name == "RangeCompiledModule":
        from rangedispatch.wrapper import RangeCompiledModule

        return RangeCompiledModule
    if name == "load_config":
        from rangedispatch.config import load_config

        return load_config
    if name == "release_cuda_graphs":
        from rangedispatch.cudagraphs import release_cuda_graphs

        return release_cuda_graphs
    raise AttributeError(f"module 'rangedispatch' has no attribute {name!r}")
