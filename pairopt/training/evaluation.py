"""Evaluation on the eval split: the loss and its metrics over every held-out pair."""

from __future__ import annotations

import math
from typing import Any

import torch

from pairopt.pairs import PairLogps
from pairopt.training.config import EvalConfig
from pairopt.training.policy import Pairs
from pairopt.training.run_log import work_bar


class Evaluator:
    """Policy (and reference) log-probs of every eval pair, then the loss's metrics over them all.

    Metrics come from one loss call on the whole eval split (not batch means), so
    `rewards/accuracies` is exactly the fraction of held-out pairs ranked right. Every process
    runs the same number of forwards (short shares repeat row 0 and drop it), as FSDP and
    ZeRO-3 need.
    """

    def __init__(
        self,
        wrapped: Any,
        reference: Any,
        loss_fn: Any,
        dataset: Any,
        rows_to_pairs: Any,
        cfg: EvalConfig,
        accelerator: Any,
        *,
        progress: bool = True,
    ) -> None:
        self.wrapped, self.reference, self.loss_fn = wrapped, reference, loss_fn
        self.dataset, self.rows_to_pairs = dataset, rows_to_pairs
        self.cfg, self.accelerator, self.progress = cfg, accelerator, progress

    @property
    def ready(self) -> bool:
        return self.dataset is not None and len(self.dataset) > 0

    @torch.no_grad()
    def run(self, step: int) -> dict[str, float]:
        accelerator, world, rank = (
            self.accelerator,
            self.accelerator.num_processes,
            self.accelerator.process_index,
        )
        n = len(self.dataset)
        per_process = math.ceil(n / world)
        mine = list(range(rank, n, world))
        mine += [-1] * (per_process - len(mine))  # -1: padding, computed on row 0 and dropped
        rows: list[tuple[float, ...]] = []
        self.wrapped.eval()
        self.loss_fn.eval()
        bar = work_bar(
            self.progress and accelerator.is_main_process,
            math.ceil(per_process / self.cfg.batch_size),
            f"eval at step {step}",
        )
        try:
            for start in range(0, per_process, self.cfg.batch_size):
                batch = mine[start : start + self.cfg.batch_size]
                real = [max(i, 0) for i in batch]
                pairs = self.rows_to_pairs(self.dataset[real])
                policy = self.wrapped(Pairs(pairs))
                ref = (
                    self.reference.logps(pairs, real, "eval")
                    if self.reference is not None
                    else None
                )
                for j, index in enumerate(batch):
                    if index < 0:
                        continue
                    row = [index, *_row(policy, j)]
                    if ref is not None:
                        row += _row(ref, j)
                    rows.append(tuple(row))
                bar.update(1)
        finally:
            bar.close()
            self.wrapped.train()
            self.loss_fn.train()
        if world > 1:
            from accelerate.utils import gather_object

            rows = gather_object(rows)
        rows.sort()
        policy_all = _table([r[1:5] for r in rows])
        reference_all = _table([r[5:9] for r in rows]) if self.reference is not None else None
        out = self.loss_fn(
            policy_all.to(accelerator.device),
            None if reference_all is None else reference_all.to(accelerator.device),
        )
        metrics = {"loss": float(out.losses.mean())}
        metrics.update({key: float(value) for key, value in out.metrics.items()})
        metrics["pairs"] = float(len(rows))
        return metrics


def _row(logps: PairLogps, j: int) -> list[float]:
    return [
        float(logps.chosen_logps[j]),
        float(logps.rejected_logps[j]),
        float(logps.chosen_tokens[j]),
        float(logps.rejected_tokens[j]),
    ]


def _table(rows: list[tuple[float, ...]]) -> PairLogps:
    data = torch.tensor(rows, dtype=torch.float64).reshape(-1, 4)  # (N, 4)
    return PairLogps(data[:, 0].float(), data[:, 1].float(), data[:, 2].long(), data[:, 3].long())
