"""What each optimiser step trains on, and at which learning rate.

Data order is a pure function of (seed, epoch): the train split is permuted with
`torch.randperm(seed + epoch)`, cut into micro-batches (by pairs and/or tokens), and every
`world * grad_accum` consecutive micro-batches form one optimiser step; process r takes
micro-batches r, r + world, ... of each step. A resumed run therefore replays the same batches,
and two processes compute exactly what one process with `grad_accum * 2` computes. An
incomplete last step of an epoch is dropped.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from pairopt.errors import PairoptError
from pairopt.pairs import row_need
from pairopt.training.config import OptimConfig


def pair_lengths(dataset: Any, *, share_prefix: bool = True) -> list[int]:
    """`row_need` of every row (prompt + chosen + rejected shared, prompt + the longer response
    unshared), read from the Arrow columns without materialising the token ids."""
    arrow = dataset.with_format("arrow")
    lengths: list[int] = []
    for start in range(0, len(dataset), 8192):
        table = arrow[start : start + 8192]
        prompt, chosen, rejected = (
            table.column(column).combine_chunks().value_lengths().to_pylist()
            for column in ("prompt_ids", "chosen_ids", "rejected_ids")
        )
        lengths += [
            row_need(p, [c, r], share_prefix)
            for p, c, r in zip(prompt, chosen, rejected, strict=True)
        ]
    return lengths


def check_row_budget(datasets: dict[str, Any], share_prefix: bool, budget: int | None) -> None:
    """Refuse, before any model loads, a pair that no row of `budget` tokens can hold."""
    if budget is None:
        return
    for split, dataset in datasets.items():
        if dataset is None or len(dataset) == 0:
            continue
        lengths = pair_lengths(dataset, share_prefix=share_prefix)
        longest = max(lengths)
        if longest > budget:
            what = "prompt + chosen + rejected" if share_prefix else "prompt + one response"
            raise PairoptError(
                f"{split} pair {lengths.index(longest)} needs {longest} tokens in one row "
                f"({what}), over engine.max_tokens_per_row={budget}; "
                f"{sum(n > budget for n in lengths)} of {len(lengths)} {split} pairs do. Raise "
                "engine.max_tokens_per_row or truncate the data (data.max_length, "
                "data.max_prompt_length)."
            )


class BatchPlan:
    """Micro-batches of row indices, grouped into optimiser steps; a pure function of the seed.

    `batch_size` caps the pairs and `batch_tokens` the prompt+chosen+rejected tokens of a
    micro-batch (either may be None); `group` = world * grad_accum micro-batches make a step.
    """

    def __init__(
        self,
        lengths: Sequence[int],
        *,
        batch_size: int | None,
        batch_tokens: int | None,
        group: int,
        seed: int,
    ) -> None:
        self.lengths = lengths
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
            tokens = 0
            for index in order:
                full_pairs = self.batch_size is not None and len(current) >= self.batch_size
                full_tokens = (
                    self.batch_tokens is not None
                    and tokens + self.lengths[index] > self.batch_tokens
                )
                if current and (full_pairs or full_tokens):
                    micro.append(current)
                    current, tokens = [], 0
                current.append(index)
                tokens += self.lengths[index]
            if current:
                micro.append(current)
            steps = [
                micro[i : i + self.group] for i in range(0, len(micro) - self.group + 1, self.group)
            ]
            if not steps:
                raise PairoptError(
                    f"the train split has {len(self.lengths)} pairs, fewer than one optimiser step "
                    f"needs ({self.group} micro-batches = processes x optim.grad_accum, of up to "
                    f"{self.batch_size} pairs each): lower optim.batch_size or optim.grad_accum, "
                    "or use more data."
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
