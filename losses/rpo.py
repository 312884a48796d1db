"""`rpo`: DPO plus a weighted NLL term on the chosen response (Iterative RPO)."""

from __future__ import annotations

from pydantic import Field

from losses.dpo import dpo_losses
from pairopt.loss import (
    DivergenceConfig,
    LengthDesensitizedConfig,
    LogRatios,
    LossOutput,
    ReferencePairLoss,
    WeightedConfig,
    average_logps,
    register_loss,
)


@register_loss("rpo")
class RPO(ReferencePairLoss):
    """RPO: the DPO loss plus α × the per-token NLL of the chosen response.

    Paper: Pang et al. 2024, "Iterative Reasoning Preference Optimization",
    https://arxiv.org/abs/2404.19733

    Formula (per pair):

        loss = −(1 − ε)·logσ(β·Δ) − ε·logσ(−β·Δ) + α·(−S_c / n_c)
        Δ    = (S_c − S_c^ref) − (S_r − S_r^ref)

    Symbols: S summed policy log-probs, S^ref the reference's, n a response's token count (clamped
    to ≥ 1), c chosen, r rejected; β temperature; ε label smoothing (as in `dpo`); α the NLL weight.

    Divergence: `f_divergence` (f-DPO; TRL's f_divergence_type) replaces each log-ratio s
    in the margin by f'(e^s) (pairopt.loss.base.divergence_score); the default reverse_kl is the
    formula as written.

    Options: `ld_alpha` (LD-DPO) weighs the tokens past the shorter response by α in every sum;
    `use_weighting` (WPO) multiplies each pair's loss by w_c·w_r (pairopt.loss.base).

    Shapes: policy and reference PairLogps fields (N,) → losses (N,).

    Metrics: rewards = β·(S − S^ref), detached; `nll_loss` = mean(−S_c / n_c).

    Defaults: β = 0.1 (TRL DPOConfig.beta); ε = 0.0; α = 1.0 (the paper's α = 1, the value TRL's
    docs recommend for `rpo_alpha`).

    Deviations: TRL's NLL term is the cross-entropy averaged over all chosen tokens of the batch
    (token-weighted); here it is each pair's per-token average, averaged over pairs
    (pair-weighted), which is the paper's length-normalised NLL and keeps the loss per pair.
    With `ld_alpha` the NLL term averages the length-desensitised sum of the chosen response
    (every sum the loss sees is that one); TRL's NLL term uses the plain per-token log-probs.
    """

    summary = "RPO: DPO plus α × per-token NLL on the chosen response"

    class Config(DivergenceConfig, LengthDesensitizedConfig, WeightedConfig):
        beta: float = Field(0.1, gt=0, description="β: temperature on the log-ratio margin")
        label_smoothing: float = Field(
            0.0, ge=0, lt=0.5, description="ε: label smoothing of the DPO term (cDPO)"
        )
        alpha: float = Field(1.0, ge=0, description="α: weight of the NLL term on chosen")

    config: Config

    def compute_ratios(self, ratios: LogRatios) -> LossOutput:
        avg_chosen_N, _ = average_logps(ratios.policy)
        nll_N = -avg_chosen_N
        dpo_N = dpo_losses(self.config.beta, self.config.label_smoothing, ratios.margin)
        losses_N = dpo_N + self.config.alpha * nll_N
        metrics = ratios.metrics(self.config.beta)
        metrics["nll_loss"] = nll_N.detach().mean()
        return LossOutput(losses_N, metrics)
