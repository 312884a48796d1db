"""Precomputed reference log-probs: one pass over the splits, cached on disk.

One value per response, not per pair: a split of groups (pairopt.data.groups) is stored as a
flat `GroupLogps` (R,) with the groups' offsets, so a response in several pairs is computed and
stored once. The cache file is keyed by what the numbers depend on: the reference's weights
(hashed byte for byte), the tokenised data (hashed), the dtype and autocast, and
`CACHE_VERSION`. A second run with the same model and data reads the file and never runs the
reference model.

The file is written atomically and holds a sha256 of its numbers. One that cannot be read, is
cut, or does not match its checksum is reported by name and computed again (then rewritten), and
on a hit a few groups are recomputed and compared, so a damaged cache never fails, or silently
skews, every later run with that model and data.
"""

from __future__ import annotations

import hashlib
import io
import logging
import math
import os
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pairopt.data.batch import GroupBatch
from pairopt.errors import PairoptError
from pairopt.pairs import GroupLogps
from pairopt.training.files import atomic_write
from pairopt.training.run_log import work_bar

logger = logging.getLogger(__name__)

# bump when the cached file's layout or the engine's numbers change (2: per response; 3: sha256)
CACHE_VERSION = 3

# a batch of groups -> their responses' reference log-probs (run without gradients)
LogpsFn = Callable[[GroupBatch], GroupLogps]
# columns that say where a row came from, not what is computed
PROVENANCE_COLUMNS = ("rows",)


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
    """A hash of the token-id (and score, pair) columns of a `datasets.Dataset`, row order
    included: every column but `PROVENANCE_COLUMNS`, nested lists level by level.

    Reads the Arrow data in slices (no Python lists), so it is fast on large splits and right
    for datasets that carry an indices mapping (a shuffled or split view).
    """
    import pyarrow as pa

    digest = hashlib.blake2b(digest_size=16)
    columns = [c for c in dataset.column_names if c not in PROVENANCE_COLUMNS]
    digest.update(f"{len(dataset)}|{','.join(columns)}".encode())
    arrow = dataset.with_format("arrow")
    for start in range(0, len(dataset), 8192):
        table = arrow[start : start + 8192]
        for column in columns:
            array = table.column(column).combine_chunks()
            while pa.types.is_list(array.type) or pa.types.is_large_list(array.type):
                digest.update(array.value_lengths().to_numpy(zero_copy_only=False).tobytes())
                array = array.flatten()
            digest.update(array.to_numpy(zero_copy_only=False).tobytes())
    return digest.hexdigest()


def default_cache_dir() -> Path:
    root = os.environ.get("PAIROPT_CACHE")
    return Path(root) / "reference" if root else Path.home() / ".cache" / "pairopt" / "reference"


def cache_key(
    model_fp: str, data_fps: dict[str, str], dtype: str, statistics: Iterable[str] = ()
) -> str:
    """What the cached numbers depend on: weights, data, dtype/autocast, the engine version, and
    the per-token statistics kept beside the sums (LD-DPO's token log-probs).

    The engine options are left out on purpose: shared/unshared and packed/unpacked give the same
    numbers (that is what the engine is tested for), so one cache serves every layout.
    """
    digest = hashlib.blake2b(digest_size=12)
    parts = [
        f"v{CACHE_VERSION}",
        model_fp,
        dtype,
        *(f"{k}={v}" for k, v in sorted(data_fps.items())),
        *(f"token:{name}" for name in sorted(statistics)),  # none: the key as it always was
    ]
    digest.update("|".join(parts).encode())
    return digest.hexdigest()


def cache_path(cache_dir: Path, key: str) -> Path:
    return cache_dir / f"ref-logps-{key}.pt"


