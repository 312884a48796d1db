"""`pairopt train`: preference fine-tuning on accelerate, top to bottom.

    config -> output dir -> tokenizer, data -> loss -> policy (dropout off, LoRA, checkpointing)
    -> reference (by the loss's declared need) -> optimiser, schedule -> accelerate.prepare
    -> [resume] -> steps (micro-batches, eval, logging, checkpoints) -> final eval -> save_pretrained

Data order is a pure function of (seed, epoch): the train split is permuted with
`torch.randperm(seed + epoch)`, cut into micro-batches (by pairs and/or tokens), and every
`world * grad_accum` consecutive micro-batches form one optimiser step; process r takes
micro-batches r, r + world, ... of each step. A resumed run therefore replays the same
batches, and two processes compute exactly what one process with `grad_accum * 2` computes.
The loss of a step is the mean over all its pairs, whatever the split across micro-batches and
processes (each micro-batch's sum is scaled by world * grad_accum / pairs in the step, because
accelerate divides by grad_accum and DDP averages over processes). An incomplete last step of
an epoch is dropped.

The policy runs inside `PolicyLogps`, a module whose forward *is* `compute_logps`: DDP, FSDP
and DeepSpeed wrap that module and so see the forward they need for gradient sync and sharding
(the engine itself calls the backbone and the LM head separately).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import shutil
import sys
import time
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pairopt.config import TrainConfig, help_text, parse_train_args
from pairopt.engine.compat import disable_dropout
from pairopt.engine.forward import compute_logps
from pairopt.errors import PairoptError
from pairopt.models import load_causal_lm, resolve_path
from pairopt.pairs import PairLogps, PreferencePair


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


class _Opaque:
    """Hides the pairs from DDP's input traversal (it would walk every token id in Python)."""

    def __init__(self, pairs: Sequence[PreferencePair]) -> None:
        self.pairs = pairs


