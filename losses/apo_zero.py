"""`apo_zero`: Anchored Preference Optimisation, zero anchor (chosen up, rejected down)."""

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


@register_loss("apo_zero")
class APOZero(ReferencePairLoss):
    """APO-zero: raise the chosen likelihood and lower the rejected one, each against the reference.

    Paper: D'Oosterlinck et al. 2024, "Anchored Preference Optimization and Contrastive
    Revisions", https://arxiv.org/abs/2408.06266 (Eq. 7)

    Formula (per pair):

        loss = (1 − σ(r_c)) + σ(r_r)
        r    = β·(S − S^ref)

    Symbols: S summed policy log-probs, S^ref the reference's, c chosen, r rejected; β temperature;
    σ the logistic sigmoid. Use it when the chosen responses are better than what the model
    produces now.

    Options: `ld_alpha` (LD-DPO) weighs the tokens past the shorter response by α in every sum;
    `use_weighting` (WPO) multiplies each pair's loss by w_c·w_r (pairopt.loss.base).

    Shapes: policy and reference PairLogps fields (N,) → losses (N,).

    Metrics: rewards = β·(S − S^ref), detached.

    Defaults: β = 0.1 (TRL DPOConfig.beta).

    Deviations: none from TRL's `apo_zero`.
    """

    summary = (
        "Anchored PO, zero anchor: chosen likelihood up, rejected down (chosen beats the model)"
    )

    class Config(LengthDesensitizedConfig, WeightedConfig):
        beta: float = Field(0.1, gt=0, description="β: scales the implicit rewards")

    config: Config

    def compute_ratios(self, ratios: LogRatios) -> LossOutput:
        chosen_N, rejected_N = ratios.rewards(self.config.beta)
        losses_N = (1 - torch.sigmoid(chosen_N)) + torch.sigmoid(rejected_N)
        return LossOutput(losses_N, reward_metrics(ratios.policy, chosen_N, rejected_N))
