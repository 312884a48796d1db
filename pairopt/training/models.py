"""Loading a causal LM: a hub id, a local directory, or a config without weights.

A directory with a config.json but no weight files (the shipped `builtin:tiny-llama`) is built
with `from_config` under a seed, so a run on it is reproducible. Light: torch and transformers,
no pydantic or datasets (`pairopt verify` uses it too).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from pairopt.errors import PairoptError
from pairopt.sources import BUILTIN_PREFIX, TOKENIZER_FILES, looks_like_path, resolve_path


def check_model_source(name_or_path: str, *, tokenizer: bool = False) -> None:
    """Refuse a local model path that cannot be a model directory (hub ids: from_pretrained's job).

    Raises PairoptError saying what is wrong with the path; `tokenizer`: it must hold one too.
    """
    local = name_or_path.startswith(BUILTIN_PREFIX) or looks_like_path(name_or_path)
    if not (local or Path(name_or_path).expanduser().exists()):
        return
    path = Path(resolve_path(name_or_path))
    if not path.exists():
        raise PairoptError(
            "no such directory (give a local model directory with a config.json, a hub model "
            "id, or builtin:tiny-llama)"
        )
    if name_or_path.startswith(BUILTIN_PREFIX) and not (path / "config.json").is_file():
        raise PairoptError(
            "that built-in is a dataset, not a model (the model is builtin:tiny-llama)"
        )
    if not path.is_dir() or not (path / "config.json").is_file():
        what = "it is a file" if not path.is_dir() else "the directory has no config.json"
        raise PairoptError(
            f"{what}: a model directory holds the config.json of a transformers model (and "
            "its weights, or none to build it from the config)"
        )
    if tokenizer and not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise PairoptError(
            f"the directory has no tokenizer ({', '.join(TOKENIZER_FILES)}): save one next to "
            "the model with tokenizer.save_pretrained(dir)"
        )


def has_weights(path: Path) -> bool:
    return any(path.glob("*.safetensors")) or any(path.glob("*.bin"))


def load_causal_lm(
    name_or_path: str,
    *,
    dtype: str = "auto",
    seed: int = 0,
    revision: str | None = None,
    trust_remote_code: bool = False,
    attn_implementation: str | None = None,
) -> nn.Module:
    """`AutoModelForCausalLM.from_pretrained`, or `from_config` under `seed` for a bare config."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path = resolve_path(name_or_path)
    torch_dtype: Any = "auto" if dtype == "auto" else getattr(torch, dtype)
    extra: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if attn_implementation is not None:
        extra["attn_implementation"] = attn_implementation
    try:
        if Path(path).is_dir() and not has_weights(Path(path)):
            config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                return AutoModelForCausalLM.from_config(
                    config, dtype=torch.float32 if dtype == "auto" else torch_dtype, **extra
                )
        return AutoModelForCausalLM.from_pretrained(
            path, revision=revision, dtype=torch_dtype, **extra
        )
    except (ImportError, torch.OutOfMemoryError):
        raise
    except Exception as err:  # a missing repo, a bad config, corrupt weights: one message
        raise PairoptError(
            f"could not load model {name_or_path!r}: {type(err).__name__}: "
            f"{str(err).rstrip('.')}. Pass a hub id, or a local directory with a config.json "
            "(and readable weights, or none to build it from the config)."
        ) from None
