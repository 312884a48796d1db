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
such names; it lives in pairopt/engine/varlen.py (its CPU schedule in varlen_cpu.py).

`backend="auto"` rule (`auto_backend`; measurements in docs/benchmarks.md): `varlen` where a
kernel computes only the visible blocks (CUDA in half precision with flash-attn or torch's
varlen_attn; the CPU unless a softcap or sliding window needs the slow emulation), else `flex`
on CUDA, else `sdpa`, else `eager` (Gemma2's softcap). FlexAttention has no backward on the CPU.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pairopt.engine.layout import Layout
from pairopt.engine.masks import (
    eager_mask,
    flex_mask_mod,
    layer_masks,
    sdpa_mask,
    varlen_plan,
    visible,
)
from pairopt.engine.varlen import (
    VARLEN_NAME,
    flash_attn_available,
    register_varlen,
    torch_varlen_available,
)
from pairopt.engine.varlen_cpu import cpu_schedule
from pairopt.errors import PairoptError

logger = logging.getLogger("pairopt")

BACKENDS = ("sdpa", "eager", "flex", "varlen")
_IMPLEMENTATION = {
    "sdpa": "sdpa",
    "eager": "eager",
    "flex": "flex_attention",
    "varlen": VARLEN_NAME,
}


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def attention_softcap(model: nn.Module) -> float | None:
    """The model's softcap on attention logits (s·tanh(scores / s)), read from its config.

    Decided from the config, never from `_supports_sdpa`: Gemma2 declared `_supports_sdpa =
    True` in transformers 5.0-5.20.2, and transformers' sdpa path silently drops the softcap
    (log-probs 0.07-0.26 off the eager result on models with large q/k weights). Any config
    field named like `attn..softcap..` (Gemma2/3's `attn_logit_softcapping`, T5Gemma,
    VaultGemma) counts.
    """
    config: Any = getattr(model, "config", None)
    if config is None:
        return None
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for source in {id(config): config, id(text): text}.values():
        for name, value in vars(source).items():
            if "attn" in name and "softcap" in name and isinstance(value, int | float) and value:
                return float(value)
    return None


def _needs_emulation(model: nn.Module) -> bool:
    """True when the varlen path would fall back to the slow pure-torch emulation on the CPU:
    a softcap (Gemma2) or a sliding window in effect on some layer."""
    config: Any = model.config
    if attention_softcap(model) is not None:
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
    Else flex on CUDA (block-sparse, compiled), else sdpa, else eager. Never sdpa for a model
    with an attention softcap (`attention_softcap`): the sdpa kernel cannot apply it.
    """
    device = _device(model)
    dtype = next(model.parameters()).dtype
    routed = getattr(model, "_supports_attention_backend", False)
    softcap = attention_softcap(model) is not None
    if device.type == "cuda":
        half = dtype in (torch.float16, torch.bfloat16)
        kernel = flash_attn_available() or (torch_varlen_available() and not softcap)
        if routed and half and kernel:
            return "varlen"
        if getattr(model, "_supports_flex_attn", False):
            return "flex"
    elif routed and not _needs_emulation(model):
        return "varlen"
    return "sdpa" if getattr(model, "_supports_sdpa", False) and not softcap else "eager"


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
    softcap = attention_softcap(model)
    if backend == "sdpa" and softcap is not None:
        raise PairoptError(
            f"{type(model).__name__} caps its attention logits (softcap {softcap:g} in its "
            "config), which the sdpa kernel cannot apply: its log-probs would be wrong. Use "
            "backend='eager' (or 'flex' / 'varlen' on a GPU), or 'auto'."
        )
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


def model_inputs(
    model: nn.Module, layout: Layout, backend: str, host: Layout | None = None
) -> dict[str, Any]:
    """The keyword arguments that carry the mask rule into `model.base_model(...)`.

    `layout` is on the model's device; `host` is the same layout still on the CPU, where the
    varlen plan is derived (Python over its ids): deriving it from device tensors would copy
    them back and synchronise at every step. Dense masks and BlockMasks are built on the device.
    """
    config: Any = model.config
    layer_types = getattr(config, "layer_types", None)
    window = getattr(config, "sliding_window", None)
    if backend == "varlen":
        plan = varlen_plan(host if host is not None else layout)
        device = layout.input_ids.device
        # An empty 4D tensor: transformers returns any 4D mask unchanged, so it builds none
        # (the plan is the mask); the varlen function ignores it.
        empty = layout.input_ids.new_zeros((layout.shape[0], 1, 0, 0), dtype=torch.bool)
        inputs = {"attention_mask": empty, "pairopt_varlen_plan": plan.to(device)}
        if device.type == "cpu":
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
