"""The guard-free opt-in (``dispatch.skip_dynamo_guards=true``) against what Dynamo's guards catch:
global state, aliasing, exact types, shape guards on the token count, transforms, a changed module.
Each case is learned on one call, then changed: every call must still return the eager result
(taking the guarded path where the guard-free checks cannot vouch for it)."""

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from helpers import Mlp
from rangedispatch import Range, RangeCompiledModule, load_config

BASE = ["hardware=cpu", "fusion.enabled=false", "dispatch.max_num_tokens=64", "dispatch.split_points=[8,32]",
        "compile.max_autotune=never", "dispatch.skip_dynamo_guards=true"]


def learned(model, *args):
    """A guard-free wrapper that has learned from ``args`` (and served them once without guards)."""
    m = RangeCompiledModule(model, load_config(BASE))
    for _ in range(2):
        torch.testing.assert_close(m(*args), model(*args))
    assert m._guard_free.signature is not None, m._guard_free.reason
    return m


def xr(n, seed=0):
    g = torch.Generator().manual_seed(seed + n)
    return torch.randn(n, 16, generator=g), torch.randn(n, 16, generator=g)


def test_aliased_arguments_either_way():
    torch.manual_seed(0)
    model = Mlp()
    x, r = xr(12)
    m = learned(model, x, r)
    torch.testing.assert_close(m(x, x), model(x, x))
    m2 = learned(model, x, x)
    torch.testing.assert_close(m2(x, r), model(x, r))


class DefaultDtype(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(16, 16)

    def forward(self, x):
        return self.lin(x), x + torch.ones(x.shape[-1])  # autocast decides the first dtype, the default the second


def test_autocast_and_the_default_dtype():
    torch.manual_seed(0)
    model = DefaultDtype()
    x = torch.randn(12, 16)
    m = learned(model, x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, want = m(x), model(x)
    assert got[0].dtype == want[0].dtype == torch.bfloat16
    torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)
    compiled = torch.compile(model, dynamic=True)
    compiled(x)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        got, want = m(x), model(x)
        torch_compile_sees_it = compiled(x)[1].dtype == torch.float64
    finally:
        torch.set_default_dtype(previous)
    if not torch_compile_sees_it:  # torch 2.11: Dynamo does not guard the default dtype
        assert got[1].dtype == torch.float32  # the guarded path, as torch.compile does
        return
    assert got[1].dtype == want[1].dtype == torch.float64
    torch.testing.assert_close(got, want)


class Marked(torch.Tensor):
    pass


def test_a_tensor_subclass_argument_is_treated_as_torch_compile_treats_it():
    torch.manual_seed(0)
    model = Mlp()
    x, r = xr(12)
    m = learned(model, x, r)
    sub = x.as_subclass(Marked)
    try:
        want = torch.compile(model, backend="aot_eager")(sub, r)
    except Exception as e:  # torch.compile cannot take it: neither can the wrapper, and it says so
        with pytest.raises(type(e)):
            m(sub, r)
        return
    got = m(sub, r)
    assert type(got) is type(want)
    torch.testing.assert_close(got, want)


class BranchesOnSize(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(16, 16)

    def forward(self, x):
        y = self.lin(x)
        return y * 2 if x.shape[0] > 16 else y - 1


def test_a_forward_that_branches_on_the_token_count():
    torch.manual_seed(0)
    model = BranchesOnSize()
    m = learned(model, torch.randn(12, 16))
    for n in (20, 40, 12, 9, 32, 17):
        x = torch.randn(n, 16)
        torch.testing.assert_close(m(x), model(x))
    assert m.stats()[Range(9, 32)]["calls"] >= 5


def test_under_vmap():
    torch.manual_seed(0)
    model = Mlp()
    m = learned(model, *xr(12))
    xs, rs = torch.randn(3, 12, 16), torch.randn(3, 12, 16)
    torch.testing.assert_close(torch.func.vmap(m)(xs, rs), torch.func.vmap(model)(xs, rs))


class Double(nn.Module):
    def forward(self, w):
        return 2 * w


@pytest.mark.parametrize("change", ["parametrization", "bias_none", "new_submodule", "other_shape"])
def test_a_changed_module_falls_back_to_the_guards(change):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU())
    x = torch.randn(12, 16)
    m = learned(model, x)
    if change == "parametrization":
        parametrize.register_parametrization(model[0], "weight", Double())
    elif change == "bias_none":
        model[0].bias = None
    elif change == "new_submodule":
        model[0] = nn.Linear(16, 16)
    else:
        model[0].weight = nn.Parameter(torch.randn(16, 16).t().contiguous().t())  # same shape, other strides
    for n in (12, 20, 5):
        xn = torch.randn(n, 16)
        torch.testing.assert_close(m(xn), model(xn))
