"""Every call returns the eager result or raises a rangedispatch error: any first call, any change
between calls that normal programs make. Each case runs with Dynamo's guards (the default) and,
where the guard-free path claims to check it, with ``dispatch.skip_dynamo_guards=true`` as well."""

import logging
import threading

import pytest
import torch
from torch import nn

from helpers import Mlp
from rangedispatch import Range, RangeCompiledModule, load_config
from rangedispatch.cudagraphs import CapturedInputs
from rangedispatch.passes import GraphPass

BASE = ["hardware=cpu", "fusion.enabled=false", "dispatch.max_num_tokens=64", "dispatch.split_points=[8,32]",
        "compile.max_autotune=never"]
GUARDS = pytest.mark.parametrize("guard_free", [False, True], ids=["guards", "guard_free"])


def wrap(model, *overrides, guard_free=False):
    return RangeCompiledModule(model, load_config([*BASE, f"dispatch.skip_dynamo_guards={guard_free}", *overrides]))


def same(m, model, *args, **kwargs):
    out = m(*args, **kwargs)
    torch.testing.assert_close(out, model(*args, **kwargs))
    return out


def xr(n, hidden=16, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed + n)
    return torch.randn(n, hidden, generator=g).to(dtype), torch.randn(n, hidden, generator=g).to(dtype)


# ---------------------------------------------------------------------------------------- 1. first call
@GUARDS
def test_first_call_of_one_token_then_every_size(guard_free):
    torch.manual_seed(0)
    model = Mlp()
    m = wrap(model, guard_free=guard_free)
    for n in (1, 2, 5, 8, 9, 20, 40, 64, 1, 3):
        same(m, model, *xr(n))
    symbolic = [g for g in m.graphs if g.is_symbolic]
    assert len(symbolic) == 1 and len(m.graphs) == 2  # the 1-token graph and one graph for every other size
    assert {r: s["calls"] for r, s in m.stats().items()} == {Range(1, 8): 6, Range(9, 32): 2, Range(33, 64): 2}


def test_warmup_with_one_token_compiles_the_general_graph_too():
    torch.manual_seed(0)
    model = Mlp()
    m = wrap(model).warmup(*xr(1))
    assert any(g.is_symbolic for g in m.graphs)
    assert all(s["compiled"] for s in m.stats().values())
    for n in (2, 5, 20, 40, 1):
        same(m, model, *xr(n))


class TokenGrid(nn.Module):
    """Input [batch, seq, hidden]: both leading dims count tokens."""

    def __init__(self, hidden=16):
        super().__init__()
        self.lin = nn.Linear(hidden, hidden)

    def forward(self, x):
        return self.lin(x).cumsum(1)  # mixes along seq: a graph that assumed batch == seq would be wrong


@pytest.mark.parametrize("first", [(1, 8), (2, 1), (1, 1), (4, 4)])
def test_batch_and_seq_token_dims_any_first_shape(first):
    torch.manual_seed(0)
    model = TokenGrid()
    m = wrap(model, "dispatch.compile_sizes=[16]")
    for b, s in (first, (2, 8), (4, 4), (1, 16), (3, 1), (1, 1), (2, 20)):
        same(m, model, torch.randn(b, s, 16))
    assert m.stats()[Range(16, 16)]["calls"] == 3 + (first == (4, 4))


def test_out_of_range_compile_with_a_first_call_of_zero_tokens(caplog):
    torch.manual_seed(0)
    model = Mlp()
    m = wrap(model, "dispatch.out_of_range=compile")
    with caplog.at_level(logging.WARNING, logger="rangedispatch"):
        assert same(m, model, *xr(0)).shape == (0, 16)
    assert "0 tokens is outside the compiled ranges" in caplog.text
    for n in (5, 20, 100):
        assert same(m, model, *xr(n)).shape == (n, 16)


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.head = nn.Linear(4 * 8 * 8, 5)

    def forward(self, x):
        return self.head(torch.relu(self.conv(x)).flatten(1))


def test_conv_net_with_the_batch_as_token_dim():
    torch.manual_seed(0)
    model = ConvNet()
    m = wrap(model, "dispatch.token_dim=0", "dispatch.split_points=[15]")
    for n in (1, 2, 15, 16, 40):
        same(m, model, torch.randn(n, 3, 8, 8))


class FailingPass(GraphPass):
    name = "fails"

    def split_points(self, gm, ctx):
        return ()

    def applies(self, r):
        return r.start == 9

    def __call__(self, graph, ctx):
        raise RuntimeError("pass exploded")

    def config_key(self):
        return "fails"


