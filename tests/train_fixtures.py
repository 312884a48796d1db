"""Shared pieces of the trainer tests: a tinier model than the shipped one, and small configs.

The model directory holds the shipped tiny tokenizer and a config of a 2-layer, 32-wide Llama
with no weights, so the trainer builds it from the config under the run seed (as it does for
`builtin:tiny-llama`), in a fraction of the time.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from typing import Any

import torch

from pairopt.sources import resolve_builtin
from pairopt.training.config import TrainConfig
from pairopt.training.config_load import validate_config


def make_tiny_model_dir(root: Path) -> Path:
    """Tokenizer of builtin:tiny-llama + a smaller config.json, no weights."""
    source = Path(resolve_builtin("builtin:tiny-llama"))
    target = root / "tiny-test-llama"
    target.mkdir(parents=True, exist_ok=True)
    for file in source.iterdir():
        if file.is_file() and file.name != "config.json":
            shutil.copy(file, target / file.name)
    config = json.loads((source / "config.json").read_text())
    config.update(
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        num_hidden_layers=2,
    )
    (target / "config.json").write_text(json.dumps(config))
    return target


def deep_update(base: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in new.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_update(out[key], value)
        else:
            out[key] = value
    return out


def tiny_config(model_dir: Path, output: Path, **sections: Any) -> TrainConfig:
    """A run of a few steps on 48 train / 16 eval pairs; `sections` override per section."""
    base: dict[str, Any] = {
        "model": {"name_or_path": str(model_dir)},
        "data": {"max_samples": 48, "max_eval_samples": 16},
        "loss": {"name": "dpo"},
        "optim": {"lr": 1e-2, "batch_size": 4, "max_steps": 3, "seed": 0, "schedule": "constant"},
        "logging": {"progress_bar": False, "every": 1},  # a metrics.jsonl record per step
        "output": {"dir": str(output)},
    }
    return validate_config(deep_update(base, sections))


def params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}
