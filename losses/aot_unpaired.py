"""`aot_unpaired`: Alignment via Optimal Transport, unpaired: chosen log-ratios dominate rejected ones."""

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


@register_loss("aot_unpaired")
class AOTUnpaired(ReferencePairLoss):
    """AOT (unpaired): the sorted chosen log-ratios should dominate the sorted rejected ones.

    Paper: Melnyk et al. 2024, "Distributional Preference Alignment of LLMs via Optimal
    Transport", https://arxiv.org/abs/2406.05882 (TRL's `aot_unpaired` loss type).

    Formula (batch of N pairs):

        s_c = S_c − S_c^ref,  s_r = S_r − S_r^ref
        δ_i = sort(s_c)_i − sort(s_r)_i
        loss_i = −(1 − ε)·logσ(β·δ_i) − ε·logσ(−β·δ_i)

    Symbols: S summed policy log-probs, S^ref the reference's, c chosen, r rejected; sort ascending
    over the batch, chosen and rejected each on its own; β temperature; ε label smoothing; σ the
    logistic sigmoid. The chosen and rejected responses need not be paired: only the two
    distributions of log-ratios are compared.

    Options: `ld_alpha` (LD-DPO) weighs the tokens past the shorter response by α in every sum
    (pairopt.loss.base); WPO weighting is refused, as in TRL (the sort would misalign it).

    Shapes: policy and reference PairLogps fields (N,) → losses (N,). loss_i belongs to the i-th
    rank: the batch is coupled (the mean is the batch loss); with N = 1 it is `dpo` with label
    smoothing.

    Metrics: rewards = β·(S − S^ref), detached (per pair, as in TRL).

    Defaults: β = 0.1, ε = 0 (TRL DPOConfig.beta, label_smoothing; TRL's paper index quotes
    β = 0.01 from the paper).

    Deviations: none from TRL 1.16's `aot_unpaired`; the sort runs over one process's
    micro-batch, and the f-divergence and WPO weighting do not apply.
    """

    summary = "AOT (unpaired): logistic loss on sorted chosen vs sorted rejected log-ratios"

    class Config(LengthDesensitizedConfig):
        beta: float = Field(0.1, gt=0, description="β: temperature on the sorted difference")
        label_smoothing: float = Field(
            0.0, ge=0, lt=0.5, description="ε: label smoothing of the logistic loss"
        )

    config: Config

    def compute_ratios(self, ratios: LogRatios) -> LossOutput:
        chosen_N, _ = torch.sort(ratios.chosen)
        rejected_N, _ = torch.sort(ratios.rejected)
        losses_N = dpo_losses(self.config.beta, self.config.label_smoothing, chosen_N - rejected_N)
        return LossOutput(losses_N, ratios.metrics(self.config.beta))
