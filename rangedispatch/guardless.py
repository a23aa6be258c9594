"""The per-wrapper Dynamo entry point, and calling its transformed code without guards (opt-in).

Every wrapper compiles its own entry function (``forward(*args, **kwargs)``, the wrapped model's
forward passed in) whose code object is a fresh copy: Dynamo keeps cache entries, recompile limits
and automatic-dynamic state per code object, so wrappers of one model class never share them (a
fifth wrapper of a class does not find the recompile limit used up by four others, and a second
hidden size does not make the first wrapper's hidden dim symbolic).

``dispatch.skip_dynamo_guards`` (off by default): once traced, Dynamo's per-call work (frame
interception and guard evaluation, ~10 us on a CPU core) is more than our whole dispatch. Like
vLLM, we can keep the bytecode Dynamo wrote for the entry (it flattens the inputs, calls the graph,
rebuilds the outputs) and call it as a plain function, bound per range to that range's artifact.
``CallSignature`` stands in for the guards Dynamo installed, kind by kind:

- global state: Dynamo's own ``GlobalStateGuard`` (grad mode, autocast, default dtype,
  deterministic algorithms...), plus no functorch transform, torch-function or dispatch mode;
- each argument: its exact type; for tensors dtype, device, rank, sizes (token dims tied to the
  token input), strides (contiguous), ``requires_grad``; for None/bool/int/float/str the value;
  which tensor arguments are the same object;
- the token count: a range skips the guards only if every shape guard of the learned graph holds
  for every token count in it (a forward that branches on the size keeps the guards there);
- the module: its exact type, ``training``, its first parameter's dtype and device; a changed
  structure (a parameter removed or set to None, a parametrization, another shape) makes the
  bytecode or the artifact fail before anything is written, and the call is run again through the
  guards, which then decide.

Everything else Dynamo guards is not checked on this path: other parameters' and buffers' dtypes,
submodules' ``training``, Python attributes and globals that forward reads; side effects in
forward are replayed as traced.
"""

from __future__ import annotations

import builtins
import itertools
import operator
import threading
import types
import weakref
from typing import Any, Callable, Optional

import torch

from rangedispatch import torch_internals
from rangedispatch.torch_internals import transforms_active

_lock = threading.Lock()
_codes: dict[types.CodeType, list] = {}  # entry code -> the transformed codes Dynamo made for it
_hook_installed = False
_entry_ids = itertools.count()


def _hook(old_code: types.CodeType, new_code: types.CodeType) -> None:
    codes = _codes.get(old_code)
    if codes is not None:
        codes.append(new_code)


def _entry(forward, *args, **kwargs):
    return forward(*args, **kwargs)


def make_entry(owner: object, model: torch.nn.Module) -> tuple[Callable, list]:
    """A fresh entry function for ``owner`` (a wrapper), and the list where the bytecode Dynamo
    makes for it is collected. Its globals are private: Dynamo installs its compiled-graph names
    there, not in any user module."""
    global _hook_installed
    name = f"rangedispatch_{type(model).__name__}_{next(_entry_ids)}"
    code = _entry.__code__.replace(co_name=name, co_qualname=name) if hasattr(_entry.__code__, "co_qualname") \
        else _entry.__code__.replace(co_name=name)
    fn = types.FunctionType(code, {"__builtins__": builtins, "__name__": __name__}, name)
    codes: list = []
    with _lock:
        if not _hook_installed:
            torch_internals.on_bytecode(_hook)
            _hook_installed = True
        _codes[code] = codes
    weakref.finalize(owner, _codes.pop, code, None)
    return fn, codes


_DYNAMO_UTILS_GLOBAL = "__import_torch_dot__dynamo_dot_utils"
_COMPILED_FN_PREFIX = "__compiled_fn"


