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

import contextlib
import copy
import hashlib
import logging
import math
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from pairopt.config import TrainConfig
from pairopt.engine.compat import disable_dropout
from pairopt.engine.forward import compute_logps
from pairopt.pairs import PairLogps, PreferencePair
from pairopt.run_log import work_bar

logger = logging.getLogger(__name__)

CACHE_VERSION = 1  # bump when the cached file's layout or the engine's numbers change


class Reference(Protocol):
    """Gives the reference log-probs of `pairs`, rows `indices` of `split` ("train" / "eval")."""

    def logps(
        self, pairs: Sequence[PreferencePair], indices: Sequence[int], split: str
    ) -> PairLogps: ...


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

    def logps(
        self, pairs: Sequence[PreferencePair], indices: Sequence[int], split: str
    ) -> PairLogps:
        with torch.no_grad(), self.autocast():
            return compute_logps(self.model, pairs, **self.engine_kwargs)


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

    def logps(
        self, pairs: Sequence[PreferencePair], indices: Sequence[int], split: str
    ) -> PairLogps:
        with torch.no_grad(), self.autocast(), self.peft_model.disable_adapter():
            return compute_logps(self.peft_model.get_base_model(), pairs, **self.engine_kwargs)


class PrecomputedReference:
    """Reference log-probs looked up by row index (strategy `precompute`).

    `tables[split]` holds (n_rows,) tensors for the whole split; `hit` says whether they came
    from the on-disk cache.
    """

    def __init__(self, tables: dict[str, PairLogps], path: Path, hit: bool) -> None:
        self.tables = tables
        self.path = path
        self.hit = hit

    def logps(
        self, pairs: Sequence[PreferencePair], indices: Sequence[int], split: str
    ) -> PairLogps:
        return self.tables[split][list(indices)]


# ---------------------------------------------------------------------------------------------
# Fingerprints and the cache
# ---------------------------------------------------------------------------------------------


