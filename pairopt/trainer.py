"""`pairopt train`: preference fine-tuning on accelerate, top to bottom.

    config -> output dir -> tokenizer, data -> loss -> policy (dropout off, LoRA, checkpointing)
    -> reference (by the loss's declared need) -> optimiser, schedule -> accelerate.prepare
    -> [resume] -> steps (micro-batches, eval, logging, checkpoints) -> final eval -> save_pretrained

The pieces live beside this file, one concept each: `policy.py` (loading, LoRA, the module
accelerate wraps), `reference.py` (the reference strategies), `schedule.py` (data order,
optimiser, learning rate), `evaluation.py`, `run_log.py` (metrics, console, trackers),
`checkpoint.py` (run directory, save_state, final save_pretrained).

The loss of a step is the mean over all its pairs, whatever the split across micro-batches and
processes: each micro-batch's sum is scaled by world * grad_accum / pairs in the step, because
accelerate divides by grad_accum and DDP averages over processes.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pairopt.checkpoint import (
    changed_settings,
    check_output_dir,
    check_resumable,
    find_checkpoint,
    list_checkpoints,
    output_dir,
    save_checkpoint,
    save_final,
)
from pairopt.config import TrainConfig
from pairopt.errors import PairoptError
from pairopt.evaluation import Evaluator
from pairopt.flags import help_text, parse_train_args
from pairopt.policy import (
    Pairs,
    PolicyLogps,
    apply_lora,
    hf_model,
    load_model,
    load_tokenizer,
    switch_off_dropout,
)
from pairopt.reference import LazyAdapter, setup_reference
from pairopt.run_log import (
    MetricsLog,
    Printer,
    add_metric,
    flat_config,
    global_means,
    print_summary,
    progress_bar,
)
from pairopt.schedule import (
    BatchPlan,
    build_optimizer,
    check_row_budget,
    lr_multiplier,
    pair_lengths,
)


def main(argv: list[str] | None = None) -> int:
    """`pairopt train ...`; returns the exit code (bad input raises PairoptError: exit 2)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        print(help_text())
        return 0
    cfg = parse_train_args(argv)
    train(cfg)
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


