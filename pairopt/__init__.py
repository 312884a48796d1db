"""pairopt: preference fine-tuning on paired data with an exact prefix-shared forward.

Importing pairopt is light: it loads torch and nothing else until a name is used, so the
engine runs where pydantic or datasets are absent (the loss registry and the trainer need them).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> module that defines it (PEP 562 lazy attributes)
_EXPORTS = {
    "PreferencePair": "pairopt.pairs",
    "ResponseGroup": "pairopt.pairs",
    "PairLogps": "pairopt.pairs",
    "ResponseLogps": "pairopt.pairs",
    "PairoptError": "pairopt.errors",
    "UnsupportedModelError": "pairopt.errors",
    "compute_logps": "pairopt.engine.forward",
    "compute_response_logps": "pairopt.engine.forward",
    "disable_dropout": "pairopt.engine.compat",
    "PairLoss": "pairopt.loss",
    "LossOutput": "pairopt.loss",
    "register_loss": "pairopt.loss",
    "build_loss": "pairopt.loss",
    "available_losses": "pairopt.loss",
    "get_loss_class": "pairopt.loss",
}

__all__ = [
    "LossOutput",
    "PairLogps",
    "PairLoss",
    "PairoptError",
    "PreferencePair",
    "ResponseGroup",
    "ResponseLogps",
    "UnsupportedModelError",
    "available_losses",
    "build_loss",
    "compute_logps",
    "compute_response_logps",
    "disable_dropout",
    "get_loss_class",
    "register_loss",
]

if TYPE_CHECKING:
    from pairopt.engine.compat import disable_dropout
    from pairopt.engine.forward import compute_logps, compute_response_logps
    from pairopt.errors import PairoptError, UnsupportedModelError
    from pairopt.loss import (
        LossOutput,
        PairLoss,
        available_losses,
        build_loss,
        get_loss_class,
        register_loss,
    )
    from pairopt.pairs import PairLogps, PreferencePair, ResponseGroup, ResponseLogps


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'pairopt' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
