"""pairopt: preference fine-tuning on paired data with an exact prefix-shared forward.

Importing pairopt is light: it loads nothing until a name is used, so the engine runs where
pydantic or datasets are absent (the loss registry and the trainer need them).

    pairopt.compute_logps(model, pairs)           the engine (pairopt/engine/)
    pairopt.compute_group_logps(model, groups)    k responses per prompt, each computed once
    pairopt.register_loss, pairopt.build_loss      the loss registry (pairopt/loss/)
    pairopt.train(config) -> TrainResult           training (pairopt/training/)

The layers, bottom up: pairs.py, errors.py, sources.py (types) <- engine/ <- loss/ and the
top-level losses/ plugins <- data/ <- training/ <- verify.py, bench/ <- cli.py
(docs/architecture.md).
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
    "GroupLogps": "pairopt.pairs",
    "PairoptError": "pairopt.errors",
    "UnsupportedModelError": "pairopt.errors",
    "compute_logps": "pairopt.engine.forward",
    "compute_response_logps": "pairopt.engine.forward",
    "compute_group_logps": "pairopt.engine.forward",
    "disable_dropout": "pairopt.engine.compat",
    "PairLoss": "pairopt.loss.base",
    "ReferencePairLoss": "pairopt.loss.base",
    "ListLoss": "pairopt.loss.listwise",
    "ListLogps": "pairopt.loss.listwise",
    "LogRatios": "pairopt.loss.base",
    "LossOutput": "pairopt.loss.base",
    "register_loss": "pairopt.loss.registry",
    "build_loss": "pairopt.loss.registry",
    "available_losses": "pairopt.loss.registry",
    "get_loss_class": "pairopt.loss.registry",
    "train": "pairopt.training.trainer",
    "TrainResult": "pairopt.training.trainer",
    "TrainConfig": "pairopt.training.config",
    "load_config": "pairopt.training.config_load",
}

__all__ = [
    "GroupLogps",
    "ListLogps",
    "ListLoss",
    "LogRatios",
    "LossOutput",
    "PairLogps",
    "PairLoss",
    "PairoptError",
    "PreferencePair",
    "ReferencePairLoss",
    "ResponseGroup",
    "ResponseLogps",
    "TrainConfig",
    "TrainResult",
    "UnsupportedModelError",
    "available_losses",
    "build_loss",
    "compute_group_logps",
    "compute_logps",
    "compute_response_logps",
    "disable_dropout",
    "get_loss_class",
    "load_config",
    "register_loss",
    "train",
]

if TYPE_CHECKING:
    from pairopt.engine.compat import disable_dropout
    from pairopt.engine.forward import compute_group_logps, compute_logps, compute_response_logps
    from pairopt.errors import PairoptError, UnsupportedModelError
    from pairopt.loss.base import LogRatios, LossOutput, PairLoss, ReferencePairLoss
    from pairopt.loss.listwise import ListLogps, ListLoss
    from pairopt.loss.registry import available_losses, build_loss, get_loss_class, register_loss
    from pairopt.pairs import GroupLogps, PairLogps, PreferencePair, ResponseGroup, ResponseLogps
    from pairopt.training.config import TrainConfig
    from pairopt.training.config_load import load_config
    from pairopt.training.trainer import TrainResult, train


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'pairopt' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
