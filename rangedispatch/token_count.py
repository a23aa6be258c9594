"""Reading the token count of a call: the size of one input along one or more dimensions.

This runs on every forward call, so argument positions are resolved once, up front, and the token
dims once per kind of token input (its rank and dtype class): a call whose token input has another
rank than the first call's gets its own dims (``token_dim="auto"``) or a clear error (explicit
dims that do not fit), never a count read off the wrong dims.
"""

from __future__ import annotations

import inspect
import math
from typing import Any, Callable, NamedTuple, Optional, Sequence, Union

import torch

from rangedispatch.errors import ConfigError

TokenArg = Union[int, str]


class _Slot(NamedTuple):
    """Where one candidate token input sits in a call: by position, by keyword, or both."""

    position: Optional[int]
    name: Optional[str]

    def get(self, args: tuple, kwargs: dict) -> Any:
        if self.position is not None and self.position < len(args):
            return args[self.position]
        return kwargs.get(self.name) if self.name is not None else None

    def __str__(self) -> str:
        if self.position is None:
            return repr(self.name)
        return f"{self.position} ({self.name!r})" if self.name is not None else str(self.position)


class TokenCounter:
    """``counter.read(args, kwargs) -> (token input, token count, dims)`` for a module's forward
    signature and the dispatch config (``dispatch.token_arg``, ``dispatch.token_dim``)."""

    def __init__(self, forward: Callable, token_arg: Union[TokenArg, Sequence[TokenArg]],
                 token_dims: Union[str, Sequence[int]]):
        self.explicit_dims: Optional[list[int]] = None if token_dims == "auto" else list(token_dims)
        params = _positional_params(forward)
        self.slots = [self._slot(forward, params, a) for a in (token_arg if isinstance(token_arg, list) else [token_arg])]
        self._dims: dict[tuple[int, torch.dtype], tuple[int, ...]] = {}  # (rank, dtype) -> token dims

    @staticmethod
    def _slot(forward: Callable, params: list[str], arg: TokenArg) -> _Slot:
        if isinstance(arg, int):
            return _Slot(arg, params[arg] if arg < len(params) else None)
        if arg in params:
            return _Slot(params.index(arg), arg)
        if not _accepts_kwargs(forward, arg):
            raise ConfigError(f"dispatch.token_arg={arg!r} is not a parameter of {_qualname(forward)}; "
                              f"allowed: {', '.join(params) or 'a position'}")
        return _Slot(None, arg)

    def token_input(self, args: tuple, kwargs: dict) -> torch.Tensor:
        """The first candidate input the call passes as a tensor; a ConfigError if there is none."""
        for slot in self.slots:
            x = slot.get(args, kwargs)
            if x is not None:
                if not isinstance(x, torch.Tensor):
                    raise ConfigError(f"dispatch.token_arg={slot}: the call passed a {type(x).__name__}; the input "
                                      "that carries the tokens must be a tensor")
                return x
        names = str(self.slots[0]) if len(self.slots) == 1 else f"[{', '.join(map(str, self.slots))}]"
        raise ConfigError(
            f"dispatch.token_arg={names}: the call passed {len(args)} positional argument(s) and keywords "
            f"{sorted(k for k, v in kwargs.items() if v is not None)} and no tensor there; name the input that "
            "carries the tokens, or a list to take the first one present (e.g. dispatch.token_arg=[input_ids,inputs_embeds])")

    def read(self, args: tuple, kwargs: dict) -> tuple[torch.Tensor, int, tuple[int, ...]]:
        """``(token input, token count, token dims)``."""
        x = None
        for slot in self.slots:  # one candidate in the common case
            x = slot.get(args, kwargs)
            if x is not None:
                break
        if not isinstance(x, torch.Tensor):
            x = self.token_input(args, kwargs)  # raises the clear error
        shape = x.shape
        dims = self._dims.get((len(shape), x.dtype))
        if dims is None:
            dims = self._resolve(x)
        if len(dims) == 1:
            return x, shape[dims[0]], dims
        return x, math.prod(shape[d] for d in dims), dims

    def __call__(self, args: tuple, kwargs: dict) -> int:
        return self.read(args, kwargs)[1]

    def _resolve(self, x: torch.Tensor) -> tuple[int, ...]:
        """The token dims for inputs of ``x``'s rank and dtype class, validated once."""
        if x.dim() == 0:
            raise ConfigError("dispatch.token_arg selects a 0-d tensor; the input that carries the tokens needs a "
                              "token dim (see dispatch.token_dim)")
        if self.explicit_dims is None:
            dims = auto_token_dims(x)
        elif self._dims and x.dim() not in {rank for rank, _ in self._dims}:
            first = next(iter(self._dims))[0]
            raise ConfigError(f"dispatch.token_dim={self.explicit_dims}: set for {first}-d token inputs, and this "
                              f"call's is {x.dim()}-d {tuple(x.shape)}; call with one rank, or use "
                              "dispatch.token_dim=auto (its dims follow each input's rank)")
        else:
            for d in self.explicit_dims:
                if not -x.dim() <= d < x.dim():
                    shown = self.explicit_dims if len(self.explicit_dims) > 1 else d
                    raise ConfigError(f"dispatch.token_dim={shown} does not fit the token input of shape "
                                      f"{tuple(x.shape)}; allowed dims: {-x.dim()}..{x.dim() - 1}")
            dims = [d % x.dim() for d in self.explicit_dims]
        resolved = tuple(dims)
        self._dims[(x.dim(), x.dtype)] = resolved
        return resolved


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
