"""Batch-1 decode on one GPU: how far is a decode step from the HBM floor, and where does the rest go?

    python benchmarks/experiments/decode_floor.py OUT_DIR [--no-cudnn-attention] [--variant NAME=OVERRIDES ...]

On a Llama-3-8B-shaped model (32 layers, hidden 4096, intermediate 14336, 8 KV heads, vocabulary
32000, random weights, bf16), it measures, each in CUDA graphs:

1. the read bandwidth the card reaches (a 4 GB sum);
2. every weight matmul of one decode step as cuBLAS ``[1, K] x [K, N]``, as the model has them
   and with q/k/v and gate/up concatenated: what the weight reads cost with vendor GEMVs;
3. one decode step of ``model.model`` wrapped in ``RangeCompiledModule`` (``hardware=h200``,
   ``dispatch.cudagraph_sizes=[1]``) with a static cache of 576 after a 512-token prefill;
4. a CUDA kernel profile of the same step without CUDA graphs (``decode_floor_kernels*.txt``).

``--no-cudnn-attention`` turns PyTorch's cuDNN SDPA backend off (the memory-efficient kernel runs).
``--variant NAME=OVERRIDES`` (repeatable; OVERRIDES space-separated config overrides on top of
``hardware=h200``) times step 3 for each variant in turn instead of steps 1, 3 and 4 once, e.g.
``--variant range_graph=hardware.compile_sizes=[]``; ``--profile`` adds step 4 per variant.
Writes ``decode_floor*.json`` and ``decode_floor_kernels*.txt`` to OUT_DIR.
"""

import argparse
import contextlib
import json
import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile
from transformers import StaticCache

from rangedispatch import RangeCompiledModule, load_config
from rangedispatch.bench import hf_models

HIDDEN, INTERMEDIATE, LAYERS, KV, VOCAB, PROMPT = 4096, 14336, 32, 1024, 32000, 512
# --rank-of-tp2: one rank's matmul shapes of Llama-3-8B at TP=2 (half the heads and the intermediate)