def test_stats_count_only_calls_that_returned_and_ranges_that_compiled():
    torch.manual_seed(0)
    model = Mlp()
    m = RangeCompiledModule(model, load_config(BASE), passes=[FailingPass()])
    same(m, model, *xr(4))
    for _ in range(2):
        with pytest.raises(Exception, match="pass exploded"):
            m(*xr(20))
    with pytest.raises(RuntimeError):
        m(torch.randn(5, 7), torch.randn(5, 7))  # the model itself rejects the shape
    stats = m.stats()
    assert stats[Range(9, 32)] | {} and not stats[Range(9, 32)]["compiled"] and stats[Range(9, 32)]["calls"] == 0
    assert stats[Range(1, 8)]["calls"] == 1
    same(m, model, *xr(40))


# ---------------------------------------------------------------------------------------- 2. between calls
class Optional_(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(16, 16)

    def forward(self, x, bias=None, scale: float = 1.0, steps: int = 1):
        y = self.lin(x) * scale
        for _ in range(steps):
            y = y.tanh()
        return y if bias is None else y + bias


@GUARDS
def test_optional_and_keyword_arguments_that_appear_or_vanish(guard_free):
    torch.manual_seed(0)
    model = Optional_()
    m = wrap(model, guard_free=guard_free)
    x, b = xr(12)
    same(m, model, x)
    same(m, model, x)
    same(m, model, x, bias=b)
    same(m, model, x, b)
    same(m, model, x)
    same(m, model, x, None)
    same(m, model, x, bias=b, scale=0.5)
    same(m, model, x, scale=2.0, steps=3)
    same(m, model, x, scale=2.0, steps=3)


def traced_mlp(guard_free):
    """An Mlp wrapper past its trace and first compiled call, and the inputs it saw."""
    torch.manual_seed(0)
    model = Mlp()
    m = wrap(model, guard_free=guard_free)
    x, r = xr(12)
    same(m, model, x, r)
    same(m, model, x, r)
    return model, m, x, r


@GUARDS
def test_dtype_changes_of_any_input_and_of_the_model(guard_free):
    model, m, x, r = traced_mlp(guard_free)
    same(m, model, x, r.double())
    same(m, model, x, r.to(torch.bfloat16))
    model.to(torch.bfloat16)
    out = m(*xr(12, dtype=torch.bfloat16))
    torch.testing.assert_close(out, model(*xr(12, dtype=torch.bfloat16)))
    assert out.dtype == torch.bfloat16


@GUARDS
def test_strided_and_grad_requiring_token_inputs(guard_free):
    model, m, x, r = traced_mlp(guard_free)
    same(m, model, torch.randn(16, 12).t(), r)  # transposed
    same(m, model, torch.randn(24, 16)[::2], r)  # strided rows
    xg = x.clone().requires_grad_(True)
    m(xg, r).sum().backward()
    xe = x.clone().requires_grad_(True)
    model(xe, r).sum().backward()
    torch.testing.assert_close(xg.grad, xe.grad)


SCALE = 1.0


class Stateful(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(16, 16)
        self.drop = nn.Dropout(0.5)
        self.scale = 1.0
        self.use_tanh = False
        self.step = 0

    def forward(self, x):
        self.step += 1
        y = self.drop(self.lin(x)) * self.scale * SCALE
        return y.tanh() if self.use_tanh else y


def test_python_state_read_by_forward_with_guards():
    global SCALE
    torch.manual_seed(0)
    model = Stateful().eval()
    m = wrap(model)
    x = torch.randn(12, 16)
    same(m, model, x)
    model.scale = 3.0
    same(m, model, x)
    model.use_tanh = True
    same(m, model, x)
    SCALE = 2.0
    try:
        same(m, model, x)
    finally:
        SCALE = 1.0
    model.drop.train()
    torch.manual_seed(1)
    out = m(x)
    assert (out == 0).float().mean() > 0.2  # dropout is active, as in eager
    model.drop.eval()
    steps = model.step
    m(x)
    assert model.step == steps + 1  # the side effect happened once, with the current value


def test_eager_fallback_is_said_once(caplog):
    torch.manual_seed(0)
    model = Stateful().eval()
    m = wrap(model)
    x = torch.randn(12, 16)
    with caplog.at_level(logging.WARNING, logger="rangedispatch"), torch._dynamo.config.patch(recompile_limit=2):
        for _ in range(5):  # self.step is a new constant on every call: a guard fails each time
            same(m, model, x)
    assert caplog.text.count("ran eagerly") == 1


# ---------------------------------------------------------------------------------------- 3. defaults
class Ids(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 16)
        self.lin = nn.Linear(16, 16)

    def forward(self, input_ids):
        return self.lin(self.emb(input_ids)).cumsum(1)


def test_auto_token_dims_count_ids_and_activations():
    torch.manual_seed(0)
    model = Ids()
    m = wrap(model)
    same(m, model, torch.randint(0, 50, (1, 5)))
    same(m, model, torch.randint(0, 50, (2, 10)))  # 20 tokens
    same(m, model, torch.randint(0, 50, (4, 10)))  # 40 tokens
    calls = {r: s["calls"] for r, s in m.stats().items()}
    assert calls == {Range(1, 8): 1, Range(9, 32): 1, Range(33, 64): 1}
    m3 = wrap(TokenGrid())
    m3(torch.randn(2, 10, 16))
    assert m3.range_for(20) == Range(9, 32) and m3.stats()[Range(9, 32)]["calls"] == 1
    m2 = wrap(Mlp())
    m2(*xr(20))
    assert m2.stats()[Range(9, 32)]["calls"] == 1


@GUARDS
def test_a_non_token_dim_that_changes_retraces(guard_free):
    torch.manual_seed(0)
    model = Optional_()
    m = wrap(model, guard_free=guard_free)
    x = torch.randn(12, 16)
    same(m, model, x)
    same(m, model, x)
    same(m, model, x, bias=torch.randn(12, 16))
    same(m, model, x, bias=torch.randn(16))  # the broadcast bias: another non-token shape
    same(m, model, x, bias=torch.randn(1, 16))


# ---------------------------------------------------------------------------------------- 4. process-wide
def test_wrappers_of_one_class_do_not_share_dynamo_limits():
    limit = torch._dynamo.config.recompile_limit
    torch.manual_seed(0)
    for _ in range(limit + 2):
        model = Mlp()
        m = wrap(model)
        for n in (1, 5, 20):
            same(m, model, *xr(n))
        assert sum(g.is_symbolic for g in m.graphs) == 1
    assert torch._dynamo.config.recompile_limit == limit


def test_two_wrappers_compile_from_two_threads():
    torch.manual_seed(0)
    models = [Mlp(16), Mlp(32)]
    wrappers = [wrap(mod) for mod in models]
    errors = []

    def work(mod, m, hidden):
        try:
            for n in (3, 12, 40):
                x, r = xr(n, hidden)
                torch.testing.assert_close(m(x, r), mod(x, r))
        except Exception as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(mod, m, h)) for mod, m, h in zip(models, wrappers, (16, 32))]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert not errors


