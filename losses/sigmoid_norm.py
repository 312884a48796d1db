"""`sigmoid_norm`: length-normalised DPO (DPO on per-token averaged log-ratios)."""

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


@register_loss("sigmoid_norm")
class SigmoidNorm(ReferencePairLoss):
    """Length-normalised DPO: the DPO loss on per-token averaged log-ratios.

    Paper: Meng et al. 2024 (SimPO), https://arxiv.org/abs/2405.14734 , introduced the length
    normalisation; Lambert et al. 2024 (Tülu 3), https://arxiv.org/abs/2411.15124 , train with
    this reference-based form. TRL's `sigmoid_norm` loss type.

    Formula (per pair):

        loss = −logσ(β·(s_c / n_c − s_r / n_r))
        s    = S − S^ref

    Symbols: S summed policy log-probs, S^ref the reference's, n the response's token count
    (clamped to ≥ 1), c chosen, r rejected; β temperature; σ the logistic sigmoid. Averaging removes
    DPO's pull towards longer chosen responses.

    Divergence: `f_divergence` (f-DPO; TRL's f_divergence_type) replaces each log-ratio s
    in the margin by f'(e^s) (pairopt.loss.base.divergence_score); the default reverse_kl is the
    formula as written.

    Options: `ld_alpha` (LD-DPO) weighs the tokens past the shorter response by α in every sum;
    `use_weighting` (WPO) multiplies each pair's loss by w_c·w_r (pairopt.loss.base).

    Shapes: policy and reference PairLogps fields (N,) → losses (N,).

    Metrics: rewards = β·(S − S^ref) on summed log-probs (as TRL logs them), detached.

    Defaults: β = 5.0, Tülu 3's length-normalised DPO setting. TRL shares β = 0.1 across loss
    types, which on per-token averages (margins of a fraction of a nat) gives almost no signal.

    Deviations: none from TRL's formula; only the default β differs (above).
    """

    summary = "Length-normalised DPO: DPO on per-token averaged log-ratios (Tülu 3)"

    class Config(DivergenceConfig, LengthDesensitizedConfig, WeightedConfig):
        beta: float = Field(
            5.0, gt=0, description="β: temperature on the per-token margin (Tülu 3 uses 5)"
        )

    config: Config

    def compute_ratios(self, ratios: LogRatios) -> LossOutput:
        losses_N = -F.logsigmoid(self.config.beta * ratios.per_token_margin())
        return LossOutput(losses_N, ratios.metrics(self.config.beta))
