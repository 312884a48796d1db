"""What each optimiser step trains on, and at which learning rate.

The items are groups (a prompt with its responses and pairs, pairopt.data.groups); a group is
never split across micro-batches, so its prompt and every response are computed once. Data
order is a pure function of (seed, epoch): the groups are permuted with
`torch.randperm(seed + epoch)`, cut into micro-batches (by examples and/or tokens: an example
is a pair for a pair loss, a group for a listwise loss), and every
`world * grad_accum` consecutive micro-batches form one optimiser step; process r takes
micro-batches r, r + world, ... of each step. A resumed run therefore replays the same batches,
and two processes compute exactly what one process with `grad_accum * 2` computes. An
incomplete last step of an epoch is dropped.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from itertools import combinations
from typing import Any

import torch
from torch import nn

from pairopt.errors import PairoptError
from pairopt.pairs import row_need
from pairopt.training.config import OptimConfig


def _group_shapes(dataset: Any) -> Iterator[tuple[int, list[int]]]:
    """(P, [n_1, ..., n_k]) of every group, read from the Arrow columns without materialising
    the token ids."""
    arrow = dataset.with_format("arrow")
    for start in range(0, len(dataset), 8192):
        table = arrow[start : start + 8192]
        prompt = table.column("prompt_ids").combine_chunks().value_lengths().to_pylist()
        responses = table.column("responses_ids").combine_chunks()
        counts = responses.value_lengths().to_pylist()
        sizes = responses.flatten().value_lengths().to_pylist()
        first = 0
        for p, k in zip(prompt, counts, strict=True):
            yield p, sizes[first : first + k]
            first += k


def group_lengths(dataset: Any, *, share_prefix: bool = True) -> list[int]:
    """`row_need` of every group: its prompt with all its responses (shared), or the prompt
    with the longest response (unshared)."""
    return [row_need(p, ns, share_prefix) for p, ns in _group_shapes(dataset)]


def group_examples(dataset: Any, per_group: bool) -> list[int]:
    """What each group counts for in a batch: its number of pairs, or 1 (`per_group`, a
    listwise loss, whose loss is one value per group)."""
    if per_group:
        return [1] * len(dataset)
    column = dataset.with_format("arrow")["chosen_idx"].combine_chunks()
    return column.value_lengths().to_pylist()


def group_pair_counts(dataset: Any, *, listwise: bool) -> list[int]:
    """The pairs each group trains: its pairs, or (listwise) every two responses whose scores
    differ (the pairs its loss ranks and its accuracy counts)."""
    if not listwise:
        return group_examples(dataset, per_group=False)
    return [
        sum(a != b for a, b in combinations(scores, 2))
        for scores in dataset.with_format("arrow")["scores"].to_pylist()
    ]


def check_row_budget(datasets: dict[str, Any], share_prefix: bool, budget: int | None) -> None:
    """Refuse, before any model loads, a group (a pair, or a prompt with all its responses)
    that no row of `budget` tokens can hold. A group is never split into rows: its responses
    share one copy of the prompt, so it needs all of them in one row."""
    if budget is None:
        return
    for split, dataset in datasets.items():
        if dataset is None or len(dataset) == 0:
            continue
        shapes = list(_group_shapes(dataset))
        lengths = [row_need(p, ns, share_prefix) for p, ns in shapes]
        longest = max(lengths)
        if longest <= budget:
            continue
        worst = lengths.index(longest)
        rows = dataset[worst]["rows"]
        where = f"row {rows[0]}" if len(rows) == 1 else f"rows {', '.join(map(str, rows))}"
        k = len(shapes[worst][1])
        what = "prompt + one response"
        if share_prefix:
            what = "prompt + chosen + rejected" if k == 2 else f"prompt + its {k} responses"
        noun = "pairs" if all(len(ns) == 2 for _, ns in shapes) else "prompts"
        raise PairoptError(
            f"{split} {where} needs {longest} tokens in one row ({what}), over "
            f"engine.max_tokens_per_row={budget}; {sum(n > budget for n in lengths)} of "
            f"{len(lengths)} {split} {noun} do. Raise engine.max_tokens_per_row or truncate "
            "the data (data.max_length, data.max_prompt_length; data.pairs best_worst keeps "
            "two responses per prompt)."
        )


class BatchPlan:
    """Micro-batches of row indices, grouped into optimiser steps; a pure function of the seed.

    `batch_size` caps the examples (`examples[i]` per row, default 1 each: pairs, or groups for
    a listwise loss) and `batch_tokens` the tokens (`lengths`) of a micro-batch (either may be
    None; a row over either cap goes alone); `group` = world * grad_accum micro-batches make a
    step.
    """

    def __init__(
        self,
        lengths: Sequence[int],
        *,
        batch_size: int | None,
        batch_tokens: int | None,
        group: int,
        seed: int,
        examples: Sequence[int] | None = None,
    ) -> None:
        self.lengths = lengths
        self.examples = examples if examples is not None else [1] * len(lengths)
        self.batch_size = batch_size
        self.batch_tokens = batch_tokens
        self.group = group
        self.seed = seed
        self._cache: dict[int, list[list[list[int]]]] = {}
        self._counts: dict[int, int] = {}  # steps of each epoch seen so far

    def epoch(self, epoch: int) -> list[list[list[int]]]:
        """The steps of one epoch: a list of steps, each a list of `group` micro-batches."""
        if epoch not in self._cache:
            generator = torch.Generator().manual_seed(self.seed + epoch)
            order = torch.randperm(len(self.lengths), generator=generator).tolist()
            micro: list[list[int]] = []
            current: list[int] = []
            tokens = examples = 0
            for index in order:
                full_pairs = (
                    self.batch_size is not None
                    and examples + self.examples[index] > self.batch_size
                )
                full_tokens = (
                    self.batch_tokens is not None
                    and tokens + self.lengths[index] > self.batch_tokens
                )
                if current and (full_pairs or full_tokens):
                    micro.append(current)
                    current, tokens, examples = [], 0, 0
                current.append(index)
                tokens += self.lengths[index]
                examples += self.examples[index]
            if current:
                micro.append(current)
            steps = [
                micro[i : i + self.group] for i in range(0, len(micro) - self.group + 1, self.group)
            ]
            if not steps:
                raise PairoptError(
                    f"the train split has {sum(self.examples)} examples (pairs, or groups for a "
                    f"listwise loss), fewer than one optimiser step needs ({self.group} "
                    f"micro-batches = processes x optim.grad_accum, of up to {self.batch_size} "
                    "each): lower optim.batch_size or optim.grad_accum, or use more data."
                )
            self._cache = {epoch: steps}  # one epoch at a time is all a run needs
            self._counts[epoch] = len(steps)
        return self._cache[epoch]

    def ends_epoch(self, step: int, epoch: int) -> bool:
        """Whether step `step` (0-based, of epoch `epoch`) is the last step of its epoch."""
        counts = [self._counts.get(e) or len(self.epoch(e)) for e in range(epoch + 1)]
        return step + 1 == sum(counts)

    def steps_for_epochs(self, epochs: int) -> int:
        return sum(len(self.epoch(e)) for e in range(epochs))

    def iterate(self, start: int, total: int) -> Iterator[tuple[int, int, list[list[int]]]]:
        """(step, epoch, micro-batches) for steps start..total-1, epochs as long as needed."""
        step, epoch = 0, 0
        while step < total:
            steps = self.epoch(epoch)
            if step + len(steps) <= start:  # a whole epoch before the resume point
                step += len(steps)
                epoch += 1
                continue
            for micro_batches in steps:
                if step >= total:
                    return
                if step >= start:
                    yield step, epoch, micro_batches
                step += 1
            epoch += 1


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """AdamW (or SGD); weight decay only on matrices, not on biases and norm scales."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise PairoptError("the model has no trainable parameters")
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)


def lr_multiplier(cfg: OptimConfig, total_steps: int) -> Any:
    """Multiplier of the peak lr at step s: linear warm-up, then constant / linear / cosine to 0.

    Same conventions as transformers' get_*_schedule_with_warmup (warm-up starts at 0).
    """
    warmup = cfg.warmup_steps or math.ceil(cfg.warmup_ratio * total_steps)
    schedule = cfg.schedule

    def multiplier(step: int) -> float:
        if step < warmup:
            return step / max(1, warmup)
        progress = (step - warmup) / max(1, total_steps - warmup)
        if schedule == "linear":
            return max(0.0, 1.0 - progress)
        if schedule == "cosine":
            return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
        return 1.0

    return multiplier
