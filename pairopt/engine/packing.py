"""Batches by token budget: a windowed first-fit-decreasing packer over a shuffled stream.

A step should carry as many pairs as fit a token budget, not a fixed number of pairs: short
pairs then fill the row that long pairs leave half empty, and nothing is spent on padding.
Packing the whole dataset at once would sort it by length (first-fit-decreasing places the
longest items first) and the batches would be the same every epoch. Instead:

1. shuffle the item indices with a generator seeded by (seed, epoch);
2. cut the shuffled stream into windows of `window` items;
3. first-fit-decreasing inside each window into bins of `max_tokens` (at most 11/9 OPT + 1
   bins); the least-full bin of a window is not emitted but carried into the next window,
   where the new items can fill it (the last window emits everything);
4. shuffle the bins of a window before emitting them, so the batch order does not follow the
   length order FFD creates.

Every item appears exactly once per epoch, every batch sums to at most `max_tokens`, and a
different epoch gives different batches. Lengths are what the engine lays out:
`pairopt.pairs.shared_length` (P + C + R) or `unshared_length` (2P + C + R).

Naive equivalent: `[[i] for i in shuffled]` (one pair per step) or fixed-size slices of the
shuffled stream; both waste the padding this removes.

With the engine: give each batch to `compute_logps(..., packing=True,
max_tokens_per_row=max_tokens)` and the pairs of a batch share one row; `bucket_size=max_tokens`
pads every row to exactly `max_tokens`, so compiled kernels (FlexAttention) see one shape.
`rows_per_batch > 1` groups several bins into one batch for backends whose cost grows with
the row length squared (the dense sdpa mask).
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence

from torch.utils.data import Sampler

from pairopt.engine.layout import first_fit_decreasing, round_up
from pairopt.errors import PairoptError


def pack_batches(
    lengths: Sequence[int],
    max_tokens: int,
    *,
    window: int = 1024,
    seed: int = 0,
    epoch: int = 0,
    shuffle: bool = True,
    rows_per_batch: int = 1,
) -> list[list[int]]:
    """Item indices of each batch for one epoch; see the module docstring.

    lengths: the token count of each item (`shared_length` or `unshared_length`). max_tokens: the budget of one
    bin (one row). window: how many stream items FFD sees at once (larger packs tighter,
    smaller keeps batches closer to the shuffled order). rows_per_batch: bins per batch.
    """
    if max_tokens < 1 or window < 1 or rows_per_batch < 1:
        raise PairoptError(
            f"pack_batches needs max_tokens, window and rows_per_batch >= 1, got "
            f"{max_tokens}, {window} and {rows_per_batch}."
        )
    for i, n in enumerate(lengths):
        if n > max_tokens:
            raise PairoptError(
                f"item {i} needs {n} tokens, over the batch budget max_tokens={max_tokens}. "
                "Raise the budget or truncate the data (data.max_length)."
            )
    order = list(range(len(lengths)))
    rng = random.Random(f"{seed}/{epoch}")  # str seeds are hashed deterministically (sha512)
    if shuffle:
        rng.shuffle(order)
    bins: list[list[int]] = []
    carry: list[int] = []
    for start in range(0, len(order), window):
        items = carry + order[start : start + window]
        last = start + window >= len(order)
        packed = first_fit_decreasing([lengths[i] for i in items], max_tokens)
        window_bins = [[items[j] for j in b] for b in packed]
        carry = []
        if not last and len(window_bins) > 1:
            fill = [sum(lengths[i] for i in b) for b in window_bins]
            carry = window_bins.pop(fill.index(min(fill)))
        if shuffle:
            rng.shuffle(window_bins)
        bins += window_bins
    return [
        [i for b in bins[j : j + rows_per_batch] for i in b]
        for j in range(0, len(bins), rows_per_batch)
    ]


def packing_efficiency(
    lengths: Sequence[int], batches: Sequence[Sequence[int]], row_tokens: int, bucket_size: int
) -> float:
    """Real tokens over padded tokens when each batch is one row of at most `row_tokens`,
    padded up to a multiple of `bucket_size` (`bucket_size=row_tokens`: a fixed row length)."""
    real = sum(lengths[i] for b in batches for i in b)
    padded = sum(
        min(round_up(sum(lengths[i] for i in b), bucket_size), row_tokens) for b in batches
    )
    return real / max(1, padded)


class TokenBudgetBatchSampler(Sampler[list[int]]):
    """`pack_batches` as a torch batch sampler: `DataLoader(ds, batch_sampler=...)`.

    Call `set_epoch(epoch)` before each epoch (as with DistributedSampler) for new batches.
    """

    def __init__(
        self,
        lengths: Sequence[int],
        max_tokens: int,
        *,
        window: int = 1024,
        seed: int = 0,
        shuffle: bool = True,
        rows_per_batch: int = 1,
    ) -> None:
        self.lengths = list(lengths)
        self.max_tokens = max_tokens
        self.window = window
        self.seed = seed
        self.shuffle = shuffle
        self.rows_per_batch = rows_per_batch
        self.epoch = 0
        self._cache: tuple[int, list[list[int]]] | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def batches(self) -> list[list[int]]:
        if self._cache is None or self._cache[0] != self.epoch:
            batches = pack_batches(
                self.lengths,
                self.max_tokens,
                window=self.window,
                seed=self.seed,
                epoch=self.epoch,
                shuffle=self.shuffle,
                rows_per_batch=self.rows_per_batch,
            )
            self._cache = (self.epoch, batches)
        return self._cache[1]

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches())

    def __len__(self) -> int:
        return len(self.batches())
