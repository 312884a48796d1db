"""The varlen backend on the CPU: a plan's blocks run as fused sdpa calls with no masked work.

`cpu_schedule(plan)` turns a `VarlenPlan` into fewer, cheaper blocks (see `CpuSchedule`);
`cpu_blocks_attention` runs them. Naive equivalent, and what the tests compare against:
`pairopt.engine.varlen.varlen_emulation` on the plan (one explicitly masked block at a time).
Used by `pairopt.engine.varlen.varlen_attention` when the plan's tensors are on the CPU and no
sliding window or softcap applies.

Shapes: Q queries and K keys of one block, H heads, D head size, P prompt tokens of a block.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from pairopt.engine.masks import VarlenPlan

CAUSAL, SPLIT, MASKED = "causal", "split", "masked"


def _flash_cpu_ops() -> tuple[Any, Any] | None:
    """torch's fused CPU attention forward (returning the log-sum-exp) and its backward."""
    aten = torch.ops.aten
    try:
        return (
            aten._scaled_dot_product_flash_attention_for_cpu.default,
            aten._scaled_dot_product_flash_attention_for_cpu_backward.default,
        )
    except (AttributeError, RuntimeError):  # an older torch: the masked path stands in
        return None


class PromptOwnAttention(torch.autograd.Function):
    """Attention of a later response's queries over [prompt ; own] keys, bottom-right causal,
    in two fused CPU calls with no masked work: the prompt keys all visible, the own keys
    causal (square). The parts merge by their log-sum-exp; the backward runs each part's fused
    backward with the *merged* output and log-sum-exp, which gives exactly each part's share of
    the gradient (the split-KV scheme of FlashAttention).
    Naive equivalent: one sdpa call over [prompt ; own] with a bottom-right causal mask.
    q, k_own, v_own: (1, H, Q, D); k_prompt, v_prompt: (1, H, P, D) -> (1, H, Q, D)."""

    @staticmethod
    def forward(
        ctx: Any,
        q: torch.Tensor,
        k_prompt: torch.Tensor,
        v_prompt: torch.Tensor,
        k_own: torch.Tensor,
        v_own: torch.Tensor,
        scale: float,
    ) -> torch.Tensor:
        fwd, _ = _flash_cpu_ops()  # type: ignore[misc]
        out_p, lse_p = fwd(q, k_prompt, v_prompt, 0.0, False, scale=scale)  # lse: (1, H, Q)
        out_o, lse_o = fwd(q, k_own, v_own, 0.0, True, scale=scale)
        lse = torch.logaddexp(lse_p, lse_o)
        out = out_p * (lse_p - lse).exp()[..., None].to(q.dtype)
        out = out + out_o * (lse_o - lse).exp()[..., None].to(q.dtype)
        ctx.save_for_backward(q, k_prompt, v_prompt, k_own, v_own, out, lse)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        _, bwd = _flash_cpu_ops()  # type: ignore[misc]
        q, k_prompt, v_prompt, k_own, v_own, out, lse = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        dq_p, dk_p, dv_p = bwd(
            grad_out, q, k_prompt, v_prompt, out, lse, 0.0, False, scale=ctx.scale
        )
        dq_o, dk_o, dv_o = bwd(grad_out, q, k_own, v_own, out, lse, 0.0, True, scale=ctx.scale)
        return dq_p + dq_o, dk_p, dv_p, dk_o, dv_o, None


@dataclass
class CpuSchedule:
    """How the CPU walks a VarlenPlan: fewer blocks, no masked work, the same numbers.

    The CPU has no bottom-right causal kernel that skips masked work: a (Q, K) block with an
    explicit mask costs Q * K, while `is_causal=True` on a square block skips its upper
    triangle. So, per plan block (flat token indices; queries are the last tokens of the keys):
    - a prompt block followed by its first response ([prompt ; own] keys) merges into one square
      causal block over [prompt ; own]: exactly the prompt's and that response's attention;
    - a later response (Q queries, K = P + Q keys) runs as `PromptOwnAttention` (SPLIT: P * Q
      + Q^2 / 2, nothing wasted); without torch's fused CPU ops, as a square causal block over
      all K positions keeping the last Q rows when its prompt is shorter than it (waste
      P^2 / 2), else with an explicit bottom-right mask (MASKED, waste Q^2 / 2);
    - any other block (padding) is square causal as it stands.
    Concatenating the kept rows gives the outputs in the plan's q_index order.
    """

    q_src: torch.Tensor  # (sum q_sizes,) flat indices of every block's queries
    k_src: torch.Tensor  # (sum k_sizes,) flat indices of every block's keys
    q_sizes: list[int]
    k_sizes: list[int]
    keep: list[int]  # rows kept: the last `keep` query rows of each block
    kind: list[str]  # CAUSAL (square, is_causal), SPLIT (PromptOwnAttention) or MASKED