class PolicyLogps(nn.Module):
    """The policy as one module whose forward is `compute_logps` (see the module docstring)."""

    def __init__(self, model: nn.Module, engine_kwargs: dict[str, Any]) -> None:
        super().__init__()
        self.model = model
        self.engine_kwargs = engine_kwargs
        # FSDP's auto-wrap policy reads the transformer block classes from here.
        self._no_split_modules = getattr(self.hf_model(), "_no_split_modules", None)

    def hf_model(self) -> nn.Module:
        """The transformers model (under PEFT: the base model with the LoRA layers injected)."""
        get_base = getattr(self.model, "get_base_model", None)
        return get_base() if callable(get_base) else self.model

    def forward(self, batch: _Opaque) -> PairLogps:
        return compute_logps(self.hf_model(), batch.pairs, **self.engine_kwargs)


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------


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
    out_dir = [_output_dir(cfg) if state.is_main_process else None]
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
    say = _Printer(is_main)
    resume_from = _find_checkpoint(cfg.checkpoint.resume, output) if cfg.checkpoint.resume else None
    _check_output_dir(output, resuming=resume_from is not None)
    say("pairopt train: resolved config")
    say(_indent(cfg.to_yaml()))

    set_seed(cfg.optim.seed)
    tokenizer = load_tokenizer(cfg)
    data = load_preference_data(cfg.data, tokenizer, seed=cfg.optim.seed)
    train_ds, eval_ds = data.train, data.eval
    if data.report is not None:
        say(f"data: {data.report}")

    loss_fn = build_loss(cfg.loss.name, **cfg.loss.params).to(accelerator.device)
    engine_kwargs = cfg.engine.kwargs()

    policy = load_model(cfg.model.name_or_path, cfg, seed=cfg.optim.seed)
    say(f"dropout: {_disable_dropout(policy)}")
    reference, reference_note, ref_cache_hit = _setup_reference(
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
        policy = _apply_lora(policy, cfg)
    if cfg.model.gradient_checkpointing:
        hf: Any = _hf(policy)
        hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        hf.config.use_cache = False
    if reference is not None and isinstance(reference, _LazyAdapter):
        reference = reference.bind(policy, engine_kwargs, accelerator.autocast)

    # Saved only now: a bad dataset or model leaves no half-made run directory behind.
    if is_main:
        output.mkdir(parents=True, exist_ok=True)
        (output / "config.yaml").write_text(cfg.to_yaml())
        say(f"config saved to {output / 'config.yaml'}")
    accelerator.wait_for_everyone()

    trainable = [p for p in policy.parameters() if p.requires_grad]
    say(
        f"model: {cfg.model.name_or_path} ({type(_hf(policy)).__name__}), "
        f"{sum(p.numel() for p in policy.parameters()):,} parameters, "
        f"{sum(p.numel() for p in trainable):,} trainable"
    )

    lengths = _pair_lengths(train_ds)
    plan = BatchPlan(
        lengths,
        batch_size=cfg.optim.batch_size,
        batch_tokens=cfg.optim.batch_tokens,
        group=world * cfg.optim.grad_accum,
        seed=cfg.optim.seed,
    )
    total_steps = cfg.optim.max_steps or plan.steps_for_epochs(cfg.optim.epochs)
    optimizer = _build_optimizer(policy, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(cfg, total_steps))

    _prepare_deepspeed_batch_size(accelerator, cfg)
    wrapped, optimizer = accelerator.prepare(PolicyLogps(policy, engine_kwargs), optimizer)
    accelerator.register_for_checkpointing(scheduler, loss_fn)

    from pairopt.reference import dataset_fingerprint

    train_fp = dataset_fingerprint(train_ds)
    start_step = 0
    if resume_from is not None:
        state = json.loads((resume_from / "trainer_state.json").read_text())
        if state["train_fingerprint"] != train_fp:
            raise PairoptError(
                f"cannot resume from {resume_from}: its training data differs from this run's "
                "(different dataset, split or tokenizer). Resume with the same data settings."
            )
        accelerator.load_state(str(resume_from))
        start_step = int(state["step"])
        say(f"resumed from {resume_from} at step {start_step}")

    if cfg.logging.report_to:
        accelerator.init_trackers(output.name, config=_flat_config(cfg))
    log = _MetricsLog(output / "metrics.jsonl", is_main, accelerator, truncate_after=start_step)
    say(
        f"training: {total_steps} steps of {world} x {cfg.optim.grad_accum} micro-batches "
        f"({_batch_words(cfg)}), {len(train_ds)} train pairs, "
        f"{len(eval_ds) if eval_ds is not None else 0} eval pairs, loss {cfg.loss.name}, "
        f"{'shared' if cfg.engine.share_prefix else 'unshared'}"
        f"{' packed' if cfg.engine.packing else ''} forward"
    )

    evaluator = _Evaluator(wrapped, reference, loss_fn, eval_ds, rows_to_pairs, cfg, accelerator)
    history: list[dict[str, float]] = []
    evals: list[dict[str, float]] = []
    bar = _progress(cfg, is_main, total_steps, start_step)
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
                policy_logps = wrapped(_Opaque(pairs))
                ref = (
                    reference.logps(pairs, indices, "train").to(device)
                    if reference is not None
                    else None
                )
                out = loss_fn(policy_logps, ref)
                accelerator.backward(out.losses.sum() * scale)
                _add(sums, "loss", out.losses.detach().sum())
                for key, value in out.metrics.items():
                    _add(sums, key, value.detach().float() * len(indices))
                if accelerator.sync_gradients:
                    if cfg.optim.max_grad_norm is not None:
                        grad_norm = accelerator.clip_grad_norm_(
                            wrapped.parameters(), cfg.optim.max_grad_norm
                        )
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
        done = step + 1
        metrics = _global_means(sums, accelerator, pairs_in_step)
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
            _save_checkpoint(accelerator, output, done, train_fp, cfg)
    loop_s = time.perf_counter() - loop_started
    if bar is not None:
        bar.close()
    if cfg.eval.at_end and evaluator.ready:
        evals.append(evaluator.run(total_steps))
        log.write(total_steps, "eval", evals[-1], console=False)

    final_model = _save_final(accelerator, wrapped, tokenizer, cfg, output)
    if cfg.logging.report_to:
        accelerator.end_training()
    wall_s = time.perf_counter() - started
    pairs_per_s = pairs_done / loop_s if loop_s > 0 else 0.0
    _summary(say, cfg, evals, total_steps - start_step, wall_s, pairs_per_s, output)
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


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------


def load_tokenizer(cfg: TrainConfig) -> Any:
    """The policy's tokenizer (a pad token is set to EOS when the tokenizer has none)."""
    from transformers import AutoTokenizer

    path = resolve_path(cfg.model.name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            path, revision=cfg.model.revision, trust_remote_code=cfg.model.trust_remote_code
        )
    except (OSError, ValueError) as err:
        raise PairoptError(
            f"could not load the tokenizer of model.name_or_path {cfg.model.name_or_path!r}: {err}"
        ) from None
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(name_or_path: str, cfg: TrainConfig, *, seed: int) -> nn.Module:
    """A causal LM from the hub, a directory, or a config without weights (built under `seed`)."""
    return load_causal_lm(
        name_or_path,
        dtype=cfg.model.dtype,
        seed=seed,
        revision=cfg.model.revision,
        trust_remote_code=cfg.model.trust_remote_code,
        attn_implementation=cfg.model.attn_implementation,
    )


def _hf(model: nn.Module) -> nn.Module:
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def _disable_dropout(model: nn.Module) -> str:
    """Switch dropout off (the shared forward is exact only without it) and say what changed."""
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        changed = disable_dropout(model)
    if changed:
        return f"switched off in {changed} places (the prefix-shared forward is exact only without dropout)"
    return "none active (the prefix-shared forward is exact only without dropout)"


def _apply_lora(model: nn.Module, cfg: TrainConfig) -> nn.Module:
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:  # the config check found peft; a broken install still deserves a message
        raise PairoptError(
            "model.lora needs the peft package: pip install 'pairopt[lora]'"
        ) from None
    lora = cfg.model.lora
    assert lora is not None
    peft_config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        target_modules=lora.target_modules or "all-linear",
        lora_dropout=0.0,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, peft_config)


