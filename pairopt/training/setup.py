"""Everything a training run builds before its first step: `setup(cfg) -> Run`.

accelerator and output directory -> tokenizer, data (checked, grouped) -> loss -> policy
(dropout off) -> reference chosen by the loss's declared need (a frozen copy taken now) -> LoRA,
checkpointing -> optimiser, schedule, batch plan -> accelerate.prepare -> reference made, placed
like the policy (the precompute pass runs here, through the prepared policy) -> [resume]. `Run`
holds what the steps need (pairopt.training.steps). This and the trainer are the modules that
read across config sections.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pairopt.data.batch import rows_to_batch
from pairopt.data.groups import make_groups
from pairopt.data.load import PreferenceData, load_preference_data
from pairopt.errors import PairoptError
from pairopt.loss.base import Loss
from pairopt.loss.registry import build_loss, get_loss_class
from pairopt.training.checkpoint import (
    changed_settings,
    check_resumable,
    check_resume_step,
    find_checkpoint_once,
    output_dir,
)
from pairopt.training.config import TrainConfig
from pairopt.training.evaluation import Evaluator
from pairopt.training.loss_inputs import check_loss_fits_data
from pairopt.training.policy import (
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
    StopRequest,
)
from pairopt.training.reference import (
    ReferencePlan,
    make_reference,
    plan_reference,
    precompute_reference,
)
from pairopt.training.reference_cache import dataset_fingerprint
from pairopt.training.run_directory import RunDirectory
from pairopt.training.run_log import (
    Printer,
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
from pairopt.training.sharding import (
    built_whole,
    check_lora_head,
    check_sharding,
    configure_deepspeed,
    full_numel,
    launch_of,
    sharding_of,
)


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
    if sharding_of(accelerator) is not None:
        say(f"sharding: {sharding_of(accelerator)} over {accelerator.num_processes} processes")
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
    resume_state = (
        check_resumable(resume_from, train_fp, cfg.flat(), launch_of(accelerator))
        if resume_from
        else None
    )
    loss_fn = build_loss(cfg.loss.name, **cfg.loss.params).to(accelerator.device)
    with built_whole(accelerator):
        policy, reference_plan = build_models(cfg, loss_fn, accelerator, say)
    plan, total_steps, wrapped, optimizer, scheduler = prepare(
        cfg, accelerator, policy, loss_fn, data
    )
    reference, note, ref_cache_hit = build_reference(
        cfg, loss_fn, reference_plan, accelerator, wrapped, data, progress
    )
    say(f"reference: {note}")
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
    weights = sum(full_numel(p) * p.element_size() for p in policy.parameters())
    need = weights if cfg.output.save_final else 0
    if cfg.checkpoint.every or cfg.checkpoint.every_epoch:
        trainable = sum(full_numel(p) for p in policy.parameters() if p.requires_grad)
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
    check_sharding(
        accelerator, optimizer=cfg.optim.optimizer, tr_dpo=cfg.reference.sync_steps is not None
    )
    return accelerator, cfg


def build_models(
    cfg: TrainConfig, loss_fn: Loss, accelerator: Any, say: Printer
) -> tuple[nn.Module, ReferencePlan]:
    """The policy (dropout off, LoRA, checkpointing), and the reference the loss needs as far
    as it is made before LoRA and sharding (reference.plan_reference)."""
    policy = load_model(cfg.model, seed=cfg.optim.seed)
    say(f"dropout: {switch_off_dropout(policy)}")
    reference = plan_reference(
        cfg.reference,
        cfg.model,
        loss_fn,
        policy,
        accelerator,
        precision=cfg.optim.precision,
        seed=cfg.optim.seed,
    )
    if cfg.model.lora is not None:
        policy = apply_lora(policy, cfg.model.lora)
        check_lora_head(policy, sharding_of(accelerator))
    if cfg.model.gradient_checkpointing:
        enable_checkpointing(policy)
    trainable = [p for p in policy.parameters() if p.requires_grad]
    say(
        f"model: {cfg.model.name_or_path} ({type(hf_model(policy)).__name__}), "
        f"{sum(p.numel() for p in policy.parameters()):,} parameters, "
        f"{sum(p.numel() for p in trainable):,} trainable"
    )
    return policy, reference


def build_reference(
    cfg: TrainConfig,
    loss_fn: Loss,
    plan: ReferencePlan,
    accelerator: Any,
    wrapped: nn.Module,
    data: PreferenceData,
    progress: bool,
) -> tuple[Any, str, bool | None]:
    """(reference, a line for the console, cache hit or None), made after the policy is
    prepared, so that it runs through a module sharded like the policy."""

    # the reference's forward gives the per-token values the loss asks of it (LD-DPO)
    engine_kwargs = {**cfg.engine.kwargs(), "statistics": loss_fn.reference_token_statistics}

    def precompute(logps: Any, plan: ReferencePlan) -> Any:
        return precompute_reference(
            logps,
            plan.fingerprint,
            {"train": data.train, "eval": data.eval},
            rows_to_batch=rows_to_batch,
            cache_dir=cfg.reference.cache_dir,
            dtype=f"{cfg.model.dtype}/{cfg.optim.precision}",
            half=plan.half,
            batch_size=cfg.eval.batch_size,
            accelerator=accelerator,
            statistics=loss_fn.reference_token_statistics,
            progress=progress,
        )

    return make_reference(
        plan, wrapped, accelerator, engine_kwargs, precompute, lora=cfg.model.lora is not None
    )


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
    configure_deepspeed(accelerator, cfg.optim)
    policy_kwargs = {**cfg.engine.kwargs(), "statistics": loss_fn.token_statistics}
    wrapped, optimizer = accelerator.prepare(PolicyLogps(policy, policy_kwargs), optimizer)
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


def _indent(text: str) -> str:
    return "".join(f"  {line}\n" for line in text.splitlines()).rstrip("\n")
