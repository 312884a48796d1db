"""`pairopt train` and `pairopt.train(config)`: preference fine-tuning on accelerate.

    setup(cfg) -> Run          everything before the first step (pairopt/training/setup.py)
    run_steps(run)             the steps, evaluations, checkpoints (pairopt/training/steps.py)
    save_final(...)            the model directory
    train(cfg) -> TrainResult  the three above, with the run directory locked and SIGTERM /
                               SIGINT turned into a checkpoint and a clean stop

The pieces beside these take their own config sections: `policy.py` (loading, LoRA, the module
accelerate wraps), `reference.py` (the reference strategies), `schedule.py` (data order,
optimiser, learning rate), `evaluation.py`, `run_log.py` (metrics, console, trackers),
`checkpoint.py` (checkpoints, final save_pretrained), `run_directory.py` (the lock).
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
import time
from pathlib import Path
from typing import Any

from torch import nn

from pairopt.training.checkpoint import (
    save_final,
)
from pairopt.training.config import TrainConfig
from pairopt.training.config_load import load_config
from pairopt.training.flags import help_text, parse_train_args
from pairopt.training.policy import apply_lora, load_model
from pairopt.training.preemption import (
    RunStopped,
    StopNow,
    stop_signals,
)
from pairopt.training.run_log import (
    print_summary,
    quiet_libraries,
)
from pairopt.training.setup import setup
from pairopt.training.sharding import built_whole
from pairopt.training.steps import run_steps


def main(argv: list[str] | None = None) -> int:
    """`pairopt train ...`; returns the exit code: 0 done, 2 bad input (PairoptError, printed by
    the CLI), STOPPED_EXIT_CODE (75) stopped by a signal with a checkpoint, 128 + N stopped at
    once by a second signal N (docs/configuration.md, Exit codes)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        print(help_text())
        return 0
    try:
        train(parse_train_args(argv))
    except (RunStopped, StopNow) as stopped:
        print(f"pairopt train: {stopped}", file=sys.stderr)
        return stopped.exit_code
    finally:
        end_process_group()
    return 0


def end_process_group() -> None:
    """Close the launch's process group before the interpreter exits (`train` leaves it open
    for a caller's further work). Left to the interpreter's teardown, a gloo or DeepSpeed
    process group was seen to abort a finished run's process ("terminate called without an
    active exception", SIGABRT), failing the launch after everything was saved."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def whole_policy(cfg: TrainConfig, accelerator: Any) -> nn.Module:
    """A fresh, unsharded policy with the run's LoRA layers (the weights are loaded over it):
    what save_final merges the adapter into under FSDP2 and ZeRO-3, on the main process."""
    with built_whole(accelerator):
        policy = load_model(cfg.model, seed=cfg.optim.seed)
        return apply_lora(policy, cfg.model.lora) if cfg.model.lora is not None else policy


@dataclasses.dataclass
class TrainResult:
    """What a run leaves behind, for scripts and tests (the files are in `output_dir`)."""

    output_dir: Path
    steps: int
    history: list[dict[str, float]]  # one entry per optimiser step (global means)
    evals: list[dict[str, float]]  # one entry per evaluation
    wall_s: float
    train_pairs_per_s: float
    reference_cache_hit: bool | None  # None unless reference.strategy resolved to precompute
    # the trained transformers model (merged, with LoRA and merge_lora); under FSDP2 and ZeRO-3
    # each process's own shards (load output_dir for the whole model)
    policy: nn.Module

    @property
    def final_eval(self) -> dict[str, float] | None:
        return self.evals[-1] if self.evals else None


def train(config: TrainConfig | dict[str, Any] | str | Path, *, quiet: bool = False) -> TrainResult:
    """Run one training job; returns its TrainResult (per-step history, evaluations, model).

    `config`: a TrainConfig, or a dict of sections / a YAML file read as `pairopt train
    --config` reads it (`{"loss": "dpo"}` is the out-of-the-box run). `quiet`: print nothing
    and show no progress bars (notebooks); the files are written all the same.
    """
    started = time.perf_counter()
    cfg = config if isinstance(config, TrainConfig) else load_config(config)
    with quiet_libraries(quiet), stop_signals() as stop, contextlib.ExitStack() as resources:
        run = setup(cfg, quiet=quiet, stop=stop, resources=resources)
        history, evals, pairs_per_s = run_steps(run)
        final_model = save_final(
            run.accelerator,
            run.wrapped,
            run.tokenizer,
            cfg.output,
            run.output,
            lora=cfg.model.lora is not None,
            rebuild=lambda: whole_policy(cfg, run.accelerator),
        )
    wall_s = time.perf_counter() - started
    steps = run.total_steps - run.start_step
    saved_to = run.output if cfg.output.save_final else None
    print_summary(run.say, cfg.loss.name, evals, steps, wall_s, pairs_per_s, saved_to)
    return TrainResult(
        run.output,
        run.total_steps,
        history,
        evals,
        wall_s,
        pairs_per_s,
        run.ref_cache_hit,
        final_model,
    )
