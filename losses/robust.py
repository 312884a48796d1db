"""`robust`: robust DPO, an unbiased loss under a known label-flip rate."""

from __future__ import annotations

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


@register_loss("robust")
class Robust(ReferencePairLoss):
    """Robust DPO (rDPO): DPO de-biased for preference labels flipped with probability ε.

    Paper: Chowdhury et al. 2024, "Provably Robust DPO: Aligning Language Models with Noisy
    Feedback", https://arxiv.org/abs/2403.00409

    Formula (per pair):

        loss = [−(1 − ε)·logσ(β·Δ) + ε·logσ(−β·Δ)] / (1 − 2ε)
        Δ    = (S_c − S_c^ref) − (S_r − S_r^ref)

    Symbols: S summed policy log-probs, S^ref the reference's, c chosen, r rejected; β temperature;
    ε the label-flip rate; σ the logistic sigmoid. Unlike cDPO (`dpo` with label smoothing) the
    flipped term enters with a plus sign, so the loss is an unbiased estimate of the clean-label DPO
    loss and can be negative.

    Divergence: `f_divergence` (f-DPO; TRL's f_divergence_type) replaces each log-ratio s
    in the margin by f'(e^s) (pairopt.loss.base.divergence_score); the default reverse_kl is the
    formula as written.

    Options: `ld_alpha` (LD-DPO) weighs the tokens past the shorter response by α in every sum;
    `use_weighting` (WPO) multiplies each pair's loss by w_c·w_r (pairopt.loss.base).

    Shapes: policy and reference PairLogps fields (N,) → losses (N,).

    Metrics: rewards = β·(S − S^ref), detached.

    Defaults: β = 0.1 (TRL DPOConfig.beta). ε = 0.1 is pairopt's choice: TRL shares
    `label_smoothing = 0.0` across loss types, which makes `robust` identical to `dpo`. Set ε to
    your estimate of the flip rate (must be < 0.5).

    Deviations: none from TRL's `robust` formula.
    """

    summary = "Robust DPO: DPO de-biased for labels flipped with probability ε"

    class Config(DivergenceConfig, LengthDesensitizedConfig, WeightedConfig):
        beta: float = Field(0.1, gt=0, description="β: temperature on the log-ratio margin")
        label_smoothing: float = Field(
            0.1,
            ge=0,
            lt=0.5,
            description="ε: estimated probability that a pair's labels are flipped",
        )

    config: Config

    def compute_ratios(self, ratios: LogRatios) -> LossOutput:
        beta, eps = self.config.beta, self.config.label_smoothing
        margin_N = ratios.margin
        clean_N = -(1 - eps) * F.logsigmoid(beta * margin_N)
        flipped_N = -eps * F.logsigmoid(-beta * margin_N)
        losses_N = (clean_N - flipped_N) / (1 - 2 * eps)
        return LossOutput(losses_N, ratios.metrics(beta))
