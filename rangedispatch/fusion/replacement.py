"""New nodes in a post-grad graph, each carrying the fake value (shape, strides) Inductor needs.

``call_with_value`` adds one call and runs its target on the operands' fake values;
``insert_replacement`` traces a replacement written as a Python function with ``make_fx`` on the
fake values of the graph nodes it takes, with Inductor's decompositions (its lowerings expect e.g.
``convert_element_type``, not ``_to_copy``), and copies the traced graph in.
"""

from __future__ import annotations

from typing import Callable

import torch.fx

from rangedispatch import torch_internals


def call_with_value(graph: torch.fx.Graph, target: Callable, args: tuple) -> torch.fx.Node:
    """``graph.call_function(target, args)`` at the current insertion point, with its fake value."""
    node = graph.call_function(target, args)
    node.meta["val"] = torch_internals.call_on_fakes(target, torch.fx.node.map_arg(args, lambda n: n.meta["val"]))
    return node


def insert_replacement(graph: torch.fx.Graph, fn: Callable, operands: list[torch.fx.Node],
                       after: torch.fx.Node) -> tuple[torch.fx.Node, ...]:
    """``fn(*operands)`` traced and copied into ``graph`` right after ``after``; its output nodes."""
    traced = torch_internals.trace_with_inductor_decompositions(fn, [n.meta["val"] for n in operands])
    placeholders = [n for n in traced.graph.nodes if n.op == "placeholder"]
    with graph.inserting_before(after.next):  # (inserting_after would put each new node first)
        out = graph.graph_copy(traced.graph, dict(zip(placeholders, operands)))
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)
