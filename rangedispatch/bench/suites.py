"""The two sweeps. Each returns rows (dicts) on every rank; rank 0 reports them.

Op level: the all-reduce + residual + RMSNorm (+ FP8) unit per kernel tier, each compiled variant
through RangeCompiledModule. Model level: a TP block (N x column-parallel -> SiLU -> row-parallel ->
all-reduce -> + residual -> RMSNorm) through plain torch.compile, RangeCompiledModule with fusion
off, with fusion forced everywhere, with sequence parallelism everywhere, and with range dispatch
as the hardware profile says.
HF level: a Hugging Face Llama-shaped decoder (attention included) under hand-written or DTensor
tensor parallelism, through plain torch.compile and range dispatch.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterable, Optional, Sequence

import torch
import torch.distributed as dist

from rangedispatch.bench.timing import time_us
from rangedispatch.bench.units import AllReduceNorm
from rangedispatch.config.schema import FusionConfig, RangeDispatchConfig, TierThresholds
from rangedispatch.bench.models import TPMLPBlock
from rangedispatch.fusion.tiers import ASYNC_TP, SEQUENCE_PARALLEL, sweep_variants
from rangedispatch.wrapper import RangeCompiledModule

EVERYWHERE = 1 << 40  # bytes: "always fuse"


def with_fusion(cfg: RangeDispatchConfig, world: int, fused: Optional[int], oneshot: Optional[int] = None,
                max_num_tokens: Optional[int] = None) -> RangeDispatchConfig:
    """``cfg`` with fusion off (``fused=None``) or with the given byte thresholds at ``world``."""
    dispatch = dataclasses.replace(cfg.dispatch, max_num_tokens=max_num_tokens or cfg.dispatch.max_num_tokens,
                                   split_points=[p for p in cfg.dispatch.split_points
                                                 if p < (max_num_tokens or cfg.dispatch.max_num_tokens)])
    if fused is None:
        return dataclasses.replace(cfg, dispatch=dispatch, fusion=dataclasses.replace(cfg.fusion, enabled=False))
    thresholds = {**cfg.hardware.thresholds, str(world): TierThresholds(fused, fused if oneshot is None else oneshot)}
    hardware = dataclasses.replace(cfg.hardware, thresholds=thresholds)
    return dataclasses.replace(cfg, dispatch=dispatch, hardware=hardware,
                               fusion=FusionConfig(enabled=True, backend=cfg.fusion.backend))


def with_symm_mem(cfg: RangeDispatchConfig, world: int, oneshot: int) -> RangeDispatchConfig:
    """``cfg`` with no fusion and the symmetric-memory tier at every size (one-shot up to ``oneshot``)."""
    t = TierThresholds(0, 0, symm_mem_max_bytes=EVERYWHERE, symm_mem_oneshot_max_bytes=oneshot)
    hardware = dataclasses.replace(cfg.hardware, thresholds={**cfg.hardware.thresholds, str(world): t})
    return dataclasses.replace(cfg, hardware=hardware, fusion=FusionConfig(enabled=True, backend=cfg.fusion.backend))


def with_sequence_parallel(cfg: RangeDispatchConfig, world: int, max_num_tokens: int,
                           async_tp: bool = False) -> RangeDispatchConfig:
    """``cfg`` with the sequence-parallel tier at every size (no fused or symmetric-memory tier), with
    async tensor parallelism on top at every size if ``async_tp``."""
    sized = with_fusion(cfg, world, 0, 0, max_num_tokens)
    t = TierThresholds(0, 0, sp_min_bytes=1, async_tp_min_bytes=int(async_tp))
    return dataclasses.replace(sized, hardware=dataclasses.replace(
        sized.hardware, thresholds={**sized.hardware.thresholds, str(world): t}))


# NCCL with its norm eager too, then what tune times: NCCL + compiled norm and each tier's variants
OP_VARIANTS = ("nccl_eager_norm", *sweep_variants("op", cuda=True))
CPU_OP_VARIANTS = ("nccl_eager_norm", *sweep_variants("op", cuda=False))  # gloo: no GPU kernels


def op_level(cfg: RangeDispatchConfig, hidden: int, tokens: Iterable[int], fp8: bool, calls: int, replays: int,
             progress: Callable[[], None], variants: Sequence[str] = OP_VARIANTS) -> list[dict]:
    """``variants`` from: nccl_eager_norm, nccl_compiled_norm (fusion off), fused_oneshot,
    fused_twoshot (FlashInfer, or the profile's backend), fused_reference (the reference backend),
    symm_mem_oneshot, symm_mem_twoshot (torch symmetric memory + compiled norm)."""
    world = dist.get_world_size()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    unit = AllReduceNorm(hidden, fp8).to(device)
    torch.manual_seed(0)
    nccl_unit = AllReduceNorm(hidden, fp8, inplace=True).to(device)
    reference = dataclasses.replace(cfg, fusion=FusionConfig(enabled=True, backend="reference"))
    builders: dict[str, Callable[[], Callable]] = {
        "nccl_eager_norm": lambda: nccl_unit,
        "nccl_compiled_norm": lambda: RangeCompiledModule(nccl_unit, with_fusion(cfg, world, None)),
        "fused_oneshot": lambda: RangeCompiledModule(unit, with_fusion(cfg, world, EVERYWHERE, EVERYWHERE)),
        "fused_twoshot": lambda: RangeCompiledModule(unit, with_fusion(cfg, world, EVERYWHERE, 0)),
        "fused_reference": lambda: RangeCompiledModule(unit, with_fusion(reference, world, EVERYWHERE, EVERYWHERE)),
        "symm_mem_oneshot": lambda: RangeCompiledModule(unit, with_symm_mem(cfg, world, EVERYWHERE)),
        "symm_mem_twoshot": lambda: RangeCompiledModule(unit, with_symm_mem(cfg, world, 0)),
    }
    fns = {name: builders[name]() for name in variants}
    warm = torch.randn(16, hidden, dtype=torch.bfloat16, device=device)
    with torch.no_grad():
        for fn in fns.values():  # traces each variant at 16 tokens
            fn(warm.clone(), warm.clone())
    rows = []
    for n in tokens:
        x = torch.randn(n, hidden, dtype=torch.bfloat16, device=device)
        r = torch.randn(n, hidden, dtype=torch.bfloat16, device=device)
        for name, fn in fns.items():
            if name == "fused_twoshot" and n <= world:
                continue  # two-shot needs more tokens than ranks
            with torch.no_grad():  # (the in-place variant grows x by the world size each call: the
                us, method = time_us(lambda: fn(x, r), calls, replays)  # values do not change kernel time)
            rows.append(dict(level="op", hidden=hidden, tokens=n, fp8=fp8, variant=name, us=round(us, 2), method=method))
            progress()
    return rows


def range_dispatch_variants(model: torch.nn.Module, cfg: RangeDispatchConfig, max_n: int,
                            compile_sizes: Sequence[int]) -> dict[str, RangeCompiledModule]:
    """``range_dispatch`` (the hardware profile's thresholds as they are, ranges up to ``max_n``), if
    ``compile_sizes`` ``range_dispatch_sizes`` (the same with those sizes as graphs of their own), and
    ``range_dispatch_cublas`` where the skinny GEMM is on (the same without it)."""
    def sized(extra: Sequence[int]) -> RangeDispatchConfig:
        d = cfg.dispatch
        return dataclasses.replace(cfg, dispatch=dataclasses.replace(
            d, max_num_tokens=max_n, split_points=[p for p in d.split_points if p < max_n],
            compile_sizes=sorted({n for n in (*d.compile_sizes, *extra) if n <= max_n})))

    variants = {"range_dispatch": RangeCompiledModule(model, sized(()))}
    if compile_sizes:
        variants["range_dispatch_sizes"] = RangeCompiledModule(model, sized(compile_sizes))
    if cfg.skinny_gemm_tokens:  # also timed without it, so that one run shows what the pass buys
        cublas = dataclasses.replace(cfg.compile, skinny_gemm="never")
        variants["range_dispatch_cublas"] = RangeCompiledModule(model, dataclasses.replace(sized(()), compile=cublas))
    return variants


def _dispatch_facts(fn: RangeCompiledModule, n: int) -> dict:
    """The range that serves ``n`` tokens and the seconds its graphs took to compile."""
    r = fn.range_for(n)
    return dict(range=str(r), compile_s=round(fn.stats()[r]["compile_s"], 1))


def model_level(cfg: RangeDispatchConfig, hidden: int, intermediate: int, layers: int, tokens: Iterable[int],
                calls: int, replays: int, progress: Callable[[], None],
                compile_sizes: Sequence[int] = ()) -> tuple[list[dict], list[str]]:
    world = dist.get_world_size()
    tokens = list(tokens)
    max_n = max(tokens)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    model = TPMLPBlock(hidden=hidden, intermediate=intermediate, layers=layers, norm="functional",
                       dtype=torch.bfloat16).to(device)
    dispatch = range_dispatch_variants(model, cfg, max_n, compile_sizes)
    variants: dict[str, Callable] = {
        "torch_compile": torch.compile(model),
        "fusion_off": RangeCompiledModule(model, with_fusion(cfg, world, None, max_num_tokens=max_n)),
        "fusion_everywhere": RangeCompiledModule(model, with_fusion(cfg, world, EVERYWHERE, None, max_n)),
        **sequence_parallel_variants(model, cfg, world, max_n),
        **dispatch,
    }
    rows = _time_block_variants(variants, hidden, tokens, calls, replays, progress)
    for row in rows:
        if row["variant"] in dispatch:
            row.update(_dispatch_facts(dispatch[row["variant"]], row["tokens"]))
    return rows, [str(r) for r in dispatch["range_dispatch"].ranges]


def sequence_parallel_level(cfg: RangeDispatchConfig, hidden: int, tokens: Iterable[int], calls: int, replays: int,
                            progress: Callable[[], None]) -> list[dict]:
    """The sequence-parallel tier's unit: 2 layers of a TP MLP block (intermediate 4 x hidden) that
    return only the normed output, as a decoder's last norm does (the residual sum is never
    gathered), through NCCL + compiled norm (``fusion_off``) and sequence parallelism. A single
    all-reduce + norm would not do: the tier's saving (the norm on 1/world of the tokens, the
    residual stream left split) and its cost (a gather before each matmul) only show across layers."""
    world = dist.get_world_size()
    tokens = list(tokens)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = TPMLPBlock(hidden=hidden, intermediate=4 * hidden, layers=2, norm="functional", dtype=torch.bfloat16,
                       return_residual=False).to(device)
    max_n = max(16, *tokens)  # the variants are traced at 16 tokens
    variants: dict[str, Callable] = {
        "fusion_off": RangeCompiledModule(model, with_fusion(cfg, world, None, max_num_tokens=max_n)),
        **sequence_parallel_variants(model, cfg, world, max_n),
    }
    return _time_block_variants(variants, hidden, tokens, calls, replays, progress)


def sequence_parallel_variants(model: torch.nn.Module, cfg: RangeDispatchConfig, world: int,
                               max_n: int) -> dict[str, RangeCompiledModule]:
    """The sequence-parallel tier at every size, without and with async TP on top (whose kernels need
    CUDA: elsewhere it runs through the process group, and says so)."""
    return {SEQUENCE_PARALLEL.name: RangeCompiledModule(model, with_sequence_parallel(cfg, world, max_n)),
            ASYNC_TP.name: RangeCompiledModule(model, with_sequence_parallel(cfg, world, max_n, async_tp=True))}


def _time_block_variants(variants: dict[str, Callable], hidden: int, tokens: list[int], calls: int, replays: int,
                         progress: Callable[[], None]) -> list[dict]:
    """Model-level rows: each variant of a block taking ``[tokens, hidden]`` bf16, traced once at 16
    tokens (dynamic), then timed at each token count."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    warm = torch.randn(16, hidden, dtype=torch.bfloat16, device=device)
    torch._dynamo.mark_dynamic(warm, 0)
    with torch.no_grad():
        for fn in variants.values():
            fn(warm.clone())
    rows = []
    for n in tokens:
        x = torch.randn(n, hidden, dtype=torch.bfloat16, device=device)
        for name, fn in variants.items():
            with torch.no_grad():
                us, method = time_us(lambda: fn(x), calls, replays)
            rows.append(dict(level="model", hidden=hidden, tokens=n, fp8=False, variant=name, us=round(us, 2),
                             method=method))
            progress()
    return rows


