"""What a loss receives from a batch of groups, by the kind the loss declares.

The engine gives every response's log-prob once, flat (`GroupLogps`, (R,)). A pair loss
(`kind == "pair"`) receives `PairLogps` (N,) indexed out of it at the batch's pairs, so a
response in several pairs is computed once and its gradient accumulates; a listwise loss
(`kind == "list"`) receives every response padded to (G, K) with the scores and a mask
(`ListLogps`). Naive equivalent of the pair case: `compute_logps` on the pairs written out one
by one, each response computed again for every pair it is in (tests/test_trainer_groups.py
compares both, values and gradients).
"""

from __future__ import annotations

from typing import Any

from pairopt.data.batch import GroupBatch
from pairopt.data.load import PreferenceData
from pairopt.errors import PairoptError
from pairopt.loss.base import Loss, LossOutput
from pairopt.loss.listwise import ListLogps
from pairopt.pairs import GroupLogps


def examples_in(loss_fn: Loss, batch: GroupBatch) -> int:
    """How many values the loss returns for `batch`: pairs, or groups for a listwise loss."""
    return len(batch.groups) if loss_fn.kind == "list" else batch.num_pairs


def loss_inputs(
    loss_fn: Loss, batch: GroupBatch, policy: GroupLogps, reference: GroupLogps | None
) -> tuple[Any, Any]:
    """(policy, reference) in the form `loss_fn` takes; see the module docstring."""
    if loss_fn.kind == "list":
        lists = ListLogps.from_groups(policy, batch.scores)
        ref = None if reference is None else ListLogps.from_groups(reference, batch.scores)
        return lists, ref
    device = policy.logps.device
    chosen, rejected = batch.chosen.to(device), batch.rejected.to(device)
    pairs = policy.pairs(chosen, rejected)
    if reference is None:
        return pairs, None
    return pairs, reference.to(device).pairs(chosen, rejected)


def apply_loss(
    loss_fn: Loss, batch: GroupBatch, policy: GroupLogps, reference: GroupLogps | None
) -> LossOutput:
    """The loss of a batch: `loss_fn(*loss_inputs(...))`."""
    if reference is not None:
        reference = reference.to(policy.logps.device)
    return loss_fn(*loss_inputs(loss_fn, batch, policy, reference))


def check_loss_fits_data(loss_cls: type[Loss], data: PreferenceData, dataset: str) -> None:
    """A listwise loss ranks responses by score: refuse it on pairwise data, before any model."""
    if loss_cls.kind == "list" and not data.ranked:
        raise PairoptError(
            f"loss {loss_cls.name!r} is listwise: it ranks every response of a prompt by its "
            f"score, but {dataset} is pairwise (chosen/rejected, no scores). Use ranked data "
            "(data.format: ranked with a responses and a scores column, e.g. --dataset "
            "builtin:tiny-prefs-groups) or a pair loss (pairopt losses lists the kinds)."
        )
