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
    """The general case: one prompt with k >= 2 responses (branch i = responses[i - 1])."""

    prompt: Sequence[int]
    responses: Sequence[Sequence[int]]


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
