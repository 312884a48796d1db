"""`pairopt train` and `pairopt.train(config)`: preference fine-tuning on accelerate.

    setup(cfg) -> Run:  accelerator, output dir -> tokenizer, data -> loss -> policy (dropout
                        off) -> reference (by the loss's declared need) -> LoRA, checkpointing
                        -> optimiser, schedule, batch plan -> accelerate.prepare -> [resume]
    train_step(run, ...) -> metrics:  one optimiser step (micro-batches, backward, clip, step)
    train(cfg):  setup, then the steps with logging, evaluation and checkpoints, the final
                 evaluation and save_pretrained; files, progress bar and trackers in `with`
                 blocks, so an error closes them too.

This is the one module that reads across config sections; each piece beside it takes its own
section: `policy.py` (loading, LoRA, the module accelerate wraps), `reference.py` (the
reference strategies), `schedule.py` (data order, optimiser, learning rate), `evaluation.py`,
`run_log.py` (metrics, console, trackers), `checkpoint.py` (run directory, save_state, final
save_pretrained).

The items are groups (a prompt, its responses, the pairs among them; pairopt.data.groups): the
engine computes every response of a group once, and the loss receives what its declared `kind`
asks for (pairopt.training.loss_inputs). The loss of a step is the mean over all its examples
(pairs, or groups for a listwise loss), whatever the split across micro-batches and
processes: each micro-batch's sum is scaled by world * grad_accum / examples in the step,
because accelerate divides by grad_accum and DDP averages over processes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pairopt.data.batch import GroupBatch, rows_to_batch
from pairopt.data.groups import make_groups
from pairopt.data.load import PreferenceData, load_preference_data
from pairopt.errors import PairoptError
from pairopt.loss.base import Loss
from pairopt.loss.registry import build_loss, get_loss_class
from pairopt.training.checkpoint import (
    changed_settings,
    check_resumable,
    check_resume_step,
    checkpoint_bytes,
    find_checkpoint_once,
    list_checkpoints,
    output_dir,
    save_checkpoint,
    save_final,
)
from pairopt.training.config import OptimConfig, TrainConfig
from pairopt.training.config_load import load_config
from pairopt.training.evaluation import EvalInterrupted, Evaluator
from pairopt.training.flags import help_text, parse_train_args
from pairopt.training.loss_inputs import apply_loss, check_loss_fits_data, examples_in
from pairopt.training.policy import (
    Groups,
    PolicyLogps,
    apply_lora,
    context_length,
    enable_checkpointing,
    hf_model,
    load_model,
    load_tokenizer,
    switch_off_dropout,
)
from pairopt.training.preemption import (
    RunStopped,
    StopNow,
    StopRequest,
    resume_command,
    stop_signals,
)
from pairopt.training.reference import LazyAdapter, precompute_reference, setup_reference
from pairopt.training.reference_cache import dataset_fingerprint
from pairopt.training.run_directory import RunDirectory
from pairopt.training.run_log import (
    MetricsLog,
    MetricsWindow,
    Printer,
    add_metric,
    any_process,
    global_means,
    print_summary,
    progress_bar,
    quiet_libraries,
    trackers,
)
from pairopt.training.schedule import (
    BatchPlan,
    build_optimizer,
    check_row_budget,
    group_examples,
    group_lengths,
    group_pair_counts,
    lr_multiplier,
)


def main(argv: list[str] | None = None) -> int:
    """`pairopt train ...`; returns the exit code: 0 done, 2 bad input (PairoptError, printed by
    the CLI), STOPPED_EXIT_CODE (75) stopped by a signal with a checkpoint, 128 + N stopped at
    once by a second signal N (docs/configuration.md, Exit codes)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        print(help_text())
        return 0
    try:
        train(parse_train_args(argv))
    except (RunStopped, StopNow) as stopped:
        print(f"pairopt train: {stopped}", file=sys.stderr)
        return stopped.exit_code
    return 0


@dataclasses.dataclass
class TrainResult:
    """What a run leaves behind, for scripts and tests (the files are in `output_dir`)."""

    output_dir: Path
    steps: int
    history: list[dict[str, float]]  # one entry per optimiser step (global means)
    evals: list[dict[str, float]]  # one entry per evaluation
    wall_s: float
    train_pairs_per_s: float
    reference_cache_hit: bool | None  # None unless reference.strategy resolved to precompute
    policy: nn.Module  # the trained transformers model (merged, with LoRA and merge_lora)

    @property
    def final_eval(self) -> dict[str, float] | None:
        return self.evals[-1] if self.evals else None


