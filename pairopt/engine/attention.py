"""Backends: how the mask rule reaches a transformers model's attention.

| backend | attn_implementation | attention_mask passed                  | extra model kwarg        |
|---------|---------------------|----------------------------------------|--------------------------|
| sdpa    | "sdpa"              | (B, 1, L, L) bool (or a dict per type) | -                        |
| eager   | "eager"             | (B, 1, L, L) additive float            | -                        |
| flex    | "flex_attention"    | BlockMask (or a dict per layer type)   | -                        |
| varlen  | "pairopt_varlen"    | empty (B, 1, 0, 0) bool: builds none   | pairopt_varlen_plan=plan |

transformers returns a 4D tensor or BlockMask given as `attention_mask` unchanged, and passes
extra model kwargs down to the registered attention function. The varlen function is
registered under a name without "flash" in it: transformers 5.x tries to fetch a hub kernel for
such names. Its kernel is flash-attn's `flash_attn_varlen_func` when installed, else torch's
`varlen_attn` on CUDA, else a pure-torch emulation (CPU; tests the plan end to end).

`backend="auto"` rule (`auto_backend`; measurements in docs/benchmarks.md): `varlen` where a
kernel computes only the visible blocks (CUDA in half precision with flash-attn or torch's
varlen_attn; the CPU unless a softcap or sliding window needs the slow emulation), else `flex`
on CUDA, else `sdpa`, else `eager` (Gemma2's softcap). FlexAttention has no backward on the CPU.
"""

from __future__ import annotations

