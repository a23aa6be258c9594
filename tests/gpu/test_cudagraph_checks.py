"""CUDA-graph replay checks what the guarded path checks, and refuses padding that changes results.
One CUDA GPU; skipped elsewhere."""

import logging

import pytest
import torch
from torch import nn

from rangedispatch import RangeCompiledModule, load_config
from rangedispatch.errors import ConfigError

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

CFG = ["hardware=cpu", "fusion.enabled=false", "dispatch.max_num_tokens=64", "dispatch.split_points=[16]",
       "dispatch.cudagraph_sizes=[16,64]"]


class TokenWise(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(32, 32)

    def forward(self, x, residual=None, scale: float = 1.0):
        y = self.lin(x) * scale
        return y if residual is None else y + residual


class MixesTokens(TokenWise):
    def forward(self, x, residual=None, scale: float = 1.0):
        return self.lin(x) - self.lin(x).mean(0, keepdim=True)  # a mean over tokens: padding changes it


def test_padded_replay_equals_eager_and_changed_calls_run_without_the_graph(caplog):
    torch.manual_seed(0)
    model = TokenWise().cuda()
    m = RangeCompiledModule(model, load_config(CFG))
    x, r = torch.randn(10, 32, device="cuda"), torch.randn(10, 32, device="cuda")
    with torch.no_grad(), caplog.at_level(logging.WARNING, logger="rangedispatch"):
        for _ in range(2):
            torch.testing.assert_close(m(x, r), model(x, r))
        assert m.stats()[m.range_for(10)]["cudagraphs"] == [16]
        torch.testing.assert_close(m(x), model(x))  # residual dropped: structure differs
        torch.testing.assert_close(m(x, r, scale=2.0), model(x, r, scale=2.0))  # keyword added
        torch.testing.assert_close(m(x, r.double()), model(x, r.double()))  # dtype differs
        torch.testing.assert_close(m(x, r[:1]), model(x, r[:1]))  # broadcast residual: shape differs
    assert caplog.text.count("CUDA graph for 16 tokens not used") == 1


def test_padding_that_changes_the_real_rows_is_refused():
    torch.manual_seed(0)
    model = MixesTokens().cuda()
    m = RangeCompiledModule(model, load_config(CFG))
    x = torch.randn(10, 32, device="cuda")
    with torch.no_grad():
        m(x)
        with pytest.raises(ConfigError, match="dispatch.cudagraph_sizes: padding 10 tokens to the captured size 16"):
            m(x)
        assert m(torch.randn(16, 32, device="cuda")).shape == (16, 32)  # no padding: nothing to refuse
