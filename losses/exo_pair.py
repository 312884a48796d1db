"""`exo_pair`: EXO, efficient exact optimisation of the alignment objective, for pairs."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
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


@register_loss("exo_pair")
class EXOPair(ReferencePairLoss):
    """EXO for pairs: reverse KL from the policy's pair preference to a smoothed label.

    Paper: Ji et al. 2024, "Towards Efficient Exact Optimization of Language Model Alignment",
    https://arxiv.org/abs/2402.00856 (Eq. 16, K = 2)

    Formula (per pair):

        loss = σ(β·Δ)·[logσ(β·Δ) − log(1 − ε)] + σ(−β·Δ)·[logσ(−β·Δ) − log ε]
        Δ    = (S_c − S_c^ref) − (S_r − S_r^ref)

    i.e. KL(q ‖ p) between the policy's preference q = (σ(βΔ), σ(−βΔ)) over {chosen, rejected}
    and the smoothed label p = (1 − ε, ε). Symbols: S summed policy log-probs, S^ref the
    reference's, c chosen, r rejected; β temperature; ε label smoothing (must be > 0, or log ε
    is −∞). The minimum, 0, is reached at βΔ = log((1 − ε)/ε).

    Divergence: `f_divergence` (f-DPO; TRL's f_divergence_type) replaces each log-ratio s
    in the margin by f'(e^s) (pairopt.loss.base.divergence_score); the default reverse_kl is the
    formula as written.

    Options: `ld_alpha` (LD-DPO) weighs the tokens past the shorter response by α in every sum;
    `use_weighting` (WPO) multiplies each pair's loss by w_c·w_r (pairopt.loss.base).

    Shapes: policy and reference PairLogps fields (N,) → losses (N,).

    Metrics: rewards = β·(S − S^ref), detached.

    Defaults: β = 0.1 (TRL DPOConfig.beta); ε = 1e-3 (TRL's historic `exo_pair` replaced
    label_smoothing = 0 by 1e-3; the EXO paper's choice).

    Deviations: TRL historically substituted 1e-3 when given ε = 0 and current TRL computes
    log ε as given; pairopt instead requires ε > 0 in the Config, so no value is silently changed.
    """

    summary = "EXO: reverse KL between the policy's pair preference and a smoothed label"

    class Config(DivergenceConfig, LengthDesensitizedConfig, WeightedConfig):
        beta: float = Field(0.1, gt=0, description="β: temperature on the log-ratio margin")
        label_smoothing: float = Field(
            1e-3, gt=0, lt=0.5, description="ε: the target puts 1 − ε on chosen and ε on rejected"
        )

    config: Config

    def compute_ratios(self, ratios: LogRatios) -> LossOutput:
        beta, eps = self.config.beta, self.config.label_smoothing
        logits_N = beta * ratios.margin
        # σ(x)·logσ(x) stays finite for |x| large: logσ is computed stably, σ underflows to 0.
        losses_N = torch.sigmoid(logits_N) * (
            F.logsigmoid(logits_N) - math.log1p(-eps)
        ) + torch.sigmoid(-logits_N) * (F.logsigmoid(-logits_N) - math.log(eps))
        return LossOutput(losses_N, ratios.metrics(beta))
