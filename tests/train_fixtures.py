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


def sharded_runs(
    model_dir: Path, out: Path, grad_accum: int = 1, *, killed: bool = False, local: bool = False
) -> dict[str, TrainConfig]:
    """The trainer runs of tests/test_sharded.py, by name: 3 steps each (linear schedule with a
    no warm-up: 1, 2/3, 1/3 of the rate), AdamW, clipping at 1.0), a checkpoint at step 2. Two processes run them with
    grad_accum 1 (tests/sharded_worker.py), one process with 2. With `killed`, also "killed":
    "copy" under another name of DPO, whose processes the worker kills in step 3 (the loss is
    registered there). With `local`, the reference cache is each process's default directory
    ($PAIROPT_CACHE/reference: the worker gives each its own, like node-local disks)."""
    common: dict[str, Any] = {
        "optim": {"max_steps": 3, "schedule": "linear", "grad_accum": grad_accum},
        "checkpoint": {"every": 2, "keep_last": None},
    }
    precompute = {"strategy": "precompute", "cache_dir": None if local else str(out / "cache")}
    lora = {"lora": {"r": 4, "alpha": 8}}
    configs = {
        "copy": tiny_config(model_dir, out / "copy", **common, reference={"strategy": "copy"}),
        "precompute": tiny_config(model_dir, out / "precompute", **common, reference=precompute),
        "precompute_hit": tiny_config(
            model_dir,
            out / "precompute_hit",
            # with accumulation: the example DeepSpeed configs leave it to optim.grad_accum
            optim={"max_steps": 1, "grad_accum": 2 * grad_accum},
            reference=precompute,
        ),
        "lora": merged(tiny_config(model_dir, out / "lora", **common, model=lora)),
    }
    if killed:
        configs["killed"] = tiny_config(
            model_dir, out / "killed", **common, loss={"name": "test_killed_at_step_3"}
        )
    return configs


def merged(cfg: TrainConfig) -> TrainConfig:
    """`cfg` with output.merge_lora on (tiny_config's `output` argument is the directory)."""
    return cfg.model_copy(update={"output": cfg.output.model_copy(update={"merge_lora": True})})
