"""The generate level: Hugging Face ``generate`` end to end, the loop people run.

A Llama-shaped ``LlamaForCausalLM`` (random weights, bf16; its LM head scaled so greedy choices are
no near ties) generates greedily from a random prompt, through:

- ``eager``: HF's default (dynamic cache, no compile);
- ``hf_compiled_static``: HF's own path for speed, a static cache, whose decode step HF compiles
  itself (CUDA graphs included; on CPU HF does not compile, and this row is eager with a static cache);
- ``torch_compile``: the inner decoder through ``torch.compile``, static cache, HF's compile off;
- ``rangedispatch``: the inner decoder through ``RangeCompiledModule``, static cache, HF's compile
  off, a CUDA graph for the decode size (on GPUs).

Per variant: the first generate's seconds (compiles included); after a second, untimed one, time
to first token (a generate of one token), time per output token (the rest, per token) and tokens
per second, medians over repeats; and how many generated tokens equal eager's (``same_tokens``: all of them, or those before
the first that differs). Under tensor parallelism the decoder's layers are
split as ``bench.hf_tp``'s first style says; every rank runs the same generate.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

from rangedispatch.config.schema import RangeDispatchConfig

VARIANTS = ("eager", "hf_compiled_static", "torch_compile", "rangedispatch")
FIELDS = ["level", "card_world", "hidden", "layers", "batch", "prompt", "new_tokens", "variant", "first_s", "ttft_ms",
          "tpot_ms", "tokens_per_s", "speedup", "floor_ms", "same_tokens", "compile_s", "cache_hits", "graphs"]


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    _sync()
    start = time.perf_counter()
    out = fn()
    _sync()
    return time.perf_counter() - start, out


def _same_prefix(out: torch.Tensor, reference: torch.Tensor, prompt: int) -> int:
    """How many generated tokens equal eager's before the first that differs (in any sequence):
    bf16 paths round differently, and one flipped near-tie changes every token after it."""
    differs = (out[:, prompt:] != reference[:, prompt:]).any(0).nonzero()
    return int(differs[0]) if len(differs) else out.shape[1] - prompt


def generate_level(cfg: RangeDispatchConfig, hidden: int, intermediate: int, layers: int, batch: int, prompt: int,
                   new_tokens: int, repeats: int, variants: list[str], tp_style: str, hbm_tb_s: float,
                   progress: Callable[[], None]) -> list[dict]:
    from rangedispatch.bench import hf_models
    from rangedispatch.wrapper import RangeCompiledModule

    device = "cuda" if torch.cuda.is_available() else "cpu"
    world = dist.get_world_size() if dist.is_initialized() else 1
    model = hf_models.build("llama", hidden, intermediate, layers, heads=max(hidden // 128, 8), kv_heads=8,
                            vocab=32000, dtype=torch.bfloat16, device=device, lm_head_scale=20.0)
    if world > 1:
        hf_models.tensor_parallel(model.model, tp_style)
    decoder = model.model
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    g = torch.Generator(device).manual_seed(batch)
    ids = torch.randint(3, 32000, (batch, prompt), device=device, generator=g)
    mask = torch.ones_like(ids)

    def generate(tokens: int, **kwargs: Any) -> torch.Tensor:
        with torch.no_grad():
            return model.generate(ids, attention_mask=mask, max_new_tokens=tokens, min_new_tokens=tokens,
                                  do_sample=False, pad_token_id=0, **kwargs)

    graphs_cfg = dataclasses.replace(cfg, dispatch=dataclasses.replace(
        cfg.dispatch, cudagraph_sizes=[batch] if device == "cuda" else []))
    setups: dict[str, tuple[Callable[[], torch.nn.Module], dict]] = {
        "eager": (lambda: decoder, {"disable_compile": True}),
        "hf_compiled_static": (lambda: decoder, {"cache_implementation": "static"}),
        "torch_compile": (lambda: torch.compile(decoder), {"cache_implementation": "static", "disable_compile": True}),
        "rangedispatch": (lambda: RangeCompiledModule(decoder, graphs_cfg),
                          {"cache_implementation": "static", "disable_compile": True}),
    }
    rows, reference = [], None
    for name in ["eager", *[v for v in variants if v != "eager"]]:
        make, kwargs = setups[name]
        model.model = make()
        first_s, out = _timed(lambda: generate(new_tokens, **kwargs))
        reference = out if reference is None else reference
        generate(new_tokens, **kwargs)  # untimed: ranges compile on their first call after the trace
        ttft = statistics.median(_timed(lambda: generate(1, **kwargs))[0] for _ in range(repeats))
        full = statistics.median(_timed(lambda: generate(new_tokens, **kwargs))[0] for _ in range(repeats))
        row = dict(level="generate", card_world=world, hidden=hidden, layers=layers, batch=batch, prompt=prompt,
                   new_tokens=new_tokens, variant=name, first_s=round(first_s, 2), ttft_ms=round(1e3 * ttft, 2),
                   tpot_ms=round(1e3 * (full - ttft) / max(new_tokens - 1, 1), 3),
                   tokens_per_s=round(batch * new_tokens / full, 1),
                   floor_ms=round(1e3 * weight_bytes / (hbm_tb_s * 1e12), 3),
                   same_tokens=_same_prefix(out, reference, prompt))
        if isinstance(model.model, RangeCompiledModule):
            stats = model.model.stats().values()
            row.update(compile_s=round(sum(s["compile_s"] for s in stats), 1),
                       cache_hits=sum(s["cache_hits"] for s in stats), graphs=len(model.model.graphs))
        rows.append(row)
        progress()
    model.model = decoder
    baseline = next((r for r in rows if r["variant"] == "hf_compiled_static"), None)
    for r in rows:
        r["speedup"] = round(r["tokens_per_s"] / baseline["tokens_per_s"], 3) if baseline else None
    return rows


def table(rows: list[dict]) -> str:
    """Markdown: one table per shape, batch and prompt; variants down."""
    out = []
    keys = sorted({(r["hidden"], r["layers"], r["batch"], r["prompt"], r["new_tokens"], r["card_world"]) for r in rows})
    cols = ["variant", "first_s", "ttft_ms", "tpot_ms", "tokens_per_s", "speedup", "same_tokens", "compile_s",
            "cache_hits", "graphs"]
    for hidden, layers, batch, prompt, new, world in keys:
        group = [r for r in rows if (r["hidden"], r["layers"], r["batch"], r["prompt"], r["new_tokens"],
                                     r["card_world"]) == (hidden, layers, batch, prompt, new, world)]
        floor = group[0].get("floor_ms")
        out.append(f"\n### generate, hidden {hidden}, {layers} layers, batch {batch}, prompt {prompt}, {new} new tokens, "
                   f"{world} rank(s) (speedup: tokens/s over hf_compiled_static; weights / HBM bandwidth: "
                   f"{floor} ms per token)\n")
        out.append("| " + " | ".join(cols) + " |")
        out.append("|" + "---|" * len(cols))
        for r in group:
            out.append("| " + " | ".join(str(r.get(c, "")) for c in cols) + " |")
    return "\n".join(out) + "\n"


def plot(rows: list[dict], path: Any) -> Optional[str]:
    """Tokens per second per variant, one panel per (shape, batch). Returns why not, if matplotlib
    is missing."""
    try:
        import matplotlib
    except ImportError as e:
        return f"no PNG: {e}"

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted({(r["hidden"], r["layers"], r["batch"]) for r in rows})
    fig, axes = plt.subplots(1, len(keys), figsize=(4.5 * len(keys), 3.6), squeeze=False)
    for ax, key in zip(axes[0], keys):
        group = [r for r in rows if (r["hidden"], r["layers"], r["batch"]) == key]
        ax.bar([r["variant"] for r in group], [r["tokens_per_s"] for r in group], color="tab:blue")
        ax.set_title(f"hidden {key[0]}, {key[1]} layers, batch {key[2]}", fontsize=9)
        ax.set_ylabel("tokens/s")
        ax.tick_params(axis="x", labelrotation=30, labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return None
