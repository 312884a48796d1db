"""`compute_logps`: the prefix-shared forward (or the classic unshared one) end to end.

Naive equivalent, for each pair and each response y in (chosen, rejected):

    logits = model(input_ids=[prompt + y]).logits[0]               # (P + n, V)
    logp(y) = sum_j log_softmax(logits[P - 1 + j])[y_j]

The engine computes the same numbers with the prompt processed once per pair (share_prefix),
several pairs per row (packing), the LM head only at scored positions, in chunks. For a group
of k responses under one prompt (`compute_group_logps`) the prompt is processed once for all
k, and every response once, however many pairs it is in.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from pairopt.engine.attention import model_inputs, resolve_backend, set_implementation
from pairopt.engine.compat import check_dropout, check_shareable, unsupported_reason
from pairopt.engine.layout import Layout, build_layout
from pairopt.engine.logps import default_chunk_size, head_values, vocab_size
from pairopt.errors import PairoptError
from pairopt.pairs import (
    GroupLogps,
    PairLogps,
    PreferencePair,
    ResponseGroup,
    ResponseLogps,
    offsets_of,
)


def forward_layout_groups(
    model: nn.Module,
    layout: Layout,
    *,
    backend: str = "auto",
    chunk_size: int | None = None,
    statistics: Iterable[str] = (),
) -> GroupLogps:
    """Run a prepared layout through the model; `backend` must be usable for the model.

    `layout` comes from `build_layout` on the CPU; it moves to the model's device here, after
    anything derived on the host (the varlen plan) has been derived from the CPU copy. Returns
    every response's summed log-prob and token count, flat (R,), in group order, and the
    per-token `statistics` asked for (pairopt.engine.logps.TOKEN_STATISTICS), flat in response
    order."""
    device = next(model.parameters()).device
    host, layout = layout, layout.to(device)
    if unsupported_reason(model) is not None:
        # The classic computation for models that cannot take our masks: one response per
        # row, right-padded, the model's own causal mask from a 2D padding mask.
        inputs: dict[str, Any] = {"attention_mask": (layout.doc_ids >= 0).long()}
    else:
        backend = resolve_backend(model, backend)
        set_implementation(model, backend)
        inputs = model_inputs(model, layout, backend, host=host)
        inputs["position_ids"] = layout.position_ids
    backbone: Any = model.base_model
    out = backbone(input_ids=layout.input_ids, use_cache=False, **inputs)
    hidden_BLD = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    hidden_TD = hidden_BLD.reshape(-1, hidden_BLD.shape[-1])[layout.score_src]  # (T, D)
    if chunk_size is None:
        chunk_size = default_chunk_size(vocab_size(model))
    wanted = frozenset(statistics)
    values = head_values(model, hidden_TD, layout.score_tgt, chunk_size, wanted)
    logps_T = values["logps"]
    R = layout.num_responses
    sums_R = logps_T.new_zeros(R).index_add(0, layout.score_owner, logps_T)
    counts_R = torch.bincount(layout.score_owner, minlength=R)
    per_token = {}
    if wanted:
        # a response's tokens are contiguous and in order in T; responses are in packing order
        order_T = torch.argsort(layout.score_owner, stable=True)
        per_token = {name: values[name][order_T] for name in wanted}
    return GroupLogps(sums_R, counts_R, offsets_of(layout.sizes).to(device), per_token)


def forward_layout(
    model: nn.Module, layout: Layout, *, backend: str = "auto", chunk_size: int | None = None
) -> ResponseLogps:
    """`forward_layout_groups` in the (G, k) form, for groups that all have k responses."""
    return forward_layout_groups(model, layout, backend=backend, chunk_size=chunk_size).as_matrix()


def compute_group_logps(
    model: nn.Module,
    groups: Sequence[ResponseGroup],
    *,
    share_prefix: bool = True,
    backend: str = "auto",
    packing: bool = True,
    max_tokens_per_row: int | None = None,
    bucket_size: int = 64,
    chunk_size: int | None = None,
    statistics: Iterable[str] = (),
) -> GroupLogps:
    """Summed log-probs and token counts of every response of every group, flat (R,), for
    groups of any sizes (k_g >= 1, mixed in one call and in one packed row).

    share_prefix: prompt once per group, responses in their own branches (else the classic
        layout, one [prompt | response] per segment).
    packing: several segments per row up to `max_tokens_per_row` (None: the longest segment).
        A group is one segment, never split: one longer than the budget is refused, naming it.
    backend: "auto", "sdpa", "eager", "flex" or "varlen" (see pairopt.engine.attention).
    chunk_size: LM-head rows per chunk (None: a 128 MiB fp32 logits budget, 2**25 // vocab).
    Models that cannot be masked (see pairopt.engine.compat) are refused unless both
    share_prefix and packing are off. Dropout must be off in train mode
    (pairopt.disable_dropout). The model's attention implementation is switched to the
    backend's and left so.
    """
    if share_prefix or packing:
        check_shareable(model)
    check_dropout(model)
    layout = build_layout(
        groups,
        share_prefix=share_prefix,
        packing=packing,
        max_tokens_per_row=max_tokens_per_row,
        bucket_size=bucket_size,
    )
    return forward_layout_groups(
        model, layout, backend=backend, chunk_size=chunk_size, statistics=statistics
    )


def compute_response_logps(
    model: nn.Module,
    groups: Sequence[ResponseGroup],
    *,
    share_prefix: bool = True,
    backend: str = "auto",
    packing: bool = True,
    max_tokens_per_row: int | None = None,
    bucket_size: int = 64,
    chunk_size: int | None = None,
) -> ResponseLogps:
    """Summed log-probs (G, k) and token counts (G, k) of groups that all have k responses.

    `compute_group_logps` with the result in the (G, k) form; options as there. Groups of
    different sizes raise a PairoptError: call `compute_group_logps` for those.
    """
    sizes = {len(group.responses) for group in groups}
    if len(sizes) > 1:
        raise PairoptError(
            f"compute_response_logps returns (G, k) tensors, but the groups have {sorted(sizes)} "
            "responses: call compute_group_logps for groups of different sizes (flat (R,) "
            "log-probs with group offsets)."
        )
    return compute_group_logps(
        model,
        groups,
        share_prefix=share_prefix,
        backend=backend,
        packing=packing,
        max_tokens_per_row=max_tokens_per_row,
        bucket_size=bucket_size,
        chunk_size=chunk_size,
    ).as_matrix()


def compute_logps(
    model: nn.Module,
    pairs: Sequence[PreferencePair],
    *,
    share_prefix: bool = True,
    backend: str = "auto",
    packing: bool = True,
    max_tokens_per_row: int | None = None,
    bucket_size: int = 64,
    chunk_size: int | None = None,
    statistics: Iterable[str] = (),
) -> PairLogps:
    """Per-pair summed log-probs and token counts of chosen and rejected; differentiable.

    Exactly the numbers of the classic unshared computation (see the module docstring), with
    the prompt computed once per pair. Options as in `compute_group_logps`; `statistics` adds
    per-token values to `PairLogps.token_values` (pairopt.engine.logps.TOKEN_STATISTICS).
    """
    out = compute_group_logps(
        model,
        [pair.as_group() for pair in pairs],
        share_prefix=share_prefix,
        backend=backend,
        packing=packing,
        max_tokens_per_row=max_tokens_per_row,
        bucket_size=bucket_size,
        chunk_size=chunk_size,
        statistics=statistics,
    )
    index = torch.arange(2 * len(pairs), device=out.logps.device)
    return out.pairs(index[0::2], index[1::2])