class _PlainDynamoUtils:
    """Stands in for ``torch._dynamo.utils`` in the transformed bytecode. Its helpers (``call_size``,
    the pre-graph profiler markers) are wrapped in ``torch._disable_dynamo``, which costs ~0.8 us a
    call; outside Dynamo there is nothing to disable, so C callables do the same work (the profiler
    markers only record when a profiler runs: here they are no-ops)."""

    call_size = staticmethod(torch.Tensor.size)
    call_stride = staticmethod(torch.Tensor.stride)
    call_storage_offset = staticmethod(torch.Tensor.storage_offset)
    record_pregraph_bytecode_enter = staticmethod(type(None))  # () -> None
    record_pregraph_bytecode_exit = staticmethod(bool)  # (None) -> ignored

    def __getattr__(self, name: str) -> Any:
        return getattr(torch_internals.dynamo_utils_module(), name)


class GuardlessForward:
    """Dynamo's transformed entry, callable as a plain function (``f(forward, *args, **kwargs)``).
    It runs with a private copy of the entry's globals: there ``torch._dynamo.utils`` is replaced
    by plain helpers and, in the per-range variants, the graph Dynamo calls is replaced by that
    range's compiled artifact itself (no per-call range dispatch at all)."""

    def __init__(self, func: Callable, code: types.CodeType, compiled_name: str):
        self.func = func
        self.code = code
        self.compiled_name = compiled_name
        self.globals = dict(func.__globals__)
        self.globals[_DYNAMO_UTILS_GLOBAL] = _PlainDynamoUtils()
        self.generic = self._function(self.globals)

    def for_artifact(self, artifact: Callable) -> Callable:
        """The forward with the graph call bound to ``artifact`` (one range's compiled graph)."""
        return self._function({**self.globals, self.compiled_name: artifact})

    def _function(self, globals_: dict) -> Callable:
        f = self.func
        return types.FunctionType(self.code, globals_, f.__name__, f.__defaults__, f.__closure__)


def guardless_forward(entry: Callable, code: types.CodeType) -> Optional[GuardlessForward]:
    """``entry``'s transformed ``code`` as a ``GuardlessForward``, or None unless it calls exactly
    one graph and resumes nothing (graph breaks need Dynamo to run the rest)."""
    compiled = [n for n in code.co_names if n.startswith(_COMPILED_FN_PREFIX)]
    if len(compiled) != 1 or any(n.startswith("__resume_at") for n in code.co_names):
        return None
    return GuardlessForward(entry, code, compiled[0])


# exceptions a changed module structure raises from the bytecode (a missing parameter: KeyError,
# AttributeError; None for a tensor: TypeError, AttributeError) or from the artifact's input checks
# (another shape: AssertionError), before any output or input is written
STRUCTURE_CHANGED = (KeyError, AttributeError, TypeError, AssertionError)

_SCALARS = (type(None), bool, int, float, str)