@dataclasses.dataclass
class Run:
    """A run after setup: everything `train_step` and the loop need, built once."""

    cfg: TrainConfig
    accelerator: Any
    output: Path
    say: Printer
    progress: bool  # show progress bars
    tokenizer: Any
    data: PreferenceData
    train_fp: str  # fingerprint of the tokenised training split (checkpoints record it)
    loss_fn: Loss
    wrapped: Any  # PolicyLogps, prepared by accelerate
    optimizer: Any
    scheduler: Any
    reference: Any  # a Reference (pairopt.training.reference) or None
    ref_cache_hit: bool | None
    plan: BatchPlan
    pairs: list[int]  # pairs each train group trains (pairopt.training.schedule.group_pair_counts)
    total_steps: int
    start_step: int
    evaluator: Evaluator
    directory: RunDirectory  # locked while the run uses it; counts the steps done
    stop: StopRequest  # set by SIGTERM / SIGINT (pairopt.training.preemption)

    @property
    def world(self) -> int:
        return int(self.accelerator.num_processes)

    @property
    def rank(self) -> int:
        return int(self.accelerator.process_index)


def train(config: TrainConfig | dict[str, Any] | str | Path, *, quiet: bool = False) -> TrainResult:
    """Run one training job; returns its TrainResult (per-step history, evaluations, model).

    `config`: a TrainConfig, or a dict of sections / a YAML file read as `pairopt train
    --config` reads it (`{"loss": "dpo"}` is the out-of-the-box run). `quiet`: print nothing
    and show no progress bars (notebooks); the files are written all the same.
    """
    started = time.perf_counter()
    cfg = config if isinstance(config, TrainConfig) else load_config(config)
    with quiet_libraries(quiet), stop_signals() as stop, contextlib.ExitStack() as resources:
        run = setup(cfg, quiet=quiet, stop=stop, resources=resources)
        history, evals, pairs_per_s = run_steps(run)
        final_model = save_final(
            run.accelerator,
            run.wrapped,
            run.tokenizer,
            cfg.output,
            run.output,
            lora=cfg.model.lora is not None,
        )
    wall_s = time.perf_counter() - started
    steps = run.total_steps - run.start_step
    saved_to = run.output if cfg.output.save_final else None
    print_summary(run.say, cfg.loss.name, evals, steps, wall_s, pairs_per_s, saved_to)
    return TrainResult(
        run.output,
        run.total_steps,
        history,
        evals,
        wall_s,
        pairs_per_s,
        run.ref_cache_hit,
        final_model,
    )


# ---------------------------------------------------------------------------------------------
# Setup
# ---------------------------------------------------------------------------------------------


def setup(
    cfg: TrainConfig,
    *,
    quiet: bool = False,
    stop: StopRequest | None = None,
    resources: contextlib.ExitStack | None = None,
) -> Run:
    """Everything before the first step, in the order that keeps a run reproducible (the RNG
    is seeded once, and LoRA's initialisation draws from it after the reference is made).

    The run directory is locked into `resources` (released when the caller's block ends)."""
    accelerator, cfg = make_accelerator(cfg)
    output = Path(str(cfg.output.dir))
    say = Printer(accelerator.is_main_process and not quiet)
    progress = cfg.logging.progress_bar and not quiet
    wanted = cfg.checkpoint.resume
    resume_from = find_checkpoint_once(accelerator, wanted, output, say) if wanted else None
    directory = RunDirectory(output, accelerator, resuming=resume_from is not None)
    (resources or contextlib.ExitStack()).enter_context(directory)
    say("pairopt train: resolved config")
    say(_indent(cfg.to_yaml()))
    if cfg.optim.cpu_threads is not None and accelerator.device.type == "cpu":
        torch.set_num_threads(cfg.optim.cpu_threads)
    from accelerate.utils import set_seed

    set_seed(cfg.optim.seed)
    tokenizer = load_tokenizer(cfg.model)
    data = load_preference_data(
        cfg.data, tokenizer, seed=cfg.optim.seed, max_tokens=context_length(cfg.model)
    )
    loss_cls = get_loss_class(cfg.loss.name)
    check_loss_fits_data(loss_cls, data, cfg.data.dataset)
    data = make_groups(data, cfg.data, all_responses=loss_cls.kind == "list")
    say(f"data: {data.report}")
    check_row_budget(
        {"train": data.train, "eval": data.eval},
        cfg.engine.share_prefix,
        cfg.engine.max_tokens_per_row,
    )
    train_fp = dataset_fingerprint(data.train)
    resume_state = check_resumable(resume_from, train_fp, cfg.flat()) if resume_from else None
    loss_fn = build_loss(cfg.loss.name, **cfg.loss.params).to(accelerator.device)
    policy, reference, ref_cache_hit = build_models(cfg, loss_fn, accelerator, data, say, progress)
    plan, total_steps, wrapped, optimizer, scheduler = prepare(
        cfg, accelerator, policy, loss_fn, data
    )
    if cfg.reference.sync_steps is not None and reference is not None:
        # a synced reference is part of the run's state: resuming must not restart it
        accelerator.register_for_checkpointing(reference.model)
    check_resume_step(resume_from, resume_state, total_steps)
    # only now: a refused run leaves the directory as it was
    say(f"config saved to {directory.write_config(cfg.to_yaml(), _bytes_to_save(cfg, policy))}")
    evaluator = Evaluator(
        wrapped,
        reference,
        loss_fn,
        data.eval,
        rows_to_batch,
        cfg.eval,
        accelerator,
        progress=progress,
    )
    run = Run(
        cfg,
        accelerator,
        output,
        say,
        progress,
        tokenizer,
        data,
        train_fp,
        loss_fn,
        wrapped,
        optimizer,
        scheduler,
        reference,
        ref_cache_hit,
        plan,
        group_pair_counts(data.train, listwise=loss_fn.kind == "list"),
        total_steps,
        0,
        evaluator,
        directory,
        stop or StopRequest(),
    )
    if resume_from is not None and resume_state is not None:
        run.start_step = resume(run, resume_from, resume_state)
    return run


