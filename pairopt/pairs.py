"""Token-level preference data in, per-response log-probabilities out.

These are the engine's input and output types; losses consume `PairLogps` and never know how
it was computed (shared or unshared, which backend). The token counts of a group's two layouts
are defined here once (`shared_length`, `unshared_length`, `row_need`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

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
    # Per-token values asked of the engine (pairopt.engine.logps.TOKEN_STATISTICS), flat (T,):
    # response r's tokens are at token_offsets()[r]:token_offsets()[r + 1], in order.
    token_values: dict[str, torch.Tensor] = field(default_factory=dict)

    def token_offsets(self) -> torch.Tensor:
        """(R + 1,) long: where each response's tokens start in `token_values`."""
        return torch.cat([self.tokens.new_zeros(1), self.tokens.cumsum(0)])

    def per_token(self, name: str, index: torch.Tensor) -> torch.Tensor:
        """(N, L) the per-token `name` of the responses at flat indices `index`, right-padded
        with 0 to L = the longest of them (a response's count in `tokens` says where it ends)."""
        values_T = self.token_values[name]
        counts_N = self.tokens[index]
        L = int(counts_N.max()) if counts_N.numel() else 0
        starts_N = self.token_offsets()[index]
        steps_L = torch.arange(L, device=counts_N.device)
        mask_NL = steps_L[None, :] < counts_N[:, None]
        positions_NL = (starts_N[:, None] + steps_L[None, :]).clamp(max=max(len(values_T) - 1, 0))
        if not len(values_T):
            return values_T.new_zeros(len(index), L)
        return values_T[positions_NL] * mask_NL.to(values_T.dtype)

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
            self.logps[chosen],
            self.logps[rejected],
            self.tokens[chosen],
            self.tokens[rejected],
            {
                name: (self.per_token(name, chosen), self.per_token(name, rejected))
                for name in self.token_values
            },
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
        values = {}
        if self.token_values:
            starts = self.token_offsets().tolist()
            token_index = torch.tensor(
                [t for i in index.tolist() for t in range(starts[i], starts[i + 1])],
                dtype=torch.long,
                device=self.logps.device,
            )
            values = {name: v[token_index] for name, v in self.token_values.items()}
        return GroupLogps(
            self.logps[index], self.tokens[index], offsets_of([len(s) for s in spans]), values
        )

    def detach(self) -> GroupLogps:
        values = {name: v.detach() for name, v in self.token_values.items()}
        return GroupLogps(self.logps.detach(), self.tokens, self.offsets, values)

    def to(self, device: torch.device | str) -> GroupLogps:
        values = {name: v.to(device) for name, v in self.token_values.items()}
        return GroupLogps(
            self.logps.to(device), self.tokens.to(device), self.offsets.to(device), values
        )

    @staticmethod
    def cat(parts: Sequence[GroupLogps]) -> GroupLogps:
        sizes = [n for p in parts for n in p.sizes]
        names = parts[0].token_values.keys() if parts else []
        return GroupLogps(
            torch.cat([p.logps for p in parts]),
            torch.cat([p.tokens for p in parts]),
            offsets_of(sizes),
            {name: torch.cat([p.token_values[name] for p in parts]) for name in names},
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
    # Per-token values a loss asked for (pairopt.engine.logps.TOKEN_STATISTICS): name ->
    # (chosen (N, Lc), rejected (N, Lr)), right-padded with 0 past each response's count.
    token_values: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.chosen_logps.shape[0])

    def _map(self, fn: Any, tokens: Any = None) -> PairLogps:
        keep = tokens or (lambda t: t)
        return PairLogps(
            fn(self.chosen_logps),
            fn(self.rejected_logps),
            keep(self.chosen_tokens),
            keep(self.rejected_tokens),
            {name: (fn(c), fn(r)) for name, (c, r) in self.token_values.items()},
        )

    def detach(self) -> PairLogps:
        return self._map(lambda t: t.detach())

    def to(self, device: torch.device | str) -> PairLogps:
        return self._map(lambda t: t.to(device), lambda t: t.to(device))

    def __getitem__(self, index: torch.Tensor | slice | Sequence[int]) -> PairLogps:
        return self._map(lambda t: t[index], lambda t: t[index])

    @staticmethod
    def cat(parts: Sequence[PairLogps]) -> PairLogps:
        names = parts[0].token_values.keys() if parts else []
        return PairLogps(
            torch.cat([p.chosen_logps for p in parts]),
            torch.cat([p.rejected_logps for p in parts]),
            torch.cat([p.chosen_tokens for p in parts]),
            torch.cat([p.rejected_tokens for p in parts]),
            {
                name: (
                    _cat_padded([p.token_values[name][0] for p in parts]),
                    _cat_padded([p.token_values[name][1] for p in parts]),
                )
                for name in names
            },
        )


def _cat_padded(parts: Sequence[torch.Tensor]) -> torch.Tensor:
    """Rows of (N_i, L_i) tensors into one (ΣN_i, max L_i), right-padded with 0."""
    width = max(p.shape[1] for p in parts)
    return torch.cat([torch.nn.functional.pad(p, (0, width - p.shape[1])) for p in parts])