# ---------------------------------------------------------------------------------------------
# The reference
# ---------------------------------------------------------------------------------------------


class _LazyAdapter:
    """The adapter strategy needs the PEFT model, which exists only after LoRA is applied."""

    def bind(self, policy: nn.Module, engine_kwargs: dict[str, Any], autocast: Any) -> Any:
        from pairopt.reference import AdapterReference

        return AdapterReference(policy, engine_kwargs, autocast)


def _setup_reference(
    cfg: TrainConfig,
    loss_fn: Any,
    policy: nn.Module,
    accelerator: Any,
    engine_kwargs: dict[str, Any],
    splits: dict[str, Any],
    rows_to_pairs: Any,
) -> tuple[Any, str, bool | None]:
    """(reference or None, a line for the console, cache hit or None). Reads the loss's flag."""
    from pairopt import reference as ref

    if not loss_fn.requires_reference:
        return None, f"none (loss {cfg.loss.name!r} is reference-free)", None
    strategy = cfg.reference.strategy
    if strategy == "auto":
        strategy = "adapter" if cfg.model.lora is not None else "copy"
    if strategy == "adapter":
        return _LazyAdapter(), "the policy with its LoRA adapter disabled", None

    def reference_model() -> nn.Module:
        if cfg.reference.name_or_path is not None:
            model = load_model(cfg.reference.name_or_path, cfg, seed=cfg.optim.seed)
        else:
            model = copy.deepcopy(policy)
        disable_dropout(model)
        return model.requires_grad_(False).eval()

    if strategy == "copy":
        model = _prepare_reference(reference_model(), accelerator)
        source = cfg.reference.name_or_path or "the policy's initial weights"
        return (
            ref.LiveReference(model, engine_kwargs, accelerator.autocast),
            f"frozen copy of {source}, run live",
            None,
        )

    # precompute: the key needs the reference's weights; the policy's own initial weights serve
    # when no other reference is named, so a cache hit loads nothing.
    named = cfg.reference.name_or_path is not None
    model_for_key = reference_model() if named else policy
    active = {name: ds for name, ds in splits.items() if ds is not None}
    key = ref.cache_key(
        ref.model_fingerprint(model_for_key),
        {name: ref.dataset_fingerprint(ds) for name, ds in active.items()},
        engine_kwargs,
        f"{cfg.model.dtype}/{cfg.optim.precision}",
    )
    cache_dir = (
        Path(cfg.reference.cache_dir).expanduser()
        if cfg.reference.cache_dir
        else ref.default_cache_dir()
    )
    original_device = next(policy.parameters()).device
    runner = model_for_key.to(accelerator.device)
    table = ref.precompute(
        runner,
        active,
        rows_to_pairs=rows_to_pairs,
        engine_kwargs=engine_kwargs,
        cache_dir=cache_dir,
        key=key,
        batch_size=cfg.eval.batch_size,
        accelerator=accelerator,
        autocast=accelerator.autocast,
    )
    if not named:
        policy.to(original_device)
    verb = "read from cache" if table.hit else "computed and cached"
    return table, f"precomputed log-probs, {verb} ({table.path})", table.hit


