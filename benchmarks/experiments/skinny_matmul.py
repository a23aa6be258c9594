"""Decode-size matmuls on one GPU: how fast each form reads the weights.

At a few tokens a TP rank's matmuls are bandwidth-bound: their time is the weight read. This times
``[M, K] x [N, K]^T`` in bf16 for small M through cuBLAS and through the reduction forms Inductor can
generate (with coordinate-descent tuning, as the single-size graphs of ``compile_sizes`` use), and
prints TB/s of weight read. It answers whether a per-range pass set can beat cuBLAS at decode sizes.

    python benchmarks/experiments/skinny_matmul.py [out.txt]
"""

from __future__ import annotations

import sys
import time

import torch
import torch._inductor.config as inductor_config

from rangedispatch.bench.timing import time_us

SHAPES = [(14336, 8192), (8192, 14336)]  # (N, K): one rank's MLP matmuls at hidden 8192, TP=2
ROWS = [1, 2, 4, 8, 16, 32]


def linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.linear(x, w)


def broadcast_reduction(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Inductor's own decomposition of a 1-row mm, for any M."""
    return (x[:, None, :].float() * w[None].float()).sum(-1).to(x.dtype)


def row_reductions(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """One reduction per row: fused into one pass over ``w`` only if Inductor merges them."""
    return torch.stack([(x[i].float() * w.float()).sum(-1) for i in range(x.shape[0])]).to(x.dtype)


FORMS = {"cublas": (linear, False), "inductor_mm": (linear, True), "broadcast_reduction": (broadcast_reduction, True),
         "row_reductions": (row_reductions, True)}


def main(out_path: str | None) -> None:
    inductor_config.coordinate_descent_tuning = True
    torch.manual_seed(0)
    lines = [f"# {torch.cuda.get_device_name()}, torch {torch.__version__}; median of 20 replays of 10 calls"]
    for n, k in SHAPES:
        w = torch.randn(n, k, dtype=torch.bfloat16, device="cuda") / k ** 0.5
        for m in ROWS:
            x = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
            ref = linear(x, w).float()
            for name, (form, compiled) in FORMS.items():
                torch._dynamo.reset()  # a fresh static graph per shape, never a recompile limit
                fn = torch.compile(form, dynamic=False) if compiled else form
                start = time.perf_counter()
                err = ((fn(x, w).float() - ref).norm() / ref.norm()).item()
                compile_s = time.perf_counter() - start
                us, _ = time_us(lambda: fn(x, w), calls=10, replays=20)
                lines.append(f"N={n} K={k} M={m} {name}: {us:.1f} us, {w.numel() * 2 / us / 1e6:.2f} TB/s, "
                             f"rel err {err:.1e}, compile {compile_s:.1f} s")
                print(lines[-1], flush=True)
    if out_path:
        with open(out_path, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else None)
