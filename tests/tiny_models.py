"""Tiny random models of each family the engine must be exact for, and the naive reference.

`naive_logps` is the classic computation written out plainly, independent of the engine: one
forward per (prompt + response), full logits, log_softmax, gather, sum.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache

import torch
import transformers

from pairopt.pairs import ResponseGroup

VOCAB = 101
COMMON = dict(vocab_size=VOCAB, max_position_embeddings=256, pad_token_id=0)
LLAMA_LIKE = dict(
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    **COMMON,
)

# family -> (config class, kwargs, attention implementation for the reference forward)
FAMILIES: dict[str, tuple[str, dict, str]] = {
    "llama": ("LlamaConfig", LLAMA_LIKE, "sdpa"),
    "mistral": ("MistralConfig", {**LLAMA_LIKE, "sliding_window": 5}, "sdpa"),
    "qwen2": (
        "Qwen2Config",
        {**LLAMA_LIKE, "use_sliding_window": True, "sliding_window": 5, "max_window_layers": 1},
        "sdpa",
    ),
    "qwen3": ("Qwen3Config", {**LLAMA_LIKE, "head_dim": 8}, "sdpa"),
    "gemma2": (
        "Gemma2Config",
        {
            **LLAMA_LIKE,
            "head_dim": 8,
            "sliding_window": 5,
            "final_logit_softcapping": 3.0,
            "attn_logit_softcapping": 5.0,
        },
        "eager",
    ),
    "phi3": ("Phi3Config", {**LLAMA_LIKE, "sliding_window": 6}, "sdpa"),
    "gpt2": (
        "GPT2Config",
        dict(
            n_embd=32,
            n_layer=2,
            n_head=4,
            n_positions=256,
            vocab_size=VOCAB,
            bos_token_id=1,
            eos_token_id=2,
        ),
        "sdpa",
    ),
    "gpt_neox": (
        "GPTNeoXConfig",
        dict(
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            **COMMON,
        ),
        "sdpa",
    ),
    "olmo2": ("Olmo2Config", LLAMA_LIKE, "sdpa"),
}


@cache
def make_model(family: str, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """Built once per process (tests only read the weights and zero the grads they make)."""
    config_cls, kwargs, attn = FAMILIES[family]
    config = getattr(transformers, config_cls)(**kwargs)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation=attn)
    return model.to(dtype).eval()


def random_groups(
    lengths: Sequence[tuple[int, ...]], seed: int = 0, vocab: int = VOCAB
) -> list[ResponseGroup]:
    """One group per tuple (P, n1, ..., nk) of random token ids in [1, vocab)."""
    g = torch.Generator().manual_seed(seed)

    def ids(n: int) -> list[int]:
        return torch.randint(1, vocab, (n,), generator=g).tolist()

    return [ResponseGroup(ids(p), [ids(n) for n in ns]) for p, *ns in lengths]


def naive_logps(model: torch.nn.Module, groups: Sequence[ResponseGroup]) -> torch.Tensor:
    """(G, k) summed log-probs, one plain forward per response."""
    rows = []
    for group in groups:
        P = len(group.prompt)
        sums = []
        for response in group.responses:
            ids = torch.tensor([list(group.prompt) + list(response)])
            logits = model(input_ids=ids).logits[0]  # (P + n, V)
            logits = logits if logits.dtype == torch.float64 else logits.float()
            logps = logits.log_softmax(-1)[P - 1 : P - 1 + len(response)]  # predecessors
            sums.append(logps.gather(-1, torch.tensor(response)[:, None]).sum())
        rows.append(torch.stack(sums))
    return torch.stack(rows)


def param_grads(model: torch.nn.Module, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
