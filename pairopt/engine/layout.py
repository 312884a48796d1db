"""Pairs (or groups of k responses, k may differ between groups) -> packed rows of token ids
with the ids the mask rule needs.

Shared layout, one segment per group:   [ prompt | response 1 | ... | response k ]
    branch ids                           [ 0 .. 0 | 1 ...... 1 | ... | k ...... k ]
    position ids                         [ 0..P-1 | P..P+n1-1 | ... | P..P+nk-1 ]
Unshared layout (the classic computation): one segment per response, [ prompt | response i ],
with branch ids 0 / 1 and positions 0..P+ni-1, i.e. exactly the tokens the plain forward sees.

Segments are packed into rows up to a token budget (first-fit-decreasing), or one per row.
Rows are right-padded to a common length rounded up to `bucket_size`. Padding is document -1,
branch 0, positions 0, 1, ... like a document of its own: under the mask rule it attends only
to padding (never NaN) and no real token attends to it.

Scoring is by predecessor index: response token j is scored from the hidden state of the
token before it *in its own branch*, i.e. the last prompt token for j = 0 (both responses are
predicted from the same prompt position), and the previous response token otherwise. A flat
index `b * L + t` addresses the hidden states of the row batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from pairopt.errors import PairoptError
from pairopt.pairs import ResponseGroup

PAD_DOC = -1


@dataclass
class Segment:
    """One document of a row, before packing: its tokens and what to score in it."""

    tokens: list[int]
    positions: list[int]
    branches: list[int]
    score_src: list[int]  # local index of each scored token's predecessor
    score_tgt: list[int]  # the scored token ids
    score_owner: list[int]  # flat response index (offset of group g) + (i - 1) of each scored token

    def __len__(self) -> int:
        return len(self.tokens)


@dataclass
class Layout:
    """A batch of rows; every tensor lives on the CPU until `to()`.

    input_ids, position_ids, doc_ids, branch_ids: (B, L) long.
    score_src: (T,) flat index b * L + t of each scored token's predecessor.
    score_tgt: (T,) the scored token ids.  score_owner: (T,) flat response index in [0, R):
    group g's responses are `offsets[g]:offsets[g + 1]` (groups may differ in size).
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    doc_ids: torch.Tensor
    branch_ids: torch.Tensor
    score_src: torch.Tensor
    score_tgt: torch.Tensor
    score_owner: torch.Tensor
    num_groups: int
    sizes: list[int]  # responses per group, k_g
    real_tokens: int  # non-padding tokens over all rows

    @property
    def num_responses(self) -> int:
        return sum(self.sizes)

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.input_ids.shape[0]), int(self.input_ids.shape[1]))

    @property
    def padded_tokens(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def packing_efficiency(self) -> float:
        """Real tokens over padded tokens (1.0 = no padding at all)."""
        return self.real_tokens / max(1, self.padded_tokens)

    def to(self, device: torch.device | str) -> Layout:
        moved = {
            name: getattr(self, name).to(device, non_blocking=True)
            for name in (
                "input_ids",
                "position_ids",
                "doc_ids",
                "branch_ids",
                "score_src",
                "score_tgt",
                "score_owner",
            )
        }
        return Layout(
            **moved, num_groups=self.num_groups, sizes=self.sizes, real_tokens=self.real_tokens
        )


def check_groups(groups: Sequence[ResponseGroup]) -> list[int]:
    """Validate token-level groups; return their sizes k_g (they may differ). Errors name the
    group and the response."""
    if not groups:
        raise PairoptError("compute_logps got no pairs: pass at least one PreferencePair.")
    sizes = []
    for g, group in enumerate(groups):
        k = len(group.responses)
        what = "pair" if k == 2 else "group"
        if len(group.prompt) == 0:
            raise PairoptError(
                f"{what} {g} has an empty prompt: the first response token must be scored from a "
                "prompt position. Tokenise the prompt with the tokenizer's special tokens (BOS)."
            )
        if k < 1:
            raise PairoptError(f"group {g} has no response: each group needs at least one.")
        for i, response in enumerate(group.responses):
            if len(response) == 0:
                name = ("chosen", "rejected")[i] if k == 2 else f"response {i + 1}"
                raise PairoptError(
                    f"{what} {g} has an empty {name} response: it has no token to score. "
                    "Drop the pair (the data loader can skip such rows with on_bad_row=skip)."
                )
        sizes.append(k)
    return sizes


def make_segments(groups: Sequence[ResponseGroup], share_prefix: bool) -> list[Segment]:
    """Groups -> segments: one per group when sharing, one per response otherwise."""
    segments = []
    first = 0  # flat index of the group's first response
    for group in groups:
        prompt = list(group.prompt)
        P = len(prompt)
        if share_prefix:
            tokens, positions, branches = list(prompt), list(range(P)), [0] * P
            src: list[int] = []
            tgt: list[int] = []
            owner: list[int] = []
            for i, response in enumerate(group.responses, start=1):
                start, n = len(tokens), len(response)
                tokens += response
                positions += range(P, P + n)
                branches += [i] * n
                src += [P - 1, *range(start, start + n - 1)]
                tgt += response
                owner += [first + i - 1] * n
            segments.append(Segment(tokens, positions, branches, src, tgt, owner))
        else:
            for i, response in enumerate(group.responses, start=1):
                n = len(response)
                segments.append(
                    Segment(
                        tokens=prompt + list(response),
                        positions=list(range(P + n)),
                        branches=[0] * P + [1] * n,
                        score_src=list(range(P - 1, P + n - 1)),
                        score_tgt=list(response),
                        score_owner=[first + i - 1] * n,
                    )
                )
        first += len(group.responses)
    return segments


def first_fit_decreasing(lengths: Sequence[int], budget: int) -> list[list[int]]:
    """Bin-pack items into bins of capacity `budget`; returns the item indices of each bin.

    First-fit-decreasing: at most 11/9 OPT + 1 bins. Items keep a stable order inside a bin.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    bins: list[list[int]] = []
    free: list[int] = []
    for i in order:
        if lengths[i] > budget:
            raise ValueError(f"item {i} of length {lengths[i]} exceeds the budget {budget}")
        for b, room in enumerate(free):
            if lengths[i] <= room:
                bins[b].append(i)
                free[b] -= lengths[i]
                break
        else:
            bins.append([i])
            free.append(budget - lengths[i])
    return [sorted(b) for b in bins]


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def build_layout(
    groups: Sequence[ResponseGroup],
    *,
    share_prefix: bool = True,
    packing: bool = True,
    max_tokens_per_row: int | None = None,
    bucket_size: int = 64,
) -> Layout:
    """Lay groups out in rows. `max_tokens_per_row=None` packs up to the longest segment."""
    sizes = check_groups(groups)
    segments = make_segments(groups, share_prefix)
    lengths = [len(s) for s in segments]
    longest = max(lengths)
    budget = longest if max_tokens_per_row is None else max_tokens_per_row
    if longest > budget:
        worst = lengths.index(longest)
        if share_prefix:
            what = "pair" if len(groups[worst].responses) == 2 else "group"
        else:
            what = "response segment"
        raise PairoptError(
            f"{what} {worst} needs {longest} tokens in one row (prompt + "
            f"{'all responses' if share_prefix else 'one response'}), over the row budget "
            f"max_tokens_per_row={budget}. Raise the budget or truncate the data "
            "(data.max_length / data.max_prompt_length)."
        )
    rows = first_fit_decreasing(lengths, budget) if packing else [[i] for i in range(len(segments))]
    used = [sum(lengths[i] for i in row) for row in rows]
    L = round_up(max(used), bucket_size)
    B = len(rows)

    input_ids = torch.zeros((B, L), dtype=torch.long)  # padding ids are never scored
    position_ids = torch.zeros((B, L), dtype=torch.long)
    doc_ids = torch.full((B, L), PAD_DOC, dtype=torch.long)
    branch_ids = torch.zeros((B, L), dtype=torch.long)
    src: list[int] = []
    tgt: list[int] = []
    owner: list[int] = []
    for b, row in enumerate(rows):
        offset = 0
        for doc, i in enumerate(row):
            seg, n = segments[i], lengths[i]
            sl = slice(offset, offset + n)
            input_ids[b, sl] = torch.tensor(seg.tokens)
            position_ids[b, sl] = torch.tensor(seg.positions)
            branch_ids[b, sl] = torch.tensor(seg.branches)
            doc_ids[b, sl] = doc
            base = b * L + offset
            src += [base + s for s in seg.score_src]
            tgt += seg.score_tgt
            owner += seg.score_owner
            offset += n
        position_ids[b, offset:] = torch.arange(L - offset)  # padding counts 0, 1, ... too
    return Layout(
        input_ids=input_ids,
        position_ids=position_ids,
        doc_ids=doc_ids,
        branch_ids=branch_ids,
        score_src=torch.tensor(src, dtype=torch.long),
        score_tgt=torch.tensor(tgt, dtype=torch.long),
        score_owner=torch.tensor(owner, dtype=torch.long),
        num_groups=len(groups),
        sizes=sizes,
        real_tokens=sum(lengths),
    )
