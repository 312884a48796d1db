"""Log-probs of scored tokens, with the LM head applied only there and in chunks.

Naive equivalent (and what the tests compare against):

    logits = lm_head(hidden_TD)                         # (T, V), all at once
    logps_T = logits.log_softmax(-1).gather(-1, target_T[:, None]).squeeze(-1)

Here the head runs on `chunk_size` rows at a time and each chunk is wrapped in a non-reentrant
activation checkpoint: the forward keeps only the (T,) result, the backward recomputes one
chunk's (chunk, V) logits at a time. Peak memory is therefore O(chunk * V) instead of O(T * V),
and gradients are exact (the same ops run again; no approximation). All chunks run inside one
call of the LM-head module (`in_one_call`), so an engine that gathers sharded weights around
module calls (DeepSpeed ZeRO-3) gathers the head once per forward and once per backward.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

Head = Callable[[torch.Tensor], torch.Tensor]

# Default chunk: as many rows as fit 2**25 fp32 logits (128 MiB), so peak memory stays flat as
# the vocabulary grows (measured in docs/benchmarks.md; ~1,000 rows at a 32k vocabulary).
LOGITS_BUDGET = 2**25


def default_chunk_size(vocab_size: int) -> int:
    return max(1, LOGITS_BUDGET // max(1, vocab_size))


def vocab_size(model: nn.Module) -> int:
    """The vocabulary the LM head scores, from the model's config.

    Not from the head's weight: under DeepSpeed ZeRO-3 outside a gathered forward that weight
    is a partitioned placeholder of shape (0,), and under FSDP a shard; either would size the
    chunks for the wrong vocabulary (a (0,) weight made the chunk the whole (T, V) logits).
    The weight's shape is used only when the config names no vocabulary.
    """
    config: Any = getattr(model, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    vocab = getattr(text, "vocab_size", None)
    if isinstance(vocab, int) and vocab > 0:
        return vocab
    return int(model.get_output_embeddings().weight.shape[0])  # type: ignore[operator]


def make_head(model: nn.Module, linear: Head | None = None) -> Head:
    """hidden (T, D) -> logits (T, V) exactly as the model's own forward computes them;
    `linear` replaces the call of the output-embedding module (its forward without hooks,
    inside `in_one_call`)."""
    lm_head = linear or model.get_output_embeddings()  # type: ignore[operator]
    config: Any = model.config
    softcap = getattr(config, "final_logit_softcapping", None)  # Gemma2/3
    divide = getattr(config, "logits_scaling", None)  # Granite
    multiply = getattr(config, "logit_scale", None)  # Cohere

    def head(hidden: torch.Tensor) -> torch.Tensor:
        logits = lm_head(hidden)
        if multiply is not None:
            logits = logits * multiply
        if divide is not None:
            logits = logits / divide
        if softcap is not None:
            logits = torch.tanh(logits / softcap) * softcap
        return logits

    return head


# Per-token values the engine can give besides the summed log-probs, by name (a loss declares the
# ones it needs; pairopt.loss.base). Each is one value per scored token.
TOKEN_STATISTICS = {
    "logps": "log p(y_t): the token's log-prob (differentiable)",
    "log_sq_mass": "log Σ_v p_v²: the log of the squared probability mass at the position "
    "(detached; WPO's sampled alignment)",
}


def check_statistics(statistics: frozenset[str]) -> None:
    unknown = sorted(statistics - set(TOKEN_STATISTICS))
    if unknown:
        raise ValueError(
            f"unknown token statistics {unknown}; the engine gives {sorted(TOKEN_STATISTICS)}"
        )


def _chunk_logps(
    head: Head, hidden_CD: torch.Tensor, target_C: torch.Tensor, sq_mass: bool = False
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    logits_CV = head(hidden_CD)
    if logits_CV.dtype not in (torch.float32, torch.float64):
        logits_CV = logits_CV.float()  # log-softmax in fp32 at least, whatever the model dtype
    lse_C = logits_CV.logsumexp(-1)
    picked_C = logits_CV.gather(-1, target_C[:, None]).squeeze(-1)
    if not sq_mass:
        return picked_C - lse_C
    with torch.no_grad():  # log Σ_v p_v² = logsumexp(2·log p): no gradient (WPO detaches it)
        sq_C = (2 * (logits_CV - lse_C[:, None])).logsumexp(-1)
    return picked_C - lse_C, sq_C


def token_values(
    head: Head,
    hidden_TD: torch.Tensor,
    target_T: torch.Tensor,
    chunk_size: int = 1024,
    statistics: frozenset[str] = frozenset(),
) -> dict[str, torch.Tensor]:
    """{"logps": (T,)} and each requested statistic of TOKEN_STATISTICS, (T,), computed in the
    same chunks as the log-probs (one head call per chunk whatever is asked).

    Naive equivalent of "log_sq_mass": `logits.log_softmax(-1).mul(2).logsumexp(-1)` on the
    full (T, V) logits (tests/test_token_statistics.py).
    """
    check_statistics(statistics)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    sq_mass = "log_sq_mass" in statistics
    logps, squares = [], []
    for start in range(0, hidden_TD.shape[0], chunk_size):
        h_CD = hidden_TD[start : start + chunk_size]
        t_C = target_T[start : start + chunk_size]
        if torch.is_grad_enabled():
            out = checkpoint(_chunk_logps, head, h_CD, t_C, sq_mass, use_reentrant=False)
        else:
            out = _chunk_logps(head, h_CD, t_C, sq_mass)
        if sq_mass:
            logps.append(out[0])
            squares.append(out[1])
        else:
            logps.append(out)
    empty = hidden_TD.new_zeros(0, dtype=torch.float32)
    values = {"logps": torch.cat(logps) if logps else empty}
    if sq_mass:
        values["log_sq_mass"] = torch.cat(squares) if squares else empty
    return values


def head_values(
    model: nn.Module,
    hidden_TD: torch.Tensor,
    target_T: torch.Tensor,
    chunk_size: int,
    statistics: frozenset[str] = frozenset(),
) -> dict[str, torch.Tensor]:
    """`token_values` with the model's LM head, all chunks inside one call of the head module
    (`in_one_call`): the same numbers as one call per chunk."""
    lm_head: nn.Module = model.get_output_embeddings()  # type: ignore[operator]
    names = ["logps", *sorted(statistics)]

    def body(forward: Head, hidden: torch.Tensor) -> tuple[torch.Tensor, ...]:
        values = token_values(make_head(model, forward), hidden, target_T, chunk_size, statistics)
        return tuple(values[name] for name in names)  # module hooks expect tensors or a tuple

    return dict(zip(names, in_one_call(lm_head, hidden_TD, body), strict=True))


def in_one_call(
    module: nn.Module, hidden: torch.Tensor, body: Callable[[Head, torch.Tensor], Any]
) -> Any:
    """`body(forward, hidden)` run as one call of `module` on `hidden`, where `forward` is the
    module's own forward without the module's hooks (body calls it once per chunk).

    Why: parameter-sharding engines gather a module's weights in hooks around each of its
    calls (DeepSpeed ZeRO-3 hooks every submodule). Called once per chunk, the LM head would be
    gathered once per chunk, three times over (forward, checkpoint recompute, backward), and
    processes with different numbers of scored tokens would issue different numbers of
    collectives: a crash or a hang. In one call it is gathered once for the forward and once
    for the backward (the hooks on the call's input and output), on every process alike.
    `body` must compute from the `hidden` it is given: the hooks may hand the module a tensor
    that carries their backward hook."""
    own = module.forward
    shadowed = module.__dict__.get("forward")  # an instance attribute to put back

    def one_call(x: torch.Tensor) -> Any:
        return body(own, x)

    module.forward = one_call
    try:
        return module(hidden)
    finally:
        if shadowed is None:
            del module.forward
        else:
            module.forward = shadowed


def token_logps(
    head: Head, hidden_TD: torch.Tensor, target_T: torch.Tensor, chunk_size: int = 1024
) -> torch.Tensor:
    """(T,) log-probs (fp32, or fp64 for an fp64 model) of `target_T` under `head(hidden_TD)`; see the module docstring."""
    return token_values(head, hidden_TD, target_T, chunk_size)["logps"]
