"""What the benchmark scripts (scripts/benchmark*.py) share: the model shapes they compare at, and the memory a
generation cache holds. Not part of the remote code."""

import torch

SIZES = {  # layers, width, heads, FFN
    "tiny": dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=2, intermediate_size=256),
    "small": dict(num_hidden_layers=4, hidden_size=256, num_attention_heads=4, intermediate_size=1024),
    "base": dict(num_hidden_layers=12, hidden_size=768, num_attention_heads=12, intermediate_size=3072),
}


def cache_mib(cache) -> float:
    """Memory held by a cache: key/value tensors (GPT-2's layers) and running sums (Luna's `LunaCacheLayer`s)."""
    tensors = []
    for layer in cache.layers:
        tensors += [getattr(layer, "keys", None), getattr(layer, "values", None)]
        tensors += list(getattr(layer, "states", None) or [])
    return sum(t.numel() * t.element_size() for t in tensors if torch.is_tensor(t)) / 2**20
