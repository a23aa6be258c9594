"""Tiny Hugging Face models for the tests (hidden 32 unless asked), and their inputs."""

import torch

from rangedispatch.bench.hf_models import FAMILIES, build as _build, tensor_parallel  # noqa: F401


def build(family: str, dtype: torch.dtype = torch.float32, hidden: int = 32) -> torch.nn.Module:
    return _build(family, hidden, 2 * hidden, dtype=dtype)


def inputs(batch: int, seq: int, mask: bool, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed + 1000 * batch + seq)
    kwargs = {"input_ids": torch.randint(1, 128, (batch, seq), generator=g), "use_cache": False}
    if mask:
        m = torch.ones(batch, seq, dtype=torch.long)
        m[0, : seq // 3] = 0  # left padding on the first row
        kwargs["attention_mask"] = m
    return kwargs


def build_causal_lm(family: str, hidden: int = 32) -> torch.nn.Module:
    """A ``<Family>ForCausalLM`` whose LM head is scaled so greedy tokens are not near ties."""
    return _build(family, hidden, 2 * hidden, lm_head_scale=20.0)
