"""`simpo`: Simple Preference Optimisation (reference-free, length-normalised, with a margin)."""

from __future__ import annotations

import torch.nn.functional as F
from pydantic import Field

from pairopt.loss import (
    LossConfig,
    LossOutput,
    PairLoss,
    average_logps,
    register_loss,
    reward_metrics,
)
from pairopt.pairs import PairLogps


@register_loss("simpo")
class SimPO(PairLoss):
    """SimPO: a Bradley-Terry loss on per-token average log-probs with a target margin γ.

    Paper: Meng et al. 2024, "SimPO: Simple Preference Optimization with a Reference-Free
    Reward", https://arxiv.org/abs/2405.14734

    Formula (per pair):

        loss = −logσ(β·(A_c − A_r) − γ)
        A    = S / n

    Symbols: S summed policy log-probs of a response, n its token count (clamped to ≥ 1), A the
    per-token average, c chosen, r rejected; β reward scale; γ the target reward margin (in
    reward units, i.e. after multiplying by β); σ the logistic sigmoid.

    Shapes: policy PairLogps fields (N,) → losses (N,). No reference model.

    Metrics: rewards = β·A (the SimPO reward; TRL CPOTrainer logs the same), detached.

    Defaults: β = 2.0 and γ = 0.5: the SimPO authors' SimPOConfig (beta = 2.0,
    gamma_beta_ratio = 0.25, so γ = 0.25·2.0 = 0.5). γ = 0.5 is also TRL CPOConfig.simpo_gamma;
    TRL's β default (0.1) is shared with CPO and too small for averaged log-probs. The authors'
    later Llama-3-Instruct recipe uses β = 10, γ/β = 0.3 (γ = 3).

    Deviations: none from TRL's `simpo` loss type with cpo_alpha = 0; for SimPO + SFT use
    `combined` with an `sft` term.
    """

    summary = "SimPO: reference-free DPO on per-token average log-probs with target margin γ"
    requires_reference = False

    class Config(LossConfig):
        beta: float = Field(2.0, gt=0, description="β: scale of the average-log-prob reward")
        gamma: float = Field(
            0.5,
            ge=0,
            description="γ: target reward margin, in reward units (γ = gamma_beta_ratio·β)",
        )

    config: Config

    def compute(self, policy: PairLogps, reference: PairLogps | None) -> LossOutput:
        avg_chosen_N, avg_rejected_N = average_logps(policy)
        beta = self.config.beta
        losses_N = -F.logsigmoid(beta * (avg_chosen_N - avg_rejected_N) - self.config.gamma)
        return LossOutput(
            losses_N, reward_metrics(policy, beta * avg_chosen_N, beta * avg_rejected_N)
        )
