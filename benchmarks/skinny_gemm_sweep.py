"""The skinny GEMM's tile configurations against cuBLAS, on one GPU: where ``CANDIDATES`` come from.

For one rank's weights of a Llama at TP=2 (hidden 4096 and 8192), every configuration of a grid is
timed at each of ``rows`` (16 by default: the decode range of the ``h200`` profile; "65,128": both
ends of a range, as the tuning times it) through ``torch.ops.rangedispatch.skinny_mm``, in CUDA
graphs, and the five fastest per weight (by their time summed over the row counts) are printed with
their speed-up over cuBLAS. The row block is the kernel's for the largest row count unless
``block_m`` says otherwise. Re-run it to pick candidates for another GPU.

    python benchmarks/skinny_gemm_sweep.py [rows,...] [out.txt] [block_m]
"""

from __future__ import annotations

import itertools
import sys

import torch

from rangedispatch.bench.timing import time_us
from rangedispatch.gemm.skinny_gemm_op import TileConfig, block_m_for, skinny_mm

# (N, K) of one rank at TP=2: q, k/v, o, gate/up, down at hidden 8192 and 4096
SHAPES = [(4096, 8192), (1024, 8192), (8192, 4096), (14336, 8192), (8192, 14336),
          (2048, 4096), (512, 4096), (4096, 2048), (7168, 4096), (4096, 7168)]
GRID = [(bn, bk, 1, warps, stages) for bn, bk, warps, stages in
        itertools.product([16, 32, 64, 128], [64, 128, 256, 512], [4, 8], [2, 3, 4, 6])]
GRID += [(bn, bk, split, 4, stages) for bn, bk, split, stages in itertools.product([32, 64], [128, 256], [2, 4], [3, 4])]


def _us(fn) -> float:
    return time_us(fn, calls=10, replays=20)[0]


def main(rows: list[int], out_path: str | None, block_m: int) -> None:
    torch.manual_seed(0)
    lines = [f"# {torch.cuda.get_device_name()}, torch {torch.__version__}; {'/'.join(map(str, rows))} rows, bf16; "
             f"{block_m}-row blocks; median of 20 replays of 10 calls; x over cuBLAS at each row count"]
    for n, k in SHAPES:
        w = torch.randn(n, k, dtype=torch.bfloat16, device="cuda") / k ** 0.5
        xs = [torch.randn(m, k, dtype=torch.bfloat16, device="cuda") for m in rows]
        refs = [(x @ w.t()).float() for x in xs]
        cublas = [_us(lambda x=x: x @ w.t()) for x in xs]
        timed = []
        for cand in GRID:
            cfg = list(TileConfig(block_m, *cand))
            try:
                err = max(((skinny_mm(x, [w.t()], [], cfg)[0].float() - ref).norm() / ref.norm()).item()
                          for x, ref in zip(xs, refs))
            except Exception as e:  # a configuration this GPU cannot run (shared memory)
                print(f"N={n} K={k} {TileConfig(*cfg)}: {type(e).__name__}", flush=True)
                continue
            us = [_us(lambda x=x: skinny_mm(x, [w.t()], [], cfg)) for x in xs]
            timed.append((sum(us), us, TileConfig(*cfg), err))
        timed.sort()
        best = "; ".join(f"{cfg} {'/'.join(f'{t:.1f}' for t in us)} us "
                         f"x{'/'.join(f'{c / t:.3f}' for c, t in zip(cublas, us))} (err {err:.0e})"
                         for _, us, cfg, err in timed[:5])
        lines.append(f"N={n} K={k} cuBLAS {'/'.join(f'{c:.1f}' for c in cublas)} us "
                     f"({w.numel() * 2 / max(cublas) / 1e6:.2f} TB/s) | {best}")
        print(lines[-1], flush=True)
    if out_path:
        with open(out_path, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    rows = [int(m) for m in sys.argv[1].split(",")] if len(sys.argv) > 1 else [16]
    main(rows, sys.argv[2] if len(sys.argv) > 2 else None,
         int(sys.argv[3]) if len(sys.argv) > 3 else block_m_for(max(rows)))