def hf_level(cfg: RangeDispatchConfig, hidden: int, intermediate: int, layers: int, style: str,
             tokens: Iterable[int], calls: int, replays: int, progress: Callable[[], None],
             compile_sizes: Sequence[int] = (), attention: str = "hf_default") -> tuple[list[dict], list[str]]:
    """Rows of level ``hf_<style>`` (``hf_<style>_<attention>`` unless ``hf_default``):
    ``LlamaModel(input_ids=[1, n])``, bf16, heads of 128, 8 KV heads (Llama 3: at least one per rank
    up to TP=8)."""
    from rangedispatch.bench import hf_models

    tokens = list(tokens)
    max_n = max(tokens)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = hf_models.build("llama", hidden, intermediate, layers, heads=max(hidden // 128, 8), kv_heads=8, vocab=32000,
                            dtype=torch.bfloat16, device=device, attention=attention)
    model = hf_models.tensor_parallel(model, style)
    dispatch = range_dispatch_variants(model, cfg, max_n, compile_sizes)
    variants: dict[str, Callable] = {"torch_compile": torch.compile(model), **dispatch}
    level = f"hf_{style}" + ("" if attention == "hf_default" else f"_{attention}")

    def ids(n: int) -> torch.Tensor:
        return torch.randint(0, 32000, (1, n), device=device, generator=torch.Generator(device).manual_seed(n))

    rows = []
    with torch.no_grad():
        for fn in variants.values():
            fn(input_ids=ids(16), use_cache=False)
        for n in tokens:
            x = ids(n)
            outs = {}
            for name, fn in variants.items():
                outs[name] = fn(input_ids=x, use_cache=False).last_hidden_state.float()
                us, method = time_us(lambda: fn(input_ids=x, use_cache=False), calls, replays)
                row = dict(level=level, hidden=hidden, tokens=n, fp8=False, variant=name, us=round(us, 2),
                           method=method)
                if name in dispatch:
                    row.update(_dispatch_facts(fn, n))
                    counts = fn.stats()[fn.range_for(n)]["matches"]
                    row["matches"] = " ".join(f"{k}:{v}" for k, v in counts.items() if v) or "none"
                    a, b = outs[name], outs["torch_compile"]
                    row["rel_err"] = round(((a - b).norm() / b.norm()).item(), 5)
                rows.append(row)
                progress()
    return rows, [str(r) for r in dispatch["range_dispatch"].ranges]
