"""Losses: the contract every plugin follows (`base.py`), the registry (`registry.py`) and
`pairopt losses` (`table.py`). The plugins themselves live in the top-level `losses/` package
(and in users' own modules), one file per loss.

The names plugins and users import are re-exported here: `from pairopt.loss import PairLoss,
LossConfig, LossOutput, register_loss, reward_metrics`.
"""

from pairopt.loss.base import (
    STANDARD_METRICS,
    DivergenceConfig,
    LogRatios,
    LossConfig,
    LossOutput,
    PairLoss,
    ReferencePairLoss,
    average_logps,
    divergence_score,
    reward_metrics,
)
from pairopt.loss.registry import (
    ENTRY_POINT_GROUP,
    available_losses,
    build_loss,
    get_loss_class,
    load_loss_module,
    register_loss,
    validate_params,
)

__all__ = [
    "ENTRY_POINT_GROUP",
    "STANDARD_METRICS",
    "DivergenceConfig",
    "LogRatios",
    "LossConfig",
    "LossOutput",
    "PairLoss",
    "ReferencePairLoss",
    "available_losses",
    "average_logps",
    "build_loss",
    "divergence_score",
    "get_loss_class",
    "load_loss_module",
    "register_loss",
    "reward_metrics",
    "validate_params",
]