def model_fingerprint(model: nn.Module) -> str:
    """A hash of the config and every parameter and buffer, byte for byte.

    Hashing the weights (not the name or path) keeps the key right for a local directory whose
    weights changed, and for models built from a config under a seed. It reads every byte once:
    ~1 s per GB, small next to the precomputation pass it guards.
    """
    digest = hashlib.blake2b(digest_size=16)
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_json_string"):
        digest.update(config.to_json_string(use_diff=False).encode())
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
        digest.update(flat.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def dataset_fingerprint(dataset: Any) -> str:
    """A hash of the token-id columns of a `datasets.Dataset`, row order included.

    Reads the Arrow data in slices (no Python lists), so it is fast on large splits and right
    for datasets that carry an indices mapping (a shuffled or split view).
    """
    digest = hashlib.blake2b(digest_size=16)
    columns = ("prompt_ids", "chosen_ids", "rejected_ids")
    digest.update(f"{len(dataset)}".encode())
    arrow = dataset.with_format("arrow")
    for start in range(0, len(dataset), 8192):
        table = arrow[start : start + 8192]
        for column in columns:
            array = table.column(column).combine_chunks()
            digest.update(array.value_lengths().to_numpy(zero_copy_only=False).tobytes())
            digest.update(array.flatten().to_numpy(zero_copy_only=False).tobytes())
    return digest.hexdigest()


def default_cache_dir() -> Path:
    root = os.environ.get("PAIROPT_CACHE")
    return Path(root) / "reference" if root else Path.home() / ".cache" / "pairopt" / "reference"


def cache_key(
    model_fp: str, data_fps: dict[str, str], engine_kwargs: dict[str, Any], dtype: str
) -> str:
    """What the cached numbers depend on: weights, data, dtype/autocast and the engine version.

    The engine options are left out on purpose: shared/unshared and packed/unpacked give the same
    numbers (that is what the engine is tested for), so one cache serves every layout.
    """
    digest = hashlib.blake2b(digest_size=12)
    parts = [
        f"v{CACHE_VERSION}",
        model_fp,
        dtype,
        *(f"{k}={v}" for k, v in sorted(data_fps.items())),
    ]
    digest.update("|".join(parts).encode())
    return digest.hexdigest()


def precompute(
    model: nn.Module,
    splits: dict[str, Any],
    *,
    rows_to_pairs: Callable[[dict[str, list[Any]]], list[PreferencePair]],
    engine_kwargs: dict[str, Any],
    cache_dir: Path,
    key: str,
    batch_size: int,
    accelerator: Any,
    autocast: Callable[[], AbstractContextManager[Any]] = nullcontext,
    progress: bool = False,
) -> PrecomputedReference:
    """Reference log-probs of every row of every split, from the cache or computed and cached.

    On a hit `model` is not run. With several processes each computes a strided share of the rows; the main process writes
    the file (atomically: a crashed write never leaves a half file that a later run would read).
    """
    path = cache_dir / f"ref-logps-{key}.pt"
    if path.is_file():
        saved = torch.load(path, map_location="cpu", weights_only=True)
        tables = {split: PairLogps(*saved[split]) for split in splits}
        if all(len(tables[split]) == len(ds) for split, ds in splits.items()):
            return PrecomputedReference(tables, path, hit=True)
        logger.warning("pairopt: reference cache %s does not match the data; recomputing", path)

    live = LiveReference(model, engine_kwargs, autocast)
    rank, world = accelerator.process_index, accelerator.num_processes
    tables = {}
    batches = sum(
        math.ceil(len(range(rank, len(ds), world)) / batch_size) for ds in splits.values()
    )
    bar = work_bar(progress and accelerator.is_main_process, batches, "reference log-probs")
    for split, dataset in splits.items():
        mine = list(range(rank, len(dataset), world))
        rows: list[tuple[int, float, float, int, int]] = []
        for batch in _chunks(mine, batch_size):
            out = live.logps(rows_to_pairs(dataset[batch]), batch, split).to("cpu")
            bar.update(1)
            rows += zip(
                batch,
                out.chosen_logps.float().tolist(),
                out.rejected_logps.float().tolist(),
                out.chosen_tokens.tolist(),
                out.rejected_tokens.tolist(),
                strict=True,
            )
        if world > 1:
            from accelerate.utils import gather_object

            rows = gather_object(rows)
        rows.sort()
        tables[split] = PairLogps(
            torch.tensor([r[1] for r in rows], dtype=torch.float32),
            torch.tensor([r[2] for r in rows], dtype=torch.float32),
            torch.tensor([r[3] for r in rows], dtype=torch.long),
            torch.tensor([r[4] for r in rows], dtype=torch.long),
        )
    bar.close()
    if accelerator.is_main_process:
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        try:
            cache_dir.mkdir(parents=True, exist_ok=True)
            torch.save(
                {
                    split: (t.chosen_logps, t.rejected_logps, t.chosen_tokens, t.rejected_tokens)
                    for split, t in tables.items()
                },
                tmp,
            )
            os.replace(tmp, path)
        except (OSError, RuntimeError) as err:  # a full disk, no permission: kept in memory
            with contextlib.suppress(OSError):  # a half-written file must not stay behind
                tmp.unlink()
            warnings.warn(
                f"could not write the reference log-prob cache to {path} ({err}); this run uses "
                "the values in memory and the next one will compute them again. Set "
                "reference.cache_dir to a writable directory to keep them.",
                stacklevel=2,
            )
    accelerator.wait_for_everyone()
    return PrecomputedReference(tables, path, hit=False)


def _chunks(items: list[int], size: int) -> Iterator[list[int]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


# ---------------------------------------------------------------------------------------------
# Choosing and placing the reference (called by the trainer)
# ---------------------------------------------------------------------------------------------


class LazyAdapter:
    """The adapter strategy needs the PEFT model, which exists only after LoRA is applied."""

    def bind(self, policy: nn.Module, engine_kwargs: dict[str, Any], autocast: Any) -> Any:
        return AdapterReference(policy, engine_kwargs, autocast)


def setup_reference(
    cfg: TrainConfig,
    loss_fn: Any,
    policy: nn.Module,
    accelerator: Any,
    engine_kwargs: dict[str, Any],
    splits: dict[str, Any],
    rows_to_pairs: Any,
) -> tuple[Any, str, bool | None]:
    """(reference or None, a line for the console, cache hit or None). Reads the loss's flag."""
    if not loss_fn.requires_reference:
        return None, f"none (loss {cfg.loss.name!r} is reference-free)", None
    strategy = cfg.reference.strategy
    if strategy == "auto":
        strategy = "adapter" if cfg.model.lora is not None else "copy"
    if strategy == "adapter":
        return LazyAdapter(), "the policy with its LoRA adapter disabled", None

    def reference_model() -> nn.Module:
        from pairopt.policy import load_model

        if cfg.reference.name_or_path is not None:
            model = load_model(cfg.reference.name_or_path, cfg, seed=cfg.optim.seed)
        else:
            model = copy.deepcopy(policy)
        disable_dropout(model)
        return model.requires_grad_(False).eval()

    if strategy == "copy":
        model = place_reference(reference_model(), accelerator)
        source = cfg.reference.name_or_path or "the policy's initial weights"
        return (
            LiveReference(model, engine_kwargs, accelerator.autocast),
            f"frozen copy of {source}, run live",
            None,
        )

    # precompute: the key needs the reference's weights; the policy's own initial weights serve
    # when no other reference is named, so a cache hit loads nothing.
    named = cfg.reference.name_or_path is not None
    model_for_key = reference_model() if named else policy
    active = {name: ds for name, ds in splits.items() if ds is not None}
    key = cache_key(
        model_fingerprint(model_for_key),
        {name: dataset_fingerprint(ds) for name, ds in active.items()},
        engine_kwargs,
        f"{cfg.model.dtype}/{cfg.optim.precision}",
    )
    cache_dir = (
        Path(cfg.reference.cache_dir).expanduser()
        if cfg.reference.cache_dir
        else default_cache_dir()
    )
    original_device = next(policy.parameters()).device
    runner = model_for_key.to(accelerator.device)
    table = precompute(
        runner,
        active,
        rows_to_pairs=rows_to_pairs,
        engine_kwargs=engine_kwargs,
        cache_dir=cache_dir,
        key=key,
        batch_size=cfg.eval.batch_size,
        accelerator=accelerator,
        autocast=accelerator.autocast,
        progress=cfg.logging.progress_bar,
    )
    if not named:
        policy.to(original_device)
    verb = "read from cache" if table.hit else "computed and cached"
    return table, f"precomputed log-probs, {verb} ({table.path})", table.hit


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
