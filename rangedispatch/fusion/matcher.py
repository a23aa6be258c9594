"""Finding ``all_reduce -> (+ residual) -> RMSNorm (-> static FP8 quant)`` in a post-grad graph.

Inductor's post-grad graph is small and regular at this point (functional collectives, decomposed
norms: tests/test_fusion_distributed.py runs each form, tests/test_matcher.py the look-alikes), so the matcher walks it semantically from
every ``wait_tensor(all_reduce(x, "sum", group))`` instead of tracing one pattern per form, dtype
and eps. It accepts operands in either order, any eps, 2-D or 3-D activations, and it refuses
(with a reason) whatever the fused op would compute differently. Every node it accepts is checked
for the arguments that change its meaning:

- all_reduce: reduce op ``sum`` only;
- residual add: ``alpha`` 1, a residual other than the all-reduced value itself, the same shape
  (no broadcast) and dtype;
- mean of the square: the last dim only, ``keepdim``, no ``dtype=`` override; square = ``pow 2``
  or ``x * x``; eps: a constant added with ``alpha`` 1; rsqrt scaling the same fp32 value;
- weight: a 1-D vector of the hidden size in the activation dtype (Gemma's ``1 + w`` with ``alpha``
  1); the output cast back to the activation dtype;
- FP8 quant: a 1-element fp32 scale, clamp bounds exactly FP8's range, then the cast;
- no intermediate used elsewhere. The post-grad graph is functional: in-place variants never match.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
import torch.fx

from rangedispatch import torch_internals
from rangedispatch.fusion.numerics import FP8_DTYPE

log = logging.getLogger("rangedispatch")

aten = torch.ops.aten
prims = torch.ops.prims


@dataclass
class FusionMatch:
    """One site: the all-reduce input, what replaces what, and the nodes that go away."""

    input: torch.fx.Node
    group_name: str
    residual: Optional[torch.fx.Node]
    weight: Optional[torch.fx.Node]
    scale: Optional[torch.fx.Node]
    eps: float
    weight_mode: str
    pre_norm: torch.fx.Node  # all_reduce(+residual): replaced by the op's second output
    out: torch.fx.Node  # norm (or quant) output: replaced by the op's first output
    dead: list[torch.fx.Node] = field(default_factory=list)  # all nodes of the site, in graph order


def is_call(node: Any, *targets: Any) -> bool:
    """Whether ``node`` is a graph call of one of ``targets``."""
    return isinstance(node, torch.fx.Node) and node.op == "call_function" and node.target in targets


def _val(node: Any) -> Any:
    return node.meta.get("val") if isinstance(node, torch.fx.Node) else None


def _only_user(node: torch.fx.Node) -> Optional[torch.fx.Node]:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def _other(node: torch.fx.Node, operand: torch.fx.Node) -> Any:
    a, b = node.args[:2]
    return b if a is operand else a if b is operand else None


def _alpha(node: torch.fx.Node) -> Any:
    return node.kwargs.get("alpha", 1)


def _is_convert(node: Any, dtype: torch.dtype) -> bool:
    return is_call(node, prims.convert_element_type.default) and node.args[1] == dtype


def find_matches(graph: torch.fx.Graph) -> tuple[list[FusionMatch], list[str]]:
    """All fusable sites and, for the all-reduces that were not fused, why not."""
    matches, skipped = [], []
    for node in graph.nodes:
        if not (is_call(node, torch_internals.FUNCTIONAL_WAIT)
                and is_call(node.args[0], torch_internals.FUNCTIONAL_ALL_REDUCE)):
            continue
        result = _match_site(node)
        if isinstance(result, FusionMatch):
            matches.append(result)
        else:
            skipped.append(f"{node.args[0].name}: {result}")
    return matches, skipped


def _match_site(wait: torch.fx.Node) -> Any:
    ar = wait.args[0]
    x, reduce_op, group_name = ar.args[:3]
    if reduce_op != "sum":
        return f"reduce op {reduce_op!r} is not sum"
    if len(ar.users) != 1:
        return "the all_reduce result has users besides its wait"
    xv = _val(x)
    if not isinstance(xv, torch.Tensor) or xv.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        return f"input dtype {getattr(xv, 'dtype', None)} is not bf16, fp16 or fp32"
    dtype = xv.dtype

    residual, pre_norm, dead = None, wait, [ar, wait]
    adds = [u for u in wait.users if is_call(u, aten.add.Tensor)]
    if len(wait.users) == 1 and len(adds) == 1:
        add = adds[0]
        if _alpha(add) != 1:
            return f"the residual add has alpha={_alpha(add)}"
        cand = _other(add, wait)
        if cand is wait:
            return "the all-reduced value is added to itself"
        cv = _val(cand)
        if isinstance(cv, torch.Tensor) and cv.dtype == dtype and cv.shape == xv.shape:
            residual, pre_norm = cand, add
            dead.append(pre_norm)
        elif isinstance(cv, torch.Tensor):
            return (f"the residual {tuple(cv.shape)} {cv.dtype} is not the all-reduced value's shape and dtype "
                    f"{tuple(xv.shape)} {dtype} (broadcast or mixed-dtype add)")
    norm = _match_norm(pre_norm, dtype)
    if isinstance(norm, str):
        return norm
    norm_nodes, eps, weight, weight_mode, out = norm
    dead += norm_nodes
    scale, out_q, quant_nodes = _match_quant(out)
    if scale is None and _val(out).dtype != dtype:
        return "the fp32 norm output is not quantized to FP8 as expected"
    out = out_q
    dead += quant_nodes
    return FusionMatch(x, group_name, residual, weight, scale, eps, weight_mode, pre_norm, out, dead)


def _match_norm(h: torch.fx.Node, dtype: torch.dtype) -> Any:
    """``(nodes, eps, weight, weight_mode, out)`` for the RMSNorm reading ``h``, or why there is none."""
    nodes = []
    if dtype == torch.float32:
        h32 = h
    else:
        h32 = next((u for u in h.users if _is_convert(u, torch.float32)), None)
        if h32 is None:
            return "no RMSNorm follows (no fp32 upcast of the pre-norm value)"
        nodes.append(h32)
    square = next((u for u in h32.users if (is_call(u, aten.pow.Tensor_Scalar) and u.args[1] == 2)
                   or (is_call(u, aten.mul.Tensor) and u.args[0] is h32 and u.args[1] is h32)), None)
    if square is None:
        return "no RMSNorm follows (no square of the pre-norm value)"
    mean = _only_user(square)
    ndim = _val(h).dim()
    if not is_call(mean, aten.mean.dim) or list(mean.args[1]) not in ([-1], [ndim - 1]) or not (
        len(mean.args) > 2 and mean.args[2] or mean.kwargs.get("keepdim")
    ):
        return "the square is not averaged over the last dim with keepdim"
    if mean.kwargs.get("dtype") not in (None, torch.float32):
        return f"the mean square is computed in {mean.kwargs['dtype']}"
    add_eps = _only_user(mean)
    if not is_call(add_eps, aten.add.Tensor, aten.add.Scalar) or add_eps.args[0] is not mean or not isinstance(
        add_eps.args[1], (int, float)
    ) or isinstance(add_eps.args[1], bool):
        return "no constant eps added to the mean square"
    if _alpha(add_eps) != 1:
        return f"eps is added with alpha={_alpha(add_eps)}"
    rsqrt = _only_user(add_eps)
    if not is_call(rsqrt, aten.rsqrt.default):
        return "no rsqrt of the mean square"
    normed = _only_user(rsqrt)
    if not is_call(normed, aten.mul.Tensor) or _other(normed, rsqrt) is not h32:
        return "rsqrt does not scale the pre-norm value"
    allowed_h32_users = {square, normed}
    if set(h32.users) - allowed_h32_users and h32 is not h:
        return "the fp32 pre-norm value has other users"
    nodes += [square, mean, add_eps, rsqrt, normed]
    weighted = _match_weight(normed, dtype)
    if isinstance(weighted, str):
        return weighted
    weight_nodes, weight, weight_mode, out = weighted
    if weight is not None:
        wv = _val(weight)
        if not isinstance(wv, torch.Tensor) or wv.dim() != 1 or wv.shape[0] != _val(h).shape[-1]:
            return "the norm weight is not a 1-D tensor of the hidden size"
        if wv.dtype != dtype:
            return f"norm weight dtype {wv.dtype} differs from activation dtype {dtype} (fusing would change numerics)"
    return nodes + weight_nodes, float(add_eps.args[1]), weight, weight_mode, out


def _is_hidden_vector(node: Any) -> bool:
    v = _val(node)
    return isinstance(v, torch.Tensor) and v.dim() == 1


def _match_weight(normed: torch.fx.Node, dtype: torch.dtype) -> Any:
    """``(nodes, weight, mode, out)`` for how the weight is applied to the fp32 normed value."""
    user = _only_user(normed)
    fp32 = dtype == torch.float32
    if fp32:
        if is_call(user, aten.mul.Tensor):
            w = _other(user, normed)
            if _is_hidden_vector(w):
                return [user], w, "standard", user
            if (is_call(w, aten.add.Tensor) and w.args[1] == 1.0 and _alpha(w) == 1 and _is_hidden_vector(w.args[0])
                    and len(w.users) == 1):
                return [w, user], w.args[0], "gemma", user
        return [], None, "none", normed
    if _is_convert(user, dtype):  # llama: cast, then scale in the input dtype
        scaler = _only_user(user)
        if is_call(scaler, aten.mul.Tensor) and _is_hidden_vector(_other(scaler, user)):
            return [user, scaler], _other(scaler, user), "llama", scaler
        return [user], None, "none", user
    if is_call(user, aten.mul.Tensor):
        w = _other(user, normed)
        if _is_hidden_vector(w) and _val(w).dtype == dtype:
            weight, mode, nodes = w, "standard", [user]
        elif (is_call(w, aten.add.Tensor) and w.args[1] == 1.0 and _alpha(w) == 1 and len(w.users) == 1
                and _is_convert(w.args[0], torch.float32) and len(w.args[0].users) == 1
                and _is_hidden_vector(w.args[0].args[0]) and _val(w.args[0].args[0]).dtype == dtype):
            weight, mode, nodes = w.args[0].args[0], "gemma", [w.args[0], w, user]
        elif is_call(w, aten.add.Tensor) and _alpha(w) != 1:
            return f"the norm weight offset is added with alpha={_alpha(w)}"
        elif _is_hidden_vector(w) or (is_call(w, aten.add.Tensor) and _is_hidden_vector(w.args[0])):
            return f"norm weight dtype differs from activation dtype {dtype} (fusing would change numerics)"
        else:
            return "the norm output is scaled by something other than a weight vector"
        cast = _only_user(user)
        if _is_convert(cast, dtype):
            return nodes + [cast], weight, mode, cast
        if is_call(cast, aten.div.Tensor):
            # Inductor on CUDA drops the round trip to the input dtype before an FP8 quant; the quant
            # must follow (checked by the caller), and the fused op keeps eager's rounding
            return nodes, weight, mode, user
        return "the weighted norm is not cast back to the input dtype"
    return "the normed value is neither cast nor scaled by a weight"


def _match_quant(out: torch.fx.Node) -> tuple[Optional[torch.fx.Node], torch.fx.Node, list]:
    """``(scale, new out, nodes)`` when ``out`` only feeds a static FP8 quant, else ``(None, out, [])``."""
    user = _only_user(out)
    nodes = []
    if _val(out).dtype != torch.float32:
        if not _is_convert(user, torch.float32):
            return None, out, []
        nodes.append(user)
        src, user = user, _only_user(user)
    else:
        src = out
    if not is_call(user, aten.div.Tensor) or user.args[0] is not src:
        return None, out, []
    scale = user.args[1]
    sv = _val(scale)
    if not isinstance(sv, torch.Tensor) or sv.numel() != 1 or sv.dtype != torch.float32:
        return None, out, []
    nodes.append(user)
    info = torch.finfo(FP8_DTYPE)
    nxt = _only_user(user)
    if is_call(nxt, aten.clamp.default) and tuple(nxt.args[1:3]) == (info.min, info.max):
        nodes.append(nxt)
    elif is_call(nxt, aten.clamp_min.default) and nxt.args[1] == info.min:
        upper = _only_user(nxt)
        if not (is_call(upper, aten.clamp_max.default) and upper.args[1] == info.max):
            return None, out, []
        nodes += [nxt, upper]
        nxt = upper
    else:
        return None, out, []
    cast = _only_user(nxt)
    if not _is_convert(cast, FP8_DTYPE):
        return None, out, []
    return scale, cast, nodes + [cast]


def insertion_point(graph: torch.fx.Graph, m: FusionMatch) -> Optional[torch.fx.Node]:
    """The node after which a replacement of site ``m`` goes: its last operand. None when an
    operand is computed after the site's outputs are first used (the replacement cannot go anywhere)."""
    order = {n: i for i, n in enumerate(graph.nodes)}
    operands = [a for a in (m.input, m.residual, m.weight, m.scale) if isinstance(a, torch.fx.Node)]
    last_operand = max(operands, key=order.__getitem__)
    site = set(m.dead)
    first_use = min((order[u] for n in (m.pre_norm, m.out) for u in n.users if u not in site), default=len(order))
    return last_operand if order[last_operand] < first_use else None


