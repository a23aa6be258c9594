"""On 2 gloo ranks: the wrapper makes no collective the model does not make. A wrapper used on one
rank alone, and one wrapper per pipeline stage on its own group, finish (a timeout turns a hang into
a failure)."""

import torch
from torch import nn

from rangedispatch.cli.launch import spawn_ranks

CFG = ["hardware=cpu", "dispatch.max_num_tokens=256", "compile.max_autotune=never"]


class Stage(nn.Module):
    """One pipeline stage: an MLP whose output is all-reduced over the stage's own group."""

    def __init__(self, group):
        super().__init__()
        self.group = group
        self.lin = nn.Linear(32, 32)
        self.norm = nn.RMSNorm(32, eps=1e-6)

    def forward(self, x):
        y = self.lin(x)
        torch.distributed.all_reduce(y, group=self.group)
        return self.norm(y + x)


def _one_rank_evaluates(rank, world):
    from rangedispatch import RangeCompiledModule, load_config

    if rank != 0:
        return None  # rank 1 never calls a wrapper (an evaluation on rank 0, an uneven last batch)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 32))
    m = RangeCompiledModule(model, load_config(CFG))
    with torch.no_grad():
        return all(torch.allclose(m(x), model(x)) for x in (torch.randn(n, 32) for n in (1, 5, 40, 5)))


def _pipeline_stages(rank, world):
    from rangedispatch import RangeCompiledModule, load_config

    groups = [torch.distributed.new_group([r]) for r in range(world)]  # every rank makes every group
    torch.manual_seed(rank)
    model = Stage(groups[rank])
    m = RangeCompiledModule(model, load_config(CFG))
    calls = 3 if rank == 0 else 1  # the stages run different numbers of calls
    with torch.no_grad():
        return all(torch.allclose(m(x), model(x), atol=1e-5) for x in (torch.randn(4 + i, 32) for i in range(calls)))


def test_a_wrapper_on_one_rank_alone_makes_no_collective():
    assert spawn_ranks(_one_rank_evaluates, 2, backend="gloo", timeout=600) == [True, None]


def test_one_wrapper_per_pipeline_stage_waits_for_no_other_stage():
    assert spawn_ranks(_pipeline_stages, 2, backend="gloo", timeout=600) == [True, True]


def _log_line(rank, world):
    import logging

    from rangedispatch import logs

    record = logging.LogRecord("rangedispatch", logging.INFO, __file__, 0, "ranges: [1,8]", None, None)
    logs._tag_rank(record)
    return logging.Formatter("[rangedispatch%(rank)s] %(message)s").format(record)


def test_log_lines_name_their_rank():
    """Under RANGEDISPATCH_LOGS every rank logs; each line says which rank wrote it."""
    assert spawn_ranks(_log_line, 2, backend="gloo", timeout=120) == [
        "[rangedispatch rank 0] ranges: [1,8]", "[rangedispatch rank 1] ranges: [1,8]"]
