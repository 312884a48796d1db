"""The checks `pairopt bench`, `pairopt verify` and the TRL peer run on their options before
anything is built: devices, numbers, model shapes, dtypes, files, tokenizer directories.

Each raises a PairoptError naming the option, the value and what to do. Light: torch only.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from pairopt.bench.model import ModelShape
from pairopt.errors import PairoptError
from pairopt.sources import TOKENIZER_FILES


def read_text(path: Path, option: str) -> str:
    """The text of a file named by a command-line option, or a PairoptError saying what is wrong."""
    if not path.exists():
        raise PairoptError(f"{option} {path}: no such file.")
    if path.is_dir():
        raise PairoptError(f"{option} {path}: is a directory; give a file.")
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise PairoptError(f"{option} {path}: cannot read it as UTF-8 text ({err}).") from err


def check_tokenizer_dir(path: str) -> None:
    """--tokenizer names a local directory holding a saved tokenizer (the bench never downloads)."""
    if not Path(path).is_dir():
        what = "is a file, not a directory" if Path(path).exists() else "does not exist"
        raise PairoptError(
            f"--tokenizer {path}: the local tokenizer directory {what}. Give the directory "
            "of a saved tokenizer (tokenizer.json / tokenizer_config.json), or store token-id "
            "lists in --data."
        )
    if not any((Path(path) / name).is_file() for name in TOKENIZER_FILES):
        raise PairoptError(
            f"--tokenizer {path}: transformers cannot load a tokenizer from this directory: it "
            f"holds none of {', '.join(TOKENIZER_FILES)}. Save one there with "
            "tokenizer.save_pretrained(dir), or store token-id lists in --data."
        )


# (option attribute, least value) of every integer option; checked before anything is built


INT_MINIMUMS = {
    **dict.fromkeys(("pairs_per_step", "steps", "bucket_size", "chunk_size", "groups_per_step"), 1),
    **dict.fromkeys(("hidden", "layers", "heads", "kv_heads", "intermediate", "vocab"), 1),
    **dict.fromkeys(("sweep_tokens", "chunk_elements"), 1),
    **dict.fromkeys(("warmup", "row_tokens", "threads"), 0),
}


def check_numbers(args: argparse.Namespace) -> None:
    """Every integer option in its range: a PairoptError naming the option and its value."""
    for name, least in INT_MINIMUMS.items():
        value = getattr(args, name, least)
        if value < least:
            hint = {"row_tokens": " (0: a whole step per row)", "threads": " (0: leave)"}
            raise PairoptError(
                f"--{name.replace('_', '-')} must be >= {least}{hint.get(name, '')}, got {value}."
            )


def check_shape(shape: ModelShape) -> None:
    """The Llama shape can be built and run: heads divide hidden into an even head size (rotary
    embeddings rotate pairs), and kv-heads divide heads (grouped-query attention)."""
    if shape.hidden % shape.heads:
        raise PairoptError(
            f"--hidden {shape.hidden} is not divisible by --heads {shape.heads}: the head size "
            "is hidden / heads. Choose heads that divide hidden."
        )
    if (shape.hidden // shape.heads) % 2:
        raise PairoptError(
            f"--hidden {shape.hidden} / --heads {shape.heads} = head size "
            f"{shape.hidden // shape.heads}, odd: rotary embeddings need an even head size."
        )
    if shape.heads % shape.kv_heads:
        raise PairoptError(
            f"--heads {shape.heads} is not divisible by --kv-heads {shape.kv_heads}: each "
            "key/value head serves heads / kv-heads query heads. Choose kv-heads that divide heads."
        )


def parse_vocabs(text: str) -> list[int]:
    """--memory-sweep "32000,128000": the vocabulary sizes, each an integer >= 1."""
    vocabs = []
    for item in text.split(","):
        try:
            vocab = int(item.strip())
        except ValueError:
            vocab = 0
        if vocab < 1:
            raise PairoptError(
                f"--memory-sweep {text!r}: {item.strip()!r} is not a vocabulary size; give "
                "comma-separated integers >= 1, e.g. 32000,128000."
            )
        vocabs.append(vocab)
    return vocabs


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in ("float32", "bfloat16", "float16"):
        raise PairoptError(f"--dtype {name!r}: choose auto, float32, bfloat16 or float16.")
    return getattr(torch, name)
