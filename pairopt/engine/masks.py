"""The mask rule (one source of truth) and its encodings for each attention backend.

Rule (docs/engine.md, The mask rule): query q may see key k iff
    doc[q] == doc[k] and k <= q and (branch[k] == 0 or branch[k] == branch[q])
and, on sliding-window layers, pos[q] - pos[k] < window (the window counts position ids,
so it is the same as in the unshared computation, whatever the packing).

Encodings: `dense_mask` (B, L, L) bool, turned into the sdpa bool mask or the eager additive
mask; `flex_block_mask` (FlexAttention `BlockMask` whose mask_mod is the rule itself); and
`varlen_plan` (a gather plan for variable-length kernels: each response's keys are gathered as
[prompt ; own tokens], so a bottom-right-aligned causal kernel applies the rule exactly). All
are tested against `dense_mask`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from pairopt.engine.layout import PAD_DOC, Layout

FULL, SLIDING = "full_attention", "sliding_attention"


def visible(
    doc_q: torch.Tensor,
    doc_k: torch.Tensor,
    branch_q: torch.Tensor,
    branch_k: torch.Tensor,
    idx_q: torch.Tensor,
    idx_k: torch.Tensor,
    pos_q: torch.Tensor,
    pos_k: torch.Tensor,
    window: int | None = None,
) -> torch.Tensor:
    """The rule, elementwise on broadcastable tensors (dense masks and FlexAttention's mask_mod)."""
    allowed = (doc_q == doc_k) & (idx_k <= idx_q) & ((branch_k == 0) | (branch_k == branch_q))
    if window is not None:
        allowed = allowed & (pos_q - pos_k < window)
    return allowed


def dense_mask(layout: Layout, window: int | None = None) -> torch.Tensor:
    """(B, L, L) bool, True where a query (dim 1) may attend to a key (dim 2)."""
    doc, branch, pos = layout.doc_ids, layout.branch_ids, layout.position_ids  # (B, L)
    idx = torch.arange(doc.shape[1], device=doc.device)
    return visible(
        doc[:, :, None],
        doc[:, None, :],
        branch[:, :, None],
        branch[:, None, :],
        idx[None, :, None],
        idx[None, None, :],
        pos[:, :, None],
        pos[:, None, :],
        window,
    )


def sdpa_mask(layout: Layout, window: int | None = None) -> torch.Tensor:
    """(B, 1, L, L) bool, the form torch's scaled_dot_product_attention takes."""
    return dense_mask(layout, window)[:, None]


def eager_mask(layout: Layout, dtype: torch.dtype, window: int | None = None) -> torch.Tensor:
    """(B, 1, L, L) additive float: 0 where visible, finfo(dtype).min elsewhere.

    Eager attention *adds* the mask to the scores: a bool mask would add 0/1 and mask nothing.
    """
    allowed = sdpa_mask(layout, window)
    zero = torch.zeros((), dtype=dtype, device=allowed.device)
    return torch.where(allowed, zero, torch.finfo(dtype).min)


def flex_mask_mod(layout: Layout, window: int | None = None) -> Callable[..., torch.Tensor]:
    """FlexAttention mask_mod(b, h, q_idx, kv_idx) applying `visible` to the layout's ids."""
    doc, branch, pos = layout.doc_ids, layout.branch_ids, layout.position_ids

    def mask_mod(b: Any, h: Any, q_idx: Any, kv_idx: Any) -> torch.Tensor:
        return visible(
            doc[b, q_idx],
            doc[b, kv_idx],
            branch[b, q_idx],
            branch[b, kv_idx],
            q_idx,
            kv_idx,
            pos[b, q_idx],
            pos[b, kv_idx],
            window,
        )

    return mask_mod


def flex_block_mask(layout: Layout, window: int | None = None, block_size: int = 128) -> Any:
    """A FlexAttention BlockMask for the layout, built once per batch on the layout's device."""
    from torch.nn.attention.flex_attention import create_block_mask

    B, L = layout.shape
    return create_block_mask(
        flex_mask_mod(layout, window),
        B,
        None,
        L,
        L,
        device=str(layout.doc_ids.device),
        BLOCK_SIZE=block_size,
    )


@dataclass
class VarlenPlan:
    """How to run attention as independent causal blocks over gathered tokens.

    The row batch is flattened to B * L tokens. Block j has queries
    q_index[cu_q[j]:cu_q[j+1]] and keys kv_index[cu_k[j]:cu_k[j+1]]; the queries are the last
    tokens of the keys, so a causal kernel aligned bottom-right (flash-attn >= 2.1 with
    seqlen_q != seqlen_k) lets query i see keys up to (K - Q + i). Blocks: each document's
    prompt (queries = keys = prompt); each response (queries = the response, keys =
    [prompt ; response]); the row's trailing padding (causal among itself). `q_index` is a permutation of all B * L
    positions, so the output scatters back without gaps. The positions of the gathered keys
    run contiguously (prompt then own branch), so a left window of w - 1 keys is the rule's
    position window.
    """

    q_index: torch.Tensor  # (B*L,) long
    kv_index: torch.Tensor  # (K_total,) long
    cu_seqlens_q: torch.Tensor  # (num_blocks + 1,) int32
    cu_seqlens_k: torch.Tensor  # (num_blocks + 1,) int32
    max_seqlen_q: int
    max_seqlen_k: int

    def to(self, device: torch.device | str) -> VarlenPlan:
        return VarlenPlan(
            self.q_index.to(device),
            self.kv_index.to(device),
            self.cu_seqlens_q.to(device),
            self.cu_seqlens_k.to(device),
            self.max_seqlen_q,
            self.max_seqlen_k,
        )


def varlen_plan(layout: Layout) -> VarlenPlan:
    """Derive the block plan from doc/branch ids (computed on the CPU, once per batch)."""
    doc = layout.doc_ids.cpu().tolist()
    branch = layout.branch_ids.cpu().tolist()
    B, L = layout.shape
    q_blocks: list[list[int]] = []
    k_blocks: list[list[int]] = []
    for b in range(B):
        t = 0
        while t < L:
            base = b * L
            d, start = doc[b][t], t
            while t < L and doc[b][t] == d:
                t += 1
            if d == PAD_DOC:  # trailing padding: one causal block, as the rule has it
                pad = list(range(base + start, base + t))
                q_blocks.append(pad)
                k_blocks.append(pad)
                continue
            prompt = [base + i for i in range(start, t) if branch[b][i] == 0]
            q_blocks.append(prompt)
            k_blocks.append(prompt)
            by_branch: dict[int, list[int]] = {}
            for i in range(start, t):
                if branch[b][i] != 0:
                    by_branch.setdefault(branch[b][i], []).append(base + i)
            for own in by_branch.values():
                q_blocks.append(own)
                k_blocks.append(prompt + own)
    cu_q = torch.tensor([0] + [len(q) for q in q_blocks]).cumsum(0).to(torch.int32)
    cu_k = torch.tensor([0] + [len(k) for k in k_blocks]).cumsum(0).to(torch.int32)
    return VarlenPlan(
        q_index=torch.tensor([i for q in q_blocks for i in q], dtype=torch.long),
        kv_index=torch.tensor([i for k in k_blocks for i in k], dtype=torch.long),
        cu_seqlens_q=cu_q,
        cu_seqlens_k=cu_k,
        max_seqlen_q=max(len(q) for q in q_blocks),
        max_seqlen_k=max(len(k) for k in k_blocks),
    )


def varlen_plan_dense(plan: VarlenPlan, B: int, L: int, window: int | None = None) -> torch.Tensor:
    """The (B, L, L) mask a plan implies under a bottom-right causal kernel (for tests)."""
    out = torch.zeros(B * L, B * L, dtype=torch.bool)
    cq, ck = plan.cu_seqlens_q.tolist(), plan.cu_seqlens_k.tolist()
    for j in range(len(cq) - 1):
        qs = plan.q_index[cq[j] : cq[j + 1]]
        ks = plan.kv_index[ck[j] : ck[j + 1]]
        Q, K = len(qs), len(ks)
        i = torch.arange(Q)[:, None]
        x = torch.arange(K)[None, :]
        allowed = x <= i + (K - Q)
        if window is not None:
            allowed &= x > i + (K - Q) - window
        out[qs[:, None], ks[None, :]] = allowed
    blocks = out.view(B, L, B, L)
    return torch.stack([blocks[b, :, b, :] for b in range(B)])


def layer_masks(
    layer_types: list[str] | None,
    sliding_window: int | None,
    encode: Callable[[int | None], Any],
) -> Any:
    """The `attention_mask` argument for a model: one mask, or a dict per layer type.

    Hybrid models (a config with `layer_types`: Gemma2/3, Qwen2/3, ...) read
    `attention_mask[layer_type]`; a single mask there would drop the window on every layer.
    Single-type models with a `sliding_window` (Mistral, Phi3, Starcoder2) get it baked in.
    """
    if layer_types is not None:
        return {t: encode(sliding_window if t == SLIDING else None) for t in set(layer_types)}
    return encode(sliding_window)
