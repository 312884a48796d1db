"""`sppo_hard`: Self-Play Preference Optimisation with hard (0/1) win probabilities."""

from __future__ import annotations

from pydantic import Field

from pairopt.loss import (
    LengthDesensitizedConfig,
    LogRatios,
    LossOutput,
    ReferencePairLoss,
    WeightedConfig,
    register_loss,
)


@register_loss("sppo_hard")
class SPPOHard(ReferencePairLoss):
    """SPPO with hard labels: regress each log-ratio onto ±1/(2β).

    Paper: Wu et al. 2024, "Self-Play Preference Optimization for Language Model Alignment",
    https://arxiv.org/abs/2405.00675 (Eq. 4.7 of Algorithm 1, with P = 1 for the winner and 0
    for the loser)

    Formula (per pair):

        loss = (s_c − 1/(2β))² + (s_r + 1/(2β))²
        s    = S − S^ref

    Symbols: S summed policy log-probs, S^ref the reference's, c chosen, r rejected; β sets the
    targets: the chosen log-ratio is pulled to +1/(2β) nats, the rejected to −1/(2β).

    Options: `ld_alpha` (LD-DPO) weighs the tokens past the shorter response by α in every sum;
    `use_weighting` (WPO) multiplies each pair's loss by w_c·w_r (pairopt.loss.base).

    Shapes: policy and reference PairLogps fields (N,) → losses (N,).

    Metrics: rewards = β·(S − S^ref), detached.

    Defaults: β = 0.1 (TRL DPOConfig.beta): targets of ±5 nats.

    Deviations: the paper estimates the win probability P with a preference model (PairRM); the
    hard version, as in TRL, uses the pair's label instead. Summed (not averaged) log-ratios, as TRL.
    """

    summary = "SPPO, hard labels: squared loss pulling log-ratios to ±1/(2β)"

    class Config(LengthDesensitizedConfig, WeightedConfig):
        beta: float = Field(
            0.1, gt=0, description="β: chosen/rejected log-ratio targets are ±1/(2β)"
        )

    config: Config

    def compute_ratios(self, ratios: LogRatios) -> LossOutput:
        target = 0.5 / self.config.beta
        losses_N = (ratios.chosen - target) ** 2 + (ratios.rejected + target) ** 2
        return LossOutput(losses_N, ratios.metrics(self.config.beta))
