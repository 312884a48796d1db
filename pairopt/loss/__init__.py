"""Losses: the contract every plugin follows (`base.py`), the registry (`registry.py`) and
`pairopt losses` (`table.py`). The plugins themselves live in the top-level `losses/` package
(and in users' own modules), one file per loss.

The names plugins and users import are re-exported here: `from pairopt.loss import PairLoss,
ListLoss, LossConfig, LossOutput, register_loss, reward_metrics`. Listwise losses (kind "list")
live in `listwise.py`.
"""

from pairopt.loss.base import (
    LOSS_KINDS,
    STANDARD_METRICS,
    DivergenceConfig,
    LengthDesensitizedConfig,
    LogRatios,
    Loss,
    LossConfig,
    LossOutput,
    PairLoss,
    ReferencePairLoss,
    WeightedConfig,
    average_logps,
    divergence_score,
    reward_metrics,
)
from pairopt.loss.listwise import ListLogps, ListLoss, list_reward_metrics, ordered_pairs
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
    "LOSS_KINDS",
    "STANDARD_METRICS",
    "DivergenceConfig",
    "LengthDesensitizedConfig",
    "ListLogps",
    "ListLoss",
    "LogRatios",
    "Loss",
    "LossConfig",
    "LossOutput",
    "PairLoss",
    "ReferencePairLoss",
    "WeightedConfig",
    "available_losses",
    "average_logps",
    "build_loss",
    "divergence_score",
    "get_loss_class",
    "list_reward_metrics",
    "load_loss_module",
    "ordered_pairs",
    "register_loss",
    "reward_metrics",
    "validate_params",
]
