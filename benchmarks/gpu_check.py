"""GPU check and op-level benchmark on 2+ GPUs: fused-op numerics through RangeCompiledModule, then
all-reduce + residual + RMSNorm (+ FP8) timings per variant from CUDA-graph replays.

    source .device-kit/activate.sh && python benchmarks/gpu_check.py --out $OUT

Writes numerics.json, oplevel.csv and oplevel.md under --out.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import statistics
import time

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import nn

from rangedispatch import RangeCompiledModule, load_config
from rangedispatch.launch import spawn_ranks
from rangedispatch.models import RMSNormForm, TPMLPBlock
from rangedispatch.fusion.numerics import quantize_fp8


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


def check_numerics(rank: int) -> list[dict]:
    rows = []
    cases = [("llama", True, False), ("functional", True, True), ("gemma", False, False), ("module", True, False),
             ("llama", False, True)]
    for form, residual, fp8 in cases:
        torch.manual_seed(0)
        model = TPMLPBlock(hidden=4096, intermediate=8192, layers=2, norm=form, residual=residual, fp8=fp8,
                           dtype=torch.bfloat16).cuda()
        rc = RangeCompiledModule(model, load_config(["hardware=h100", "dispatch.max_num_tokens=8192"]))
        for n in (16, 1000, 5000):
            x = torch.randn(n, 4096, dtype=torch.bfloat16, device="cuda")
            with torch.no_grad():
                y, r = rc(x.clone())
                ye, re = model(x.clone())
            stats = rc.stats()[rc.range_for(n)]
            rows.append(dict(form=form, residual=residual, fp8=fp8, tokens=n, range=str(rc.range_for(n)),
                             matches=stats["matches"], out_rel_err=rel_err(y, ye), residual_rel_err=rel_err(r, re)))
        if rank == 0:
            print(rows[-3:], flush=True)
    return rows


class AllReduceNorm(nn.Module):
    """The op-level unit: all_reduce -> + residual -> RMSNorm (F.rms_norm) [-> static FP8]."""

    def __init__(self, hidden: int, fp8: bool):
        super().__init__()
        self.norm = RMSNormForm(hidden, "functional", 1e-6, torch.bfloat16)
        self.fp8 = fp8
        self.register_buffer("scale", torch.tensor([0.05]))

    def forward(self, x, residual):
        x = funcol.all_reduce(x, "sum", dist.group.WORLD)  # out of place, as a row-parallel output is
        h = x + residual
        y = self.norm(h)
        if self.fp8:
            y = quantize_fp8(y, self.scale)
        return y, h


def time_graph(fn, x, residual, calls: int = 10, replays: int = 20) -> tuple[float, str]:
    """us per call: CUDA graph of `calls` calls, median over replays (max over ranks)."""
    method = "cudagraph"
    try:
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(3):
                fn(x, residual)
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for _ in range(calls):
                fn(x, residual)
        run = g.replay
        per = calls
    except Exception as e:
        if dist.get_rank() == 0:
            print("graph capture failed, timing eagerly:", type(e).__name__, str(e)[:200], flush=True)
        torch.cuda.synchronize()
        method = "events"
        run = lambda: [fn(x, residual) for _ in range(calls)]  # noqa: E731
        per = calls
    for _ in range(3):
        run()
    torch.cuda.synchronize()
    samples = []
    for _ in range(replays):
        dist.barrier()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        run()
        b.record()
        b.synchronize()
        samples.append(a.elapsed_time(b) * 1000 / per)
    t = torch.tensor([statistics.median(samples)], device="cuda")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item(), method


def op_level(rank: int, hidden: int, tokens: list[int]) -> list[dict]:
    rows = []
    for fp8 in (False, True):
        torch.manual_seed(0)
        base = AllReduceNorm(hidden, fp8).cuda()
        common = ["hardware=h100", "dispatch.max_num_tokens=8192", "hardware.thresholds.2.fused_max_bytes=1073741824",
                  "hardware.thresholds.2.oneshot_max_bytes=1073741824"]
        variants = {
            "nccl_eager_norm": base,
            "nccl_compiled_norm": RangeCompiledModule(base, load_config(common + ["fusion.enabled=false"])),
            "flashinfer_fused_oneshot": RangeCompiledModule(base, load_config(common)),
            "flashinfer_fused_twoshot": RangeCompiledModule(base, load_config(
                common[:3] + ["hardware.thresholds.2.oneshot_max_bytes=0"])),
        }
        for name, fn in variants.items():
            warm = torch.randn(16, hidden, dtype=torch.bfloat16, device="cuda")
            with torch.no_grad():
                fn(warm.clone(), warm.clone())
        for n in tokens:
            x = torch.randn(n, hidden, dtype=torch.bfloat16, device="cuda")
            r = torch.randn(n, hidden, dtype=torch.bfloat16, device="cuda")
            for name, fn in variants.items():
                if name.endswith("twoshot") and n <= 2:
                    continue
                with torch.no_grad():
                    us, method = time_graph(fn, x.clone(), r)
                rows.append(dict(hidden=hidden, tokens=n, fp8=fp8, variant=name, us=round(us, 2), method=method))
                if rank == 0:
                    print(rows[-1], flush=True)
    return rows


def work(rank: int, world: int, out: str, hidden: int, tokens: list[int]) -> None:
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING)
    torch._dynamo.config.recompile_limit = 64  # several wrappers of one module class share Dynamo's limit
    t0 = time.time()
    numerics = check_numerics(rank)
    oplevel = op_level(rank, hidden, tokens)
    if rank == 0:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "numerics.json"), "w") as f:
            json.dump(numerics, f, indent=1)
        with open(os.path.join(out, "oplevel.csv"), "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(oplevel[0]))
            w.writeheader()
            w.writerows(oplevel)
        print(f"done in {time.time() - t0:.0f} s", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results/gpu")
    ap.add_argument("--hidden", type=int, default=8192)
    ap.add_argument("--tokens", default="1,8,32,128,512,2048,4096")
    ap.add_argument("--world-size", type=int, default=2)
    a = ap.parse_args()
    spawn_ranks(work, a.world_size, a.out, a.hidden, [int(t) for t in a.tokens.split(",")], backend="nccl")


if __name__ == "__main__":
    main()
