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

import hashlib
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from pairopt.engine.forward import compute_logps
from pairopt.pairs import PairLogps, PreferencePair

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
    for split, dataset in splits.items():
        mine = list(range(rank, len(dataset), world))
        rows: list[tuple[int, float, float, int, int]] = []
        for batch in _chunks(mine, batch_size):
            out = live.logps(rows_to_pairs(dataset[batch]), batch, split).to("cpu")
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
    if accelerator.is_main_process:
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        torch.save(
            {
                split: (t.chosen_logps, t.rejected_logps, t.chosen_tokens, t.rejected_tokens)
                for split, t in tables.items()
            },
            tmp,
        )
        os.replace(tmp, path)
    accelerator.wait_for_everyone()
    return PrecomputedReference(tables, path, hit=False)


def _chunks(items: list[int], size: int) -> Iterator[list[int]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]
