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

- global state: Dynamo's own ``GlobalStateGuard`` (grad mode, autocast, deterministic
  algorithms...), the default dtype (which Dynamo misses on torch 2.11), plus no
  functorch transform, torch-function or dispatch mode;
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
import threading
import types
import weakref
from typing import Any, Callable, Optional, Sequence

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
    slower, never wrong.)

    ``accepts(x, args, kwargs, module)`` is generated as one flat function with every check
    written out, as Dynamo compiles its guards: it runs on every call, next to a compiled graph
    that leaves the interpreter's caches cold, and a loop over per-argument closures cost about
    twice as much there."""

    def __init__(self, x: torch.Tensor, token_dims: tuple, args: tuple, kwargs: dict, module: torch.nn.Module):
        self.reason: Optional[str] = None
        token_sizes = {x.shape[d]: d for d in token_dims}
        names: dict[str, Any] = {"keys": frozenset(kwargs), "global_state_holds": torch_internals.global_state_guard().check,
                                 "transforms_active": transforms_active, "module_type": type(module),
                                 "aliasing_of": _aliasing_of, "get_default_dtype": torch.get_default_dtype,
                                 "default_dtype": torch.get_default_dtype()}
        body = [f"if len(args) != {len(args)} or " + ("kwargs.keys() != keys" if kwargs else "kwargs") + ": return False",
                # the default dtype too: Dynamo's guards miss it on torch 2.11 (the guarded path then decides)
                "if not global_state_holds() or transforms_active() or get_default_dtype() is not default_dtype: "
                "return False",
                f"if type(module) is not module_type or module.training is not {module.training}: return False"]
        param = next(module.parameters(), None)
        if param is not None:
            names.update(param=param, param_dtype=param.dtype, param_device=param.device)
            body.append("if param.dtype is not param_dtype or param.device != param_device: return False")
        tensors = []
        for i, (where, value) in enumerate([*enumerate(args), *kwargs.items()]):
            read = f"args[{where}]" if type(where) is int else f"kwargs[{where!r}]"
            checks = self._checks_for(value, f"v{i}", token_sizes, names)
            if checks is None:
                self.reason = f"argument {where!r} is a {type(value).__name__}, which the guard-free path cannot check"
                return
            body += [f"v{i} = {read}", *checks]
            if isinstance(value, torch.Tensor):
                tensors.append((i, id(value)))
        if len(tensors) > 1:  # which tensor arguments are the same object
            ids = "(" + "".join(f"id(v{i}), " for i, _ in tensors) + ")"
            aliasing = _aliasing_of([ident for _, ident in tensors])
            if len(set(aliasing)) == len(aliasing):
                body.append(f"if len(set({ids})) != {len(tensors)}: return False")
            else:
                body.append(f"if aliasing_of({ids}) != {aliasing!r}: return False")
        if torch_internals.transforms_active():
            self.reason = "the traced call ran under a functorch transform or a torch-function / dispatch mode"
        source = "def accepts(x, args, kwargs, module):\n    xs = x.shape\n" + "".join(
            f"    {line}\n" for line in [*body, "return True"])
        exec(compile(source, "<rangedispatch guard-free checks>", "exec"), names)
        self.accepts: Callable[[torch.Tensor, tuple, dict, torch.nn.Module], bool] = names["accepts"]
        self.source = source  # for reading what is checked

    @staticmethod
    def _checks_for(value: Any, v: str, token_sizes: dict, names: dict) -> Optional[list[str]]:
        """The lines checking argument ``value`` (read into local ``v``); None if it cannot be checked."""
        if isinstance(value, torch.Tensor):
            if not value.is_contiguous():
                return None
            names.update({f"{v}_type": type(value), f"{v}_dtype": value.dtype, f"{v}_device": value.device})
            sizes = [f"{v}_shape[{d}] != " + (f"xs[{token_sizes[s]}]" if s in token_sizes else str(s))
                     for d, s in enumerate(value.shape)]
            return [f"if type({v}) is not {v}_type or {v}.dtype is not {v}_dtype or {v}.device != {v}_device "
                    f"or {v}.requires_grad is not {value.requires_grad} or not {v}.is_contiguous(): return False",
                    f"{v}_shape = {v}.shape",
                    f"if len({v}_shape) != {value.dim()}" + "".join(f" or {c}" for c in sizes) + ": return False"]
        if type(value) in _SCALARS:
            names.update({f"{v}_type": type(value), f"{v}_value": value})
            return [f"if type({v}) is not {v}_type or {v} != {v}_value: return False"]
        return None


def _aliasing_of(ids: Sequence[int]) -> tuple:
    """Per tensor argument (by ``id``), the index of the first argument that is the same object."""
    first: dict[int, int] = {}
    return tuple(first.setdefault(i, n) for n, i in enumerate(ids))


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
