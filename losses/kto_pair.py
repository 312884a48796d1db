"""`kto_pair`: Kahneman-Tversky Optimisation applied to paired data."""

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
)


@register_loss("kto_pair")
class KTOPair(ReferencePairLoss):
    """KTO on pairs: each response is judged against a batch estimate of the policy/reference KL.

    Paper: Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic Optimization",
    https://arxiv.org/abs/2402.01306

    Formula (batch of N pairs):

        KL_c   = max(0, mean_i(s_c,i)),   KL_r = max(0, mean_i(s_r,i))
        loss_i = ½·[(1 − σ(β·(s_c,i − KL_r))) + (1 − σ(β·(KL_c − s_r,i)))]
        s      = S − S^ref

    Symbols: S summed policy log-probs, S^ref the reference's, c chosen, r rejected; β temperature;
    σ the logistic sigmoid; KL_c, KL_r batch-local estimates of the policy/reference KL.
    The mean of loss_i over the batch is TRL's mean over its 2N terms.

    Options: `ld_alpha` (LD-DPO) weighs the tokens past the shorter response by α in every sum;
    `use_weighting` (WPO) multiplies each pair's loss by w_c·w_r (pairopt.loss.base).

    Shapes: policy and reference PairLogps fields (N,) → losses (N,). The KL estimates couple the
    pairs of a batch: loss_i depends on every pair, and so does its gradient.

    Metrics: rewards = β·(S − S^ref), detached; `kl` = (KL_c + KL_r) / 2.

    Defaults: β = 0.1 (TRL DPOConfig.beta).

    Deviations: this is TRL's historic `kto_pair` loss type of DPOTrainer (since removed in favour
    of KTOTrainer, which estimates the KL from mismatched prompt/response pairs and weights desirable
    and undesirable terms). As there, the KL estimates are not detached and are local to a batch
    (per process under data parallelism).
    """

    summary = (
        "KTO on pairs: prospect-theoretic loss against batch KL estimates (TRL's historic kto_pair)"
    )

    class Config(LengthDesensitizedConfig, WeightedConfig):
        beta: float = Field(0.1, gt=0, description="β: scales the rewards and KL reference point")

    config: Config

    def compute_ratios(self, ratios: LogRatios) -> LossOutput:
        beta = self.config.beta
        chosen_N, rejected_N = ratios.chosen, ratios.rejected
        kl_chosen = chosen_N.mean().clamp(min=0)  # () batch estimate, not detached (as TRL)
        kl_rejected = rejected_N.mean().clamp(min=0)
        chosen_losses_N = 1 - torch.sigmoid(beta * (chosen_N - kl_rejected))
        rejected_losses_N = 1 - torch.sigmoid(beta * (kl_chosen - rejected_N))
        losses_N = 0.5 * (chosen_losses_N + rejected_losses_N)
        metrics = ratios.metrics(beta)
        metrics["kl"] = (0.5 * (kl_chosen + kl_rejected)).detach()
        return LossOutput(losses_N, metrics)
