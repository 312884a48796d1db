"""The reference model's log-probs, for losses that declare `requires_reference`.

Three strategies, all giving the same numbers (the reference is frozen and dropout is off):

- `copy`: a frozen copy of the policy's initial weights (or `reference.name_or_path`), run
  through the same prefix-shared forward under `no_grad` at every step. Costs one extra
  forward per step and the memory of a second model.
- `precompute`: one pass over the train and eval splits before training, cached on disk under a
  key made of the model's and the dataset's fingerprints; a second run with the same model and
  data reads the cache and never loads the reference model. Costs one pass, once.
- `adapter`: with a PEFT LoRA policy, the base model *is* the reference: the same forward with
  the adapter disabled. No second model in memory.

The trainer picks one by the loss instance's `requires_reference` flag (never by its name) and
uses none for reference-free losses.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from pairopt.data.batch import GroupBatch
from pairopt.engine.compat import disable_dropout
from pairopt.engine.forward import compute_group_logps
from pairopt.errors import PairoptError
from pairopt.pairs import GroupLogps
from pairopt.training.config import ModelConfig, ReferenceConfig
from pairopt.training.policy import load_model
from pairopt.training.reference_cache import (
    cache_key,
    cache_mismatch,
    cache_path,
    compute_tables,
    damaged_cache,
    dataset_fingerprint,
    default_cache_dir,
    model_fingerprint,
    read_cache,
    write_cache,
)
from pairopt.training.run_log import any_process


class Reference(Protocol):
    """Gives the reference log-probs of every response of `batch`, the groups at rows
    `indices` of `split` ("train" / "eval"), flat (R,) like the policy's."""

    def logps(self, batch: GroupBatch, indices: Sequence[int], split: str) -> GroupLogps: ...


class LiveReference:
    """A frozen model run through the shared forward under no_grad (strategy `copy`)."""

    def __init__(
        self,
        model: nn.Module,
        engine_kwargs: dict[str, Any],
        autocast: Callable[[], AbstractContextManager[Any]] = nullcontext,
    ) -> None:
        self.model = model  # frozen by the caller (or the policy itself, before training)
        self.engine_kwargs = engine_kwargs
        self.autocast = autocast

    def logps(self, batch: GroupBatch, indices: Sequence[int], split: str) -> GroupLogps:
        with torch.no_grad(), self.autocast():
            return compute_group_logps(self.model, batch.groups, **self.engine_kwargs)

    @torch.no_grad()
    def sync(self, policy: nn.Module, alpha: float) -> None:
        """TR-DPO: reference <- (1 − α)·reference + α·policy, parameter by parameter (buffers
        stay), in place. Gorbatovski et al. 2024, https://arxiv.org/abs/2404.09656"""
        reference = dict(_unwrapped(self.model).named_parameters())
        for name, param in policy.named_parameters():
            target = reference[name]
            target.mul_(1 - alpha).add_(param.detach().to(target.device, target.dtype), alpha=alpha)


class AdapterReference:
    """A PEFT policy with its adapter disabled (strategy `adapter`).

    `peft_model` is the PeftModel (it owns `disable_adapter`); the forward runs on its base
    transformers model, where the LoRA layers live and honour the disabled flag.
    """

    def __init__(
        self,
        peft_model: Any,
        engine_kwargs: dict[str, Any],
        autocast: Callable[[], AbstractContextManager[Any]] = nullcontext,
    ) -> None:
        self.peft_model = peft_model
        self.engine_kwargs = engine_kwargs
        self.autocast = autocast

    def logps(self, batch: GroupBatch, indices: Sequence[int], split: str) -> GroupLogps:
        with torch.no_grad(), self.autocast(), self.peft_model.disable_adapter():
            base = self.peft_model.get_base_model()
            return compute_group_logps(base, batch.groups, **self.engine_kwargs)


class PrecomputedReference:
    """Reference log-probs looked up by row index (strategy `precompute`).

    `tables[split]` holds every response of the whole split, flat (R,) with the groups'
    offsets; `hit` says whether they came from the on-disk cache.
    """

    def __init__(self, tables: dict[str, GroupLogps], path: Path, hit: bool) -> None:
        self.tables = tables
        self.path = path
        self.hit = hit

    def logps(self, batch: GroupBatch, indices: Sequence[int], split: str) -> GroupLogps:
        return self.tables[split].take(indices)


# ---------------------------------------------------------------------------------------------
# Fingerprints and the cache
# ---------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------
# Choosing and placing the reference (called by the trainer)
# ---------------------------------------------------------------------------------------------


class LazyAdapter:
    """The adapter strategy needs the PEFT model, which exists only after LoRA is applied."""

    def bind(self, policy: nn.Module, engine_kwargs: dict[str, Any], autocast: Any) -> Any:
        return AdapterReference(policy, engine_kwargs, autocast)


def resolve_strategy(cfg: ReferenceConfig, lora: bool) -> str:
    """`auto` -> adapter with a LoRA policy, else copy."""
    if cfg.strategy != "auto":
        return cfg.strategy
    return "adapter" if lora else "copy"


