"""`sft`: negative log-likelihood of the chosen response, a building block for `combined`."""

from __future__ import annotations

from pairopt.loss import LossOutput, PairLoss, average_logps, register_loss, reward_metrics
from pairopt.pairs import PairLogps


@register_loss("sft")
class SFT(PairLoss):
    """SFT on the chosen response: its negative log-likelihood, averaged per token.

    Paper: none; the supervised term of RPO, CPO and ORPO on its own, to combine with a preference
    loss in `combined` (e.g. DPO + SFT, TRL's `loss_type=["sigmoid", "sft"]`).

    Formula (per pair):

        loss = −S_c / n_c

    Symbols: S_c summed policy log-probs of the chosen response, n_c its token count (clamped to
    ≥ 1). The rejected response is ignored.

    Shapes: policy PairLogps fields (N,) → losses (N,). No reference model.

    Metrics: rewards = A = S / n (the reference-free convention with β = 1), detached;
    `nll_loss` = mean(−S_c / n_c).

    Defaults: no parameters.

    Deviations: TRL's `sft` loss type averages the cross-entropy over all chosen tokens of the
    batch (token-weighted); this averages per pair first (pair-weighted), so each pair has a loss
    and a long response does not outweigh a short one.
    """

    summary = "NLL of the chosen response, averaged per token (a building block for `combined`)"
    requires_reference = False

    def compute(self, policy: PairLogps, reference: PairLogps | None) -> LossOutput:
        avg_chosen_N, avg_rejected_N = average_logps(policy)
        losses_N = -avg_chosen_N
        metrics = reward_metrics(policy, avg_chosen_N, avg_rejected_N)
        metrics["nll_loss"] = losses_N.detach().mean()
        return LossOutput(losses_N, metrics)
