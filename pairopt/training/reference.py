"""The reference model's log-probs, for losses that declare `requires_reference`.

Three strategies, all giving the same numbers (the reference is frozen and dropout is off):

- `copy`: a frozen copy of the policy's initial weights (or `reference.name_or_path`), run
  through the same prefix-shared forward under `no_grad` at every step. Costs one extra
  forward per step and the memory of a second model (sharded like the policy under FSDP2 and
  ZeRO-3: pairopt.training.sharding.shard_frozen).
- `precompute`: one pass over the train and eval splits before training, cached on disk under a
  key made of the model's and the dataset's fingerprints; a second run with the same model and
  data reads the cache and never runs the reference model but to spot-check it. The pass runs
  through the policy's own wrapped module before the first step (its weights are the initial
  ones then), so it is sharded like the policy and holds no second model.
- `adapter`: with a PEFT LoRA policy, the base model *is* the reference: the same forward with
  the adapter disabled. No second model in memory.

Every strategy calls a wrapped `PolicyLogps`'s forward, never the engine on a bare model: that
forward is where FSDP2 gathers the root's parameters (pairopt.training.policy). The reference is
chosen before LoRA and sharding (`plan_reference`: the copy is taken from the initial weights)
and made after `accelerate.prepare` (`make_reference`). The trainer picks one by the loss
instance's `requires_reference` flag (never by its name) and uses none for reference-free losses.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from pairopt.data.batch import GroupBatch
from pairopt.engine.compat import disable_dropout
from pairopt.errors import PairoptError
from pairopt.pairs import GroupLogps
from pairopt.training.config import ModelConfig, ReferenceConfig
from pairopt.training.policy import Groups, PolicyLogps, load_model
from pairopt.training.reference_cache import (
    LogpsFn,
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
from pairopt.training.sharding import release_frozen, shard_frozen, unwrap


class Reference(Protocol):
    """Gives the reference log-probs of every response of `batch`, the groups at rows
    `indices` of `split` ("train" / "eval"), flat (R,) like the policy's."""

    def logps(self, batch: GroupBatch, indices: Sequence[int], split: str) -> GroupLogps: ...


class LiveReference:
    """A wrapped PolicyLogps run under no_grad: a frozen copy (strategy `copy`), or with `base`
    the policy's own module with its LoRA adapter disabled (strategy `adapter`)."""

    def __init__(
        self,
        module: nn.Module,
        autocast: Callable[[], AbstractContextManager[Any]] = nullcontext,
        *,
        base: bool = False,
        statistics: Iterable[str] = (),
    ) -> None:
        self.module = module  # frozen by the caller, or the policy itself (base; before step 1)
        self.autocast = autocast
        self.base = base
        self.statistics = tuple(statistics)  # the per-token values the loss asks of the reference

    @property
    def model(self) -> nn.Module:
        """The transformers (or PEFT) model inside the wrapped module."""
        return unwrap(self.module).model  # type: ignore[return-value]

    def logps(self, batch: GroupBatch, indices: Sequence[int], split: str) -> GroupLogps:
        with torch.no_grad(), self.autocast():
            if self.base:
                return self.module(Groups(batch.groups), base=True, statistics=self.statistics)
            return self.module(Groups(batch.groups), statistics=self.statistics)

    @torch.no_grad()
    def sync(self, policy: nn.Module, alpha: float) -> None:
        """TR-DPO: reference <- (1 − α)·reference + α·policy, parameter by parameter (buffers
        stay), in place. Gorbatovski et al. 2024, https://arxiv.org/abs/2404.09656"""
        reference = dict(self.model.named_parameters())
        for name, param in policy.named_parameters():
            target = reference[name]
            target.mul_(1 - alpha).add_(param.detach().to(target.device, target.dtype), alpha=alpha)


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
# Choosing (before LoRA and sharding) and making (after accelerate.prepare) the reference
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class ReferencePlan:
    """The reference as chosen before LoRA and sharding; `make_reference` makes it after."""

    strategy: str  # "none", "copy", "precompute" or "adapter"
    note: str  # a line for the console
    model: nn.Module | None = None  # copy, or precompute of reference.name_or_path: whole, frozen
    fingerprint: str = ""  # precompute: reference_cache.model_fingerprint of its weights
    half: bool = False  # precompute: computed in half precision (the cache check's tolerance)


def resolve_strategy(cfg: ReferenceConfig, lora: bool) -> str:
    """`auto` -> adapter with a LoRA policy, else copy."""
    if cfg.strategy != "auto":
        return cfg.strategy
    return "adapter" if lora else "copy"


