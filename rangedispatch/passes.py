"""Graph passes that run per range, and the Inductor custom pass that carries them.

A ``GraphPass`` sees every traced graph before ranges are final (``split_points``: it may ask for
range boundaries of its own), says per range whether it ``applies``, and rewrites Inductor's
post-grad graph in those ranges. What a pass knows of the compile besides the graph in hand comes
in a ``PassContext``, made by ``graph_cache.py`` for each call. ``RangePassPipeline`` is what
Inductor actually runs; its ``uuid()`` encodes the range and each pass's configuration, because
Inductor's FX graph cache keys on it: anything less and one range's cached graph comes back for
another.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ContextManager, Mapping, Optional, Sequence

import torch
import torch.fx
from torch._inductor.custom_graph_pass import CustomGraphPass

from rangedispatch import torch_internals
from rangedispatch.ranges import Range

# The reshapes a post-grad graph puts between a tensor and its readers (a linear layer flattens its
# input to 2-D on its own): passes that ask "is this the same tensor" look through them.
RESHAPE_OPS = (torch.ops.aten.view.default, torch.ops.aten.reshape.default, torch.ops.aten._unsafe_view.default)


@dataclass(frozen=True)
class PassContext:
    """The compile a pass is called in, besides the graph in hand: one per traced graph for
    ``split_points`` (no range yet), one per range compile for ``__call__``."""

    # the range being compiled; None in split_points (ranges are not final then)
    range: Optional[Range] = None
    # the traced graph after Inductor's post-grad passes, where it was captured: a graph of DTensor
    # ops has no collectives before AOT dispatch, so they are read there; None otherwise
    post_grad_graph: Optional[torch.fx.Graph] = None
    # symbol -> size hint while the range compiles: the token count's is the range's end, the other
    # symbols (a KV length) keep their traced hints. Empty for a graph compiled static.
    size_hints: Mapping[Any, int] = field(default_factory=dict)

    def size_hint(self, size: "int | torch.SymInt") -> Optional[int]:
        """``size`` (an int, or a SymInt of the graph) at these hints; None where a symbol has none."""
        if not isinstance(size, torch.SymInt):
            return int(size)
        value = torch_internals.symint_expr(size).xreplace(self.size_hints)
        return int(value) if value.is_number else None


class GraphPass:
    """Base class of per-range passes. Subclasses set ``name`` and override what they need."""

    name: str = "pass"
    # True: the rewrite has no backward (a custom op without autograd), so graphs that record
    # gradients keep the original ops
    inference_only: bool = False
    # True: the rewrite replaces the model's collectives (another kind, count or kernel). Every rank
    # must then run it, so a call that cannot take it (it records gradients) is refused, never run
    # with the model's own collectives while another rank runs the rewrite
    replaces_collectives: bool = False
    # The ops a match leaves in the graph (one of them per match), as the generated code calls them
    # ("torch.ops.<namespace>.<op>.default"): matches are counted in the code Inductor generates,
    # which a cache hit hands back too (the pass itself does not run then)
    output_ops: tuple[str, ...] = ()

    def split_points(self, gm: torch.fx.GraphModule, ctx: PassContext) -> Sequence[int]:
        """Token counts where this pass wants a range to end, read off one traced (pre-grad) graph.
        Called for every graph Dynamo produces, before the ranges are final."""
        return ()

    def applies(self, r: Range) -> bool:
        return True

    def __call__(self, graph: torch.fx.Graph, ctx: PassContext) -> int:
        """Rewrite the post-grad graph of range ``ctx.range`` in place; return how many matches were
        replaced (``stats()`` reports it, or counts ``output_ops`` in the generated code where it is set)."""
        raise NotImplementedError

    def config_key(self) -> str:
        """Everything about this pass that changes its output graph (code version, thresholds,
        backend...). Part of the Inductor cache key."""
        return type(self).__qualname__


@functools.cache
def source_digest(package: Path) -> str:
    """Hash of the modules of ``package``, the code that shapes a pass's rewritten graphs: a changed
    pass must never get a graph that Inductor cached for the old one."""
    h = hashlib.sha256()
    for path in sorted(package.glob("*.py")):
        h.update(path.name.encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


class RangePassPipeline(CustomGraphPass):
    """The passes that apply to one range, run in order as Inductor's post-grad custom pass."""

    def __init__(self, passes: Sequence[GraphPass], ctx: PassContext, previous: Optional[Any] = None,
                 bounds: Optional[Callable[[], ContextManager]] = None):
        self.passes = list(passes)
        self.ctx = ctx  # what the passes are told of the compile (its range, size hints)
        self.previous = previous  # a post-grad custom pass the user had configured: still runs first
        self.bounds = bounds  # a context the passes run in: the range's bounds on the token count
        self.returned: Optional[dict[str, int]] = None  # what the passes returned (None: a cache hit)

    def __call__(self, graph: torch.fx.Graph) -> None:
        if self.previous is not None:
            self.previous(graph)
        with self.bounds() if self.bounds is not None else contextlib.nullcontext():
            self.returned = {p.name: int(p(graph, self.ctx) or 0) for p in self.passes}
        graph.lint()

    def uuid(self) -> Optional[Any]:
        h = hashlib.sha256(f"rangedispatch-pipeline-v1|{self.ctx.range}".encode())
        for p in self.passes:
            h.update(f"|{p.name}:{p.config_key()}".encode())
        if self.previous is not None:
            prev = self.previous.uuid() if hasattr(self.previous, "uuid") else None
            if prev is None:
                return None  # the user's pass is not cacheable: neither are we
            h.update(f"|previous:{prev}".encode())
        return h.hexdigest()
