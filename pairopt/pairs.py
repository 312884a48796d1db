"""Token-level preference data in, per-response log-probabilities out.

These are the engine's input and output types; losses consume `PairLogps` and never know how
it was computed (shared or unshared, which backend). The token counts of a group's two layouts
are defined here once (`shared_length`, `unshared_length`, `row_need`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


def shared_length(prompt: int, responses: Sequence[int]) -> int:
    """Tokens of a group in the shared layout, one segment: P + n_1 + ... + n_k."""
    return prompt + sum(responses)


def unshared_length(prompt: int, responses: Sequence[int]) -> int:
    """Tokens of a group in the unshared (classic) layout, k segments: k·P + n_1 + ... + n_k."""
    return len(responses) * prompt + sum(responses)


def row_need(prompt: int, responses: Sequence[int], share_prefix: bool) -> int:
    """The fewest tokens one row must hold for a group: its shared segment, or (unshared) the
    prompt with its longest response. A packed row budget below this cannot hold the group."""
    return shared_length(prompt, responses) if share_prefix else prompt + max(responses)


@dataclass(frozen=True)
class PreferencePair:
    """One prompt with a preferred (`chosen`) and a dispreferred (`rejected`) response.

    All three are token ids. The prompt carries the special tokens (BOS, chat template); the
    responses are the continuations, EOS included (docs/configuration.md, Data).
    """

    prompt: Sequence[int]
    chosen: Sequence[int]
    rejected: Sequence[int]

    def as_group(self) -> ResponseGroup:
        return ResponseGroup(prompt=self.prompt, responses=(self.chosen, self.rejected))

    def lengths(self) -> tuple[int, list[int]]:
        """(P, [C, R]): the arguments of `shared_length`, `unshared_length` and `row_need`."""
        return len(self.prompt), [len(self.chosen), len(self.rejected)]


@dataclass(frozen=True)
class ResponseGroup:
    """The general case: one prompt with k responses (branch i = responses[i - 1]).

    Groups of one call may have different sizes; `GroupLogps` holds their log-probs flat.
    """

    prompt: Sequence[int]
    responses: Sequence[Sequence[int]]


@dataclass
class GroupLogps:
    """Summed log-probs and token counts of every response of groups of any sizes, flat.

    `logps` (R,) float and `tokens` (R,) long, one entry per response, the groups one after
    another; `offsets` (G + 1,) long: group g's responses are `logps[offsets[g]:offsets[g + 1]]`.
    A response in several pairs is here once; `pairs` indexes it into each of them, so its
    gradient accumulates through autograd. Naive equivalent of `pairs(c, r)`: one forward per
    pair, the chosen and rejected response computed again for every pair they are in.
    """

    logps: torch.Tensor
    tokens: torch.Tensor
    offsets: torch.Tensor

    @property
    def sizes(self) -> list[int]:
        """Responses per group, k_g."""
        return self.offsets.diff().tolist()

    @property
    def num_groups(self) -> int:
        return int(self.offsets.shape[0]) - 1

    def pairs(self, chosen: torch.Tensor, rejected: torch.Tensor) -> PairLogps:
        """PairLogps (N,) of the responses at flat indices `chosen` (N,) and `rejected` (N,)."""
        return PairLogps(
            self.logps[chosen], self.logps[rejected], self.tokens[chosen], self.tokens[rejected]
        )

    def padded(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(logps, tokens, mask), each (G, K) with K = the largest group; padding is 0 / False."""
        sizes = self.offsets.diff()
        K = int(sizes.max()) if sizes.numel() else 0
        mask_GK = torch.arange(K, device=sizes.device)[None, :] < sizes[:, None]
        logps_GK = self.logps.new_zeros(len(sizes), K).masked_scatter(mask_GK, self.logps)
        tokens_GK = self.tokens.new_zeros(len(sizes), K).masked_scatter(mask_GK, self.tokens)
        return logps_GK, tokens_GK, mask_GK

    def as_matrix(self) -> ResponseLogps:
        """The (G, k) form, for groups that all have k responses."""
        sizes = set(self.sizes)
        if len(sizes) != 1:
            raise ValueError(
                f"groups of different sizes {sorted(sizes)} have no (G, k) form: use the flat "
                "GroupLogps (compute_group_logps) instead"
            )
        k = sizes.pop()
        return ResponseLogps(self.logps.view(-1, k), self.tokens.view(-1, k))

    def take(self, groups: Sequence[int]) -> GroupLogps:
        """The responses of groups `groups` (in that order), with their own offsets."""
        bounds = self.offsets.tolist()
        spans = [range(bounds[g], bounds[g + 1]) for g in groups]
        index = torch.tensor([i for span in spans for i in span], dtype=torch.long)
        index = index.to(self.logps.device)
        return GroupLogps(
            self.logps[index], self.tokens[index], offsets_of([len(s) for s in spans])
        )

    def detach(self) -> GroupLogps:
        return GroupLogps(self.logps.detach(), self.tokens, self.offsets)

    def to(self, device: torch.device | str) -> GroupLogps:
        return GroupLogps(self.logps.to(device), self.tokens.to(device), self.offsets.to(device))

    @staticmethod
    def cat(parts: Sequence[GroupLogps]) -> GroupLogps:
        sizes = [n for p in parts for n in p.sizes]
        return GroupLogps(
            torch.cat([p.logps for p in parts]),
            torch.cat([p.tokens for p in parts]),
            offsets_of(sizes),
        )


