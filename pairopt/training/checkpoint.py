"""The run directory: its name, checkpoints (accelerate.save_state) and the final model.

A checkpoint is written into `step-NNNNNN.tmp/` and renamed into place once complete, with
`trainer_state.json` written last: the step, the training data's fingerprint, the settings, and
the sha256 and size of every file of the checkpoint (files.checksums). Reading one checks all of
that (`checkpoint_problem`), so a cut, garbled or half-replaced checkpoint is reported by name,
and resuming a run falls back to its newest complete checkpoint, saying so. The final model is
saved into a temp folder too and moved into the run directory with config.json last, so a failed
save never leaves a directory that looks finished.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from pairopt.errors import PairoptError
from pairopt.training.config import CheckpointConfig, OutputConfig
from pairopt.training.files import (
    atomic_write,
    check_free_space,
    checksums,
    damaged_files,
    publish_directory,
    publish_files,
    write_failed,
)
from pairopt.training.preemption import resume_command
from pairopt.training.run_log import any_process
from pairopt.training.sharding import (
    describe_launch,
    full_numel,
    launch_of,
    partitions_parameters,
    unwrap,
)

STATE_FILE = "trainer_state.json"
_STEP_DIR = re.compile(r"step-(\d+)(\.old)?")

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
    *,
    need_bytes: int = 0,
) -> Path:
    """accelerate.save_state (model, optimiser, RNG, scheduler, loss state) + trainer_state.json
    with the step, the training data's fingerprint, the run's `settings` (TrainConfig.flat()),
    the launch (sharding.launch_of: processes and sharding) and the checksums of the files;
    returns the checkpoint's directory.

    Written into `step-NNNNNN.tmp` and renamed into place (files.publish_directory), after a
    check that the disk has room for `need_bytes` (the model and optimiser state). A failure on
    any process raises on every process, naming the path; the checkpoints before it stay intact.
    """
    directory = output / "checkpoints" / f"step-{step:06d}"
    tmp = directory.with_name(directory.name + ".tmp")
    last = list_checkpoints(output)
    intact = (
        f"The checkpoints written before it are intact (the newest: {last[-1]})."
        if last
        else "No checkpoint of this run exists yet."
    )

    def prepare() -> None:
        shutil.rmtree(tmp, ignore_errors=True)  # a save killed earlier; never a complete one
        check_free_space(output, need_bytes, f"the checkpoint of step {step}", intact=intact)

    def finish() -> None:
        state = {"step": step, "train_fingerprint": train_fp, "config": settings}
        state["launch"] = launch_of(accelerator)
        state["files"] = checksums(tmp)
        atomic_write(tmp / STATE_FILE, json.dumps(_sealed(state), indent=1))
        publish_directory(tmp, directory)
        if cfg.keep_last is not None:
            for old in list_checkpoints(output)[: -cfg.keep_last]:
                shutil.rmtree(old, ignore_errors=True)

    _on_main_together(accelerator, prepare, tmp, need_bytes, intact)
    _together(accelerator, lambda: accelerator.save_state(str(tmp)), tmp, need_bytes, intact)
    _on_main_together(accelerator, finish, tmp, need_bytes, intact)
    return directory


def _together(
    accelerator: Any, action: Callable[[], Any], tmp: Path, need: int, intact: str
) -> None:
    """Run `action` on every process; if it fails on any, remove `tmp` and raise on all."""
    error: PairoptError | None = None
    try:
        action()
    except PairoptError as err:
        error = err
    except Exception as err:  # torch.save's RuntimeError, SafetensorError: a write that failed
        error = write_failed(tmp, err, need=need, intact=intact)
    except BaseException:  # StopNow, KeyboardInterrupt: leave no half checkpoint behind
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if any_process(accelerator, error is not None):
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        raise error or PairoptError(
            f"another process could not write the checkpoint {tmp} (see its message). {intact}"
        )


def _on_main_together(
    accelerator: Any, action: Callable[[], Any], tmp: Path, need: int, intact: str
) -> None:
    _together(
        accelerator, action if accelerator.is_main_process else lambda: None, tmp, need, intact
    )


def _sealed(state: dict[str, Any]) -> dict[str, Any]:
    """`state` with a sha256 of its own content, so a changed byte in trainer_state.json shows."""
    return {**state, "state_sha256": _state_digest(state)}


def _state_digest(state: dict[str, Any]) -> str:
    content = {key: value for key, value in state.items() if key != "state_sha256"}
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


def checkpoint_bytes(model: nn.Module, optimizer: Any) -> int:
    """What a checkpoint of this process's model and optimiser state takes on disk, about."""
    inner = unwrap(model)  # the elements of whole parameters (ZeRO-3 leaves (0,) placeholders)
    weights = sum(full_numel(t) * t.element_size() for t in [*inner.parameters(), *inner.buffers()])
    state = getattr(optimizer, "state", {})
    moments = sum(
        value.numel() * value.element_size()
        for per_param in state.values()
        for value in per_param.values()
        if hasattr(value, "element_size")
    )
    return weights + moments


