"""The steps of a run: `train_step` (one optimiser step), `run_steps` (the loop with logging,
evaluation, checkpoints, reference sync and graceful stops, its files, bar and trackers in `with`
blocks, so an error closes them too).

The loss of a step is the mean over all its examples (pairs, or groups for a listwise loss),
whatever the split across micro-batches and processes: each micro-batch's sum is scaled by
world * grad_accum / examples in the step, because accelerate divides by grad_accum and DDP
averages over processes.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from pairopt.data.batch import GroupBatch, rows_to_batch
from pairopt.errors import PairoptError
from pairopt.training.checkpoint import (
    checkpoint_bytes,
    list_checkpoints,
    save_checkpoint,
)
from pairopt.training.evaluation import EvalInterrupted
from pairopt.training.loss_inputs import apply_loss, examples_in
from pairopt.training.policy import (
    Groups,
)
from pairopt.training.preemption import (
    RunStopped,
    resume_command,
)
from pairopt.training.run_log import (
    MetricsLog,
    MetricsWindow,
    add_metric,
    any_process,
    fail_together,
    global_means,
    progress_bar,
    trackers,
)
from pairopt.training.setup import Run
from pairopt.training.sharding import unwrap


def train_step(run: Run, step: int, epoch: int, micro_batches: list[list[int]]) -> dict[str, float]:
    """Optimiser step `step` (0-based): this process's share of `micro_batches` forward and
    backward, then clip and step. Returns the step's metrics, global means (the same on every
    process), or raises when the loss is not finite."""
    accelerator, cfg = run.accelerator, run.cfg
    started = time.perf_counter()
    lr = run.scheduler.get_last_lr()[0]  # the rate this step uses
    examples_in_step = sum(run.plan.examples[i] for mb in micro_batches for i in mb)
    pairs_in_step = sum(run.pairs[i] for mb in micro_batches for i in mb)
    scale = run.world * cfg.optim.grad_accum / examples_in_step
    sums: dict[str, torch.Tensor] = {}
    tokens = 0
    grad_norm: torch.Tensor | None = None
    for indices in micro_batches[run.rank :: run.world]:
        batch = rows_to_batch(run.data.train[indices])
        tokens += batch.tokens()
        with accelerator.accumulate(run.wrapped):
            try:
                micro_batch(run, batch, indices, scale, sums)
            except PairoptError as err:  # the loss's own checks (PairLoss.forward)
                raise _stopped_at(run, step, str(err)) from None
            if accelerator.sync_gradients:
                grad_norm = optimizer_step(run)
    metrics = global_means(sums, accelerator, examples_in_step)
    if not math.isfinite(metrics["loss"]):
        raise _stopped_at(
            run,
            step,
            f"the loss is {metrics['loss']} (not finite), so the weights are no longer usable. "
            "Lower optim.lr, keep optim.max_grad_norm set, or check the loss parameters.",
        )
    step_s = time.perf_counter() - started
    device = accelerator.device
    tokens_all = int(accelerator.reduce(torch.tensor([tokens], device=device), "sum").item())
    metrics.update(
        {
            "lr": float(lr),
            "epoch": float(epoch),
            "tokens_per_s": tokens_all / step_s,
            "pairs_per_s": pairs_in_step / step_s,
            "step_s": step_s,
        }
    )
    if grad_norm is not None:
        metrics["grad_norm"] = float(grad_norm)
    return metrics


def _stopped_at(run: Run, step: int, why: str) -> PairoptError:
    last = list_checkpoints(run.output)
    return PairoptError(
        f"step {step + 1}: {why.rstrip('.')}. The run stops without saving a model"
        + (f"; the last good checkpoint is {last[-1]}." if last else ".")
    )


def micro_batch(
    run: Run,
    batch: GroupBatch,
    indices: list[int],
    scale: float,
    sums: dict[str, torch.Tensor],
) -> None:
    """Forward, loss and backward of one micro-batch; its metric sums are added to `sums`.

    The policy computes every response of the batch's groups once (flat); the loss receives
    them in the form its kind asks for (pairs indexed out of them, or padded lists). The
    reference runs first, so no other forward comes between the policy's and its backward
    (FSDP2 and ZeRO-3 gather and release parameters around each). A loss that fails its checks
    on any process fails on every process, before the backward (a collective under DDP, FSDP
    and DeepSpeed) that the others would wait in for ever."""
    ref = (
        run.reference.logps(batch, indices, "train").to(run.accelerator.device)
        if run.reference is not None
        else None
    )
    policy_logps = run.wrapped(Groups(batch.groups))
    try:
        out = apply_loss(run.loss_fn, batch, policy_logps, ref)
    except PairoptError as err:
        fail_together(run.accelerator, err)
    fail_together(run.accelerator, None)
    run.accelerator.backward(out.losses.sum() * scale)
    add_metric(sums, "loss", out.losses.detach().sum())
    for key, value in out.metrics.items():
        add_metric(sums, key, value.detach().float() * examples_in(run.loss_fn, batch))


def optimizer_step(run: Run) -> torch.Tensor | None:
    """Clip (when configured), step the optimiser and the schedule; the gradient norm."""
    grad_norm = None
    if run.cfg.optim.max_grad_norm is not None:
        grad_norm = run.accelerator.clip_grad_norm_(
            run.wrapped.parameters(), run.cfg.optim.max_grad_norm
        )
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    return grad_norm


def run_steps(run: Run) -> tuple[list[dict[str, float]], list[dict[str, float]], float]:
    """The steps from `start_step`, with logging, evaluation and checkpoints, then the final
    evaluation. Returns (per-step metrics, evaluations, train pairs per second)."""
    cfg = run.cfg
    history: list[dict[str, float]] = []
    evals: list[dict[str, float]] = []
    pairs_done = 0
    window = MetricsWindow()
    log = MetricsLog(
        run.output / "metrics.jsonl",
        run.accelerator.is_main_process,
        run.accelerator,
        run.say,
        truncate_after=run.start_step,
    )
    tracked = trackers(run.accelerator, cfg.logging.report_to, run.output.name, cfg.flat())
    with log, tracked:
        run.say(_training_line(run))
        loop_started = time.perf_counter()
        with progress_bar(run.progress, run.total_steps, run.start_step) as bar:
            run.wrapped.train()
            run.stop.armed = True  # from here a signal finishes the step and checkpoints it
            for step, epoch, micro_batches in run.plan.iterate(run.start_step, run.total_steps):
                metrics = train_step(run, step, epoch, micro_batches)
                done = step + 1
                run.directory.steps_done += 1
                history.append(metrics)
                pairs = sum(run.pairs[i] for mb in micro_batches for i in mb)
                pairs_done += pairs
                examples = sum(run.plan.examples[i] for mb in micro_batches for i in mb)
                window.add(metrics, examples, pairs)
                stopping = stop_requested(run)  # a stop also flushes the logging window
                if stopping or done % cfg.logging.every == 0 or done == run.total_steps:
                    log.write(done, "train", window.flush(), console=True)
                bar.update(1)
                bar.set_postfix(
                    loss=f"{metrics['loss']:.4f}",
                    acc=f"{metrics.get('rewards/accuracies', float('nan')):.2f}",
                    tok_s=f"{metrics['tokens_per_s']:.0f}",
                )
                after_step(run, done, run.plan.ends_epoch(step, epoch), log, evals)
                if stopping:  # after the reference sync, which the checkpoint must hold
                    stop_after(run, done)
        loop_s = time.perf_counter() - loop_started
        if stop_requested(run):
            stop_after(run, run.total_steps)
        if cfg.eval.at_end:
            _evaluate(run, run.total_steps, log, evals, console=False)
    return history, evals, pairs_done / loop_s if loop_s > 0 else 0.0


def after_step(
    run: Run, done: int, epoch_end: bool, log: MetricsLog, evals: list[dict[str, float]]
) -> None:
    """What follows optimiser step `done` (1-based): the TR-DPO reference sync, evaluation and
    checkpoints, every N steps and/or at the end of an epoch."""
    cfg = run.cfg
    sync = cfg.reference.sync_steps
    if sync is not None and run.reference is not None and done % sync == 0:
        policy = unwrap(run.wrapped).model
        run.reference.sync(policy, cfg.reference.sync_alpha)
    last = done == run.total_steps
    if not last and (
        (cfg.eval.every and done % cfg.eval.every == 0) or (cfg.eval.every_epoch and epoch_end)
    ):
        _evaluate(run, done, log, evals, console=True)
    if (cfg.checkpoint.every and done % cfg.checkpoint.every == 0) or (
        cfg.checkpoint.every_epoch and epoch_end
    ):
        _save_checkpoint(run, done)


def _save_checkpoint(run: Run, done: int) -> Path:
    path = save_checkpoint(
        run.accelerator,
        run.output,
        done,
        run.train_fp,
        run.cfg.checkpoint,
        run.cfg.flat(),
        need_bytes=checkpoint_bytes(run.wrapped, run.optimizer),
    )
    run.directory.checkpointed = done
    return path


def stop_requested(run: Run) -> bool:
    """Whether SIGTERM / SIGINT reached any process (the same answer on every process)."""
    return any_process(run.accelerator, run.stop.requested)


def stop_after(run: Run, done: int) -> None:
    """Checkpoint step `done` (unless this step's checkpoint was just written) and raise
    RunStopped, which says where it is and how to resume (pairopt.training.preemption)."""
    name = run.stop.name or "a signal to another process"
    run.say(f"{name} received: step {done} is done; writing its checkpoint")
    if run.directory.checkpointed == done:
        checkpoint = run.output / "checkpoints" / f"step-{done:06d}"
    else:
        checkpoint = _save_checkpoint(run, done)
    raise RunStopped(
        f"stopped by {name} after step {done} of {run.total_steps}; its checkpoint is "
        f"{checkpoint}. Resume with: {resume_command(run.output)}",
        checkpoint=checkpoint,
        step=done,
    )


def _evaluate(
    run: Run, step: int, log: MetricsLog, evals: list[dict[str, float]], *, console: bool
) -> None:
    if run.evaluator.ready:
        try:
            evals.append(run.evaluator.run(step, interrupted=lambda: stop_requested(run)))
        except EvalInterrupted:  # a signal during an evaluation: checkpoint the step it follows
            stop_after(run, step)
        log.write(step, "eval", evals[-1], console=console)


def _training_line(run: Run) -> str:
    cfg = run.cfg
    unit = "groups" if run.loss_fn.kind == "list" else "pairs"
    batches = []
    if cfg.optim.batch_size is not None:
        batches.append(f"<= {cfg.optim.batch_size} {unit}")
    if cfg.optim.batch_tokens is not None:
        batches.append(f"<= {cfg.optim.batch_tokens} tokens")
    eval_groups = len(run.data.eval) if run.data.eval is not None else 0
    return (
        f"training: {run.total_steps} steps of {run.world} x {cfg.optim.grad_accum} "
        f"micro-batches ({' and '.join(batches)} each), {_count(len(run.data.train), sum(run.pairs))} "
        f"train, {eval_groups} eval prompts, loss {cfg.loss.name} ({run.loss_fn.kind}), "
        f"{'shared' if cfg.engine.share_prefix else 'unshared'}"
        f"{' packed' if cfg.engine.packing else ''} forward"
    )


def _count(groups: int, pairs: int) -> str:
    """ "3000 pairs", or "600 prompts, 4,210 pairs" when groups hold several pairs."""
    return f"{pairs:,} pairs" if groups == pairs else f"{groups:,} prompts, {pairs:,} pairs"
