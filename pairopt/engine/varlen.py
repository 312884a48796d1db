"""The varlen backend: attention as independent causal blocks over gathered tokens.

`varlen_attention` is the function registered with transformers' `AttentionInterface` under
`VARLEN_NAME` (no "flash" in the name: transformers 5.x tries to fetch a hub kernel for such
names). Given the batch's `VarlenPlan` (pairopt.engine.masks) as a model kwarg, it gathers each
block's queries and keys, runs a bottom-right-aligned causal kernel and scatters the output
back. Kernels, in order: flash-attn's `flash_attn_varlen_func` (CUDA), torch's `varlen_attn`
(CUDA, no softcap), the fused CPU schedule (pairopt.engine.varlen_cpu), and a pure-torch
emulation (`varlen_emulation`: any device, softcap and window; slow; the naive equivalent the
others are tested against).
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import logging
from typing import Any

import torch
from torch import nn

from pairopt.engine.masks import VarlenPlan
from pairopt.engine.varlen_cpu import CpuSchedule, cpu_blocks_attention
from pairopt.errors import PairoptError

VARLEN_NAME = "pairopt_varlen"
logger = logging.getLogger("pairopt")


@functools.cache
def flash_attn_available() -> bool:
    """flash-attn is usable here: it imports and a tiny varlen call runs on this GPU.

    Checked once per process. A broken install (built for another CUDA or torch) raises at
    import or at its first call; found here, the varlen backend falls back to torch's kernel
    instead of failing inside the model's forward.
    """
    if importlib.util.find_spec("flash_attn") is None or not torch.cuda.is_available():
        return False
    try:
        from flash_attn import flash_attn_varlen_func

        q = torch.zeros(4, 1, 64, device="cuda", dtype=torch.bfloat16)
        cu = torch.tensor([0, 4], device="cuda", dtype=torch.int32)
        flash_attn_varlen_func(q, q, q, cu, cu, 4, 4, causal=True)
        torch.cuda.synchronize()
    except Exception as err:
        logger.warning(
            "pairopt: flash-attn is installed but cannot run here (%s: %s); the varlen backend "
            "uses torch's kernels instead",
            type(err).__name__,
            err,
        )
        return False
    return True


def torch_varlen_available() -> bool:
    """torch's own varlen kernel (CUDA), with the `window_size` argument (torch >= 2.10)."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return False
    return "window_size" in inspect.signature(varlen_attn).parameters


def varlen_emulation(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_q: torch.Tensor,
    cu_k: torch.Tensor,
    scale: float,
    window: int | None,
    softcap: float | None,
) -> torch.Tensor:
    """Pure-torch equivalent of flash_attn_varlen_func(causal=True), bottom-right aligned.

    q: (Tq, H, D), k/v: (Tk, H, D) with heads already repeated for GQA. One block at a time;
    slow, for the CPU and for tests of the plan.
    """
    out = []
    cq, ck = cu_q.tolist(), cu_k.tolist()
    for j in range(len(cq) - 1):
        qb, kb, vb = q[cq[j] : cq[j + 1]], k[ck[j] : ck[j + 1]], v[ck[j] : ck[j + 1]]
        Q, K = qb.shape[0], kb.shape[0]
        scores = torch.einsum("qhd,khd->hqk", qb, kb).float() * scale  # (H, Q, K)
        if softcap is not None:
            scores = softcap * torch.tanh(scores / softcap)
        i = torch.arange(Q, device=q.device)[:, None]
        x = torch.arange(K, device=q.device)[None, :]
        allowed = x <= i + (K - Q)
        if window is not None:
            allowed = allowed & (x > i + (K - Q) - window)
        probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1).to(vb.dtype)
        out.append(torch.einsum("hqk,khd->qhd", probs, vb))
    return torch.cat(out)


