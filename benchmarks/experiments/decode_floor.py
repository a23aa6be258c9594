"""Batch-1 decode on one GPU: how far is a decode step from the HBM floor, and where does the rest go?

    python benchmarks/experiments/decode_floor.py OUT_DIR [--no-cudnn-attention]

On a Llama-3-8B-shaped model (32 layers, hidden 4096, intermediate 14336, 8 KV heads, vocabulary
32000, random weights, bf16), it measures, each in CUDA graphs:

1. the read bandwidth the card reaches (a 4 GB sum);
2. every weight matmul of one decode step as cuBLAS ``[1, K] x [K, N]``, as the model has them
   and with q/k/v and gate/up concatenated: what the weight reads cost with vendor GEMVs;
3. one decode step of ``model.model`` wrapped in ``RangeCompiledModule`` (``hardware=h200``,
   ``dispatch.cudagraph_sizes=[1]``) with a static cache of 576 after a 512-token prefill;
4. a CUDA kernel profile of the same step without CUDA graphs (``kernels*.txt``).

``--no-cudnn-attention`` turns PyTorch's cuDNN SDPA backend off (the memory-efficient kernel runs).
Writes ``floor*.json`` and ``kernels*.txt`` to OUT_DIR.
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
    args = ap.parse_args()
    tag = "_no_cudnn_attention" if args.no_cudnn_attention else ""
    if args.no_cudnn_attention:
        torch.backends.cuda.enable_cudnn_sdp(False)
    result = {"card": torch.cuda.get_device_name(), "torch": torch.__version__, "cudnn_attention": not tag}
    if not tag:
        weight_reads(result)
    model = hf_models.build("llama", HIDDEN, INTERMEDIATE, LAYERS, heads=32, kv_heads=8, vocab=VOCAB,
                            dtype=torch.bfloat16, device="cuda", lm_head_scale=20.0)
    decoder = model.model
    start = time.time()
    model.model = RangeCompiledModule(decoder, load_config(["hardware=h200", "dispatch.cudagraph_sizes=[1]"]))
    decode_ms(model, 4)
    result["compile_s"] = round(time.time() - start, 1)
    result["cudagraph_step_ms"] = [decode_ms(model, 48) for _ in range(3)]
    model.model = RangeCompiledModule(decoder, load_config(["hardware=h200"]))
    result["no_cudagraph_step_ms"] = decode_ms(model, 48)
    profiler = profile(activities=[ProfilerActivity.CUDA])
    decode_ms(model, 10, lambda: profiler)
    events = [e for e in profiler.key_averages() if e.device_type.name == "CUDA" and e.self_device_time_total > 0]
    total = sum(e.self_device_time_total for e in events)
    with open(f"{args.out_dir}/kernels{tag}.txt", "w") as f:
        f.write(f"CUDA kernel time over 10 decode steps without CUDA graphs: {total:.0f} us\n")
        for e in sorted(events, key=lambda e: -e.self_device_time_total):
            f.write(f"{100 * e.self_device_time_total / total:6.2f}%  {e.self_device_time_total:9.0f} us  "
                    f"{e.count:5d}x  {e.key[:150]}\n")
    with open(f"{args.out_dir}/floor{tag}.json", "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
