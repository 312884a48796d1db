"""`ipo`: Identity Preference Optimisation, on per-token averaged log-ratios."""

from __future__ import annotations

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


@register_loss("ipo")
class IPO(ReferencePairLoss):
    """Identity Preference Optimisation: regress the log-ratio margin onto 1/(2β).

    Paper: Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human
    Preferences", https://arxiv.org/abs/2310.12036 (Eq. 17)

    Formula (per pair):

        loss = (s_c / n_c − s_r / n_r − 1/(2β))²
        s    = S − S^ref

    Symbols: S summed policy log-probs of a response, S^ref the reference's, n its token count
    (clamped to ≥ 1); c chosen, r rejected; β the regularisation strength (τ in the paper):
    smaller β asks for a larger margin 1/(2β).

    Divergence: `f_divergence` (f-DPO; TRL's f_divergence_type) replaces each log-ratio s
    in the margin by f'(e^s) (pairopt.loss.base.divergence_score); the default reverse_kl is the
    formula as written.

    Options: `ld_alpha` (LD-DPO) weighs the tokens past the shorter response by α in every sum;
    `use_weighting` (WPO) multiplies each pair's loss by w_c·w_r (pairopt.loss.base).

    Shapes: policy and reference PairLogps fields (N,) → losses (N,).

    Metrics: rewards = β·(S − S^ref) on summed log-probs (as TRL logs them), detached.

    Defaults: β = 0.1 (TRL DPOConfig.beta).

    Deviations: the paper writes sequence-level log-ratios; like TRL we divide each by its token
    count, because summed log-ratios make the squared loss grow with response length. TRL notes that
    the IPO authors confirmed this normalised form is what their reported results used.
    """

    summary = (
        "Identity Preference Optimisation: squared loss pulling the per-token margin to 1/(2β)"
    )

    class Config(DivergenceConfig, LengthDesensitizedConfig, WeightedConfig):
        beta: float = Field(
            0.1, gt=0, description="β (τ in the paper): the target per-token margin is 1/(2β)"
        )

    config: Config

    def compute_ratios(self, ratios: LogRatios) -> LossOutput:
        losses_N = (ratios.per_token_margin() - 1 / (2 * self.config.beta)) ** 2
        return LossOutput(losses_N, ratios.metrics(self.config.beta))