def _kernel(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    plan: VarlenPlan,
    scale: float,
    window: int | None,
    softcap: float | None,
) -> torch.Tensor:
    left = -1 if window is None else window - 1  # flash counts the keys left of the diagonal
    if q.is_cuda and flash_attn_available():
        from flash_attn import flash_attn_varlen_func

        return flash_attn_varlen_func(
            q,
            k,
            v,
            plan.cu_seqlens_q,
            plan.cu_seqlens_k,
            plan.max_seqlen_q,
            plan.max_seqlen_k,
            softmax_scale=scale,
            causal=True,
            window_size=(left, 0),
            softcap=0.0 if softcap is None else softcap,
        )
    groups = q.shape[1] // k.shape[1]
    if q.is_cuda and softcap is None:
        from torch.nn.attention.varlen import varlen_attn

        # enable_gqa arrived in torch 2.12; repeat K/V heads on older releases.
        gqa = "enable_gqa" in inspect.signature(varlen_attn).parameters
        if groups > 1 and not gqa:
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        extra: dict[str, Any] = {"enable_gqa": True} if gqa and groups > 1 else {}
        return varlen_attn(  # type: ignore[return-value]
            q,
            k,
            v,
            plan.cu_seqlens_q,
            plan.cu_seqlens_k,
            plan.max_seqlen_q,
            plan.max_seqlen_k,
            scale=scale,
            window_size=(left, 0),
            **extra,
        )
    if groups > 1:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    return varlen_emulation(q, k, v, plan.cu_seqlens_q, plan.cu_seqlens_k, scale, window, softcap)


def varlen_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Any,
    scaling: float | None = None,
    dropout: float = 0.0,
    *,
    pairopt_varlen_plan: VarlenPlan | None = None,
    pairopt_cpu_schedule: CpuSchedule | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers attention function: query (B, Hq, L, D), key/value (B, Hkv, L, D) ->
    (B, L, Hq, D). Gathers tokens per the plan, runs the varlen kernel, scatters back."""
    plan = pairopt_varlen_plan
    if plan is None:
        # A plain model call after compute_logps left the model on this implementation
        # (generation, evaluation, another library's trainer): behave as sdpa does, with the
        # sdpa mask transformers built for this name (see register_varlen).
        if softcap is not None:
            raise PairoptError(
                "this model has an attention softcap, which sdpa cannot apply: call "
                "model.set_attn_implementation('eager') before using it outside pairopt."
            )
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    if dropout:
        raise PairoptError("attention dropout is not supported by the shared forward.")
    B, Hq, L, D = query.shape
    Hkv = key.shape[1]
    scale = D**-0.5 if scaling is None else scaling
    sched = pairopt_cpu_schedule
    if sched is not None and not query.is_cuda and sliding_window is None and softcap is None:
        q = query.transpose(1, 2).reshape(B * L, Hq, D)[sched.q_src]  # (sum q_sizes, Hq, D)
        k = key.transpose(1, 2).reshape(B * L, Hkv, D)[sched.k_src]  # (sum k_sizes, Hkv, D)
        v = value.transpose(1, 2).reshape(B * L, Hkv, D)[sched.k_src]
        if Hq != Hkv:
            k, v = k.repeat_interleave(Hq // Hkv, dim=1), v.repeat_interleave(Hq // Hkv, dim=1)
        out = cpu_blocks_attention(q, k, v, sched, scale)  # (B*L, Hq, D) in q_index order
        result = torch.empty_like(out).index_copy(0, plan.q_index, out)
        return result.view(B, L, Hq, D), None
    q = query.transpose(1, 2).reshape(B * L, Hq, D)[plan.q_index]  # (B*L, Hq, D) permuted
    k = key.transpose(1, 2).reshape(B * L, Hkv, D)[plan.kv_index]  # (K_total, Hkv, D)
    v = value.transpose(1, 2).reshape(B * L, Hkv, D)[plan.kv_index]
    out = _kernel(q, k, v, plan, scale, sliding_window, softcap)  # (B*L, Hq, D)
    result = torch.empty_like(out).index_copy(0, plan.q_index, out)  # undo the permutation
    return result.view(B, L, Hq, D), None


def register_varlen() -> None:
    """Register the varlen function with transformers, once, with sdpa's mask function: a plain
    model call then gets the usual sdpa mask and the sdpa path. compute_logps passes an empty
    4D mask instead, which transformers hands through untouched, so no mask is built there."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    if VARLEN_NAME not in AttentionInterface._global_mapping:
        AttentionInterface.register(VARLEN_NAME, varlen_attention)
    if VARLEN_NAME not in AttentionMaskInterface._global_mapping:
        AttentionMaskInterface.register(VARLEN_NAME, sdpa_mask)
