"""`hinge`: the hinge loss on the DPO log-ratio margin (SLiC / RSO)."""

from __future__ import annotations

import torch
from pydantic import Field

from pairopt.loss import (
    DivergenceConfig,
    LengthDesensitizedConfig,
    LogRatios,
    LossOutput,
    ReferencePairLoss,
    WeightedConfig,
    register_loss,
)


@register_loss("hinge")
class Hinge(ReferencePairLoss):
    """Hinge loss on the reference-normalised margin, as in SLiC and RSO.

    Paper: Liu et al. 2023, "Statistical Rejection Sampling Improves Preference Optimization"
    (RSO), https://arxiv.org/abs/2309.06657 ; Zhao et al. 2023, SLiC-HF,
    https://arxiv.org/abs/2305.10425

    Formula (per pair):

        loss = max(0, 1 − β·Δ)
        Δ    = (S_c − S_c^ref) − (S_r − S_r^ref)

    Symbols: S summed policy log-probs, S^ref the reference's, c chosen, r rejected; β scales the
    margin (1/β is the margin, in nats, beyond which a pair stops contributing).

    Divergence: `f_divergence` (f-DPO; TRL's f_divergence_type) replaces each log-ratio s
    in the margin by f'(e^s) (pairopt.loss.base.divergence_score); the default reverse_kl is the
    formula as written.

    Options: `ld_alpha` (LD-DPO) weighs the tokens past the shorter response by α in every sum;
    `use_weighting` (WPO) multiplies each pair's loss by w_c·w_r (pairopt.loss.base).

    Shapes: policy and reference PairLogps fields (N,) → losses (N,).

    Metrics: rewards = β·(S − S^ref), detached.

    Defaults: β = 0.1 (TRL DPOConfig.beta, shared by its `hinge` loss type).

    Deviations: none from TRL's `hinge`.
    """

    summary = "Hinge loss max(0, 1 − βΔ) on the DPO margin (SLiC, RSO)"

    class Config(DivergenceConfig, LengthDesensitizedConfig, WeightedConfig):
        beta: float = Field(0.1, gt=0, description="β: pairs with margin Δ > 1/β add no loss")

    config: Config

    def compute_ratios(self, ratios: LogRatios) -> LossOutput:
        losses_N = torch.relu(1 - self.config.beta * ratios.margin)
        return LossOutput(losses_N, ratios.metrics(self.config.beta))
