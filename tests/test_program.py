"""The program around the call: hooks, grad mode, other compiles, copies, threads, stateful
arguments in warmup, the token input on every call. Each call must return what eager returns (or
raise one clear error) and leave the rest of the program as it would be without the wrapper."""

import copy
import io
import logging
import pickle
import threading

import pytest
import torch
from torch import nn

from helpers import Mlp
from rangedispatch import Range, RangeCompiledModule, load_config
from rangedispatch.errors import ConfigError

BASE = ["hardware=cpu", "fusion.enabled=false", "dispatch.max_num_tokens=64", "dispatch.split_points=[8,32]",
        "compile.max_autotune=never"]


def wrap(model, *overrides):
    return RangeCompiledModule(model, load_config([*BASE, *overrides]))


def xr(n, hidden=16, seed=0):
    g = torch.Generator().manual_seed(seed + n)
    return torch.randn(n, hidden, generator=g), torch.randn(n, hidden, generator=g)


def same(m, model, *args, **kwargs):
    out = m(*args, **kwargs)
    torch.testing.assert_close(out, model(*args, **kwargs))
    return out


# ---------------------------------------------------------------------------------------- hooks
def test_hooks_on_the_model_added_after_the_first_call_run_as_in_eager():
    torch.manual_seed(0)
    model = Mlp()
    m = wrap(model)
    x, r = xr(12)
    same(m, model, x, r)
    seen = []
    pre = model.register_forward_pre_hook(lambda mod, args: seen.append(mod is model))
    double = model.register_forward_hook(lambda mod, args, out: out * 2)
    torch.testing.assert_close(m(x, r), model(x, r))  # eager doubles too
    assert seen == [True, True]  # the wrapper's call and the eager call: the hook got the model itself
    double.remove()
    kw = model.register_forward_pre_hook(lambda mod, args, kwargs: ((args[0] + 1, *args[1:]), kwargs),
                                         with_kwargs=True)
    same(m, model, *xr(20))
    kw.remove()
    pre.remove()
    same(m, model, *xr(40))
    assert m.stats()[Range(33, 64)]["calls"] == 1


def test_hooks_on_the_wrapper_and_process_wide_hooks_run_once_per_call():
    torch.manual_seed(0)
    model = Mlp()
    m = wrap(model)
    x, r = xr(12)
    same(m, model, x, r)
    m.register_forward_hook(lambda mod, args, out: out + 1)
    torch.testing.assert_close(m(x, r), model(x, r) + 1)
    calls = []
    handle = torch.nn.modules.module.register_module_forward_hook(
        lambda mod, args, out: calls.append(type(mod).__name__) if mod is model else None)
    try:
        m(x, r)
    finally:
        handle.remove()
    assert calls == ["Mlp"]


def test_submodule_hooks_behave_as_under_torch_compile():
    """Hooks on submodules are traced with them, as torch.compile does: one registered before the
    first call runs; one added after a trace is not seen by either."""

    class Local(Mlp):  # a code object of its own: no compiled code of another test serves it
        def forward(self, x, residual):
            return super().forward(x, residual)

    torch.manual_seed(0)
    model = Local()
    model.lin.register_forward_hook(lambda mod, args, out: out + 1)
    m, tc = wrap(model), torch.compile(model, backend="eager")
    x, r = xr(12)
    same(m, model, x, r)
    torch.testing.assert_close(tc(x, r), model(x, r))
    model.lin.register_forward_hook(lambda mod, args, out: out * 3)
    torch.testing.assert_close(m(x, r), tc(x, r))


# ---------------------------------------------------------------------------------------- grad mode
def test_range_compiles_use_the_grad_mode_their_graph_was_traced_under():
    torch.manual_seed(0)
    model = Mlp()
    m = wrap(model)
    m(*xr(12))  # traced with grad mode on: the graph records gradients
    with torch.no_grad():
        m.warmup()  # compiles every range here, under no_grad
    x, r = xr(20)
    x.requires_grad_(True)
    m(x, r).sum().backward()
    grad, x.grad = x.grad, None
    model(x, r).sum().backward()
    torch.testing.assert_close(grad, x.grad)

    model2 = Mlp()
    m2 = wrap(model2)
    with torch.no_grad():
        m2(*xr(12))
    m2.warmup()  # grad mode on
    with torch.no_grad():
        out = m2(*xr(20))
    assert out.grad_fn is None and not out.requires_grad


# ---------------------------------------------------------------------------------------- other compiles
def _breaks_and_returns_a_dict(x):
    y = x * 2
    torch._dynamo.graph_break()
    return {"y": y + 1, "n": [x.shape[0]]}


def test_a_wrapper_leaves_unrelated_compiled_code_alone():
    torch.manual_seed(0)
    model = Mlp()
    m = wrap(model)
    same(m, model, *xr(5))
    x = torch.randn(3)
    f = torch.compile(_breaks_and_returns_a_dict)
    assert f(x)["n"] == [3] and torch.equal(f(x)["y"], x * 2 + 1)
    g = torch.compile(lambda t: (t.sin(), {"k": t.cos()}))
    torch.testing.assert_close(g(x)[1]["k"], x.cos())
    same(m, model, *xr(20))