def tables_digest(tables: Mapping[str, Sequence[torch.Tensor]]) -> str:
    """sha256 of the cached numbers, split by split, in a fixed order."""
    digest = hashlib.sha256()
    for split in sorted(tables):
        digest.update(split.encode())
        for tensor in tables[split]:
            digest.update(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
            digest.update(tensor.contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def damaged_cache(path: Path, why: str) -> None:
    warnings.warn(
        f"the reference log-prob cache {path} is damaged ({why}); it is computed again and "
        "rewritten. Delete the file if this repeats.",
        stacklevel=3,
    )


def read_cache(path: Path, splits: dict[str, Any]) -> dict[str, GroupLogps] | None:
    """The cached tables, or None when there is no file, it is damaged (a warning names it) or
    it does not match the data."""
    if not path.is_file():
        return None
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        stored = {split: tuple(saved["tables"][split]) for split in splits}
        recorded = saved["sha256"]
        names = list(saved.get("statistics", []))
    except Exception as err:  # cut or garbled: torch.load raises a dozen different types
        damaged_cache(path, f"it cannot be read: {type(err).__name__}: {err}")
        return None
    if recorded != tables_digest(stored):
        damaged_cache(path, "its numbers do not match the checksum written with them")
        return None
    tables = {}
    for split in splits:
        logps, tokens, offsets, *per_token = stored[split]
        tables[split] = GroupLogps(logps, tokens, offsets, dict(zip(names, per_token, strict=True)))
    if all(tables[split].num_groups == len(ds) for split, ds in splits.items()):
        return tables
    logger.warning("pairopt: reference cache %s does not match the data; recomputing", path)
    return None


def write_cache(path: Path, tables: dict[str, GroupLogps]) -> None:
    """Write atomically (files.atomic_write: a crashed write never leaves a half file a later
    run would read); a failure (full disk, no permission) only warns: the run keeps the values
    in memory."""
    names = sorted(next(iter(tables.values())).token_values) if tables else []
    stored = {
        split: (t.logps, t.tokens, t.offsets, *(t.token_values[name] for name in names))
        for split, t in tables.items()
    }
    buffer = io.BytesIO()
    torch.save({"tables": stored, "sha256": tables_digest(stored), "statistics": names}, buffer)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, buffer.getvalue())
    except (OSError, PairoptError) as err:
        warnings.warn(
            f"could not write the reference log-prob cache to {path} ({err}); this run uses "
            "the values in memory and the next one will compute them again. Set "
            "reference.cache_dir to a writable directory to keep them.",
            stacklevel=2,
        )


SPOT_CHECK_ROWS = 8  # groups recomputed on a cache hit: one small batch, next to the pass saved


def cache_mismatch(
    tables: dict[str, GroupLogps],
    logps: LogpsFn,
    splits: dict[str, Any],
    *,
    rows_to_batch: Callable[[dict[str, list[Any]]], GroupBatch],
    half: bool,
) -> str | None:
    """How the cache disagrees with the reference model on the first groups of the first split,
    or None. A file that passes its checksum can still hold numbers that are not this model's
    (copied from elsewhere, written by a faulty version); recomputing a few groups finds that.

    Tolerances: the recomputed groups are batched differently from the precompute pass, which
    moves float32 sums by ~1e-6 relative; half precision moves them far more (bf16 keeps ~3
    digits), while another model's numbers differ by whole nats.
    """
    split = next(iter(splits))
    rows = list(range(min(SPOT_CHECK_ROWS, len(splits[split]))))
    if not rows:
        return None
    fresh = logps(rows_to_batch(splits[split][rows])).to("cpu")
    cached = tables[split].take(rows)
    if not torch.equal(fresh.offsets, cached.offsets):
        return f"{split} rows {rows[0]}-{rows[-1]}: another number of responses per row"
    rtol, atol = (2e-2, 0.5) if half else (1e-4, 1e-3)
    for field in ("tokens", "logps"):
        new, old = getattr(fresh, field).double(), getattr(cached, field).double()
        wrong = ~((new - old).abs() <= atol + rtol * old.abs())  # NaN counts as wrong
        if bool(wrong.any()):
            response = int(wrong.nonzero()[0])
            row = rows[int(torch.searchsorted(cached.offsets, response, right=True)) - 1]
            return (
                f"{split} row {row}: a response's {field} is {old[response].item():.6g} in the "
                f"cache but {new[response].item():.6g} from the reference model"
            )
    return None


def compute_tables(
    logps: LogpsFn,
    splits: dict[str, Any],
    *,
    rows_to_batch: Callable[[dict[str, list[Any]]], GroupBatch],
    batch_size: int,
    accelerator: Any,
    progress: bool = False,
) -> dict[str, GroupLogps]:
    """Reference log-probs of every response of every group of every split, in row order. With
    several processes each computes a strided share of the groups and every process gets all
    of them; every process runs the same number of batches (a short share repeats row 0 and
    drops it), as FSDP and ZeRO-3 need: their forward is a collective. `batch_size` counts
    groups."""
    rank, world = accelerator.process_index, accelerator.num_processes
    tables = {}
    batches = sum(math.ceil(math.ceil(len(ds) / world) / batch_size) for ds in splits.values())
    bar = work_bar(progress and accelerator.is_main_process, batches, "reference log-probs")
    with bar:
        for split, dataset in splits.items():
            mine = list(range(rank, len(dataset), world))
            mine += [-1] * (math.ceil(len(dataset) / world) - len(mine))  # -1: padding
            rows: list[tuple[int, GroupLogps]] = []
            for batch in _chunks(mine, batch_size):
                out = logps(rows_to_batch(dataset[[max(i, 0) for i in batch]])).to("cpu")
                out = GroupLogps(
                    out.logps.float(),
                    out.tokens,
                    out.offsets,
                    {name: v.float() for name, v in out.token_values.items()},
                )
                bar.update(1)
                rows += [(index, out.take([g])) for g, index in enumerate(batch) if index >= 0]
            if world > 1:
                from accelerate.utils import gather_object

                rows = gather_object(rows)
            rows.sort(key=lambda row: row[0])
            tables[split] = GroupLogps.cat([group for _, group in rows])
    return tables


def _chunks(items: list[int], size: int) -> Iterator[list[int]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]
