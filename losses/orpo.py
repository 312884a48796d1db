"""`orpo`: Odds Ratio Preference Optimisation (reference-free)."""

from __future__ import annotations

import torch
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


def log_odds(avg_logps_N: torch.Tensor) -> torch.Tensor:
    """log(p / (1 − p)) for p = exp(A), A ≤ 0 a per-token average log-prob, (N,).

    Naive equivalent: `A - torch.log(1 - torch.exp(A))`. `log(−expm1(A))` keeps the digits that
    `1 − exp(A)` loses for A near 0; A is clamped to ≤ −eps (eps of its dtype) so that A = 0
    (every token certain) gives a large finite value instead of +inf.
    """
    eps = torch.finfo(avg_logps_N.dtype).eps
    clamped_N = avg_logps_N.clamp(max=-eps)
    return clamped_N - torch.log(-torch.expm1(clamped_N))


@register_loss("orpo")
class ORPO(PairLoss):
    """ORPO: NLL on the chosen response plus a log-odds-ratio preference term, no reference.

    Paper: Hong et al. 2024, "ORPO: Monolithic Preference Optimization without Reference Model",
    https://arxiv.org/abs/2403.07691

    Formula (per pair):

        loss     = −A_c − λ·logσ(log_odds(A_c) − log_odds(A_r))
        log_odds(A) = A − log(1 − exp(A))
        A        = S / n

    Symbols: S summed policy log-probs of a response, n its token count (clamped to ≥ 1), A the
    per-token average, c chosen, r rejected; λ the weight of the odds-ratio term (TRL calls it
    beta); σ the logistic sigmoid.

    Shapes: policy PairLogps fields (N,) → losses (N,). No reference model.

    Metrics: rewards = λ·A (TRL's ORPO convention: λ times the averaged log-prob), detached;
    `nll_loss` = mean(−A_c); `log_odds_ratio` = mean(logσ(log_odds(A_c) − log_odds(A_r)));
    `log_odds_chosen` = mean(log_odds(A_c) − log_odds(A_r)) (TRL's names).

    Defaults: λ = 0.1 (TRL ORPOConfig.beta; the paper's λ = 0.1).

    Deviations: TRL's NLL term is the cross-entropy averaged over all chosen tokens of the batch
    (token-weighted); here it is each pair's own per-token average −A_c, then averaged over pairs
    (pair-weighted), so that the loss is defined per pair. The two agree when all chosen responses
    have the same length. A is clamped to ≤ −eps (see `log_odds`), which TRL does not do.
    """

    summary = "ORPO: chosen NLL plus λ × log-odds-ratio preference term (reference-free)"
    requires_reference = False

    class Config(LossConfig):
        beta: float = Field(
            0.1, gt=0, description="λ: weight of the odds-ratio term (TRL's ORPOConfig.beta)"
        )

    config: Config

    def compute(self, policy: PairLogps, reference: PairLogps | None) -> LossOutput:
        avg_chosen_N, avg_rejected_N = average_logps(policy)
        log_odds_N = log_odds(avg_chosen_N) - log_odds(avg_rejected_N)
        ratio_N = F.logsigmoid(log_odds_N)
        nll_N = -avg_chosen_N
        losses_N = nll_N - self.config.beta * ratio_N
        metrics = reward_metrics(
            policy, self.config.beta * avg_chosen_N, self.config.beta * avg_rejected_N
        )
        metrics["nll_loss"] = nll_N.detach().mean()
        metrics["log_odds_ratio"] = ratio_N.detach().mean()
        metrics["log_odds_chosen"] = log_odds_N.detach().mean()
        return LossOutput(losses_N, metrics)
