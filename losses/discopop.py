"""`discopop`: DiscoPOP, the log-ratio modulated blend of the logistic and exponential losses."""

from __future__ import annotations

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


@register_loss("discopop")
class DiscoPOP(ReferencePairLoss):
    """DiscoPOP (LRML): logistic loss for small margins, exponential loss for large ones.

    Paper: Chris Lu et al. 2024, "Discovering Preference Optimization Algorithms with and for
    Large Language Models", https://arxiv.org/abs/2406.08414 (Eq. 5, the Log-Ratio Modulated
    Loss; TRL's `discopop` loss type).

    Formula (per pair):

        z    = β·Δ,  Δ = (S_c − S_c^ref) − (S_r − S_r^ref)
        m    = σ(z / τ)
        loss = (1 − m)·(−logσ(z)) + m·e^(−z)

    Symbols: S summed policy log-probs, S^ref the reference's, c chosen, r rejected; β temperature;
    τ the modulation temperature; σ the logistic sigmoid. For z ≪ 0 the logistic (DPO) term
    dominates, for z ≫ 0 the exponential one.

    Divergence: `f_divergence` (f-DPO; TRL's f_divergence_type) replaces each log-ratio s
    in the margin by f'(e^s) (pairopt.loss.base.divergence_score); the default reverse_kl is the
    formula as written.

    Options: `ld_alpha` (LD-DPO) weighs the tokens past the shorter response by α in every sum;
    `use_weighting` (WPO) multiplies each pair's loss by w_c·w_r (pairopt.loss.base).

    Shapes: policy and reference PairLogps fields (N,) → losses (N,).

    Metrics: rewards = β·(S − S^ref), detached.

    Defaults: β = 0.1 (TRL DPOConfig.beta; the paper's runs use 0.05), τ = 0.05 (TRL
    DPOConfig.discopop_tau, the paper's value).

    Deviations: m·e^(−z) is computed as e^(logσ(z/τ) − z): the same number where TRL's product
    is finite, and 0 instead of TRL's NaN (0 · ∞) when z is very negative.
    """

    summary = "DiscoPOP: log-ratio modulated blend of logistic and exponential losses"

    class Config(DivergenceConfig, LengthDesensitizedConfig, WeightedConfig):
        beta: float = Field(0.1, gt=0, description="β: temperature on the log-ratio margin")
        tau: float = Field(
            0.05, gt=0, description="τ: temperature of the modulation σ(βΔ/τ) (TRL discopop_tau)"
        )

    config: Config

    def compute_ratios(self, ratios: LogRatios) -> LossOutput:
        z_N = self.config.beta * ratios.margin
        modulation_N = torch.sigmoid(z_N / self.config.tau)
        logistic_N = -F.logsigmoid(z_N)
        exponential_N = torch.exp(F.logsigmoid(z_N / self.config.tau) - z_N)  # m·e^(−z)
        losses_N = (1 - modulation_N) * logistic_N + exponential_N
        return LossOutput(losses_N, ratios.metrics(self.config.beta))
