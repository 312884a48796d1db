"""The model `pairopt bench` measures: a randomly initialised Llama of a given shape."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass(frozen=True)
class ModelShape:
    """A Llama with random weights. CPU default: the LM head costs ~12% of a token's forward,
    about what it costs in the GPU shape (2048 x 16 layers, 32k vocab: ~8%) and in 7-8B models;
    a 32k vocab on a 2-layer model would make the head (identical in every mode) dominate."""

    hidden: int = 256
    layers: int = 2
    heads: int = 4
    kv_heads: int = 4
    intermediate: int = 704
    vocab: int = 1024


GPU_SHAPE = ModelShape(hidden=2048, layers=16, heads=16, kv_heads=4, intermediate=5632, vocab=32000)


def build_model(
    shape: ModelShape, device: str, dtype: torch.dtype, seed: int, **config: Any
) -> nn.Module:
    """A randomly initialised Llama of `shape` under `seed`; `config`: more LlamaConfig fields."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    llama = LlamaConfig(
        hidden_size=shape.hidden,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        intermediate_size=shape.intermediate,
        vocab_size=shape.vocab,
        max_position_embeddings=32768,
        **config,
    )
    model: nn.Module = LlamaForCausalLM(llama)
    return model.to(
        device=device, dtype=dtype
    ).train()  # Llama has no dropout: train mode passes check_dropout