def _bytes_to_save(cfg: TrainConfig, policy: nn.Module) -> int:
    """About what the next write of the model needs on disk: the final model, and a checkpoint
    (weights + AdamW's two float32 moments per trainable parameter) when checkpoints are on."""
    weights = sum(p.numel() * p.element_size() for p in policy.parameters())
    need = weights if cfg.output.save_final else 0
    if cfg.checkpoint.every or cfg.checkpoint.every_epoch:
        trainable = sum(p.numel() for p in policy.parameters() if p.requires_grad)
        need += weights + (8 * trainable if cfg.optim.optimizer == "adamw" else 0)
    return need


def make_accelerator(cfg: TrainConfig) -> tuple[Any, TrainConfig]:
    """The Accelerator, and the config with output.dir resolved (the same on every process)."""
    from accelerate import Accelerator, PartialState
    from accelerate.utils import ProjectConfiguration, broadcast_object_list

    # The output directory first (trackers need it when the Accelerator is made); the default
    # name has a timestamp, so every process takes process 0's.
    cpu = _multi_process_cpu()
    state = PartialState(cpu=cpu)
    name = output_dir(cfg.output, cfg.loss.name, cfg.model.name_or_path)
    out_dir = [name if state.is_main_process else None]
    if state.num_processes > 1:
        broadcast_object_list(out_dir)
    output = Path(str(out_dir[0]))
    cfg = cfg.model_copy(update={"output": cfg.output.model_copy(update={"dir": str(output)})})
    _fresh_accelerate_state()
    accelerator = Accelerator(
        cpu=cpu,
        mixed_precision=cfg.optim.precision,
        gradient_accumulation_steps=cfg.optim.grad_accum,
        log_with=list(cfg.logging.report_to) or None,
        project_config=ProjectConfiguration(
            project_dir=str(output), logging_dir=str(output / "trackers")
        ),
        step_scheduler_with_optimizer=False,
    )
    if accelerator.gradient_accumulation_steps != cfg.optim.grad_accum:
        raise PairoptError(
            f"the accelerate config sets gradient_accumulation_steps="
            f"{accelerator.gradient_accumulation_steps} but optim.grad_accum is "
            f"{cfg.optim.grad_accum}: make them equal (--optim.grad_accum "
            f"{accelerator.gradient_accumulation_steps})."
        )
    return accelerator, cfg


def build_models(
    cfg: TrainConfig,
    loss_fn: Loss,
    accelerator: Any,
    data: PreferenceData,
    say: Printer,
    progress: bool,
) -> tuple[nn.Module, Any, bool | None]:
    """The policy (dropout off, LoRA, checkpointing) and the reference the loss needs."""
    engine_kwargs = cfg.engine.kwargs()
    policy = load_model(cfg.model, seed=cfg.optim.seed)
    say(f"dropout: {switch_off_dropout(policy)}")

    def precompute(model: nn.Module) -> Any:
        return precompute_reference(
            model,
            {"train": data.train, "eval": data.eval},
            rows_to_batch=rows_to_batch,
            engine_kwargs=engine_kwargs,
            cache_dir=cfg.reference.cache_dir,
            dtype=f"{cfg.model.dtype}/{cfg.optim.precision}",
            batch_size=cfg.eval.batch_size,
            accelerator=accelerator,
            progress=progress,
        )

    reference, note, hit = setup_reference(
        cfg.reference,
        cfg.model,
        loss_fn,
        policy,
        accelerator,
        engine_kwargs,
        precompute,
        seed=cfg.optim.seed,
    )
    say(f"reference: {note}")
    if cfg.model.lora is not None:
        policy = apply_lora(policy, cfg.model.lora)
    if cfg.model.gradient_checkpointing:
        enable_checkpointing(policy)
    if isinstance(reference, LazyAdapter):
        reference = reference.bind(policy, engine_kwargs, accelerator.autocast)
    trainable = [p for p in policy.parameters() if p.requires_grad]
    say(
        f"model: {cfg.model.name_or_path} ({type(hf_model(policy)).__name__}), "
        f"{sum(p.numel() for p in policy.parameters()):,} parameters, "
        f"{sum(p.numel() for p in trainable):,} trainable"
    )
    return policy, reference, hit