class Outer(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.head = nn.Linear(16, 4)

    def forward(self, x, r):
        return self.head(self.inner(x, r))


@pytest.mark.parametrize("fullgraph", [False, True])
def test_inside_an_outer_torch_compile_the_outer_trace_takes_the_plain_model(fullgraph, caplog, monkeypatch):
    monkeypatch.setattr("rangedispatch.wrapper._said_outer_compile", False)
    torch._dynamo.reset()  # Outer.forward's compiled code from the other parametrization would serve this one
    torch.manual_seed(0)
    model = Mlp()
    eager, outer = Outer(model), Outer(wrap(model))
    outer.head = eager.head
    compiled = torch.compile(outer, backend="eager", fullgraph=fullgraph)
    with caplog.at_level(logging.WARNING, logger="rangedispatch"):
        for n in (3, 12, 40):
            torch.testing.assert_close(compiled(*xr(n)), eager(*xr(n)))
    said = [r.getMessage() for r in caplog.records if "inside another torch.compile" in r.getMessage()]
    assert len(said) == 1 and "without range dispatch" in said[0] and "disable_compile=True" in said[0]


def test_a_wrapper_of_a_wrapper_and_a_wrapper_inside_a_wrapped_model():
    torch.manual_seed(0)
    model = Mlp()
    outer = wrap(wrap(model))
    nested_model = Outer(wrap(model))
    nested = wrap(nested_model)
    eager_nested = Outer(model)
    eager_nested.head = nested_model.head
    for n in (1, 5, 20, 40):
        same(outer, model, *xr(n))
        torch.testing.assert_close(nested(*xr(n)), eager_nested(*xr(n)))


# ---------------------------------------------------------------------------------------- copies
@pytest.mark.parametrize("when", ["before_the_first_call", "after_the_first_call"])
def test_copies_and_pickles_are_independent_working_wrappers(when):
    torch.manual_seed(0)
    model = Mlp()
    m = wrap(model, "dispatch.skip_dynamo_guards=true")
    if when == "after_the_first_call":
        same(m, model, *xr(12))
    deep = copy.deepcopy(m)
    buffer = io.BytesIO()
    torch.save(m, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    unpickled = pickle.loads(pickle.dumps(m))
    for c in (deep, loaded, unpickled):
        assert c.module is not model and c.config == m.config
        for n in (1, 12, 40):
            same(c, c.module, *xr(n))
    with torch.no_grad():
        deep.module.w.add_(1.0)
    same(m, model, *xr(20))  # the original is untouched by changes to its copy
    assert not torch.equal(deep(*xr(20)), m(*xr(20)))
    shallow = copy.copy(m)
    assert shallow.module is model
    same(shallow, model, *xr(7))


# ---------------------------------------------------------------------------------------- threads
class WaitsForAnotherThread(nn.Module):
    """A forward that waits until another thread has compiled and run something."""

    def __init__(self, inside: threading.Event, ready: threading.Event, waited: list):
        super().__init__()
        self.lin = nn.Linear(16, 16)
        self.inside, self.ready, self.waited = inside, ready, waited

    def forward(self, x):
        self.inside.set()
        self.waited.append(self.ready.wait(timeout=120))
        return self.lin(x)


def test_the_state_dict_is_the_wrapped_models_in_both_directions():
    """A model holding a wrapper saves the keys it would save without it, and loads them (and keys
    that name the wrapper's ``module.``) back, strictly."""
    torch.manual_seed(0)
    parent = nn.Sequential(nn.Linear(16, 16), Mlp())
    plain = {k: v.clone() for k, v in parent.state_dict().items()}
    parent[1] = wrap(parent[1])
    parent[1](*xr(5))  # traced: the state dict does not change
    saved = parent.state_dict()
    assert list(saved) == list(plain) and all(torch.equal(saved[k], plain[k]) for k in plain)
    other = nn.Sequential(nn.Linear(16, 16), wrap(Mlp()))
    other.load_state_dict(plain)
    assert all(torch.equal(other.state_dict()[k], plain[k]) for k in plain)
    other.load_state_dict({k.replace("1.", "1.module.", 1) if k.startswith("1.") else k: v for k, v in plain.items()})
    assert list(wrap(nn.Linear(4, 4)).state_dict()) == ["weight", "bias"]


def test_a_forward_that_waits_for_another_threads_compile_does_not_deadlock():
    torch.manual_seed(0)
    inside, ready, waited = threading.Event(), threading.Event(), []
    model = WaitsForAnotherThread(inside, ready, waited)
    m = wrap(model)
    ready.set()
    m(torch.randn(12, 16))  # traced; the forward's waits run eagerly between graphs
    inside.clear()
    ready.clear()
    other = Mlp()
    other_wrapper = wrap(other)
    errors = []

    def compile_other():
        try:
            inside.wait(timeout=120)
            same(other_wrapper, other, *xr(20))  # a first call: traces and compiles
        except Exception as e:  # surfaced below
            errors.append(e)
        finally:
            ready.set()

    t = threading.Thread(target=compile_other)
    t.start()
    x = torch.randn(20, 16)
    out = m(x)
    t.join()
    assert not errors and waited[-1] is True
    torch.testing.assert_close(out, model.lin(x))


def test_concurrent_calls_of_one_wrapper_return_eager_results():
    torch.manual_seed(0)
    model = Mlp()
    m = wrap(model)
    same(m, model, *xr(12))
    errors = []

    def work(seed):
        try:
            for n in (3, 12, 20, 40, 5):
                same(m, model, *xr(n, seed=seed))
        except Exception as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(s,)) for s in range(4)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert not errors


def test_calls_made_while_another_thread_compiles_still_run_their_range():
    """torch 2.13 marks the whole process as compiling while any thread compiles: a call made
    meanwhile from another thread must still dispatch to its range's graph, not run eagerly."""
    torch.manual_seed(0)
    model = Mlp()
    m = wrap(model)
    x = xr(12)
    same(m, model, *x)
    same(m, model, *x)  # the range is compiled
    entered, release = threading.Event(), threading.Event()

    def held_backend(gm, example_inputs):
        entered.set()
        release.wait(timeout=120)
        return gm.forward

    unrelated = torch.compile(lambda a: a.sin() + 1, backend=held_backend)
    other = threading.Thread(target=unrelated, args=(torch.randn(3),))
    other.start()
    try:
        assert entered.wait(timeout=120)
        before = m.stats()[m.range_for(12)]["calls"]
        for _ in range(3):
            same(m, model, *x)
        assert m.stats()[m.range_for(12)]["calls"] == before + 3
    finally:
        release.set()
        other.join()


# ---------------------------------------------------------------------------------------- stateful arguments
class Cache:
    """A toy KV cache: the model appends to it on every call."""

    def __init__(self):
        self.keys = []


class CachedModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(16, 16)

    def forward(self, x, cache):
        cache.keys.append(x.sum())
        return self.lin(x) + torch.stack(cache.keys).sum()


def test_warmup_never_runs_a_stateful_example_twice(caplog):
    torch.manual_seed(0)
    model = CachedModel()
    m = wrap(model)
    cache = Cache()
    with caplog.at_level(logging.INFO, logger="rangedispatch"):
        m.warmup(torch.randn(1, 16), cache)
    assert len(cache.keys) == 1  # the example ran once, as a call would
    assert "the example holds a Cache, state the model updates: it is not run again" in caplog.text
    eager_cache, wrapped_cache = Cache(), Cache()
    for n in (1, 5, 20):
        x = torch.randn(n, 16)
        torch.testing.assert_close(m(x, wrapped_cache), model(x, eager_cache))
    assert len(wrapped_cache.keys) == 3


# ---------------------------------------------------------------------------------------- the token input
class Embeds(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 16)
        self.lin = nn.Linear(16, 16)

    def forward(self, input_ids=None, inputs_embeds=None):
        h = self.emb(input_ids) if inputs_embeds is None else inputs_embeds
        return self.lin(h)


def test_a_call_without_the_token_input_names_the_key_and_a_list_takes_the_first_present():
    torch.manual_seed(0)
    model = Embeds()
    m = wrap(model)
    ids = torch.randint(0, 50, (1, 5))
    same(m, model, input_ids=ids)
    with pytest.raises(ConfigError, match="dispatch.token_arg=0 \\('input_ids'\\): the call passed 1 positional argument\\(s\\) and "
                                          "keywords \\['inputs_embeds'\\] and no tensor there"):
        m(None, inputs_embeds=torch.randn(1, 5, 16))
    both = wrap(model, "dispatch.token_arg=[input_ids,inputs_embeds]")
    same(both, model, input_ids=ids)
    same(both, model, inputs_embeds=torch.randn(2, 10, 16))  # 20 tokens
    same(both, model, input_ids=torch.randint(0, 50, (4, 10)))  # 40 tokens
    assert {r: s["calls"] for r, s in both.stats().items()} == {Range(1, 8): 1, Range(9, 32): 1, Range(33, 64): 1}


class AnyRank(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(16, 16)

    def forward(self, x):
        return self.lin(x).cumsum(-2)


def test_a_token_input_of_another_rank_is_counted_by_its_own_dims_or_refused():
    torch.manual_seed(0)
    model = AnyRank()
    m = wrap(model)
    same(m, model, torch.randn(1, 5, 16))
    same(m, model, torch.randn(5, 16))  # 5 tokens, not 80
    same(m, model, torch.randn(2, 10, 16))
    assert {r: s["calls"] for r, s in m.stats().items()} == {Range(1, 8): 2, Range(9, 32): 1, Range(33, 64): 0}
    explicit = wrap(model, "dispatch.token_dim=[0,1]")
    same(explicit, model, torch.randn(1, 5, 16))
    with pytest.raises(ConfigError, match="dispatch.token_dim=\\[0, 1\\]: set for 3-d token inputs, and this call's "
                                          "is 2-d \\(5, 16\\)"):
        explicit(torch.randn(5, 16))