def cpu_schedule(plan: VarlenPlan) -> CpuSchedule:
    """Derive the CPU schedule from a plan (Python over the plan's indices, once per batch)."""
    cq, ck = plan.cu_seqlens_q.tolist(), plan.cu_seqlens_k.tolist()
    qi, ki = plan.q_index.tolist(), plan.kv_index.tolist()
    blocks = [(qi[cq[j] : cq[j + 1]], ki[ck[j] : ck[j + 1]]) for j in range(len(cq) - 1)]
    split = _flash_cpu_ops() is not None
    q_src: list[int] = []
    k_src: list[int] = []
    sched = CpuSchedule(torch.empty(0), torch.empty(0), [], [], [], [])

    def add(queries: list[int], keys: list[int], keep: int, kind: str) -> None:
        q_src.extend(queries)
        k_src.extend(keys)
        sched.q_sizes.append(len(queries))
        sched.k_sizes.append(len(keys))
        sched.keep.append(keep)
        sched.kind.append(kind)

    j = 0
    while j < len(blocks):
        q, k = blocks[j]
        if q == k and j + 1 < len(blocks):
            q2, k2 = blocks[j + 1]
            if len(k2) == len(k) + len(q2) and k2[: len(k)] == k and k2[len(k) :] == q2:
                add(k2, k2, len(k2), CAUSAL)  # prompt + first response, one square block
                j += 2
                continue
        Q, K = len(q), len(k)
        own = k[K - Q :] == q  # the queries are the last keys (always, for a plan's blocks)
        if Q == K:
            add(k, k, Q, CAUSAL)
        elif split and own:
            add(q, k, Q, SPLIT)
        elif own and K - Q < Q:
            add(k, k, Q, CAUSAL)  # square causal, keep the last Q rows
        else:
            add(q, k, Q, MASKED)
        j += 1
    sched.q_src = torch.tensor(q_src, dtype=torch.long)
    sched.k_src = torch.tensor(k_src, dtype=torch.long)
    return sched


def cpu_blocks_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sched: CpuSchedule, scale: float
) -> torch.Tensor:
    """Run a schedule: q (sum q_sizes, H, D) gathered at q_src, k/v (sum k_sizes, H, D) at
    k_src, heads repeated for GQA -> (B*L, H, D) in the plan's q_index order. Fused CPU
    attention calls per block; no window, no softcap (the emulation does those).
    Naive equivalent: `varlen_emulation` on the plan."""
    out = []
    # One split per tensor, not a slice per block: the backward of a split is one cat, while
    # each slice's backward would allocate and add a zero tensor of the full size.
    blocks = zip(
        q.split(sched.q_sizes), k.split(sched.k_sizes), v.split(sched.k_sizes), strict=True
    )
    for (q_QHD, k_KHD, v_KHD), keep, kind in zip(blocks, sched.keep, sched.kind, strict=True):
        qb = q_QHD.transpose(0, 1)[None]  # (1, H, Q, D)
        kb = k_KHD.transpose(0, 1)[None]  # (1, H, K, D)
        vb = v_KHD.transpose(0, 1)[None]
        Q, K = qb.shape[2], kb.shape[2]
        if kind == SPLIT and (
            torch.is_autocast_enabled("cpu")
            or not qb.dtype == kb.dtype == vb.dtype
            or qb.dtype not in (torch.float32, torch.float64)
        ):
            # The raw fused op bypasses autocast and takes one dtype; its log-sum-exp merge is
            # checked in fp32/fp64 only. sdpa with the explicit mask handles the rest.
            kind = MASKED
        if kind == SPLIT:
            P = K - Q
            ob = PromptOwnAttention.apply(
                qb.contiguous(),
                kb[:, :, :P].contiguous(),
                vb[:, :, :P].contiguous(),
                kb[:, :, P:].contiguous(),
                vb[:, :, P:].contiguous(),
                scale,
            )
        elif kind == MASKED:
            i = torch.arange(Q, device=q.device)[:, None]
            x = torch.arange(K, device=q.device)[None, :]
            allowed = x <= i + (K - Q)  # (Q, K) bottom-right aligned causal
            ob = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=allowed, scale=scale)
        else:
            ob = F.scaled_dot_product_attention(qb, kb, vb, is_causal=True, scale=scale)
        out.append(ob[0, :, Q - keep :].transpose(0, 1))  # (keep, H, D)
    return torch.cat(out)