def _prepare_reference(model: nn.Module, accelerator: Any) -> nn.Module:
    """Place the frozen reference: sharded by DeepSpeed ZeRO-3, else whole on each device."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        import deepspeed

        plugin = accelerator.state.deepspeed_plugin
        config = copy.deepcopy(plugin.deepspeed_config)
        if config.get("zero_optimization", {}).get("stage") != 3:
            config["zero_optimization"] = {"stage": 0}  # ZeRO-1/2 shard optimiser state only
        config.pop("optimizer", None)
        config.pop("scheduler", None)
        for key, value in list(config.items()):
            if value == "auto":
                config.pop(key)
        engine, *_ = deepspeed.initialize(model=model, config=config)
        engine.eval()
        return engine
    return accelerator.prepare_model(model, evaluation_mode=True)


def _prepare_deepspeed_batch_size(accelerator: Any, cfg: TrainConfig) -> None:
    """DeepSpeed insists on a micro-batch size; accelerate takes it from a dataloader we don't use."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is None:
        return
    config = plugin.deepspeed_config
    if config.get("train_micro_batch_size_per_gpu", "auto") == "auto":
        config["train_micro_batch_size_per_gpu"] = cfg.optim.batch_size or 1


# ---------------------------------------------------------------------------------------------
# Data order
# ---------------------------------------------------------------------------------------------


def _pair_lengths(dataset: Any) -> list[int]:
    """prompt + chosen + rejected tokens of every row, read from the Arrow columns."""
    arrow = dataset.with_format("arrow")
    lengths: list[int] = []
    for start in range(0, len(dataset), 8192):
        table = arrow[start : start + 8192]
        total = None
        for column in ("prompt_ids", "chosen_ids", "rejected_ids"):
            values = (
                table.column(column).combine_chunks().value_lengths().to_numpy(zero_copy_only=False)
            )
            total = values if total is None else total + values
        lengths += [int(n) for n in (total if total is not None else [])]
    return lengths


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
        return self._cache[epoch]

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


# ---------------------------------------------------------------------------------------------
# Optimiser and schedule
# ---------------------------------------------------------------------------------------------


def _build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW (or SGD); weight decay only on matrices, not on biases and norm scales."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    groups = [
        {"params": decay, "weight_decay": cfg.optim.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise PairoptError("the model has no trainable parameters")
    if cfg.optim.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.optim.lr)
    return torch.optim.AdamW(groups, lr=cfg.optim.lr, betas=cfg.optim.betas, eps=cfg.optim.eps)


def _lr_lambda(cfg: TrainConfig, total_steps: int) -> Any:
    """Multiplier of the peak lr at step s: linear warm-up, then constant / linear / cosine to 0.

    Same conventions as transformers' get_*_schedule_with_warmup (warm-up starts at 0).
    """
    warmup = cfg.optim.warmup_steps or math.ceil(cfg.optim.warmup_ratio * total_steps)
    schedule = cfg.optim.schedule

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


# ---------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------


