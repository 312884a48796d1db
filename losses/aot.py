"""`aot`: Alignment via Optimal Transport, paired: the sorted policy margins dominate the reference's."""

from __future__ import annotations

import torch
from pydantic import Field

from losses.dpo import dpo_losses
from pairopt.loss import (
    LengthDesensitizedConfig,
    LogRatios,
    LossOutput,
    ReferencePairLoss,
    register_loss,
)


@register_loss("aot")
class AOT(ReferencePairLoss):
    """AOT (paired): DPO's logistic loss on the quantile coupling of policy and reference margins.

    Paper: Melnyk et al. 2024, "Distributional Preference Alignment of LLMs via Optimal
    Transport", https://arxiv.org/abs/2406.05882 (TRL's `aot` loss type).

    Formula (batch of N pairs):

        m_i   = S_c,i − S_r,i            (policy margins)
        m^ref = S_c^ref − S_r^ref         (reference margins)
        δ_i   = sort(m)_i − sort(m^ref)_i  (i-th smallest against i-th smallest)
        loss_i = −(1 − ε)·logσ(β·δ_i) − ε·logσ(−β·δ_i)

    Symbols: S summed policy log-probs, S^ref the reference's, c chosen, r rejected; sort ascending
    over the batch; β temperature; ε label smoothing; σ the logistic sigmoid. Sorting gives the
    one-dimensional optimal-transport coupling: the loss asks the policy's margin distribution to
    dominate the reference's (first-order stochastic dominance), not each pair's margin.

    Options: `ld_alpha` (LD-DPO) weighs the tokens past the shorter response by α in every sum
    (pairopt.loss.base); WPO weighting is refused, as in TRL (the sort would misalign it).

    Shapes: policy and reference PairLogps fields (N,) → losses (N,). loss_i belongs to the i-th
    rank, not to pair i: the batch is coupled (the mean is the batch loss), and with N = 1 it is
    `dpo` with label smoothing.

    Metrics: rewards = β·(S − S^ref), detached (per pair, as in TRL).

    Defaults: β = 0.1, ε = 0 (TRL DPOConfig.beta, label_smoothing; TRL's paper index quotes
    β = 0.01 from the paper's Figure 2).

    Deviations: none from TRL 1.16's `aot`. As there, the sort runs over one process's
    micro-batch (never gathered across processes), and the f-divergence and WPO weighting do not
    apply (the sort would misalign per-pair terms).
    """

    summary = "AOT (paired): logistic loss on sorted policy vs sorted reference margins"

    class Config(LengthDesensitizedConfig):
        beta: float = Field(0.1, gt=0, description="β: temperature on the sorted margin difference")
        label_smoothing: float = Field(
            0.0, ge=0, lt=0.5, description="ε: label smoothing of the logistic loss"
        )

    config: Config

    def compute_ratios(self, ratios: LogRatios) -> LossOutput:
        policy, reference = ratios.policy, ratios.reference
        margins_N, _ = torch.sort(policy.chosen_logps - policy.rejected_logps)
        ref_margins_N, _ = torch.sort(reference.chosen_logps - reference.rejected_logps)
        delta_N = margins_N - ref_margins_N
        losses_N = dpo_losses(self.config.beta, self.config.label_smoothing, delta_N)
        return LossOutput(losses_N, ratios.metrics(self.config.beta))
