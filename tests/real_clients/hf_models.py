"""Tiny Hugging Face models built from config (random weights, no downloads)."""

import torch

FAMILIES = ("llama", "qwen2", "gemma2", "phi3")


def build(family: str, dtype: torch.dtype = torch.float32, hidden: int = 32, layers: int = 2) -> torch.nn.Module:
    import transformers

    config_cls, model_cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaModel),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2Model),
        "gemma2": (transformers.Gemma2Config, transformers.Gemma2Model),
        "phi3": (transformers.Phi3Config, transformers.Phi3Model),
    }[family]
    heads = 4
    config = config_cls(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                        num_attention_heads=heads, num_key_value_heads=2, head_dim=hidden // heads,
                        vocab_size=128, max_position_embeddings=1024, pad_token_id=0)
    torch.manual_seed(0)
    return model_cls(config).to(dtype).eval()


def inputs(batch: int, seq: int, mask: bool, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed + 1000 * batch + seq)
    kwargs = {"input_ids": torch.randint(1, 128, (batch, seq), generator=g), "use_cache": False}
    if mask:
        m = torch.ones(batch, seq, dtype=torch.long)
        m[0, : seq // 3] = 0  # left padding on the first row
        kwargs["attention_mask"] = m
    return kwargs
