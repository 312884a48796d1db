"""`dpo`: Direct Preference Optimization, with label smoothing as conservative DPO (cDPO)."""

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


def dpo_losses(beta: float, label_smoothing: float, margin_N: torch.Tensor) -> torch.Tensor:
    """−(1−ε)·logσ(β·Δ) − ε·logσ(−β·Δ) per pair, (N,). Shared with `rpo`."""
    logits_N = beta * margin_N
    return -(1 - label_smoothing) * F.logsigmoid(logits_N) - label_smoothing * F.logsigmoid(
        -logits_N
    )


@register_loss("dpo")
class DPO(ReferencePairLoss):
    """Direct Preference Optimization; label smoothing ε > 0 gives conservative DPO (cDPO).

    Paper: Rafailov et al. 2023, https://arxiv.org/abs/2305.18290 ; cDPO: Mitchell 2023,
    https://ericmitchell.ai/cdpo.pdf

    Formula (per pair):

        loss = −(1 − ε)·logσ(β·Δ) − ε·logσ(−β·Δ)
        Δ    = (S_c − S_c^ref) − (S_r − S_r^ref)

    Symbols: S_c, S_r summed policy log-probs of the chosen / rejected response; S^ref the
    reference model's; β temperature (larger keeps the policy closer to the reference); ε the
    assumed probability that a preference label is flipped; σ the logistic sigmoid.

    Divergence: `f_divergence` (f-DPO; TRL's f_divergence_type) replaces each log-ratio s
    in the margin by f'(e^s) (pairopt.loss.base.divergence_score); the default reverse_kl is the
    formula as written.

    Options: `ld_alpha` (LD-DPO) weighs the tokens past the shorter response by α in every sum;
    `use_weighting` (WPO) multiplies each pair's loss by w_c·w_r (pairopt.loss.base).

    Shapes: policy and reference PairLogps fields (N,) → losses (N,).

    Metrics: rewards = β·(S − S^ref), detached.

    Defaults: β = 0.1 (TRL DPOConfig.beta; the paper uses 0.1–0.5); ε = 0.0 (TRL
    DPOConfig.label_smoothing; plain DPO).

    Deviations: none from TRL's historic `sigmoid` loss, which took `label_smoothing`. TRL's current
    `sigmoid` dropped label smoothing; pairopt keeps it here, since cDPO is exactly this loss.
    """

    summary = "Direct Preference Optimization; label_smoothing > 0 gives conservative DPO (cDPO)"

    class Config(DivergenceConfig, LengthDesensitizedConfig, WeightedConfig):
        beta: float = Field(
            0.1, gt=0, description="β: temperature on the log-ratio margin (TRL default 0.1)"
        )
        label_smoothing: float = Field(
            0.0,
            ge=0,
            lt=0.5,
            description="ε: assumed label-flip probability; > 0 is cDPO (0 is plain DPO)",
        )

    config: Config

    def compute_ratios(self, ratios: LogRatios) -> LossOutput:
        losses_N = dpo_losses(self.config.beta, self.config.label_smoothing, ratios.margin)
        return LossOutput(losses_N, ratios.metrics(self.config.beta))