def setup_reference(
    cfg: ReferenceConfig,
    model_cfg: ModelConfig,
    loss_fn: Any,
    policy: nn.Module,
    accelerator: Any,
    engine_kwargs: dict[str, Any],
    precompute: Callable[[nn.Module], PrecomputedReference],
    *,
    seed: int,
) -> tuple[Any, str, bool | None]:
    """(reference or None, a line for the console, cache hit or None). Reads the loss's flag.

    `precompute(model)` runs the precompute strategy with `model` as the reference.
    """
    if not loss_fn.requires_reference:
        return None, f"none (loss {loss_fn.name!r} is reference-free)", None
    strategy = resolve_strategy(cfg, model_cfg.lora is not None)
    if strategy == "adapter":
        return LazyAdapter(), "the policy with its LoRA adapter disabled", None

    def reference_model() -> nn.Module:
        if cfg.name_or_path is not None:
            model = load_model(model_cfg, seed=seed, name_or_path=cfg.name_or_path)
        else:
            model = copy.deepcopy(policy)
        disable_dropout(model)
        return model.requires_grad_(False).eval()

    if strategy == "copy":
        model = reference_model()
        if cfg.sync_steps is not None:
            check_syncable(model, policy)
        model = place_reference(model, accelerator)
        source = cfg.name_or_path or "the policy's initial weights"
        return (
            LiveReference(model, engine_kwargs, accelerator.autocast),
            f"frozen copy of {source}, run live",
            None,
        )
    # precompute: the policy's own initial weights serve when no other reference is named, so
    # a cache hit loads nothing
    table = precompute(reference_model() if cfg.name_or_path is not None else policy)
    verb = "read from cache" if table.hit else "computed and cached"
    return table, f"precomputed log-probs, {verb} ({table.path})", table.hit


def precompute_reference(
    model: nn.Module,
    splits: dict[str, Any],
    *,
    rows_to_batch: Callable[[dict[str, list[Any]]], GroupBatch],
    engine_kwargs: dict[str, Any],
    cache_dir: str | None,
    dtype: str,
    batch_size: int,
    accelerator: Any,
    progress: bool = False,
) -> PrecomputedReference:
    """Reference log-probs of every response of every split, from the cache or computed and
    cached (on a hit `model` only recomputes a few groups to check the file:
    reference_cache.cache_mismatch). The main process writes the file; every process takes the
    same branch."""
    active = {name: ds for name, ds in splits.items() if ds is not None}
    key = cache_key(
        model_fingerprint(model),
        {n: dataset_fingerprint(ds) for n, ds in active.items()},
        dtype,
        engine_kwargs.get("statistics", ()),
    )
    path = cache_path(Path(cache_dir).expanduser() if cache_dir else default_cache_dir(), key)
    original_device = next(model.parameters()).device
    live = LiveReference(model.to(accelerator.device), engine_kwargs, accelerator.autocast)
    tables = read_cache(path, active)
    if not any_process(accelerator, tables is None) and tables is not None:
        half = not dtype.endswith("/no") or next(model.parameters()).dtype != torch.float32
        mismatch = cache_mismatch(
            tables,
            lambda batch: live.logps(batch, [], ""),
            active,
            rows_to_batch=rows_to_batch,
            half=half,
        )
        if not any_process(accelerator, mismatch is not None):
            model.to(original_device)
            return PrecomputedReference(tables, path, hit=True)
        damaged_cache(
            path, f"its numbers are not the reference model's: {mismatch or 'see another process'}"
        )
    tables = compute_tables(
        lambda batch: live.logps(batch, [], ""),
        active,
        rows_to_batch=rows_to_batch,
        batch_size=batch_size,
        accelerator=accelerator,
        progress=progress,
    )
    model.to(original_device)
    if accelerator.is_main_process:
        write_cache(path, tables)
    accelerator.wait_for_everyone()
    return PrecomputedReference(tables, path, hit=False)


def check_syncable(reference: nn.Module, policy: nn.Module) -> None:
    """TR-DPO mixes parameters by name: the reference must have the policy's parameters."""
    ours = {name: tuple(p.shape) for name, p in policy.named_parameters()}
    theirs = {name: tuple(p.shape) for name, p in reference.named_parameters()}
    if ours != theirs:
        differ = sorted(set(ours) ^ set(theirs)) or [n for n in ours if ours[n] != theirs[n]]
        raise PairoptError(
            "reference.sync_steps (TR-DPO) mixes the policy's parameters into the reference's, "
            f"but reference.name_or_path has other parameters ({', '.join(differ[:3])} ...): use "
            "a reference of the policy's architecture, or drop reference.sync_steps."
        )


def _unwrapped(model: nn.Module) -> nn.Module:
    """The model inside a DDP / DeepSpeed wrapper (their `module`), or the model itself."""
    inner = getattr(model, "module", None)
    return inner if isinstance(inner, nn.Module) else model


def place_reference(model: nn.Module, accelerator: Any) -> nn.Module:
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
