"""`apo_down`: Anchored Preference Optimisation, down anchor (both down, rejected more)."""

from __future__ import annotations

import torch
from pydantic import Field

from pairopt.loss import (
    LengthDesensitizedConfig,
    LogRatios,
    LossOutput,
    ReferencePairLoss,
    WeightedConfig,
    register_loss,
    reward_metrics,
)


@register_loss("apo_down")
class APODown(ReferencePairLoss):
    """APO-down: lower the chosen likelihood, and the rejected one by more.

    Paper: D'Oosterlinck et al. 2024, "Anchored Preference Optimization and Contrastive
    Revisions", https://arxiv.org/abs/2408.06266 (Eq. 8)

    Formula (per pair):

        loss = σ(r_c) + (1 − σ(r_c − r_r))
        r    = β·(S − S^ref)

    Symbols: S summed policy log-probs, S^ref the reference's, c chosen, r rejected; β temperature;
    σ the logistic sigmoid. Use it when the model already produces better responses than the
    chosen ones.

    Options: `ld_alpha` (LD-DPO) weighs the tokens past the shorter response by α in every sum;
    `use_weighting` (WPO) multiplies each pair's loss by w_c·w_r (pairopt.loss.base).

    Shapes: policy and reference PairLogps fields (N,) → losses (N,).

    Metrics: rewards = β·(S − S^ref), detached.

    Defaults: β = 0.1 (TRL DPOConfig.beta).

    Deviations: none from TRL's `apo_down`.
    """

    summary = (
        "Anchored PO, down anchor: chosen likelihood down, rejected further (model beats chosen)"
    )

    class Config(LengthDesensitizedConfig, WeightedConfig):
        beta: float = Field(0.1, gt=0, description="β: scales the implicit rewards")

    config: Config

    def compute_ratios(self, ratios: LogRatios) -> LossOutput:
        chosen_N, rejected_N = ratios.rewards(self.config.beta)
        losses_N = torch.sigmoid(chosen_N) + (1 - torch.sigmoid(chosen_N - rejected_N))
        return LossOutput(losses_N, reward_metrics(ratios.policy, chosen_N, rejected_N))
