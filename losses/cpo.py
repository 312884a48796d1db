"""`cpo`: Contrastive Preference Optimisation (reference-free DPO plus NLL on chosen)."""

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


@register_loss("cpo")
class CPO(PairLoss):
    """CPO: reference-free sigmoid preference loss on summed log-probs, plus α × chosen NLL.

    Paper: Xu et al. 2024, "Contrastive Preference Optimization: Pushing the Boundaries of LLM
    Performance in Machine Translation", https://arxiv.org/abs/2401.08417

    Formula (per pair):

        loss = −logσ(β·(S_c − S_r)) + α·(−A_c)
        A    = S / n

    Symbols: S summed policy log-probs of a response, n its token count (clamped to ≥ 1), A the
    per-token average, c chosen, r rejected; β temperature; α weight of the behaviour-cloning
    (NLL) term; σ the logistic sigmoid.

    Shapes: policy PairLogps fields (N,) → losses (N,). No reference model.

    Metrics: rewards = β·S (TRL CPOTrainer's convention for this loss: β times the log-probs the
    preference term compares, here summed), detached; `nll_loss` = mean(−A_c).

    Defaults: β = 0.1 (TRL CPOConfig.beta); α = 1.0 (TRL CPOConfig.cpo_alpha; the paper's
    unweighted sum).

    Deviations: TRL's NLL term is the cross-entropy averaged over all chosen tokens of the batch
    (token-weighted); here it is each pair's per-token average −A_c, averaged over pairs
    (pair-weighted), so that the loss is defined per pair. They agree when all chosen responses
    have the same length.
    """

    summary = "CPO: reference-free sigmoid loss on summed log-probs plus α × chosen NLL"
    requires_reference = False

    class Config(LossConfig):
        beta: float = Field(0.1, gt=0, description="β: temperature on the summed log-prob margin")
        alpha: float = Field(
            1.0, ge=0, description="α: weight of the NLL term on chosen (0 drops it)"
        )

    config: Config

    def compute(self, policy: PairLogps, reference: PairLogps | None) -> LossOutput:
        beta = self.config.beta
        avg_chosen_N, _ = average_logps(policy)
        nll_N = -avg_chosen_N
        preference_N = -F.logsigmoid(beta * (policy.chosen_logps - policy.rejected_logps))
        losses_N = preference_N + self.config.alpha * nll_N
        metrics = reward_metrics(policy, beta * policy.chosen_logps, beta * policy.rejected_logps)
        metrics["nll_loss"] = nll_N.detach().mean()
        return LossOutput(losses_N, metrics)