import importlib.util
import inspect
import logging
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pairopt.engine.layout import Layout
from pairopt.engine.masks import (
    VarlenPlan,
    eager_mask,
    flex_mask_mod,
    layer_masks,
    sdpa_mask,
    varlen_plan,
    visible,
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


def _torch_varlen_available() -> bool:
    """torch's own varlen kernel (CUDA), with the `window_size` argument (torch >= 2.10)."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return False
    return "window_size" in inspect.signature(varlen_attn).parameters


def _needs_emulation(model: nn.Module) -> bool:
    """True when the varlen path would fall back to the slow pure-torch emulation on the CPU:
    a softcap (Gemma2) or a sliding window in effect on some layer."""
    config: Any = model.config
    if getattr(config, "attn_logit_softcapping", None) is not None:
        return True
    if getattr(config, "sliding_window", None) is None:
        return False
    layer_types = getattr(config, "layer_types", None)
    return layer_types is None or "sliding_attention" in layer_types


def auto_backend(model: nn.Module) -> str:
    """The rule behind backend="auto" (measurements: docs/benchmarks.md).

    varlen, where a kernel computes only the visible blocks (each response's queries against
    [prompt ; own] keys) and the model routes attention through transformers' interface:
      - CUDA with half-precision weights and flash-attn installed or torch's varlen_attn
        (flash kernels need fp16/bf16; torch's takes no softcap);
      - the CPU without softcap or sliding window (one fused sdpa call per block; measured
        1.5-5x faster than the dense mask on packed rows, whose cost grows with L^2 however
        much of the row is masked).
    Else flex on CUDA (block-sparse, compiled), else sdpa, else eager.
    """
    device = _device(model)
    dtype = next(model.parameters()).dtype
    routed = getattr(model, "_supports_attention_backend", False)
    config: Any = model.config
    softcap = getattr(config, "attn_logit_softcapping", None) is not None
    if device.type == "cuda":
        half = dtype in (torch.float16, torch.bfloat16)
        kernel = flash_attn_available() or (_torch_varlen_available() and not softcap)
        if routed and half and kernel:
            return "varlen"
        if getattr(model, "_supports_flex_attn", False):
            return "flex"
    elif routed and not _needs_emulation(model):
        return "varlen"
    return "sdpa" if getattr(model, "_supports_sdpa", False) else "eager"


def resolve_backend(model: nn.Module, backend: str) -> str:
    """Turn "auto" into a concrete backend and check that the choice can run here."""
    if backend not in (*BACKENDS, "auto"):
        raise PairoptError(
            f"unknown backend {backend!r}: choose one of auto, {', '.join(BACKENDS)}."
        )
    cuda = _device(model).type == "cuda"
    if backend == "auto":
        chosen = auto_backend(model)
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
        # An empty 4D tensor: transformers returns any 4D mask unchanged, so it builds none
        # (the plan is the mask); the varlen function ignores it.
        empty = layout.input_ids.new_zeros((layout.shape[0], 1, 0, 0), dtype=torch.bool)
        inputs = {"attention_mask": empty, "pairopt_varlen_plan": plan}
        if plan.q_index.device.type == "cpu":
            inputs["pairopt_cpu_schedule"] = cpu_schedule(plan)
        return inputs
    if backend == "sdpa":
        mask = layer_masks(layer_types, window, lambda w: sdpa_mask(layout, w))
    elif backend == "eager":
        dtype = next(model.parameters()).dtype
        mask = layer_masks(layer_types, window, lambda w: eager_mask(layout, dtype, w))
    else:
        mask = layer_masks(layer_types, window, lambda w: flex_block_mask_chunked(layout, w))
    return {"attention_mask": mask}


def flex_block_mask_chunked(
    layout: Layout, window: int | None = None, block_size: int = 128, rows: int = 1024
) -> Any:
    """The BlockMask of `masks.flex_block_mask`, built without an (L, L) tensor.

    `create_block_mask` evaluates the rule on the whole (B, L, L) grid at once, with several
    int64 temporaries of that size: gigabytes for one packed row of 20k tokens. Here the rule
    runs `rows` queries at a time on the layout's device, each chunk is reduced to its blocks
    (any visible pair: computed; all visible: a full block, no mask_mod needed), and the
    BlockMask is assembled from the block lists. Blocks that straddle the row end count as
    partial, which is exact (the mask_mod decides there). Tested equal to flex_block_mask.
    """
    from torch.nn.attention.flex_attention import BlockMask

    B, L = layout.shape
    doc, branch, pos = layout.doc_ids, layout.branch_ids, layout.position_ids  # (B, L)
    n = -(-L // block_size)  # blocks per side
    idx = torch.arange(L, device=doc.device)
    any_BQK = torch.zeros(B, n, n, dtype=torch.bool, device=doc.device)
    all_BQK = torch.zeros_like(any_BQK)
    step = max(1, rows // block_size) * block_size
    for start in range(0, L, step):
        stop = min(L, start + step)
        allowed = visible(  # (B, r, L)
            doc[:, start:stop, None],
            doc[:, None, :],
            branch[:, start:stop, None],
            branch[:, None, :],
            idx[start:stop, None],
            idx[None, :],
            pos[:, start:stop, None],
            pos[:, None, :],
            window,
        )
        r = -(-(stop - start) // block_size)
        allowed = F.pad(allowed, (0, n * block_size - L, 0, r * block_size - (stop - start)))
        blocks = allowed.view(B, r, block_size, n, block_size)
        q0 = start // block_size
        any_BQK[:, q0 : q0 + r] = blocks.any(dim=4).any(dim=2)
        all_BQK[:, q0 : q0 + r] = blocks.all(dim=4).all(dim=2)

    def ordered(dense_BQK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # (B, 1, n) block counts and (B, 1, n, n) kv-block indices, the listed ones first
        num = dense_BQK.sum(-1).to(torch.int32)
        order = torch.argsort(dense_BQK.to(torch.int8), dim=-1, descending=True, stable=True)
        return num[:, None], order.to(torch.int32)[:, None]

    kv_num, kv_indices = ordered(any_BQK & ~all_BQK)
    full_num, full_indices = ordered(all_BQK)
    return BlockMask.from_kv_blocks(
        kv_num,
        kv_indices,
        full_num,
        full_indices,
        BLOCK_SIZE=block_size,
        mask_mod=flex_mask_mod(layout, window),
        seq_lengths=(L, L),
    )


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