class _Evaluator:
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
        cfg: TrainConfig,
        accelerator: Any,
    ) -> None:
        self.wrapped, self.reference, self.loss_fn = wrapped, reference, loss_fn
        self.dataset, self.rows_to_pairs, self.cfg, self.accelerator = (
            dataset,
            rows_to_pairs,
            cfg,
            accelerator,
        )

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
        try:
            for start in range(0, per_process, self.cfg.eval.batch_size):
                batch = mine[start : start + self.cfg.eval.batch_size]
                real = [max(i, 0) for i in batch]
                pairs = self.rows_to_pairs(self.dataset[real])
                policy = self.wrapped(_Opaque(pairs))
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
        finally:
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


# ---------------------------------------------------------------------------------------------
# Metrics, logging, checkpoints, output
# ---------------------------------------------------------------------------------------------


def _add(sums: dict[str, torch.Tensor], key: str, value: torch.Tensor) -> None:
    sums[key] = sums[key] + value if key in sums else value


def _global_means(
    sums: dict[str, torch.Tensor], accelerator: Any, pairs_in_step: int
) -> dict[str, float]:
    """Pair-weighted means over every micro-batch of the step on every process."""
    keys = sorted(sums)
    stacked = torch.stack([sums[k].float().reshape(()) for k in keys]).to(accelerator.device)
    if accelerator.num_processes > 1:
        stacked = accelerator.reduce(stacked, "sum")
    return {
        key: float(value) / pairs_in_step for key, value in zip(keys, stacked.tolist(), strict=True)
    }


class _Printer:
    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled

    def __call__(self, message: str) -> None:
        if self.enabled:
            from tqdm.auto import tqdm

            tqdm.write(message)


class _MetricsLog:
    """metrics.jsonl (one JSON object per line), accelerate trackers, and console lines."""

    def __init__(self, path: Path, is_main: bool, accelerator: Any, *, truncate_after: int) -> None:
        self.accelerator = accelerator
        self.is_main = is_main
        self.file = None
        if is_main:
            kept = []
            if truncate_after > 0 and path.is_file():  # a resumed run replaces what came after
                kept = [
                    line
                    for line in path.read_text().splitlines()
                    if line and json.loads(line)["step"] <= truncate_after
                ]
            path.write_text("".join(line + "\n" for line in kept))
            self.file = path.open("a")

    def write(self, step: int, split: str, metrics: dict[str, float], *, console: bool) -> None:
        if self.file is not None:
            self.file.write(json.dumps({"step": step, "split": split, **metrics}) + "\n")
            self.file.flush()
        self.accelerator.log({f"{split}/{key}": value for key, value in metrics.items()}, step=step)
        if console and self.is_main:
            keys = ("loss", "rewards/accuracies", "rewards/margins", "lr", "tokens_per_s")
            shown = " | ".join(f"{_short(k)} {metrics[k]:.4g}" for k in keys if k in metrics)
            _Printer(True)(f"[{split} step {step}] {shown}")

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


def _short(key: str) -> str:
    return {"rewards/accuracies": "acc", "rewards/margins": "margin", "tokens_per_s": "tok/s"}.get(
        key, key
    )


def _progress(cfg: TrainConfig, is_main: bool, total: int, initial: int) -> Any:
    if not (is_main and cfg.logging.progress_bar):
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True)


def _save_checkpoint(
    accelerator: Any, output: Path, step: int, train_fp: str, cfg: TrainConfig
) -> None:
    """accelerate.save_state (model, optimiser, RNG, scheduler, loss state) + trainer_state.json."""
    directory = output / "checkpoints" / f"step-{step:06d}"
    accelerator.save_state(str(directory))
    if accelerator.is_main_process:
        (directory / "trainer_state.json").write_text(
            json.dumps({"step": step, "train_fingerprint": train_fp})
        )
        if cfg.checkpoint.keep_last is not None:
            for old in _checkpoints(output)[: -cfg.checkpoint.keep_last]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def _checkpoints(output: Path) -> list[Path]:
    root = output / "checkpoints"
    found = (
        [p for p in root.glob("step-*") if (p / "trainer_state.json").is_file()]
        if root.is_dir()
        else []
    )
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def _find_checkpoint(resume: str, output: Path) -> Path:
    """--resume value -> a checkpoint directory (checked before anything is loaded)."""
    if resume == "latest":
        found = _checkpoints(output)
        if not found:
            raise PairoptError(
                f"--resume: no checkpoint in {output / 'checkpoints'} (set --output-dir to the run to resume)"
            )
        return found[-1]
    path = Path(resume).expanduser()
    if (path / "trainer_state.json").is_file():
        return path
    found = _checkpoints(path)
    if not found:
        raise PairoptError(
            f"--resume {resume}: neither a checkpoint (no trainer_state.json) nor a run with checkpoints/"
        )
    return found[-1]