def plan_reference(
    cfg: ReferenceConfig,
    model_cfg: ModelConfig,
    loss_fn: Any,
    policy: nn.Module,
    accelerator: Any,
    *,
    precision: str,
    seed: int,
) -> ReferencePlan:
    """The strategy by the loss's flag, and what must be taken from the policy before LoRA is
    applied and the policy is sharded: the frozen copy, or the fingerprint of the weights the
    precomputed log-probs belong to (the main process's, given to all: `precision` is
    optim.precision, part of the cache key)."""
    if not loss_fn.requires_reference:
        return ReferencePlan("none", f"none (loss {loss_fn.name!r} is reference-free)")
    strategy = resolve_strategy(cfg, model_cfg.lora is not None)
    if strategy == "adapter":
        return ReferencePlan(strategy, "the policy with its LoRA adapter disabled")

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
        source = cfg.name_or_path or "the policy's initial weights"
        return ReferencePlan(strategy, f"frozen copy of {source}, run live", model)
    # precompute: the policy's own initial weights serve when no other reference is named
    other = reference_model() if cfg.name_or_path is not None else None
    weights = other if other is not None else policy
    half = precision != "no" or next(weights.parameters()).dtype != torch.float32
    fingerprint = _on_main(accelerator, lambda: model_fingerprint(weights))
    return ReferencePlan(strategy, "precomputed log-probs", other, fingerprint, half)


def make_reference(
    plan: ReferencePlan,
    wrapped: nn.Module,
    accelerator: Any,
    engine_kwargs: dict[str, Any],
    precompute: Callable[[LogpsFn, ReferencePlan], PrecomputedReference],
    *,
    lora: bool,
) -> tuple[Any, str, bool | None]:
    """(reference or None, a line for the console, cache hit or None), after the policy's
    `accelerate.prepare` and before its first step. `wrapped` is the prepared policy;
    `engine_kwargs` the reference's (its `statistics`: what the loss asks of the reference);
    `precompute(logps, plan)` runs the precompute strategy with `logps` as the reference."""
    if plan.strategy == "none":
        return None, plan.note, None
    autocast, statistics = accelerator.autocast, engine_kwargs.get("statistics", ())
    if plan.strategy == "adapter":
        return LiveReference(wrapped, autocast, base=True, statistics=statistics), plan.note, None
    module = None
    if plan.model is not None:
        module = shard_frozen(PolicyLogps(plan.model, engine_kwargs), accelerator)
        live = LiveReference(module, autocast, statistics=statistics)
    else:  # the policy before its first step (with LoRA: its base model)
        live = LiveReference(wrapped, autocast, base=lora, statistics=statistics)
    if plan.strategy == "copy":
        return live, plan.note, None
    table = precompute(lambda batch: live.logps(batch, [], ""), plan)
    if module is not None:  # another reference model: only its numbers are kept
        release_frozen(module, accelerator)
        plan.model = None
    verb = "read from cache" if table.hit else "computed and cached"
    return table, f"{plan.note}, {verb} ({table.path})", table.hit


def _on_main(accelerator: Any, compute: Callable[[], str]) -> str:
    """`compute()` on the main process, its answer given to every process."""
    answer = [compute() if accelerator.is_main_process else ""]
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        broadcast_object_list(answer)
    return answer[0]


def precompute_reference(
    logps: LogpsFn,
    fingerprint: str,
    splits: dict[str, Any],
    *,
    rows_to_batch: Callable[[dict[str, list[Any]]], GroupBatch],
    cache_dir: str | None,
    dtype: str,
    half: bool,
    batch_size: int,
    accelerator: Any,
    statistics: Iterable[str] = (),
    progress: bool = False,
) -> PrecomputedReference:
    """Reference log-probs of every response of every split, from the cache or computed and
    cached; `logps(batch)` computes them, with the per-token `statistics` the loss asks of the
    reference (part of the cache key), and is a collective under FSDP and ZeRO-3, so every
    process runs it equally often. The main process decides: it reads the cache and gives its tables
    (or none) to every process, so all take the same branch even when the cache directory is
    local to each machine; on a hit, every process recomputes the same few groups to check the
    file (reference_cache.cache_mismatch). The main process writes the file."""
    active = {name: ds for name, ds in splits.items() if ds is not None}
    key = cache_key(
        fingerprint, {n: dataset_fingerprint(ds) for n, ds in active.items()}, dtype, statistics
    )
    path = cache_path(Path(cache_dir).expanduser() if cache_dir else default_cache_dir(), key)
    tables = _read_on_main(accelerator, path, active)
    if tables is not None:
        mismatch = cache_mismatch(tables, logps, active, rows_to_batch=rows_to_batch, half=half)
        if not any_process(accelerator, mismatch is not None):
            return PrecomputedReference(tables, path, hit=True)
        if accelerator.is_main_process:
            damaged_cache(
                path,
                f"its numbers are not the reference model's: {mismatch or 'see another process'}",
            )
    tables = compute_tables(
        logps,
        active,
        rows_to_batch=rows_to_batch,
        batch_size=batch_size,
        accelerator=accelerator,
        progress=progress,
    )
    if accelerator.is_main_process:
        write_cache(path, tables)
    accelerator.wait_for_everyone()
    return PrecomputedReference(tables, path, hit=False)


def _read_on_main(
    accelerator: Any, path: Path, splits: dict[str, Any]
) -> dict[str, GroupLogps] | None:
    """read_cache on the main process (its warnings too), the tables given to every process."""
    tables = [read_cache(path, splits) if accelerator.is_main_process else None]
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        broadcast_object_list(tables)
    return tables[0]


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
