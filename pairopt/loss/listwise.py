"""The listwise loss contract: a loss over every response of a group, ranked by its score.

A pair loss (`PairLoss`) sees pairs; a listwise loss (`ListLoss`, kind "list") sees each
prompt's k responses at once, with their scores, and returns one loss per group. Groups differ
in size, so the inputs are padded to the largest group K with a mask:

    policy.logps  (G, K) float   S, summed log-probs of each response (0 where masked)
    policy.tokens (G, K) long    n, its token count (0 where masked)
    policy.scores (G, K) float   the data's score of each response, higher is better
    policy.mask   (G, K) bool    True for a real response, False for padding

The reference's `ListLogps` has the same tokens, scores and mask. Masked entries must not
change a loss or receive a gradient (a registry-wide test checks both). The trainer optimises
the mean of the per-group losses. A listwise loss needs scored data (prompt, responses, scores);
on pairwise data (prompt, chosen, rejected) the trainer refuses it before any model loads.

    @register_loss("my_list_loss")
    class MyListLoss(ListLoss):
        def compute(self, policy, reference):  # ListLogps (G, K) each
            ...
            return LossOutput(losses_G, list_reward_metrics(policy, rewards_GK))
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from pairopt.loss.base import Loss, LossOutput, check_output, missing_reference
from pairopt.pairs import GroupLogps


@dataclass
class ListLogps:
    """Every response of G groups padded to K, all fields (G, K); see the module docstring."""

    logps: torch.Tensor
    tokens: torch.Tensor
    scores: torch.Tensor
    mask: torch.Tensor

    def __len__(self) -> int:
        return int(self.logps.shape[0])

    @staticmethod
    def from_groups(flat: GroupLogps, scores_GK: torch.Tensor) -> ListLogps:
        """Pad flat per-response log-probs (R,) into (G, K); `scores_GK` is already padded."""
        logps_GK, tokens_GK, mask_GK = flat.padded()
        scores_GK = scores_GK.to(device=logps_GK.device, dtype=torch.float64)
        if scores_GK.shape != mask_GK.shape:
            raise ValueError(
                f"scores have shape {tuple(scores_GK.shape)} but the groups pad to "
                f"{tuple(mask_GK.shape)}"
            )
        return ListLogps(logps_GK, tokens_GK, scores_GK, mask_GK)

    def detach(self) -> ListLogps:
        return ListLogps(self.logps.detach(), self.tokens, self.scores, self.mask)

    def to(self, device: torch.device | str) -> ListLogps:
        return ListLogps(
            self.logps.to(device),
            self.tokens.to(device),
            self.scores.to(device),
            self.mask.to(device),
        )


class ListLoss(Loss):
    """Base class of the listwise losses (kind "list"); subclasses implement `compute`."""

    kind: ClassVar[str] = "list"

    def compute(self, policy: ListLogps, reference: ListLogps | None) -> LossOutput:
        """Per-group losses (G,) and metrics. `reference` is None iff not `requires_reference`."""
        raise NotImplementedError(
            f"{type(self).__name__} must implement compute(policy, reference)"
        )

    def forward(self, policy: ListLogps, reference: ListLogps | None = None) -> LossOutput:
        """Check the inputs, cut the reference out of the graph, upcast half precision (as
        `PairLoss.forward` does), call `compute`, and check one loss per group."""
        _check_lists(policy, "policy")
        if self.requires_reference:
            if reference is None:
                raise missing_reference(self)
            _check_lists(reference, "reference")
            if reference.logps.shape != policy.logps.shape or not torch.equal(
                reference.mask, policy.mask
            ):
                raise ValueError(
                    f"policy lists {tuple(policy.logps.shape)} and reference lists "
                    f"{tuple(reference.logps.shape)} must have the same shape and mask"
                )
            reference = _upcast(reference.detach())
        else:
            reference = None
        out = self.compute(_upcast(policy), reference)
        inputs = [policy.logps[policy.mask]]  # (R,): the padding of the lists is no input
        if reference is not None:
            inputs.append(reference.logps[reference.mask])
        check_output(self.name or type(self).__name__, out, inputs, len(policy), unit="group")
        return out


def _check_lists(lists: ListLogps, what: str) -> None:
    shapes = {tuple(t.shape) for t in (lists.logps, lists.tokens, lists.scores, lists.mask)}
    if len(shapes) != 1 or len(next(iter(shapes))) != 2:
        raise ValueError(
            f"{what} ListLogps fields must all have shape (G, K), got {sorted(shapes)}"
        )
    if lists.mask.dtype != torch.bool:
        raise ValueError(f"{what} ListLogps.mask must be bool, got {lists.mask.dtype}")


def _upcast(lists: ListLogps) -> ListLogps:
    if lists.logps.dtype in (torch.float16, torch.bfloat16):
        return ListLogps(lists.logps.float(), lists.tokens, lists.scores, lists.mask)
    return lists


# Helpers listwise plugins share


def ordered_pairs(scores_GK: torch.Tensor, mask_GK: torch.Tensor) -> torch.Tensor:
    """(G, K, K) bool: [g, i, j] is True iff responses i and j of group g are real and i is
    scored strictly higher than j. Ties (and padding) form no pair."""
    real = mask_GK[:, :, None] & mask_GK[:, None, :]
    return real & (scores_GK[:, :, None] > scores_GK[:, None, :])


def list_reward_metrics(policy: ListLogps, rewards_GK: torch.Tensor) -> dict[str, torch.Tensor]:
    """The six standard metrics over every ordered pair of the batch (i scored above j): the
    better response is "chosen", the worse "rejected"; detached means (0 when no pair).

    `rewards/accuracies` is the fraction of those pairs whose rewards are in the score order.
    """
    better_GKK = ordered_pairs(policy.scores, policy.mask)
    count = better_GKK.sum().clamp(min=1)
    rewards_GKK, logps_GKK = rewards_GK.detach()[:, :, None], policy.logps.detach()[:, :, None]

    def mean(values_GKK: torch.Tensor) -> torch.Tensor:
        return values_GKK.expand_as(better_GKK)[better_GKK].sum() / count

    chosen, rejected = rewards_GKK, rewards_GKK.transpose(1, 2)  # i better, j worse
    return {
        "rewards/chosen": mean(chosen),
        "rewards/rejected": mean(rejected),
        "rewards/accuracies": mean((chosen > rejected).to(chosen.dtype)),
        "rewards/margins": mean(chosen - rejected),
        "logps/chosen": mean(logps_GKK),
        "logps/rejected": mean(logps_GKK.transpose(1, 2)),
    }
