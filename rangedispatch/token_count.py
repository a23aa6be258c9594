"""Reading the token count of a call: the size of one input along one or more dimensions.

This runs on every forward call, so the argument position and dims are resolved once, up front:
``token_dim="auto"`` is resolved on the first call from that call's token input.
"""

from __future__ import annotations

import inspect
import math
from typing import Any, Callable, Optional, Sequence, Union

import torch

from rangedispatch.errors import ConfigError


class TokenCounter:
    """``counter(args, kwargs) -> int`` for a module's forward signature and the dispatch config."""

    def __init__(self, forward: Callable, token_arg: Union[int, str], token_dims: Union[str, Sequence[int]]):
        self.auto = token_dims == "auto"
        self.dims: list[int] = [] if self.auto else list(token_dims)
        self.single_dim: Optional[int] = None
        self.position: Optional[int] = None
        self.name: Optional[str] = None
        params = _positional_params(forward)
        if isinstance(token_arg, int):
            self.position = token_arg
            self.name = params[token_arg] if token_arg < len(params) else None
        else:
            self.name = token_arg
            if token_arg in params:
                self.position = params.index(token_arg)
            elif not _accepts_kwargs(forward, token_arg):
                raise ConfigError(
                    f"dispatch.token_arg={token_arg!r} is not a parameter of {_qualname(forward)}; "
                    f"allowed: {', '.join(params) or 'a position'}"
                )

    def token_input(self, args: tuple, kwargs: dict) -> Any:
        if self.position is not None and self.position < len(args):
            return args[self.position]
        if self.name is not None and self.name in kwargs:
            return kwargs[self.name]
        raise ConfigError(
            f"dispatch.token_arg={self.position if self.name is None else self.name!r}: the call passed "
            f"{len(args)} positional argument(s) and keywords {sorted(kwargs)}; it has no such input"
        )

    def __call__(self, args: tuple, kwargs: dict) -> int:
        return self.read(args, kwargs)[1]

    def read(self, args: tuple, kwargs: dict) -> tuple[Any, int, bool]:
        """``(token input, token count, every token dim >= 2)``. The last says whether the call may
        take the guard-free path: Dynamo specializes dims of size 0 and 1, so such calls have graphs
        of their own."""
        pos = self.position
        x = args[pos] if pos is not None and pos < len(args) else self.token_input(args, kwargs)
        dim = self.single_dim
        if dim is not None:
            n = x.shape[dim]
            return x, n, n >= 2
        shape = x.shape
        sizes = [shape[d] for d in self.dims]
        return x, math.prod(sizes), min(sizes) >= 2

    def check(self, args: tuple, kwargs: dict) -> torch.Tensor:
        """Validate the token input once (first call) with a clear message and resolve
        ``token_dim="auto"`` from it; returns it."""
        x = self.token_input(args, kwargs)
        if not isinstance(x, torch.Tensor):
            raise ConfigError(f"dispatch.token_arg selects an input of type {type(x).__name__}; it must be a tensor")
        if self.auto and not self.dims:
            self.dims = auto_token_dims(x)
        self.dims = [d % x.dim() if -x.dim() <= d < x.dim() else d for d in self.dims]
        self.single_dim = self.dims[0] if len(self.dims) == 1 else None
        for d in self.dims:
            if not -x.dim() <= d < x.dim():
                raise ConfigError(
                    f"dispatch.token_dim={self.dims if len(self.dims) > 1 else d} does not fit the token input "
                    f"of shape {tuple(x.shape)}; allowed dims: {-x.dim()}..{x.dim() - 1}"
                )
        return x


def auto_token_dims(x: torch.Tensor) -> list[int]:
    """Every dim of integer token ids; every dim but the last (the hidden size) of activations."""
    if x.dim() <= 1 or not (x.is_floating_point() or x.is_complex()):
        return list(range(max(x.dim(), 1)))
    return list(range(x.dim() - 1))


def _positional_params(fn: Callable) -> list[str]:
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return []
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return [p.name for p in sig.parameters.values() if p.kind in kinds]


def _accepts_kwargs(fn: Callable, name: str) -> bool:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return True
    return any(p.kind is inspect.Parameter.VAR_KEYWORD or (p.name == name and p.kind is inspect.Parameter.KEYWORD_ONLY)
               for p in params)


def _qualname(fn: Callable) -> str:
    return getattr(fn, "__qualname__", repr(fn))
