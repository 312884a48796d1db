"""Evaluation on the eval split: the loss and its metrics over every held-out pair (group)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from pairopt.data.batch import GroupBatch
from pairopt.pairs import GroupLogps
from pairopt.training.config import EvalConfig
from pairopt.training.loss_inputs import apply_loss
from pairopt.training.policy import Groups
from pairopt.training.run_log import work_bar
from pairopt.training.schedule import group_pair_counts


class EvalInterrupted(Exception):
    """`interrupted()` said to stop between two eval batches (a SIGTERM: see preemption.py)."""


class Evaluator:
    """Policy (and reference) log-probs of every eval group, then the loss's metrics over them all.

    Metrics come from one loss call on the whole eval split (not batch means), so
    `rewards/accuracies` is exactly the fraction of held-out pairs ranked right. Every process
    runs the same number of forwards (short shares repeat row 0 and drop it), as FSDP and
    ZeRO-3 need. `batch_size` counts groups.
    """

    def __init__(
        self,
        wrapped: Any,
        reference: Any,
        loss_fn: Any,
        dataset: Any,
        rows_to_batch: Callable[[dict[str, list[Any]]], GroupBatch],
        cfg: EvalConfig,
        accelerator: Any,
        *,
        progress: bool = True,
    ) -> None:
        self.wrapped, self.reference, self.loss_fn = wrapped, reference, loss_fn
        self.dataset, self.rows_to_batch = dataset, rows_to_batch
        self.cfg, self.accelerator, self.progress = cfg, accelerator, progress

    @property
    def ready(self) -> bool:
        return self.dataset is not None and len(self.dataset) > 0

    @torch.no_grad()
    def run(self, step: int, interrupted: Callable[[], bool] | None = None) -> dict[str, float]:
        """The metrics at `step`. `interrupted` is asked before every batch (on every process
        alike: it may be a collective) and raises EvalInterrupted when it says so."""
        accelerator, world = self.accelerator, self.accelerator.num_processes
        self.wrapped.eval()
        self.loss_fn.eval()
        try:
            rows = self._my_rows(step, interrupted)
        finally:
            self.wrapped.train()
            self.loss_fn.train()
        if world > 1:
            from accelerate.utils import gather_object

            rows = gather_object(rows)
        rows.sort(key=lambda row: row[0])
        policy_all = GroupLogps.cat([r[1] for r in rows])
        reference_all = None
        if self.reference is not None:
            reference_all = GroupLogps.cat([r[2] for r in rows if r[2] is not None])
        everything = self.rows_to_batch(self.dataset[:])
        out = apply_loss(
            self.loss_fn,
            everything,
            policy_all.to(accelerator.device),
            None if reference_all is None else reference_all.to(accelerator.device),
        )
        metrics = {"loss": float(out.losses.mean())}
        metrics.update({key: float(value) for key, value in out.metrics.items()})
        listwise = self.loss_fn.kind == "list"
        metrics["pairs"] = float(sum(group_pair_counts(self.dataset, listwise=listwise)))
        if len(rows) != metrics["pairs"]:
            metrics["groups"] = float(len(rows))
        return metrics

    def _my_rows(
        self, step: int, interrupted: Callable[[], bool] | None = None
    ) -> list[tuple[int, GroupLogps, GroupLogps | None]]:
        """(row, policy log-probs, reference log-probs) of this process's groups, one group
        each, on the CPU in float32 (per-token values the loss asked for included)."""
        world, rank = self.accelerator.num_processes, self.accelerator.process_index
        n = len(self.dataset)
        per_process = math.ceil(n / world)
        mine = list(range(rank, n, world))
        mine += [-1] * (per_process - len(mine))  # -1: padding, computed on row 0 and dropped
        rows: list[tuple[int, GroupLogps, GroupLogps | None]] = []
        bar = work_bar(
            self.progress and self.accelerator.is_main_process,
            math.ceil(per_process / self.cfg.batch_size),
            f"eval at step {step}",
        )
        with bar:
            for start in range(0, per_process, self.cfg.batch_size):
                if interrupted is not None and interrupted():
                    raise EvalInterrupted(step)
                batch_rows = mine[start : start + self.cfg.batch_size]
                real = [max(i, 0) for i in batch_rows]
                batch = self.rows_to_batch(self.dataset[real])
                policy = self.wrapped(Groups(batch.groups))
                ref = None
                if self.reference is not None:
                    ref = self.reference.logps(batch, real, "eval")
                policy, ref = _host(policy), None if ref is None else _host(ref)
                for j, index in enumerate(batch_rows):
                    if index < 0:
                        continue
                    rows.append((index, policy.take([j]), None if ref is None else ref.take([j])))
                bar.update(1)
        return rows


def _host(logps: GroupLogps) -> GroupLogps:
    """On the CPU in float32, detached: what the evaluation keeps of a batch."""
    logps = logps.detach().to("cpu")
    return GroupLogps(
        logps.logps.float(),
        logps.tokens,
        logps.offsets,
        {name: v.float() for name, v in logps.token_values.items()},
    )
