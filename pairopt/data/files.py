"""Local data files: text that is not UTF-8, and files of a data folder the run does not read.

Both are checked before `datasets` reads anything: a byte that is not UTF-8 in a .jsonl file
otherwise surfaces as a UnicodeDecodeError from inside pyarrow, far from the file and line.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import datasets

from pairopt.data.config import DataConfig
from pairopt.errors import PairoptError
from pairopt.sources import resolve_builtin

TEXT_SUFFIXES = (".json", ".jsonl", ".csv")


def check_utf8(paths: Iterable[Path]) -> None:
    """Raise a PairoptError naming the file, line and column of the first byte that is not
    UTF-8 in any text data file (.json/.jsonl/.csv) of `paths`; other files are skipped."""
    for path in paths:
        if not path.is_file() or path.suffix.lower() not in TEXT_SUFFIXES:
            continue
        with path.open("rb") as file:
            for number, line in enumerate(file, 1):
                try:
                    line.decode("utf-8")
                except UnicodeDecodeError as err:
                    raise PairoptError(
                        f"{path} line {number}, column {err.start + 1}: byte "
                        f"0x{line[err.start]:02x} is not UTF-8 text. Save the file as UTF-8 "
                        "(or fix that line); pairopt reads data files as UTF-8, as datasets does."
                    ) from None


def unused_files(cfg: DataConfig, used_splits: list[str]) -> list[str]:
    """Files of a local data folder that the run does not read, each with why: another split
    than train_split / eval_split, or a file `datasets` skips (another file type, a name it
    does not take for a split). Hidden files and the datasets cache are left out."""
    folder = Path(resolve_builtin(cfg.dataset)).expanduser()
    if not folder.is_dir():
        return []
    builder = datasets.load_dataset_builder(str(folder), name=cfg.subset, cache_dir=cfg.cache_dir)
    split_of = {
        Path(file).resolve(): str(split)
        for split, files in (builder.config.data_files or {}).items()
        for file in files
    }
    cache = Path(cfg.cache_dir).expanduser().resolve() if cfg.cache_dir else None
    notes = []
    for file in sorted(folder.rglob("*")):
        relative = file.relative_to(folder)
        hidden = any(part.startswith(".") for part in relative.parts)
        in_cache = cache is not None and file.resolve().is_relative_to(cache)
        if not file.is_file() or hidden or in_cache:
            continue
        split = split_of.get(file.resolve())
        if split is None:
            notes.append(f"{relative} (not read: another file type, or no split in its name)")
        elif split not in used_splits:
            notes.append(
                f"{relative} (split {split!r}: neither data.train_split nor data.eval_split)"
            )
    return notes
