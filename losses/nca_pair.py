"""`nca_pair`: Noise Contrastive Alignment, pairwise form."""

from __future__ import annotations

import torch.nn.functional as F
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


@register_loss("nca_pair")
class NCAPair(ReferencePairLoss):
    """NCA for pairs: raises the chosen reward in absolute terms, not only relative to rejected.

    Paper: Chen et al. 2024, "Noise Contrastive Alignment of Language Models with Explicit
    Rewards", https://arxiv.org/abs/2402.05369

    Formula (per pair):

        loss = −logσ(r_c) − ½·logσ(−r_c) − ½·logσ(−r_r)
        r    = β·(S − S^ref)

    Symbols: S summed policy log-probs, S^ref the reference's, c chosen, r rejected; β temperature;
    σ the logistic sigmoid. Unlike DPO, which only sees r_c − r_r, NCA pushes r_c up and r_r down
    each against 0, so the chosen likelihood is not free to fall.

    Options: `ld_alpha` (LD-DPO) weighs the tokens past the shorter response by α in every sum;
    `use_weighting` (WPO) multiplies each pair's loss by w_c·w_r (pairopt.loss.base).

    Shapes: policy and reference PairLogps fields (N,) → losses (N,).

    Metrics: rewards = β·(S − S^ref), detached.

    Defaults: β = 0.1 (TRL DPOConfig.beta).

    Deviations: none from TRL's `nca_pair`.
    """

    summary = "Noise Contrastive Alignment: absolute reward targets for chosen and rejected"

    class Config(LengthDesensitizedConfig, WeightedConfig):
        beta: float = Field(0.1, gt=0, description="β: scales the implicit rewards")

    config: Config

    def compute_ratios(self, ratios: LogRatios) -> LossOutput:
        chosen_N, rejected_N = ratios.rewards(self.config.beta)
        losses_N = (
            -F.logsigmoid(chosen_N)
            - 0.5 * F.logsigmoid(-chosen_N)
            - 0.5 * F.logsigmoid(-rejected_N)
        )
        return LossOutput(losses_N, reward_metrics(ratios.policy, chosen_N, rejected_N))