# ---------------------------------------------------------------------------------------- 5. CUDA-graph inputs
def mismatch(captured, args, kwargs, n):
    return captured.mismatch(*torch.utils._pytree.tree_flatten((args, kwargs)), n)


def test_captured_inputs_refuse_calls_that_differ():
    x, r = torch.randn(4, 16), torch.randn(4, 16)
    captured = CapturedInputs((x,), {"residual": r, "use_cache": False}, pad_dim=0, n=4, s=8)
    assert captured.token_leaf == [True, True, False]
    assert mismatch(captured, (torch.randn(6, 16),), {"residual": torch.randn(6, 16), "use_cache": False}, 6) is None
    assert "arguments differ" in mismatch(captured, (x,), {"residual": r}, 4)
    assert "arguments differ" in mismatch(captured, (x,), {"residual": r, "use_cache": False, "mask": r}, 4)
    assert "True; False was captured" in mismatch(captured, (x,), {"residual": r, "use_cache": True}, 4)
    assert "torch.float64" in mismatch(captured, (x,), {"residual": r.double(), "use_cache": False}, 4)
    assert "shape (4, 8)" in mismatch(captured, (x,), {"residual": torch.randn(4, 8), "use_cache": False}, 4)
    assert "is a NoneType" in mismatch(captured, (x,), {"residual": None, "use_cache": False}, 4)


LOGS_SCRIPT = """
import torch
from rangedispatch import RangeCompiledModule, load_config
m = RangeCompiledModule(torch.nn.Linear(4, 4), load_config(["hardware=cpu", "dispatch.max_num_tokens=64"]))
m(torch.randn(3, 4))
"""


def test_log_switch_from_the_environment():
    import os
    import subprocess
    import sys

    env = dict(os.environ, RANGEDISPATCH_LOGS="info")
    out = subprocess.run([sys.executable, "-c", LOGS_SCRIPT], env=env, capture_output=True, text=True, check=True)
    assert "[rangedispatch] ranges: [1,8] [9,32] [33,64]" in out.stderr
    env["RANGEDISPATCH_LOGS"] = "loud"
    bad = subprocess.run([sys.executable, "-c", LOGS_SCRIPT], env=env, capture_output=True, text=True)
    assert bad.returncode != 0 and "RANGEDISPATCH_LOGS='loud' is not a log level; allowed: debug, info, warning" in bad.stderr
