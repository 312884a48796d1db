"""A batch of groups, ready for the engine and the losses.

    rows_to_batch(dataset[indices]) -> GroupBatch

`groups` go to the engine (`compute_group_logps`), which returns every response's log-prob
once, flat (R,), group after group. `chosen` and `rejected` are the pairs as flat indices into
that (R,) vector, so `GroupLogps.pairs(batch.chosen, batch.rejected)` is the `PairLogps` a pair
loss receives, and `scores` (G, K) the padded scores a listwise loss receives with
`ListLogps.from_groups`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pairopt.pairs import ResponseGroup


@dataclass
class GroupBatch:
    """Groups with their pairs as flat response indices; see the module docstring.

    groups: G ResponseGroups.  chosen, rejected: (N,) long, indices into the R responses.
    scores: (G, K) float64, padded with 0 (all 0 for pairwise data).  scored: data has scores.
    """

    groups: list[ResponseGroup]
    chosen: torch.Tensor
    rejected: torch.Tensor
    scores: torch.Tensor
    scored: bool

    @property
    def num_pairs(self) -> int:
        return int(self.chosen.shape[0])

    @property
    def num_responses(self) -> int:
        return sum(len(g.responses) for g in self.groups)

    def tokens(self) -> int:
        """Tokens of the group-shared layout: sum over groups of P + n_1 + ... + n_k."""
        return sum(len(g.prompt) + sum(len(r) for r in g.responses) for g in self.groups)


def rows_to_batch(rows: dict[str, list]) -> GroupBatch:
    """A columnar batch of groups (`dataset[indices]`, GROUP_FEATURES) -> GroupBatch."""
    groups, chosen, rejected = [], [], []
    first = 0
    for prompt, responses, c, r in zip(
        rows["prompt_ids"],
        rows["responses_ids"],
        rows["chosen_idx"],
        rows["rejected_idx"],
        strict=True,
    ):
        groups.append(ResponseGroup(prompt=prompt, responses=responses))
        chosen += [first + i for i in c]
        rejected += [first + i for i in r]
        first += len(responses)
    K = max((len(g.responses) for g in groups), default=0)
    scores = torch.zeros(len(groups), K, dtype=torch.float64)
    scored = any(rows["scores"])
    for g, values in enumerate(rows["scores"]):
        scores[g, : len(values)] = torch.tensor(values, dtype=torch.float64)
    return GroupBatch(
        groups,
        torch.tensor(chosen, dtype=torch.long),
        torch.tensor(rejected, dtype=torch.long),
        scores,
        scored,
    )
