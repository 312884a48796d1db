"""Which models the shared forward is exact for, and dropout (which would break exactness).

A model can run the prefix-shared forward only if every token mixes with others solely through
attention that honours our mask. Refused (found by experiment, see ENGINE-NOTES.md):
ALiBi models build their bias from a 2D mask (Bloom, MPT); Falcon ignores custom attention
functions; GPT-Neo bypasses the interface; recurrent / linear-attention layers carry state from
the chosen branch into the rejected one (Mamba, Jamba, Qwen3-Next, Falcon-H1, LFM2, ...).
"""

from __future__ import annotations

import warnings
from typing import Any

from torch import nn

from pairopt.errors import PairoptError, UnsupportedModelError

_ALIBI = "its ALiBi position bias is built from a 2D padding mask, not from our 4D mask"
_RECURRENT = "its recurrent / linear-attention layers would carry the chosen branch's state into the rejected branch"
REFUSED_MODEL_TYPES = {
    "bloom": _ALIBI,
    "mpt": _ALIBI,
    "falcon": "it ignores custom attention functions and misreads boolean masks",
    "gpt_neo": "its attention does not go through transformers' attention interface",
    "mamba": _RECURRENT,
    "mamba2": _RECURRENT,
    "falcon_mamba": _RECURRENT,
    "jamba": _RECURRENT,
    "bamba": _RECURRENT,
    "zamba": _RECURRENT,
    "zamba2": _RECURRENT,
    "falcon_h1": _RECURRENT,
    "granitemoehybrid": _RECURRENT,
    "nemotron_h": _RECURRENT,
    "lfm2": _RECURRENT,
    "lfm2_moe": _RECURRENT,
    "qwen3_next": _RECURRENT,
    "recurrent_gemma": _RECURRENT,
    "rwkv": _RECURRENT,
    "xlstm": _RECURRENT,
    "minimax": _RECURRENT,
}
# Layer types whose attention our masks describe; anything else (linear_attention, mamba,
# chunked_attention, ...) is refused.
MASKABLE_LAYER_TYPES = {"full_attention", "sliding_attention"}

_DROPOUT_ATTRS = ("attention_dropout", "attn_dropout", "attn_pdrop", "dropout")


def _model_name(model: nn.Module) -> str:
    model_type = getattr(getattr(model, "config", None), "model_type", "?")
    return f"{type(model).__name__} (model_type '{model_type}')"


def unsupported_reason(model: nn.Module) -> str | None:
    """Why this model cannot be masked by the rule of pairopt.engine.masks, or None if it can."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type in REFUSED_MODEL_TYPES:
        return REFUSED_MODEL_TYPES[model_type]
    if getattr(config, "alibi", False) or getattr(config, "position_embedding_type", "") == "alibi":
        return _ALIBI
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        unknown = sorted(set(layer_types) - MASKABLE_LAYER_TYPES)
        if unknown:
            return f"it has layers of type {unknown}, which a token mask cannot describe"
    if not getattr(model, "_supports_attention_backend", False):
        return "it does not route attention through transformers' attention interface"
    return None


def check_shareable(model: nn.Module) -> None:
    """Raise UnsupportedModelError, before any work, if the shared/packed forward would be wrong."""
    reason = unsupported_reason(model)
    if reason is not None:
        raise UnsupportedModelError(
            f"{_model_name(model)} cannot run the prefix-shared or packed forward exactly: "
            f"{reason}. Use share_prefix=False and packing=False (the classic unshared "
            "computation) for this model."
        )


def active_dropout(model: nn.Module) -> list[str]:
    """Names of the places where dropout is active (only in train mode)."""
    found = []
    for name, module in model.named_modules():
        if not module.training:
            continue
        if isinstance(module, nn.Dropout) and module.p > 0:
            found.append(name or type(module).__name__)
        for attr in _DROPOUT_ATTRS:
            value = getattr(module, attr, None)
            if isinstance(value, float) and value > 0:
                found.append(f"{name}.{attr}")
    return found


def check_dropout(model: nn.Module) -> None:
    places = active_dropout(model)
    if places:
        shown = ", ".join(places[:3]) + (f" and {len(places) - 3} more" if len(places) > 3 else "")
        raise PairoptError(
            f"{_model_name(model)} is in train mode with dropout active ({shown}): the shared "
            "forward would draw different noise than the unshared one, so its log-probs would "
            "not be those of the classic computation. Call pairopt.disable_dropout(model) "
            "first (the trainer does), or model.eval()."
        )


def disable_dropout(model: Any) -> int:
    """Set every dropout probability in `model` to 0 and warn if any was non-zero.

    Returns how many places were changed. The config is left as it was, so a saved model keeps
    its authors' dropout settings for other uses.
    """
    changed = 0
    for module in model.modules():
        if isinstance(module, nn.Dropout) and module.p > 0:
            module.p = 0.0
            changed += 1
        for attr in _DROPOUT_ATTRS:
            value = getattr(module, attr, None)
            if isinstance(value, float) and value > 0:
                setattr(module, attr, 0.0)
                changed += 1
    if changed:
        warnings.warn(
            f"pairopt: switched off dropout in {changed} places of {_model_name(model)}; the "
            "prefix-shared forward is exact only without dropout.",
            stacklevel=2,
        )
    return changed