def _step_dirs(root: Path) -> list[Path]:
    """`step-N` folders (and a `step-N.old` whose `step-N` is missing: a swap cut short by a
    kill, see files.publish_directory), oldest first."""
    if not root.is_dir():
        return []
    found: dict[int, Path] = {}
    for path in root.iterdir():
        match = _STEP_DIR.fullmatch(path.name)
        if match and path.is_dir():
            step = int(match.group(1))
            if match.group(2) is None or step not in found:
                found[step] = path
    return [found[step] for step in sorted(found)]


def list_checkpoints(output: Path) -> list[Path]:
    """The run's checkpoints that have a trainer_state.json, oldest first (not yet verified)."""
    return [p for p in _step_dirs(output / "checkpoints") if (p / STATE_FILE).is_file()]


def read_state(checkpoint: Path) -> dict[str, Any]:
    """A checkpoint's trainer_state.json; PairoptError naming the file when it is damaged."""
    path = checkpoint / STATE_FILE
    try:
        state = json.loads(path.read_text())
        if not isinstance(state, dict):
            raise ValueError(f"it holds a {type(state).__name__}, not an object")
        int(state["step"])
        str(state["train_fingerprint"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise PairoptError(
            f"{path} is damaged (cut short or garbled: {type(err).__name__}: {err})"
        ) from None
    if "state_sha256" in state and state["state_sha256"] != _state_digest(state):
        raise PairoptError(
            f"{path} does not match its checksum (bytes changed after it was written)"
        )
    return state


def checkpoint_problem(checkpoint: Path) -> str | None:
    """What is wrong with a checkpoint (missing, cut or changed files), or None when complete.

    Checkpoints written before checksums were recorded are taken as they are."""
    if not (checkpoint / STATE_FILE).is_file():
        return f"{checkpoint / STATE_FILE} is missing (the save did not finish)"
    try:
        state = read_state(checkpoint)
    except PairoptError as err:
        return str(err)
    problems = damaged_files(checkpoint, state.get("files", {}))
    if problems:
        return f"in {checkpoint}: {'; '.join(problems)}"
    return None


def find_checkpoint(resume: str, output: Path, say: Callable[[str], None] = print) -> Path:
    """--resume value -> a complete checkpoint directory (checked before anything is loaded).

    A run directory (or 'latest') gives its newest complete checkpoint: damaged newer ones are
    reported through `say` and skipped. A checkpoint named directly must be complete itself.
    """
    if resume == "latest":
        run = output
        if not _step_dirs(run / "checkpoints"):
            raise PairoptError(
                f"--resume: no checkpoint in {output / 'checkpoints'} (set --output-dir to the run to resume)"
            )
    else:
        path = Path(resume).expanduser()
        in_run = _STEP_DIR.fullmatch(path.name) is not None and path.parent.name == "checkpoints"
        if (path / STATE_FILE).is_file() or in_run:
            problem = checkpoint_problem(path)
            if problem is None:
                return path
            others = [p for p in _step_dirs(path.parent) if p != path] if in_run else []
            hint = (
                f" Resume from the run instead (--resume {path.parent.parent}) to take its "
                "newest complete checkpoint"
                if others
                else " Resume from another checkpoint, or start the run again"
            )
            raise PairoptError(f"--resume {resume}: the checkpoint is damaged: {problem}.{hint}.")
        run = path
        if not _step_dirs(run / "checkpoints"):
            raise PairoptError(
                f"--resume {resume}: neither a checkpoint (no trainer_state.json) nor a run with checkpoints/"
            )
    return _newest_complete(run, say)


def find_checkpoint_once(
    accelerator: Any, resume: str, output: Path, say: Callable[[str], None] = print
) -> Path:
    """find_checkpoint on the main process only (it reads every byte of the checkpoints it
    checks), its answer or its error given to every process."""
    answer: list[str | None] = [None, None]  # (checkpoint, error)
    if accelerator.is_main_process:
        try:
            answer[0] = str(find_checkpoint(resume, output, say))
        except PairoptError as err:
            answer[1] = str(err)
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        broadcast_object_list(answer)
    if answer[1] is not None or answer[0] is None:
        raise PairoptError(answer[1] or f"--resume {resume}: the main process found no checkpoint")
    return Path(answer[0])


def _newest_complete(run: Path, say: Callable[[str], None]) -> Path:
    skipped: list[str] = []
    for checkpoint in reversed(_step_dirs(run / "checkpoints")):
        problem = checkpoint_problem(checkpoint)
        if problem is None:
            if skipped:
                say(
                    "warning: skipping damaged checkpoints (" + "; ".join(skipped) + "); "
                    f"resuming from the newest complete one, {checkpoint}."
                )
            return checkpoint
        skipped.append(problem)
    raise PairoptError(
        f"--resume: no complete checkpoint in {run / 'checkpoints'}: "
        + "; ".join(skipped)
        + ". The run cannot be resumed: start it again in another --output-dir."
    )


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


def check_resumable(
    checkpoint: Path, train_fp: str, settings: dict[str, Any], launch: dict[str, Any]
) -> dict[str, Any]:
    """The checkpoint's trainer_state.json, once its training data is known to be this run's
    and its launch (`launch`: sharding.launch_of) this one's.

    Checked right after the data is tokenised: before any model loads or file is written.
    """
    state = read_state(checkpoint)
    saved = state.get("launch")  # absent in checkpoints of pairopt before it was recorded
    if saved is not None and saved != launch:
        raise PairoptError(
            f"cannot resume from {checkpoint}: it was written by {describe_launch(saved)} and "
            f"this run is {describe_launch(launch)}. A checkpoint resumes only under the launch "
            "that wrote it: its optimiser state is split that way, and which batches each "
            "process takes depends on the number of processes. Launch it as before (the same "
            "number of processes and accelerate config), or start a new run."
        )
    if state["train_fingerprint"] != train_fp:
        data_changes = [c for c in changed_settings(state, settings) if c.startswith("data.")]
        said = f" Data settings changed: {'; '.join(data_changes)}." if data_changes else ""
        raise PairoptError(
            f"cannot resume from {checkpoint}: its training data differs from this run's "
            f"(different dataset, split, tokenizer or file contents).{said} Resume with the "
            "same data settings."
        )
    return state


def check_resume_step(
    checkpoint: Path | None, state: dict[str, Any] | None, total_steps: int
) -> None:
    """A resumed run must end at or after its checkpoint's step (equal: only the final
    evaluation and save are left)."""
    if checkpoint is None or state is None or int(state["step"]) <= total_steps:
        return
    raise PairoptError(
        f"cannot resume from {checkpoint}: it was written at step {state['step']}, but this run "
        f"ends at step {total_steps} (optim.max_steps, or optim.epochs). Set --max-steps to "
        f"{state['step']} or more, or resume from an earlier checkpoint."
    )


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
    rebuild: Callable[[], nn.Module] | None = None,
) -> nn.Module:
    """save_pretrained the policy (with `lora`: the adapter, and merged on request) and the
    tokenizer into the output dir; returns the model (merged, with LoRA and merge_lora).

    The weights come from the full state dict accelerate gathers on the main process (a
    collective: under FSDP2 and ZeRO-3 each process holds only shards, and the model's own
    tensors are DTensor shards or (0,) placeholders that save_pretrained would write as they
    are). The adapter is the LoRA part of that dict; a merged model under sharding is made on
    the main process from `rebuild()` (an unsharded policy of the same architecture and
    LoRA layers) with the gathered weights loaded into it.

    Saved into `output/.final-model.tmp` and moved into `output` with config.json (or, for an
    adapter alone, adapter/) last: check_output_dir takes those as the sign of a finished run,
    so a save that fails (a full disk) never leaves a directory that looks finished.
    """
    accelerator.wait_for_everyone()
    model: Any = unwrap(wrapped).model
    if not cfg.save_final:
        return model
    state = accelerator.get_state_dict(wrapped)  # gathered: whole on the main process
    tmp = output / ".final-model.tmp"
    need = sum(t.numel() * t.element_size() for t in state.values()) if state else 0
    intact = _unsaved_note(output)
    saved = [model]

    def write() -> None:
        shutil.rmtree(tmp, ignore_errors=True)
        check_free_space(output, need, "the final model", intact=intact)
        full = {key.removeprefix("model."): value for key, value in state.items()}
        tied = _tied_names(model)
        weights = {key: value for key, value in full.items() if key not in tied}
        if lora:
            model.save_pretrained(tmp / "adapter", state_dict=weights)  # PEFT keeps the LoRA keys
            if cfg.merge_lora:
                whole = rebuild if partitions_parameters(accelerator) else None
                saved[0] = _merged(model, full, whole)
                saved[0].save_pretrained(tmp)
        else:
            model.save_pretrained(tmp, state_dict=weights)
        tokenizer.save_pretrained(tmp)
        publish_files(tmp, output, last=("adapter", "config.json"))

    _on_main_together(accelerator, write, tmp, need, intact)
    return saved[0]


def _tied_names(model: nn.Module) -> set[str]:
    """Names of parameters that are another parameter (tied embeddings), which save_pretrained
    leaves out: gathered full state dicts (FSDP2) hold them as separate copies."""
    first: dict[int, str] = {}
    tied = set()
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in first:
            tied.add(name)
        first.setdefault(id(param), name)
    return tied


def _merged(
    model: Any, weights: dict[str, Any], rebuild: Callable[[], nn.Module] | None
) -> nn.Module:
    """The LoRA policy merged into its base model (PEFT's merge_and_unload). The policy itself
    when it is whole; under sharding a whole copy from `rebuild()` with the gathered weights."""
    if rebuild is None:
        return model.merge_and_unload()
    whole: Any = rebuild()
    whole.load_state_dict(weights)
    return whole.merge_and_unload()


def _unsaved_note(output: Path) -> str:
    """What a failed final save leaves to go on from."""
    last = list_checkpoints(output)
    if not last:
        return "The trained weights are not saved, and the run has no checkpoint to resume from."
    return (
        f"The trained model is not saved; the newest checkpoint is {last[-1]}: once there is "
        f"room, `{resume_command(output)}` continues from it and saves the model."
    )