class CallSignature:
    """What the guard-free path checks on every call instead of Dynamo's guards (see the module
    docstring). ``reason`` is set when the traced call has an argument the checks cannot cover;
    then no call may skip the guards.

    A tensor dim whose size equalled a token dim's at the traced call must equal that token dim
    on every call; the other dims must keep their traced size. (A static dim that happened to equal
    the token count at the traced call therefore sends other token counts to the guarded path:
    slower, never wrong.)"""

    def __init__(self, x: torch.Tensor, token_dims: tuple, args: tuple, kwargs: dict, module: torch.nn.Module):
        self.reason: Optional[str] = None
        token_sizes = {x.shape[d]: d for d in token_dims}
        self.n_args = len(args)
        self.keys = frozenset(kwargs)
        self.checks: list[tuple[Any, Callable[[Any, torch.Tensor], bool]]] = []
        self.tensor_slots: list[Any] = []  # where the tensor arguments are, for the aliasing check
        for where, value in [*enumerate(args), *kwargs.items()]:
            check = self._check_for(value, token_sizes)
            if check is None:
                self.reason = f"argument {where!r} is a {type(value).__name__}, which the guard-free path cannot check"
                return
            self.checks.append((where, check))
            if isinstance(value, torch.Tensor):
                self.tensor_slots.append(where)
        self.aliasing = self._aliasing_of([id(args[w] if type(w) is int else kwargs[w]) for w in self.tensor_slots])
        self.distinct = len(set(self.aliasing)) == len(self.aliasing)
        self.global_state_holds = torch_internals.global_state_guard().check
        if torch_internals.transforms_active():
            self.reason = "the traced call ran under a functorch transform or a torch-function / dispatch mode"
        self.module_type = type(module)
        self.training = module.training
        param = next(module.parameters(), None)
        self.param = param
        self.param_key = (param.dtype, param.device) if param is not None else None

    @staticmethod
    def _aliasing_of(ids: list) -> tuple:
        """Per tensor argument (by ``id``), the index of the first argument that is the same object."""
        first: dict[int, int] = {}
        return tuple(first.setdefault(i, n) for n, i in enumerate(ids))

    def _check_for(self, value: Any, token_sizes: dict) -> Optional[Callable[[Any, torch.Tensor], bool]]:
        if isinstance(value, torch.Tensor):
            if not value.is_contiguous():
                return None
            kind, dtype, device, ndim, grad = type(value), value.dtype, value.device, value.dim(), value.requires_grad
            shape = value.shape
            static = _sizes_at(tuple(d for d, s in enumerate(shape) if s not in token_sizes))
            static_sizes = static(shape)
            tied = _sizes_at(tuple(d for d, s in enumerate(shape) if s in token_sizes))
            token = _sizes_at(tuple(token_sizes[s] for s in shape if s in token_sizes))

            def tensor_ok(t: Any, x: torch.Tensor) -> bool:
                t_shape = t.shape
                return (type(t) is kind and t.dtype is dtype and len(t_shape) == ndim and t.device == device
                        and t.requires_grad is grad and static(t_shape) == static_sizes
                        and tied(t_shape) == token(x.shape) and t.is_contiguous())

            return tensor_ok
        if type(value) in _SCALARS:
            kind = type(value)
            return lambda v, x: type(v) is kind and v == value
        return None

    def accepts(self, x: torch.Tensor, args: tuple, kwargs: dict, module: torch.nn.Module) -> bool:
        if len(args) != self.n_args or kwargs.keys() != self.keys:
            return False
        if not self.global_state_holds() or transforms_active():
            return False
        if type(module) is not self.module_type or module.training is not self.training:
            return False
        param = self.param
        if param is not None and (param.dtype, param.device) != self.param_key:
            return False
        for where, check in self.checks:
            if not check(args[where] if type(where) is int else kwargs[where], x):
                return False
        if len(self.aliasing) > 1:
            ids = [id(args[w] if type(w) is int else kwargs[w]) for w in self.tensor_slots]
            if self.distinct:
                return len(set(ids)) == len(ids)
            return self._aliasing_of(ids) == self.aliasing
        return True


def _sizes_at(dims: tuple) -> Callable[[torch.Size], Any]:
    """The sizes at ``dims`` of a shape, by one C call (it runs on every guard-free call)."""
    return operator.itemgetter(*dims) if dims else (lambda shape: ())


def range_guards_hold(graph: Any, r: Any) -> bool:
    """Whether every shape guard of ``graph`` holds for every token count of range ``r``: only then
    may calls of ``r`` skip the guards (a guard that some size breaks needs Dynamo to re-check).
    The signature pins every other size: a dim whose size equalled the token count is that token
    count, any other keeps its traced size; the guards are read with those sizes put in."""
    sym = graph.token_symbol
    if sym is None:
        return False
    hints = torch_internals.size_hints(graph.shape_env)
    guards = torch_internals.shape_guards(graph.shape_env)
    others = {s for g in guards for s in g.free_symbols} - {sym}
    if any(s not in hints for s in others):
        return False
    pinned = {s: sym if hints[s] == hints[sym] else hints[s] for s in others}
    for guard in guards:
        g = guard.xreplace(pinned)
        if not (torch_internals.holds_over(g, sym, r.start, r.end) if g.free_symbols else bool(g)):
            return False
    return True