def prepare(
    cfg: TrainConfig, accelerator: Any, policy: nn.Module, loss_fn: Loss, data: PreferenceData
) -> tuple[BatchPlan, int, Any, Any, Any]:
    """(batch plan, total steps, wrapped policy, optimiser, schedule), after accelerate.prepare."""
    plan = BatchPlan(
        group_lengths(data.train),
        batch_size=cfg.optim.batch_size,
        batch_tokens=cfg.optim.batch_tokens,
        group=accelerator.num_processes * cfg.optim.grad_accum,
        seed=cfg.optim.seed,
        examples=group_examples(data.train, per_group=loss_fn.kind == "list"),
    )
    total_steps = cfg.optim.max_steps or plan.steps_for_epochs(cfg.optim.epochs)
    optimizer = build_optimizer(policy, cfg.optim)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_multiplier(cfg.optim, total_steps))
    _prepare_deepspeed_batch_size(accelerator, cfg.optim)
    wrapped, optimizer = accelerator.prepare(PolicyLogps(policy, cfg.engine.kwargs()), optimizer)
    accelerator.register_for_checkpointing(scheduler, loss_fn)
    return plan, total_steps, wrapped, optimizer, scheduler


def resume(run: Run, checkpoint: Path, state: dict[str, Any]) -> int:
    """Load a checkpoint's state; the step it was written at. Warns about changed settings."""
    run.accelerator.load_state(str(checkpoint))
    step = int(state["step"])
    run.say(f"resumed from {checkpoint} at step {step}")
    changed = changed_settings(state, run.cfg.flat())
    if changed:
        run.say(
            "warning: settings changed since this checkpoint was written; from here the run "
            "follows the new ones (a changed max_steps or epochs also reshapes the LR "
            "schedule), so it is no longer identical to an uninterrupted run:\n  "
            + "\n  ".join(changed)
        )
    return step


# ---------------------------------------------------------------------------------------------
# Steps
# ---------------------------------------------------------------------------------------------


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
    them in the form its kind asks for (pairs indexed out of them, or padded lists)."""
    policy_logps = run.wrapped(Groups(batch.groups))
    ref = (
        run.reference.logps(batch, indices, "train").to(run.accelerator.device)
        if run.reference is not None
        else None
    )
    out = apply_loss(run.loss_fn, batch, policy_logps, ref)
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
                window.add(metrics, pairs)
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
        policy = run.accelerator.unwrap_model(run.wrapped).model
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


# ---------------------------------------------------------------------------------------------
# accelerate details
# ---------------------------------------------------------------------------------------------


def _multi_process_cpu() -> bool:
    """Launched as several processes on a machine without an accelerator (torchrun on CPU).

    accelerate sets up gloo DDP there only when told `cpu=True`; otherwise every process would
    silently train alone on the whole batch.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    accelerator_api = getattr(torch, "accelerator", None)  # torch >= 2.6
    has_accelerator = (
        accelerator_api.is_available() if accelerator_api is not None else torch.cuda.is_available()
    )
    return not has_accelerator


def _fresh_accelerate_state() -> None:
    """Let `train` run more than once per process (scripts, tests) with different settings.

    accelerate keeps mixed precision and plugins in process-wide singletons and refuses a second
    Accelerator that differs; the distributed setup (PartialState) is kept, it does not change.
    """
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()


def _prepare_deepspeed_batch_size(accelerator: Any, cfg: OptimConfig) -> None:
    """DeepSpeed insists on a micro-batch size; accelerate takes it from a dataloader we don't use."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is None:
        return
    config = plugin.deepspeed_config
    if config.get("train_micro_batch_size_per_gpu", "auto") == "auto":
        config["train_micro_batch_size_per_gpu"] = cfg.batch_size or 1


def _indent(text: str) -> str:
    return "".join(f"  {line}\n" for line in text.splitlines()).rstrip("\n")
