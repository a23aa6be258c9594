"""Async tensor parallelism: on top of the sequence-parallel tier, in the ranges of the model's tier
plan from the profile's ``async_tp_min_bytes``, each collective of that tier that sits next to a
matmul is overlapped with it (``async_tp_op.py``):

    sp_all_gather(norm block) -> [view to 2-D] -> mm(., w1), mm(., w2) ...  ->  sp_all_gather_matmul
    mm(a, w) -> [view] -> sp_reduce_scatter                                  ->  sp_matmul_reduce_scatter

The first form takes every matmul (``mm``, or ``addmm`` whose bias is then added) that reads the
whole gathered tensor, the column-parallel projections after a norm (q/k/v, gate/up); other readers
of the gathered tensor get it from the op. The second form takes a matmul whose only use is the
reduce-scatter: the row-parallel projection before a site. Anything else is left to the
sequence-parallel ops, which compute the same values one collective at a time.

The pass runs after ``sequence_parallel_pass.py`` in the same range, on the ops it put in the graph.
"""

from __future__ import annotations

import logging
import operator
from typing import Optional

import torch
import torch.fx

from rangedispatch import torch_internals
from rangedispatch.fusion.async_tp_op import SP_ALL_GATHER_MATMUL, SP_MATMUL_REDUCE_SCATTER
from rangedispatch.fusion.matcher import is_call
from rangedispatch.fusion.replacement import call_with_value
from rangedispatch.fusion.sequence_parallel_op import SP_ALL_GATHER, SP_REDUCE_SCATTER
from rangedispatch.fusion.tier_plan import TierPass
from rangedispatch.fusion.tiers import ASYNC_TP
from rangedispatch.passes import RESHAPE_OPS, PassContext

log = logging.getLogger("rangedispatch")

aten = torch.ops.aten


class AsyncTensorParallel(TierPass):
    name = "async_tp"
    tier = ASYNC_TP
    output_ops = ("torch.ops.rangedispatch.sp_all_gather_matmul.default",
                  "torch.ops.rangedispatch.sp_matmul_reduce_scatter.default")

    def __call__(self, graph: torch.fx.Graph, ctx: PassContext) -> int:
        replaced = 0
        for node in list(graph.nodes):
            if is_call(node, SP_ALL_GATHER) and self.plan.async_tp_serves(node.args[1]):
                replaced += self._gather_matmuls(graph, node)
            elif is_call(node, SP_REDUCE_SCATTER) and self.plan.async_tp_serves(node.args[1]):
                replaced += self._matmul_reduce_scatter(graph, node)
        return replaced

    def _gather_matmuls(self, graph: torch.fx.Graph, gather: torch.fx.Node) -> int:
        shard, group_name, shape = gather.args
        readers = _whole_matmuls(gather)
        if not readers:
            return 0
        order = {n: i for i, n in enumerate(graph.nodes)}
        weights = [w for _, w, _ in readers]
        if any(order[w] > order[gather] and _depends_on(w, gather) for w in weights):
            log.info("async_tp: %s left as it is: a weight is computed from the gathered tensor", gather.name)
            return 0
        for w in sorted(weights, key=order.__getitem__):  # the weights' casts or transposes move up
            _move_before(w, gather, order)
        with graph.inserting_before(gather):
            fused = call_with_value(graph, SP_ALL_GATHER_MATMUL,
                                    (shard, weights, group_name, shape, self.backend, self.plan.max_num_tokens))
            whole = call_with_value(graph, operator.getitem, (fused, 0))
            products = [call_with_value(graph, operator.getitem, (fused, i + 1)) for i in range(len(readers))]
        for (matmul, _, bias), product in zip(readers, products):
            if bias is not None:
                with graph.inserting_before(matmul):
                    product = call_with_value(graph, aten.add.Tensor, (product, bias))
            matmul.replace_all_uses_with(product)
            graph.erase_node(matmul)
        gather.replace_all_uses_with(whole)
        graph.erase_node(gather)
        for view in [u for u in whole.users if is_call(u, *RESHAPE_OPS) and not u.users]:
            graph.erase_node(view)
        return 1

    def _matmul_reduce_scatter(self, graph: torch.fx.Graph, scatter: torch.fx.Node) -> int:
        source, group_name = scatter.args
        matmul = _only_producer_matmul(source)
        if matmul is None:
            return 0
        a, w = matmul.args
        size_reads = [u for n in {source, matmul} for u in n.users if is_call(u, aten.sym_size.int)]
        if not all(torch_internals.known_equal(u.meta["val"], a.meta["val"].shape[0]) for u in size_reads):
            return 0
        for read in size_reads:  # the token count, read off the product: a's rows
            read.args = (a, 0)
        with graph.inserting_before(scatter):
            fused = call_with_value(graph, SP_MATMUL_REDUCE_SCATTER,
                                    (a, w, group_name, self.backend, self.plan.max_num_tokens))
        scatter.replace_all_uses_with(fused)
        graph.erase_node(scatter)
        for node in (source, matmul) if source is not matmul else (matmul,):
            graph.erase_node(node)
        return 1


def _whole_matmuls(gather: torch.fx.Node) -> list[tuple[torch.fx.Node, torch.fx.Node, Optional[torch.fx.Node]]]:
    """``(matmul, weight, bias)`` for each matmul reading the whole gathered tensor as 2-D tokens."""
    hidden = gather.args[2][-1]
    flats = [gather] if len(gather.args[2]) == 2 else []
    flats += [u for u in gather.users if is_call(u, *RESHAPE_OPS) and u.meta["val"].dim() == 2
              and u.meta["val"].shape[-1] == hidden]
    found = []
    for flat in flats:
        for user in flat.users:
            if is_call(user, aten.mm.default) and user.args[0] is flat and not user.kwargs:
                found.append((user, user.args[1], None))
            elif is_call(user, aten.addmm.default) and user.args[1] is flat and not user.kwargs and len(user.args) == 3 \
                    and user.args[0].meta["val"].dim() == 1:
                found.append((user, user.args[2], user.args[0]))
    return found


def _only_producer_matmul(source: torch.fx.Node) -> Optional[torch.fx.Node]:
    """The ``mm`` whose only use is ``source`` (itself, or a view of it that only the reduce-scatter
    reads); reading a size (``sym_size``) is not a use."""
    matmul = source.args[0] if is_call(source, *RESHAPE_OPS) else source
    if not is_call(matmul, aten.mm.default):
        return None
    uses = [u for n in {source, matmul} for u in n.users if u is not source and not is_call(u, aten.sym_size.int)]
    return matmul if len(uses) == 1 else None


def _depends_on(node: torch.fx.Node, ancestor: torch.fx.Node) -> bool:
    seen, todo = set(), [node]
    while todo:
        n = todo.pop()
        if n is ancestor:
            return True
        if n not in seen:
            seen.add(n)
            todo.extend(n.all_input_nodes)
    return False


def _move_before(node: torch.fx.Node, anchor: torch.fx.Node, order: dict[torch.fx.Node, int]) -> None:
    """Move ``node`` and whatever it is computed from that comes after ``anchor`` to just before it."""
    if order[node] < order[anchor]:
        return
    for arg in sorted(node.all_input_nodes, key=order.__getitem__):
        _move_before(arg, anchor, order)
    anchor.prepend(node)
    order[node] = order[anchor] - 0.5