def graph_ms(fn, reps: int) -> float:
    """Median ms of one replay of a CUDA graph of ``fn``."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    times = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / reps)
    return round(statistics.median(times), 4)


def weight_reads(result: dict) -> None:
    big = torch.empty(2 * 1024**3, dtype=torch.bfloat16, device="cuda").normal_()
    ms = graph_ms(lambda: big.sum(dtype=torch.float32), reps=5)
    result.update(read_4GB_ms=ms, read_TBps=round(big.numel() * 2 / ms / 1e9, 3))
    del big
    layer = [(HIDDEN, HIDDEN), (KV, HIDDEN), (KV, HIDDEN), (HIDDEN, HIDDEN),
             (INTERMEDIATE, HIDDEN), (INTERMEDIATE, HIDDEN), (HIDDEN, INTERMEDIATE)]
    weights = [torch.randn(n, k, dtype=torch.bfloat16, device="cuda") for n, k in layer * LAYERS + [(VOCAB, HIDDEN)]]
    xs = {k: torch.randn(1, k, dtype=torch.bfloat16, device="cuda") for k in (HIDDEN, INTERMEDIATE)}
    gb = sum(w.numel() * 2 for w in weights) / 1e9
    ms = graph_ms(lambda: [torch.mm(xs[w.shape[1]], w.t()) for w in weights], reps=10)
    result.update(gemv_weights_gb=round(gb, 3), gemv_cublas_ms=ms, gemv_cublas_TBps=round(gb / ms, 3))
    fused = []
    for i in range(LAYERS):
        q, k, v, o, gate, up, down = weights[7 * i:7 * i + 7]
        fused += [torch.cat([q, k, v]), o, torch.cat([gate, up]), down]
    fused.append(weights[-1])
    del weights
    result["gemv_cublas_fused_qkv_gateup_ms"] = graph_ms(lambda: [torch.mm(xs[w.shape[1]], w.t()) for w in fused], 10)


def decode_ms(model, steps: int, around=contextlib.nullcontext) -> float:
    """ms per decode step after a prefill, the steps issued back to back (one sync at the end)."""
    cache = StaticCache(config=model.config, max_cache_len=PROMPT + 64)
    tok = torch.ones(1, 1, dtype=torch.long, device="cuda")
    with torch.no_grad():
        model(input_ids=torch.ones(1, PROMPT, dtype=torch.long, device="cuda"), past_key_values=cache,
              cache_position=torch.arange(PROMPT, device="cuda"))
        for i in range(4):  # compile, capture
            model(input_ids=tok, past_key_values=cache, cache_position=torch.tensor([PROMPT + i], device="cuda"))
        torch.cuda.synchronize()
        start = time.perf_counter()
        with around():
            for i in range(4, 4 + steps):
                model(input_ids=tok, past_key_values=cache, cache_position=torch.tensor([PROMPT + i], device="cuda"))
            torch.cuda.synchronize()
    return round(1e3 * (time.perf_counter() - start) / steps, 3)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out_dir")
    ap.add_argument("--no-cudnn-attention", action="store_true")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME=OVERRIDES")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--rank-of-tp2", action="store_true",
                    help="with --variant: the model has one TP=2 rank's shapes (16 heads, 4 KV heads, intermediate 7168)")
    args = ap.parse_args()
    tag = ("_no_cudnn_attention" if args.no_cudnn_attention else "") + ("_rank_of_tp2" if args.rank_of_tp2 else "")
    if args.no_cudnn_attention:
        torch.backends.cuda.enable_cudnn_sdp(False)
    result = {"card": torch.cuda.get_device_name(), "torch": torch.__version__,
              "cudnn_attention": not args.no_cudnn_attention}
    if not tag and not args.variant:  # the weights read: the full model's only
        weight_reads(result)
    halve = 2 if args.rank_of_tp2 else 1
    model = hf_models.build("llama", HIDDEN, INTERMEDIATE // halve, LAYERS, heads=32 // halve, kv_heads=8 // halve,
                            vocab=VOCAB, dtype=torch.bfloat16, device="cuda", lm_head_scale=20.0, head_dim=128)
    result["shape"] = "one TP=2 rank of Llama-3-8B" if halve == 2 else "Llama-3-8B"
    variants = dict(v.split("=", 1) for v in args.variant) or {"h200": ""}
    for name, overrides in variants.items():
        overrides = ["hardware=h200", *overrides.split()]
        key = f"{name}_" if args.variant else ""
        result.update(step_times(model, overrides, key))
        if args.profile or not args.variant:
            decoder = model.model
            model.model = RangeCompiledModule(decoder, load_config(overrides))
            result[f"{key}no_cudagraph_step_ms"] = decode_ms(model, 48)
            write_profile(model, overrides, f"{args.out_dir}/decode_floor_kernels{tag}{'_' + name if args.variant else ''}.txt")
            model.model = decoder
        print(json.dumps(result, indent=1), flush=True)
    with open(f"{args.out_dir}/decode_floor{tag}.json", "w") as f:
        json.dump(result, f, indent=1)


def step_times(model, overrides: list[str], key: str) -> dict:
    """Compile seconds and ms per decode step (CUDA graphs) of ``model.model`` wrapped with ``overrides``."""
    decoder = model.model
    start = time.time()
    model.model = RangeCompiledModule(decoder, load_config([*overrides, "dispatch.cudagraph_sizes=[1]"]))
    decode_ms(model, 4)
    times = {f"{key}compile_s": round(time.time() - start, 1),
             f"{key}cudagraph_step_ms": [decode_ms(model, 48) for _ in range(3)]}
    model.model = decoder
    return times


def write_profile(model, overrides: list[str], path: str) -> None:
    """Kernel times of 10 decode steps without CUDA graphs, the longest first."""
    profiler = profile(activities=[ProfilerActivity.CUDA])
    decode_ms(model, 10, lambda: profiler)
    events = [e for e in profiler.key_averages() if e.device_type.name == "CUDA" and e.self_device_time_total > 0]
    total = sum(e.self_device_time_total for e in events)
    with open(path, "w") as f:
        f.write(f"CUDA kernel time over 10 decode steps without CUDA graphs ({' '.join(overrides)}): {total:.0f} us\n")
        for e in sorted(events, key=lambda e: -e.self_device_time_total):
            f.write(f"{100 * e.self_device_time_total / total:6.2f}%  {e.self_device_time_total:9.0f} us  "
                    f"{e.count:5d}x  {e.key[:150]}\n")


if __name__ == "__main__":
    main()
