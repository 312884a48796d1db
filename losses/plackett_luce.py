"""`plackett_luce`: DPO's Plackett-Luce objective on every response of a prompt, ranked by score."""

from __future__ import annotations

import torch
from pydantic import Field

from pairopt.loss import (
    ListLogps,
    ListLoss,
    LossConfig,
    LossOutput,
    list_reward_metrics,
    ordered_pairs,
    register_loss,
)


@register_loss("plackett_luce")
class PlackettLuce(ListLoss):
    """Listwise DPO: the Plackett-Luce likelihood of the data's ranking under implicit rewards.

    Paper: Rafailov et al. 2023, "Direct Preference Optimization", appendix A.3 (the
    Plackett-Luce model), https://arxiv.org/abs/2305.18290

    Formula (per group of K responses ranked τ(1) best ... τ(K) worst by score):

        loss = −Σ_{j=1..K} log( exp(r_τ(j)) / Σ_{l=j..K} exp(r_τ(l)) )
        r    = β·(S − S^ref)

    With ties in the scores, the denominator of response i holds i itself and the responses
    scored strictly below it: loss = −Σ_i [ r_i − log( exp(r_i) + Σ_{l: s_l < s_i} exp(r_l) ) ].
    Without ties this is the formula above; with K = 2 it is DPO's −logσ(r_c − r_r).

    Symbols: S summed policy log-probs of a response, S^ref the reference model's; s its score
    in the data (higher is better); r its implicit reward; β temperature; τ the ranking by s.

    Shapes: policy and reference ListLogps fields (G, K), mask (G, K) → losses (G,). Masked
    entries (groups smaller than K) take no part and receive no gradient.

    Metrics: rewards = β·(S − S^ref), detached, over every ordered pair of the batch (the better
    response as "chosen"); `rewards/accuracies` is the fraction of those pairs whose rewards
    follow the scores.

    Defaults: β = 0.1, as DPO (TRL DPOConfig.beta); appendix A.3 uses DPO's β and gives no value
    of its own.

    Deviations: the paper assumes a ranking without ties. Here tied responses are neither ordered
    nor compared (no arbitrary order between them, the loss does not depend on the order of the
    responses in the row), so a group whose responses all tie contributes 0, as ties form no
    pair for the pair losses either. The loss of a group is the paper's sum over its K stages,
    not a mean: larger groups weigh more.
    """

    summary = (
        "Plackett-Luce DPO (listwise): the likelihood of the data's ranking of all k responses"
    )
    requires_reference = True

    class Config(LossConfig):
        beta: float = Field(
            0.1, gt=0, description="β: temperature of the implicit rewards (DPO's default 0.1)"
        )

    config: Config

    def compute(self, policy: ListLogps, reference: ListLogps | None) -> LossOutput:
        assert reference is not None  # ListLoss.forward refuses a missing reference first
        mask_GK = policy.mask
        rewards_GK = torch.where(
            mask_GK, self.config.beta * (policy.logps - reference.logps), 0.0
        )  # padding: 0, never in a real response's pool, no gradient
        K = mask_GK.shape[1]
        eye_KK = torch.eye(K, dtype=torch.bool, device=mask_GK.device)
        # pool[g, i, l]: l is in the denominator of response i (itself, or scored below it)
        pool_GKK = ordered_pairs(policy.scores, mask_GK) | eye_KK
        logits_GKK = rewards_GK[:, None, :].expand_as(pool_GKK)
        denominator_GK = logits_GKK.masked_fill(~pool_GKK, float("-inf")).logsumexp(-1)
        stages_GK = torch.where(mask_GK, rewards_GK - denominator_GK, 0.0)
        return LossOutput(-stages_GK.sum(-1), list_reward_metrics(policy, rewards_GK))
