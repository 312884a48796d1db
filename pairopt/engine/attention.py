"""Backends: how the mask rule reaches a transformers model's attention.

| backend | attn_implementation | attention_mask passed                  | extra model kwarg        |
|---------|---------------------|----------------------------------------|--------------------------|
| sdpa    | "sdpa"              | (B, 1, L, L) bool (or a dict per type) | -                        |
| eager   | "eager"             | (B, 1, L, L) additive float            | -                        |
| flex    | "flex_attention"    | BlockMask (or a dict per layer type)   | -                        |
| varlen  | "pairopt_varlen"    | None                                   | pairopt_varlen_plan=plan |

transformers returns a 4D tensor or BlockMask given as `attention_mask` unchanged, and passes
extra model kwargs down to the registered attention function. The varlen function is
registered under a name without "flash" in it: transformers 5.x tries to fetch a hub kernel for
such names. Its kernel is flash-attn's `flash_attn_varlen_func` when installed, else torch's
`varlen_attn` on CUDA, else a pure-torch emulation (CPU; tests the plan end to end).

`backend="auto"` rule (documented in docs/engine.md): on CUDA, `varlen` when flash-attn is
installed (fastest measured kernel family, no masked blocks computed), else `flex` when the
model supports it, else `sdpa`; on the CPU, `sdpa`, or `eager` for models without an sdpa path
(Gemma2's softcap). FlexAttention has no backward on the CPU.
"""

from __future__ import annotations

import importlib.util
import inspect
import logging
from typing import Any

import torch
from torch import nn

from pairopt.engine.layout import Layout
from pairopt.engine.masks import (
    VarlenPlan,
    eager_mask,
    flex_block_mask,
    layer_masks,
    sdpa_mask,
    varlen_plan,
)
from pairopt.errors import PairoptError

logger = logging.getLogger("pairopt")

BACKENDS = ("sdpa", "eager", "flex", "varlen")
VARLEN_NAME = "pairopt_varlen"
_IMPLEMENTATION = {
    "sdpa": "sdpa",
    "eager": "eager",
    "flex": "flex_attention",
    "varlen": VARLEN_NAME,
}


def flash_attn_available() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def resolve_backend(model: nn.Module, backend: str) -> str:
    """Turn "auto" into a concrete backend and check that the choice can run here."""
    if backend not in (*BACKENDS, "auto"):
        raise PairoptError(
            f"unknown backend {backend!r}: choose one of auto, {', '.join(BACKENDS)}."
        )
    cuda = _device(model).type == "cuda"
    if backend == "auto":
        if cuda and flash_attn_available():
            chosen = "varlen"
        elif cuda and getattr(model, "_supports_flex_attn", False):
            chosen = "flex"
        else:
            chosen = "sdpa" if getattr(model, "_supports_sdpa", False) else "eager"
        if getattr(model, "_pairopt_auto_backend", None) != chosen:
            logger.info("pairopt: backend='auto' chose %r for %s", chosen, type(model).__name__)
            model._pairopt_auto_backend = chosen  # type: ignore[assignment]  # log once per model
        return chosen
    if backend == "sdpa" and not getattr(model, "_supports_sdpa", False):
        raise PairoptError(f"{type(model).__name__} has no sdpa attention: use backend='eager'.")
    if backend == "flex":
        if not getattr(model, "_supports_flex_attn", False):
            raise PairoptError(f"{type(model).__name__} has no FlexAttention path: use 'sdpa'.")
        if not cuda and torch.is_grad_enabled():
            raise PairoptError(
                "backend='flex' has no backward on the CPU (torch raises for inputs that require "
                "grad): use backend='sdpa' on the CPU, or run under torch.no_grad()."
            )
    return backend


def set_implementation(model: nn.Module, backend: str) -> None:
    """Switch the model's attention implementation to the backend's (left so afterwards:
    gradient checkpointing re-runs the forward during backward and must see the same one)."""
    name = _IMPLEMENTATION[backend]
    if backend == "varlen":
        register_varlen()
    if model.config._attn_implementation != name:  # type: ignore[union-attr]
        model.set_attn_implementation(name)  # type: ignore[operator]


def model_inputs(model: nn.Module, layout: Layout, backend: str) -> dict[str, Any]:
    """The keyword arguments that carry the mask rule into `model.base_model(...)`."""
    config: Any = model.config
    layer_types = getattr(config, "layer_types", None)
    window = getattr(config, "sliding_window", None)
    if backend == "varlen":
        plan = varlen_plan(layout).to(layout.input_ids.device)
        return {"attention_mask": None, "pairopt_varlen_plan": plan}
    if backend == "sdpa":
        mask = layer_masks(layer_types, window, lambda w: sdpa_mask(layout, w))
    elif backend == "eager":
        dtype = next(model.parameters()).dtype
        mask = layer_masks(layer_types, window, lambda w: eager_mask(layout, dtype, w))
    else:
        mask = layer_masks(layer_types, window, lambda w: flex_block_mask(layout, w))
    return {"attention_mask": mask}


# ----------------------------------------------------------------------------- varlen backend


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
    sliding_window: int | None = None,
    softcap: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers attention function: query (B, Hq, L, D), key/value (B, Hkv, L, D) ->
    (B, L, Hq, D). Gathers tokens per the plan, runs the varlen kernel, scatters back."""
    plan = pairopt_varlen_plan
    if plan is None:
        raise PairoptError(
            "the pairopt_varlen attention needs a plan: call it through pairopt.compute_logps."
        )
    if dropout:
        raise PairoptError("attention dropout is not supported by the shared forward.")
    B, Hq, L, D = query.shape
    Hkv = key.shape[1]
    scale = D**-0.5 if scaling is None else scaling
    q = query.transpose(1, 2).reshape(B * L, Hq, D)[plan.q_index]  # (B*L, Hq, D) permuted
    k = key.transpose(1, 2).reshape(B * L, Hkv, D)[plan.kv_index]  # (K_total, Hkv, D)
    v = value.transpose(1, 2).reshape(B * L, Hkv, D)[plan.kv_index]
    out = _kernel(q, k, v, plan, scale, sliding_window, softcap)  # (B*L, Hq, D)
    result = torch.empty_like(out).index_copy(0, plan.q_index, out)  # undo the permutation
    return result.view(B, L, Hq, D), None


def register_varlen() -> None:
    """Register the varlen function with transformers, once. No mask function is registered
    for the name on purpose: transformers then builds no mask at all (the plan is the mask)."""
    from transformers import AttentionInterface

    if VARLEN_NAME not in AttentionInterface._global_mapping:
        AttentionInterface.register(VARLEN_NAME, varlen_attention)
