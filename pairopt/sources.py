"""Where a model or dataset named by a string comes from: `builtin:<name>`, a local path, or a hub id.

`builtin:<name>` is a folder shipped under pairopt/assets/ (the tiny model, the tiny data).
A string that starts like a path (/, ./, ../, ~) or names a data file (.jsonl, ...) can only
be meant as a local path; anything else that does not exist locally is a hub id. Light: no
torch, pydantic or datasets here (the data layer and the trainer both use it).
"""

from __future__ import annotations

from pathlib import Path

from pairopt.errors import PairoptError

ASSETS_DIR = Path(__file__).resolve().parent / "assets"
BUILTIN_PREFIX = "builtin:"
# data file suffix -> the `datasets` packaged builder that reads it
DATA_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}
# a saved tokenizer has at least one of these (transformers 5.0 "loads" an empty folder)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def available_builtins() -> list[str]:
    return sorted(
        p.name for p in ASSETS_DIR.iterdir() if p.is_dir() and not p.name.startswith(("_", "."))
    )


def resolve_builtin(path: str) -> str:
    """`builtin:<name>` -> the absolute path of pairopt/assets/<name>; any other path unchanged."""
    if not path.startswith(BUILTIN_PREFIX):
        return path
    name = path[len(BUILTIN_PREFIX) :]
    if name not in available_builtins():
        raise PairoptError(
            f"Unknown built-in asset {path!r}. Available: "
            + ", ".join(BUILTIN_PREFIX + n for n in available_builtins())
            + "."
        )
    return str(ASSETS_DIR / name)


def looks_like_path(value: str) -> bool:
    """Hub ids are `org/name`; these can only be meant as local paths."""
    return value.startswith(("/", "./", "../", "~", ".", ".\\"))


def looks_like_data_file(value: str) -> bool:
    """A path, or a name with a data-file suffix: never a hub dataset id."""
    return looks_like_path(value) or Path(value).suffix.lower() in DATA_FILE_BUILDERS


def resolve_path(name_or_path: str) -> str:
    """`builtin:<name>` -> the shipped asset's directory; an existing path -> expanded; else as is."""
    if name_or_path.startswith(BUILTIN_PREFIX):
        return resolve_builtin(name_or_path)
    path = Path(name_or_path).expanduser()
    return str(path) if path.exists() else name_or_path