def offsets_of(sizes: Sequence[int]) -> torch.Tensor:
    """(G + 1,) long offsets of groups of `sizes` responses: [0, k_0, k_0 + k_1, ...]."""
    return torch.tensor([0, *sizes], dtype=torch.long).cumsum(0)


@dataclass
class ResponseLogps:
    """Summed log-probs and token counts per response: `logps` (N, k) float, `tokens` (N, k) long."""

    logps: torch.Tensor
    tokens: torch.Tensor

    def as_pairs(self) -> PairLogps:
        if self.logps.shape[1] != 2:
            raise ValueError(
                f"as_pairs needs k = 2 responses per prompt, got {self.logps.shape[1]}"
            )
        return PairLogps(self.logps[:, 0], self.logps[:, 1], self.tokens[:, 0], self.tokens[:, 1])


@dataclass
class PairLogps:
    """Per-pair sums of response-token log-probs and their token counts, all tensors of shape (N,).

    `chosen_logps` and `rejected_logps` are differentiable when computed from a model in
    grad mode. Averages are `chosen_logps / chosen_tokens`; plugins derive them themselves.
    """

    chosen_logps: torch.Tensor
    rejected_logps: torch.Tensor
    chosen_tokens: torch.Tensor
    rejected_tokens: torch.Tensor

    def __len__(self) -> int:
        return int(self.chosen_logps.shape[0])

    def detach(self) -> PairLogps:
        return PairLogps(
            self.chosen_logps.detach(),
            self.rejected_logps.detach(),
            self.chosen_tokens,
            self.rejected_tokens,
        )

    def to(self, device: torch.device | str) -> PairLogps:
        return PairLogps(
            self.chosen_logps.to(device),
            self.rejected_logps.to(device),
            self.chosen_tokens.to(device),
            self.rejected_tokens.to(device),
        )

    def __getitem__(self, index: torch.Tensor | slice | Sequence[int]) -> PairLogps:
        return PairLogps(
            self.chosen_logps[index],
            self.rejected_logps[index],
            self.chosen_tokens[index],
            self.rejected_tokens[index],
        )

    @staticmethod
    def cat(parts: Sequence[PairLogps]) -> PairLogps:
        return PairLogps(
            torch.cat([p.chosen_logps for p in parts]),
            torch.cat([p.rejected_logps for p in parts]),
            torch.cat([p.chosen_tokens for p in parts]),
            torch.cat([p.rejected_tokens for p in parts]),
        )