def retire_site(graph: torch.fx.Graph, m: FusionMatch, out: torch.fx.Node, pre_norm: torch.fx.Node) -> None:
    """Point the users of the site's outputs at their replacements and erase the site's nodes."""
    m.out.replace_all_uses_with(out)
    m.pre_norm.replace_all_uses_with(pre_norm)
    for node in reversed(m.dead):
        if not node.users:
            graph.erase_node(node)


def replace_each_site(graph: torch.fx.Graph, replace: Callable[[FusionMatch, torch.fx.Node], bool], tier: str) -> int:
    """Offer every site of ``graph`` to ``replace(site, insert_after)`` (True: replaced) and return
    how many it replaced. One site at a time, matching again after each rewrite: a rewrite replaces
    nodes (the next layer's residual) that later matches would still point at. A refused site is
    not offered again; sites the matcher skipped, or that have no insertion point, are logged."""
    replaced, refused = 0, set()
    while True:
        matches, skipped = find_matches(graph)
        todo = [m for m in matches if m.out not in refused]
        if not todo:
            break
        site = todo[0]
        anchor = insertion_point(graph, site)
        if anchor is None:
            log.info("%s: %s left as it is: an operand is computed after the site's outputs are used", tier,
                     site.input.name)
        if anchor is not None and replace(site, anchor):
            replaced += 1
        else:
            refused.add(site.out)
    for reason in skipped:
        log.info("%s: not replaced: %s", tier, reason)
    return replaced
