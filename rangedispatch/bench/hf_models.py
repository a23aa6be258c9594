"""Hugging Face Llama-shaped models for the benchmark and the tests, built from config (random
weights, no downloads), and tensor parallelism the two ways people write it:

- ``handwritten``: each rank keeps its slice of the weights (column-parallel q/k/v/gate/up,
  row-parallel o/down) and a forward hook all-reduces the row-parallel outputs with
  ``dist.all_reduce``, as in gpt-fast;
- ``dtensor``: ``parallelize_module`` with ``ColwiseParallel`` / ``RowwiseParallel``, as in
  torchtitan and HF's ``tp_plan``; ``dtensor_output`` keeps the row-parallel outputs DTensors
  (``use_local_output=False``), with the layers' inputs and norms replicated to match.

Attention runs in one of two ways (``ATTENTIONS``):

- ``hf_default``: as the installed transformers picks it (SDPA for Llama; eager for Gemma2, whose
  soft-capping SDPA lacks). Under ``torch.compile`` with torch 2.11 or transformers 5.17, HF builds
  the causal mask for SDPA as a tensor, and SDPA with a mask tensor cannot use its flash kernel;
- ``sdpa_is_causal``: SDPA with ``is_causal=True`` and no mask tensor, what transformers 5.24 with
  torch 2.13 runs under ``torch.compile`` (checked on CPU). The same result for calls with
  ``input_ids`` only, the benchmark's; an attention mask, a KV cache or sliding-window layers are
  refused.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

FAMILIES = ("llama", "qwen2", "gemma2", "phi3")
TP_STYLES = ("handwritten", "dtensor", "dtensor_output")
ATTENTIONS = ("hf_default", "sdpa_is_causal")
COLUMN = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj")
ROW = ("self_attn.o_proj", "mlp.down_proj")


def build(family: str, hidden: int, intermediate: int, layers: int = 2, heads: int = 4, kv_heads: int = 2,
          vocab: int = 128, dtype: torch.dtype = torch.float32, device: str = "cpu",
          attention: str = "hf_default", lm_head_scale: float = 0.0, head_dim: int = 0) -> nn.Module:
    """A ``<Family>Model`` (the decoder stack, no LM head) with seed-0 random weights, its attention
    one of ``ATTENTIONS``. ``lm_head_scale`` > 0: a ``<Family>ForCausalLM`` instead (for
    ``generate``), its LM head scaled by that factor: random weights give near-tied logits, and
    greedy tokens would flip between numerically different but correct paths. ``head_dim`` 0:
    ``hidden // heads``; another value gives one rank's shapes of a tensor-parallel model."""
    import transformers

    if attention == "sdpa_is_causal":
        transformers.AttentionInterface.register(attention, _sdpa_is_causal)
        transformers.AttentionMaskInterface.register(attention, _no_mask_tensor)

    name = {"llama": "Llama", "qwen2": "Qwen2", "gemma2": "Gemma2", "phi3": "Phi3"}[family]
    config_cls = getattr(transformers, f"{name}Config")
    model_cls = getattr(transformers, f"{name}ForCausalLM" if lm_head_scale else f"{name}Model")
    config = config_cls(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                        num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim or hidden // heads,
                        vocab_size=vocab, max_position_embeddings=32768, pad_token_id=0)
    if attention == "sdpa_is_causal" and getattr(config, "sliding_window", None):
        raise ValueError(f"attention=sdpa_is_causal: {family} has sliding-window layers "
                         f"(sliding_window={config.sliding_window}), whose mask is_causal does not give; "
                         "use hf_default")
    torch.manual_seed(0)
    with torch.device(device):
        model = model_cls(config).to(dtype).eval()
    if lm_head_scale:
        with torch.no_grad():
            model.lm_head.weight.mul_(lm_head_scale)
    if attention == "sdpa_is_causal":
        model.config._attn_implementation = attention
    return model


def _sdpa_is_causal(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    attention_mask: None, **kwargs) -> tuple:
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, query, key, value, None, **kwargs)  # is_causal for 2+ queries


def _no_mask_tensor(*, q_length: int, kv_length: int, q_offset: int, attention_mask: object, **_: object) -> None:
    """The mask of ``sdpa_is_causal``: none, for the calls where SDPA's ``is_causal`` is the same."""
    if attention_mask is not None or kv_length != q_length or (isinstance(q_offset, int) and q_offset):
        given = "an attention_mask" if attention_mask is not None else f"{q_length} queries over {kv_length} keys"
        raise ValueError(f"attention=sdpa_is_causal: only for calls with input_ids alone (no attention_mask, "
                         f"no KV cache); this call has {given}")


def tensor_parallel(model: nn.Module, style: str) -> nn.Module:
    """``model`` split over the default process group in ``style`` (one of ``TP_STYLES``)."""
    if style == "handwritten":
        return _handwritten(model)
    return _dtensor(model, use_local_output=style == "dtensor")


def _all_reduce_output(module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
    dist.all_reduce(output)
    return output


def _slice(linear: nn.Linear, dim: int, rank: int, world: int) -> None:
    linear.weight = nn.Parameter(linear.weight.detach().chunk(world, dim)[rank].contiguous())
    if linear.bias is not None:
        bias = linear.bias.detach()
        linear.bias = nn.Parameter(bias.chunk(world, 0)[rank].contiguous() if dim == 0 else bias / world)


def _handwritten(model: nn.Module) -> nn.Module:
    rank, world = dist.get_rank(), dist.get_world_size()
    for layer in model.layers:
        for name in COLUMN:
            _slice(layer.get_submodule(name), 0, rank, world)
        for name in ROW:
            row = layer.get_submodule(name)
            _slice(row, 1, rank, world)
            row.register_forward_hook(_all_reduce_output)
    return model


def _dtensor(model: nn.Module, use_local_output: bool) -> nn.Module:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, distribute_module
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        PrepareModuleInput,
        RowwiseParallel,
        parallelize_module,
    )

    mesh = init_device_mesh(model.device.type, (dist.get_world_size(),))
    plan = {name: ColwiseParallel() for name in COLUMN}
    plan.update({name: RowwiseParallel(use_local_output=use_local_output) for name in ROW})
    if not use_local_output:  # the residual add then adds two DTensors
        plan[""] = PrepareModuleInput(input_layouts=(Replicate(),), desired_input_layouts=(Replicate(),),
                                      use_local_output=False)
    for layer in model.layers:
        parallelize_module(layer, mesh, plan)
    if not use_local_output:  # the norms see replicated DTensors: replicate their weights too
        for name, module in model.named_modules():
            if name.endswith("norm"):
                distribute_module(module, mesh)
    return model