def train(cfg: TrainConfig) -> TrainResult:
    """Run one training job as configured; returns its TrainResult."""
    started = time.perf_counter()
    from accelerate import Accelerator, PartialState
    from accelerate.utils import ProjectConfiguration, broadcast_object_list, set_seed

    from pairopt.data import load_preference_data, rows_to_pairs
    from pairopt.loss import build_loss

    # Output directory first (trackers need it when the Accelerator is made); the default name
    # has a timestamp, so every process takes process 0's.
    cpu = _multi_process_cpu()
    state = PartialState(cpu=cpu)
    out_dir = [output_dir(cfg) if state.is_main_process else None]
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
    is_main, world, rank = (
        accelerator.is_main_process,
        accelerator.num_processes,
        accelerator.process_index,
    )
    say = Printer(is_main)
    resume_from = find_checkpoint(cfg.checkpoint.resume, output) if cfg.checkpoint.resume else None
    check_output_dir(output, resuming=resume_from is not None)
    say("pairopt train: resolved config")
    say(_indent(cfg.to_yaml()))

    if cfg.optim.cpu_threads is not None and accelerator.device.type == "cpu":
        torch.set_num_threads(cfg.optim.cpu_threads)
    set_seed(cfg.optim.seed)
    tokenizer = load_tokenizer(cfg)
    data = load_preference_data(cfg.data, tokenizer, seed=cfg.optim.seed)
    train_ds, eval_ds = data.train, data.eval
    if data.report is not None:
        say(f"data: {data.report}")
    from pairopt.reference import dataset_fingerprint

    check_row_budget(
        {"train": train_ds, "eval": eval_ds},
        cfg.engine.share_prefix,
        cfg.engine.max_tokens_per_row,
    )
    train_fp = dataset_fingerprint(train_ds)
    resume_state = check_resumable(resume_from, train_fp, cfg) if resume_from else None

    loss_fn = build_loss(cfg.loss.name, **cfg.loss.params).to(accelerator.device)
    engine_kwargs = cfg.engine.kwargs()

    policy = load_model(cfg.model.name_or_path, cfg, seed=cfg.optim.seed)
    say(f"dropout: {switch_off_dropout(policy)}")
    reference, reference_note, ref_cache_hit = setup_reference(
        cfg,
        loss_fn,
        policy,
        accelerator,
        engine_kwargs,
        {"train": train_ds, "eval": eval_ds},
        rows_to_pairs,
    )
    say(f"reference: {reference_note}")
    if cfg.model.lora is not None:
        policy = apply_lora(policy, cfg)
    if cfg.model.gradient_checkpointing:
        hf: Any = hf_model(policy)
        no_reentrant = {"use_reentrant": False}
        if hasattr(hf, "activation_checkpointing_enable"):  # transformers >= 5.2x name
            hf.activation_checkpointing_enable(activation_checkpointing_kwargs=no_reentrant)
        else:
            hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs=no_reentrant)
        hf.config.use_cache = False
    if reference is not None and isinstance(reference, LazyAdapter):
        reference = reference.bind(policy, engine_kwargs, accelerator.autocast)

    # Saved only now: a bad dataset or model leaves no half-made run directory behind.
    if is_main:
        output.mkdir(parents=True, exist_ok=True)
        (output / "config.yaml").write_text(cfg.to_yaml())
        say(f"config saved to {output / 'config.yaml'}")
    accelerator.wait_for_everyone()

    trainable = [p for p in policy.parameters() if p.requires_grad]
    say(
        f"model: {cfg.model.name_or_path} ({type(hf_model(policy)).__name__}), "
        f"{sum(p.numel() for p in policy.parameters()):,} parameters, "
        f"{sum(p.numel() for p in trainable):,} trainable"
    )

    lengths = pair_lengths(train_ds)
    plan = BatchPlan(
        lengths,
        batch_size=cfg.optim.batch_size,
        batch_tokens=cfg.optim.batch_tokens,
        group=world * cfg.optim.grad_accum,
        seed=cfg.optim.seed,
    )
    total_steps = cfg.optim.max_steps or plan.steps_for_epochs(cfg.optim.epochs)
    optimizer = build_optimizer(policy, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_multiplier(cfg, total_steps))

    _prepare_deepspeed_batch_size(accelerator, cfg)
    wrapped, optimizer = accelerator.prepare(PolicyLogps(policy, engine_kwargs), optimizer)
    accelerator.register_for_checkpointing(scheduler, loss_fn)

    start_step = 0
    if resume_from is not None and resume_state is not None:
        accelerator.load_state(str(resume_from))
        start_step = int(resume_state["step"])
        say(f"resumed from {resume_from} at step {start_step}")
        changed = changed_settings(resume_state, cfg)
        if changed:
            say(
                "warning: settings changed since this checkpoint was written; from here the run "
                "follows the new ones (a changed max_steps or epochs also reshapes the LR "
                "schedule), so it is no longer identical to an uninterrupted run:\n  "
                + "\n  ".join(changed)
            )

    if cfg.logging.report_to:
        accelerator.init_trackers(output.name, config=flat_config(cfg))
    log = MetricsLog(output / "metrics.jsonl", is_main, accelerator, truncate_after=start_step)
    say(
        f"training: {total_steps} steps of {world} x {cfg.optim.grad_accum} micro-batches "
        f"({_batch_words(cfg)}), {len(train_ds)} train pairs, "
        f"{len(eval_ds) if eval_ds is not None else 0} eval pairs, loss {cfg.loss.name}, "
        f"{'shared' if cfg.engine.share_prefix else 'unshared'}"
        f"{' packed' if cfg.engine.packing else ''} forward"
    )

    evaluator = Evaluator(wrapped, reference, loss_fn, eval_ds, rows_to_pairs, cfg, accelerator)
    history: list[dict[str, float]] = []
    evals: list[dict[str, float]] = []
    bar = progress_bar(cfg, is_main, total_steps, start_step)
    loop_started = time.perf_counter()
    pairs_done = 0
    device = accelerator.device
    wrapped.train()
    for step, epoch, micro_batches in plan.iterate(start_step, total_steps):
        step_started = time.perf_counter()
        lr = scheduler.get_last_lr()[0]  # the rate this step uses
        pairs_in_step = sum(len(mb) for mb in micro_batches)
        scale = world * cfg.optim.grad_accum / pairs_in_step
        sums: dict[str, torch.Tensor] = {}
        tokens = 0
        grad_norm: torch.Tensor | None = None
        for indices in micro_batches[rank::world]:
            pairs = rows_to_pairs(train_ds[indices])
            tokens += sum(len(p.prompt) + len(p.chosen) + len(p.rejected) for p in pairs)
            with accelerator.accumulate(wrapped):
                policy_logps = wrapped(Pairs(pairs))
                ref = (
                    reference.logps(pairs, indices, "train").to(device)
                    if reference is not None
                    else None
                )
                out = loss_fn(policy_logps, ref)
                accelerator.backward(out.losses.sum() * scale)
                add_metric(sums, "loss", out.losses.detach().sum())
                for key, value in out.metrics.items():
                    add_metric(sums, key, value.detach().float() * len(indices))
                if accelerator.sync_gradients:
                    if cfg.optim.max_grad_norm is not None:
                        grad_norm = accelerator.clip_grad_norm_(
                            wrapped.parameters(), cfg.optim.max_grad_norm
                        )
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
        done = step + 1
        metrics = global_means(sums, accelerator, pairs_in_step)  # the same on every process
        if not math.isfinite(metrics["loss"]):
            if bar is not None:
                bar.close()
            last = list_checkpoints(output)
            raise PairoptError(
                f"step {done}: the loss is {metrics['loss']} (not finite), so the weights are no "
                "longer usable and the run stops without saving a model. Lower optim.lr, keep "
                "optim.max_grad_norm set, or check the loss parameters"
                + (f"; the last good checkpoint is {last[-1]}." if last else ".")
            )
        step_s = time.perf_counter() - step_started
        tokens_all = int(accelerator.reduce(torch.tensor([tokens], device=device), "sum").item())
        pairs_done += pairs_in_step
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
        history.append(metrics)
        log.write(
            done, "train", metrics, console=done % cfg.logging.every == 0 or done == total_steps
        )
        if bar is not None:
            bar.update(1)
            bar.set_postfix(
                loss=f"{metrics['loss']:.4f}",
                acc=f"{metrics.get('rewards/accuracies', float('nan')):.2f}",
                tok_s=f"{metrics['tokens_per_s']:.0f}",
            )
        if cfg.eval.every and done % cfg.eval.every == 0 and done < total_steps and evaluator.ready:
            evals.append(evaluator.run(done))
            log.write(done, "eval", evals[-1], console=True)
        if cfg.checkpoint.every and done % cfg.checkpoint.every == 0:
            save_checkpoint(accelerator, output, done, train_fp, cfg)
    loop_s = time.perf_counter() - loop_started
    if bar is not None:
        bar.close()
    if cfg.eval.at_end and evaluator.ready:
        evals.append(evaluator.run(total_steps))
        log.write(total_steps, "eval", evals[-1], console=False)

    final_model = save_final(accelerator, wrapped, tokenizer, cfg, output)
    if cfg.logging.report_to:
        accelerator.end_training()
    wall_s = time.perf_counter() - started
    pairs_per_s = pairs_done / loop_s if loop_s > 0 else 0.0
    print_summary(say, cfg, evals, total_steps - start_step, wall_s, pairs_per_s, output)
    log.close()
    return TrainResult(
        output, total_steps, history, evals, wall_s, pairs_per_s, ref_cache_hit, final_model
    )


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


def _prepare_deepspeed_batch_size(accelerator: Any, cfg: TrainConfig) -> None:
    """DeepSpeed insists on a micro-batch size; accelerate takes it from a dataloader we don't use."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is None:
        return
    config = plugin.deepspeed_config
    if config.get("train_micro_batch_size_per_gpu", "auto") == "auto":
        config["train_micro_batch_size_per_gpu"] = cfg.optim.batch_size or 1


def _batch_words(cfg: TrainConfig) -> str:
    parts = []
    if cfg.optim.batch_size is not None:
        parts.append(f"<= {cfg.optim.batch_size} pairs")
    if cfg.optim.batch_tokens is not None:
        parts.append(f"<= {cfg.optim.batch_tokens} tokens")
    return " and ".join(parts) + " each"


def _indent(text: str) -> str:
    return "".join(f"  {line}\n" for line in text.splitlines()).rstrip("\n")