def _output_dir(cfg: TrainConfig) -> str:
    if cfg.output.dir:
        return str(Path(cfg.output.dir).expanduser())
    model = cfg.model.name_or_path.removeprefix("builtin:").rstrip("/").split("/")[-1]
    name = cfg.output.run_name or f"{cfg.loss.name}-{model}-{time.strftime('%Y%m%d-%H%M%S')}"
    return str(Path("pairopt-output") / name)


def _check_output_dir(output: Path, *, resuming: bool) -> None:
    if not resuming and (output / "config.yaml").exists():
        raise PairoptError(
            f"output directory {output} already holds a run (config.yaml): pass --resume to continue "
            "it, or choose another --output-dir."
        )


def _save_final(
    accelerator: Any, wrapped: Any, tokenizer: Any, cfg: TrainConfig, output: Path
) -> nn.Module:
    """save_pretrained the policy (merged when LoRA) and the tokenizer into the output dir."""
    accelerator.wait_for_everyone()
    module = accelerator.unwrap_model(wrapped)
    model = module.model
    if not cfg.output.save_final:
        return model
    state = accelerator.get_state_dict(wrapped)
    if accelerator.is_main_process:
        state = {key.removeprefix("model."): value for key, value in state.items()}
        if cfg.model.lora is not None:
            model.save_pretrained(output / "adapter")
            if cfg.output.merge_lora:
                model = model.merge_and_unload()
                model.save_pretrained(output)
        else:
            model.save_pretrained(output, state_dict=state)
        tokenizer.save_pretrained(output)
    accelerator.wait_for_everyone()
    return model


def _summary(
    say: _Printer,
    cfg: TrainConfig,
    evals: list[dict[str, float]],
    steps: int,
    wall_s: float,
    pairs_per_s: float,
    output: Path,
) -> None:
    lines = [f"done: {steps} steps in {wall_s:.0f} s wall time, {pairs_per_s:.1f} train pairs/s"]
    if evals:
        final = evals[-1]
        accuracy = final.get("rewards/accuracies")
        if accuracy is not None:
            lines.append(
                f"held-out preference accuracy: {accuracy:.1%} of {int(final['pairs'])} eval pairs "
                f"(chosen ranked above rejected by the {cfg.loss.name} implicit reward)"
            )
        lines.append(f"eval loss: {final['loss']:.4f}")
    if cfg.output.save_final:
        lines.append(
            f"model and tokenizer saved to {output} (AutoModelForCausalLM.from_pretrained loads it)"
        )
    for line in lines:
        say(line)


def _flat_config(cfg: TrainConfig) -> dict[str, Any]:
    """Tracker hyper-parameters must be scalars: dotted keys, lists and None as strings."""
    out: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(value, f"{prefix}{key}.")
        else:
            out[prefix[:-1]] = node if isinstance(node, bool | int | float | str) else str(node)

    walk(cfg.to_yaml_dict(), "")
    return out


def _batch_words(cfg: TrainConfig) -> str:
    parts = []
    if cfg.optim.batch_size is not None:
        parts.append(f"<= {cfg.optim.batch_size} pairs")
    if cfg.optim.batch_tokens is not None:
        parts.append(f"<= {cfg.optim.batch_tokens} tokens")
    return " and ".join(parts) + " each"


def _indent(text: str) -> str:
    return "".join(f"  {line}\n" for line in text.splitlines()).rstrip("\n")
