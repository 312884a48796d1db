"""The run directory: its name, checkpoints (accelerate.save_state) and the final model."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from torch import nn

from pairopt.errors import PairoptError
from pairopt.training.config import CheckpointConfig, OutputConfig

# Settings that do not change what a resumed run computes: where it writes, what it prints.
_NOT_TRAJECTORY = (
    "checkpoint.",
    "output.",
    "logging.",
    "eval.",
    "reference.cache_dir",
    "optim.cpu_threads",
    "model.gradient_checkpointing",
    "engine.backend",  # backend and chunk size: the same values up to rounding
    "engine.chunk_size",
)


def save_checkpoint(
    accelerator: Any,
    output: Path,
    step: int,
    train_fp: str,
    cfg: CheckpointConfig,
    settings: dict[str, Any],
) -> None:
    """accelerate.save_state (model, optimiser, RNG, scheduler, loss state) + trainer_state.json
    with the step, the training data's fingerprint and the run's `settings` (TrainConfig.flat())."""
    directory = output / "checkpoints" / f"step-{step:06d}"
    accelerator.save_state(str(directory))
    if accelerator.is_main_process:
        (directory / "trainer_state.json").write_text(
            json.dumps({"step": step, "train_fingerprint": train_fp, "config": settings}, indent=1)
        )
        if cfg.keep_last is not None:
            for old in list_checkpoints(output)[: -cfg.keep_last]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def list_checkpoints(output: Path) -> list[Path]:
    root = output / "checkpoints"
    found = (
        [p for p in root.glob("step-*") if (p / "trainer_state.json").is_file()]
        if root.is_dir()
        else []
    )
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def find_checkpoint(resume: str, output: Path) -> Path:
    """--resume value -> a checkpoint directory (checked before anything is loaded)."""
    if resume == "latest":
        found = list_checkpoints(output)
        if not found:
            raise PairoptError(
                f"--resume: no checkpoint in {output / 'checkpoints'} (set --output-dir to the run to resume)"
            )
        return found[-1]
    path = Path(resume).expanduser()
    if (path / "trainer_state.json").is_file():
        return path
    found = list_checkpoints(path)
    if not found:
        raise PairoptError(
            f"--resume {resume}: neither a checkpoint (no trainer_state.json) nor a run with checkpoints/"
        )
    return found[-1]


def changed_settings(state: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """Settings `now` (TrainConfig.flat()) that differ from those the checkpoint was written
    with, as "key: old -> new". Empty for checkpoints written before trainer_state.json held
    the config.
    """
    saved = state.get("config")
    if not isinstance(saved, dict):
        return []
    return [
        f"{key}: {saved.get(key, '(unset)')} -> {now.get(key, '(unset)')}"
        for key in sorted(set(saved) | set(now))
        if not key.startswith(_NOT_TRAJECTORY) and saved.get(key) != now.get(key)
    ]


def check_resumable(checkpoint: Path, train_fp: str, settings: dict[str, Any]) -> dict[str, Any]:
    """The checkpoint's trainer_state.json, once its training data is known to be this run's.

    Checked right after the data is tokenised: before any model loads or file is written.
    """
    state: dict[str, Any] = json.loads((checkpoint / "trainer_state.json").read_text())
    if state["train_fingerprint"] != train_fp:
        data_changes = [c for c in changed_settings(state, settings) if c.startswith("data.")]
        said = f" Data settings changed: {'; '.join(data_changes)}." if data_changes else ""
        raise PairoptError(
            f"cannot resume from {checkpoint}: its training data differs from this run's "
            f"(different dataset, split, tokenizer or file contents).{said} Resume with the "
            "same data settings."
        )
    return state


def output_dir(cfg: OutputConfig, loss: str, model: str) -> str:
    """The run directory: output.dir, else ./pairopt-output/<run_name or loss-model-time>."""
    if cfg.dir:
        return str(Path(cfg.dir).expanduser())
    model = model.removeprefix("builtin:").rstrip("/").split("/")[-1]
    name = cfg.run_name or f"{loss}-{model}-{time.strftime('%Y%m%d-%H%M%S')}"
    return str(Path("pairopt-output") / name)


def check_output_dir(output: Path, *, resuming: bool) -> None:
    """Refuse, before anything loads, an output dir that cannot be written or holds another run."""
    if output.exists() and not output.is_dir():
        raise PairoptError(f"output directory {output} is a file: choose another --output-dir.")
    existing = next(p for p in (output, *output.parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise PairoptError(
            f"output directory {output} cannot be created: {existing} is not a writable "
            "directory. Choose another --output-dir."
        )
    if not resuming and (output / "config.yaml").exists():
        if list_checkpoints(output):
            hint = "pass --resume to continue it, or choose another --output-dir."
        elif (output / "config.json").exists() or (output / "adapter").exists():
            hint = "a finished one (its model is saved there); choose another --output-dir."
        else:
            hint = (
                "it has no checkpoint to resume from, so choose another --output-dir (or delete "
                "this one if that run is not needed)."
            )
        raise PairoptError(f"output directory {output} already holds a run (config.yaml): {hint}")


def save_final(
    accelerator: Any,
    wrapped: Any,
    tokenizer: Any,
    cfg: OutputConfig,
    output: Path,
    *,
    lora: bool,
) -> nn.Module:
    """save_pretrained the policy (with `lora`: the adapter, and merged on request) and the
    tokenizer into the output dir."""
    accelerator.wait_for_everyone()
    module = accelerator.unwrap_model(wrapped)
    model = module.model
    if not cfg.save_final:
        return model
    state = accelerator.get_state_dict(wrapped)
    if accelerator.is_main_process:
        state = {key.removeprefix("model."): value for key, value in state.items()}
        if lora:
            model.save_pretrained(output / "adapter")
            if cfg.merge_lora:
                model = model.merge_and_unload()
                model.save_pretrained(output)
        else:
            model.save_pretrained(output, state_dict=state)
        tokenizer.save_pretrained(output)
    accelerator.wait_for_everyone()
    return model
