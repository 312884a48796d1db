"""Damaged files, full disks and runs that collide: each fault injected, then the outcome checked.

Nothing silently wrong (a damaged checkpoint, state file or reference cache is found by its
checksum and named), nothing checkpointed lost (resume falls back to the newest complete
checkpoint, and an older one resumed past a newer never leaves that one half rewritten), and
one message naming the file and what to do, without a traceback.

Full disks are simulated: OSError(ENOSPC) from the write, or shutil.disk_usage reporting a few
bytes free (what files.check_free_space reads).
"""

from __future__ import annotations

import collections
import errno
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import accelerate
import pytest
import torch
from train_fixtures import make_tiny_model_dir, params, tiny_config

from pairopt.errors import PairoptError
from pairopt.training import files
from pairopt.training.checkpoint import (
    check_output_dir,
    checkpoint_problem,
    find_checkpoint,
    list_checkpoints,
)
from pairopt.training.run_directory import LOCK_NAME
from pairopt.training.trainer import train

FOUR_STEPS = {"optim": {"max_steps": 4}, "checkpoint": {"every": 2, "keep_last": None}}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.set_num_threads(1)
    return make_tiny_model_dir(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def pristine(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """A finished 4-step run with checkpoints at steps 2 and 4, and its final weights."""
    run_dir = tmp_path_factory.mktemp("pristine") / "run"
    result = train(tiny_config(model_dir, run_dir, **FOUR_STEPS))
    return run_dir, params(result.policy)


@pytest.fixture
def run_copy(pristine: tuple[Path, dict], tmp_path: Path) -> Path:
    run_dir = tmp_path / "run"
    shutil.copytree(pristine[0], run_dir)
    return run_dir


def resume_config(model_dir: Path, run_dir: Path, **optim):
    return tiny_config(
        model_dir,
        run_dir,
        optim={**FOUR_STEPS["optim"], **optim},
        checkpoint={**FOUR_STEPS["checkpoint"], "resume": str(run_dir)},
    )


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def flip_byte(path: Path, offset: int = -100) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


DAMAGE = {
    "weights_cut": (lambda c: truncate(c / "model.safetensors"), "model.safetensors has"),
    "optimizer_flipped": (lambda c: flip_byte(c / "optimizer.bin"), "optimizer.bin does not match"),
    "optimizer_empty": (lambda c: (c / "optimizer.bin").write_bytes(b""), "optimizer.bin has 0 bytes"),
    "rng_missing": (lambda c: (c / "random_states_0.pkl").unlink(), "random_states_0.pkl is missing"),
    "state_empty": (lambda c: (c / "trainer_state.json").write_text(""), "trainer_state.json is damaged"),
    "state_cut": (lambda c: truncate(c / "trainer_state.json"), "trainer_state.json is damaged"),
    "state_edited": (
        lambda c: (c / "trainer_state.json").write_text(
            (c / "trainer_state.json").read_text().replace('"step": 4', '"step": 5')
        ),
        "trainer_state.json does not match its checksum",
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", DAMAGE)
def test_a_damaged_newest_checkpoint_is_skipped_with_a_note(run_copy: Path, case: str) -> None:
    damage, expected = DAMAGE[case]
    damage(run_copy / "checkpoints" / "step-000004")
    notes: list[str] = []
    assert find_checkpoint("latest", run_copy, notes.append).name == "step-000002"
    assert len(notes) == 1 and expected in notes[0] and "step-000004" in notes[0]
    assert "resuming from the newest complete one" in notes[0]
    # Named directly, the damaged checkpoint is refused, pointing at the run.
    with pytest.raises(PairoptError, match=rf"damaged.*{expected}.*--resume {run_copy}"):
        find_checkpoint(str(run_copy / "checkpoints" / "step-000004"), run_copy, print)


def test_no_complete_checkpoint_is_one_clear_error(run_copy: Path) -> None:
    for name in ("step-000002", "step-000004"):
        truncate(run_copy / "checkpoints" / name / "model.safetensors")
    with pytest.raises(PairoptError, match=r"no complete checkpoint .*cannot be resumed"):
        find_checkpoint("latest", run_copy, print)


def test_resume_past_a_damaged_checkpoint_equals_the_straight_run(
    model_dir: Path, pristine: tuple[Path, dict], run_copy: Path, capsys
) -> None:
    """Flipped bytes in step 4's weights: the resume takes step 2, runs steps 3-4 and ends with
    the weights of the uninterrupted run (nothing checkpointed is lost, nothing wrong is used)."""
    flip_byte(run_copy / "checkpoints" / "step-000004" / "model.safetensors")
    result = train(resume_config(model_dir, run_copy))
    assert "skipping damaged checkpoints" in capsys.readouterr().out
    torch.testing.assert_close(params(result.policy), pristine[1], rtol=1e-6, atol=1e-7)
    assert checkpoint_problem(run_copy / "checkpoints" / "step-000004") is None  # rewritten


def test_retraining_past_a_newer_checkpoint_never_leaves_it_half_rewritten(
    model_dir: Path, run_copy: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Resume from step 2 while step 4 exists, and kill the run inside step 4's save (after
    accelerate wrote the files, before trainer_state.json): the old step 4 is untouched and
    complete, no temp folder is left, and `--resume` takes it."""
    old_state = (run_copy / "checkpoints" / "step-000004" / "trainer_state.json").read_text()
    real = accelerate.Accelerator.save_state

    def killed_after_writing(self, output_dir=None, **kwargs):
        real(self, output_dir, **kwargs)
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(accelerate.Accelerator, "save_state", killed_after_writing)
    cfg = tiny_config(
        model_dir, run_copy, optim={"max_steps": 4},
        checkpoint={"every": 2, "keep_last": None, "resume": str(run_copy / "checkpoints" / "step-000002")},
    )  # fmt: skip
    with pytest.raises(KeyboardInterrupt):
        train(cfg)
    step4 = run_copy / "checkpoints" / "step-000004"
    assert (step4 / "trainer_state.json").read_text() == old_state
    assert checkpoint_problem(step4) is None
    assert sorted(p.name for p in (run_copy / "checkpoints").iterdir()) == [
        "step-000002",
        "step-000004",
    ]
    assert find_checkpoint("latest", run_copy, print) == step4
    assert not (run_copy / LOCK_NAME).exists()


def test_a_kill_between_the_renames_of_a_swap_keeps_the_old_checkpoint(run_copy: Path) -> None:
    """publish_directory renames step-4 -> step-4.old, then the new folder -> step-4. Killed
    between the two, the complete old folder is what list_checkpoints reads."""
    step4 = run_copy / "checkpoints" / "step-000004"
    step4.rename(step4.with_name("step-000004.old"))
    assert list_checkpoints(run_copy)[-1].name == "step-000004.old"
    assert find_checkpoint("latest", run_copy, print).name == "step-000004.old"


def full_disk(monkeypatch: pytest.MonkeyPatch, free: int = 1000) -> None:
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(files.shutil, "disk_usage", lambda path: usage(10**9, 10**9 - free, free))


class SafetensorLikeError(Exception):
    """What safetensors raises on a full disk: no errno, the OS error only in the text."""


@pytest.mark.parametrize("error", ["enospc", "no_errno", "safetensors"])
def test_a_full_disk_during_a_checkpoint_names_the_path_and_the_free_space(
    model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error: str
) -> None:
    """The save of step 4 fails (ENOSPC; torch.save's RuntimeError, which has no errno, on a
    disk with 1000 bytes free; safetensors' error, which only says it in its text): one message
    saying the disk is full, the temp folder removed, step 2 kept."""
    real = accelerate.Accelerator.save_state

    def failing(self, output_dir=None, **kwargs):
        if output_dir.endswith("step-000004.tmp"):
            if error == "enospc":
                raise OSError(errno.ENOSPC, "No space left on device")
            if error == "safetensors":
                raise SafetensorLikeError(
                    "Error while serializing: I/O error: No space left on device (os error 28)"
                )
            full_disk(monkeypatch)
            raise RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed")
        return real(self, output_dir, **kwargs)

    monkeypatch.setattr(accelerate.Accelerator, "save_state", failing)
    run_dir = tmp_path / "run"
    with pytest.raises(PairoptError) as err:
        train(tiny_config(model_dir, run_dir, **FOUR_STEPS))
    message = str(err.value)
    assert (
        f"could not write {run_dir / 'checkpoints' / 'step-000004.tmp'}: the disk is full"
        in message
    )
    assert "free on that filesystem" in message and "step-000002" in message
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == ["step-000002"]
    assert checkpoint_problem(run_dir / "checkpoints" / "step-000002") is None
    assert not (run_dir / LOCK_NAME).exists()


def test_free_space_is_checked_before_a_checkpoint_and_before_the_run(
    model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before the run: the disk must hold the model it will save (else nothing is written, and
    no directory is left). Before each checkpoint: its estimated size (weights + moments)."""
    run_dir = tmp_path / "run"
    full_disk(monkeypatch)
    with pytest.raises(
        PairoptError, match=r"not enough disk space to write the model this run saves"
    ):
        train(tiny_config(model_dir, run_dir, **FOUR_STEPS))
    assert not run_dir.exists()
    monkeypatch.undo()
    real_usage = shutil.disk_usage
    usage = collections.namedtuple("usage", "total used free")

    def filling(path):  # plenty of room until the first checkpoint exists
        if (run_dir / "checkpoints" / "step-000002").exists():
            return usage(10**9, 10**9 - 1000, 1000)
        return real_usage(path)

    monkeypatch.setattr(files.shutil, "disk_usage", filling)
    with pytest.raises(PairoptError) as err:
        train(tiny_config(model_dir, run_dir, **FOUR_STEPS))
    message = str(err.value)
    assert "not enough disk space to write the checkpoint of step 4" in message
    assert "1000 bytes free" in message and "needed" in message
    assert not (run_dir / "checkpoints" / "step-000004.tmp").exists()


def test_a_failed_final_save_never_looks_finished(
    model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ENOSPC while save_pretrained writes the final model: the message says the disk is full
    and how to go on; the directory holds no config.json, so it is not "a finished one"; once
    there is room, --resume writes the model."""
    import transformers

    real = transformers.PreTrainedModel.save_pretrained

    def no_space(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(transformers.PreTrainedModel, "save_pretrained", no_space)
    run_dir = tmp_path / "run"
    cfg = tiny_config(model_dir, run_dir, optim={"max_steps": 4}, checkpoint={"every": 4})
    with pytest.raises(PairoptError) as err:
        train(cfg)
    message = str(err.value)
    assert "the disk is full" in message and "The trained model is not saved" in message
    assert f"pairopt train --resume {run_dir}" in message
    assert not (run_dir / "config.json").exists() and not (run_dir / ".final-model.tmp").exists()
    with pytest.raises(PairoptError) as refused:
        check_output_dir(run_dir, resuming=False)
    assert "a finished one" not in str(refused.value) and "pass --resume" in str(refused.value)
    monkeypatch.setattr(transformers.PreTrainedModel, "save_pretrained", real)
    resumed = train(resume_config(model_dir, run_dir))
    assert resumed.history == [] and (run_dir / "config.json").is_file()  # only the save was left


def test_saved_weights_follow_the_umask(model_dir: Path, tmp_path: Path) -> None:
    """safetensors >= 0.8 writes 0600 whatever the umask; every saved file gets umask's mode."""
    previous = os.umask(0o022)
    try:
        train(
            tiny_config(
                model_dir, tmp_path / "run", optim={"max_steps": 2}, checkpoint={"every": 2}
            )
        )
    finally:
        os.umask(previous)
    run_dir = tmp_path / "run"
    for path in (
        run_dir / "model.safetensors",
        run_dir / "config.json",
        run_dir / "checkpoints" / "step-000002" / "model.safetensors",
    ):
        assert path.stat().st_mode & 0o777 == 0o644, path


# ------------------------------------------------------------------------ metrics.jsonl


def test_a_full_disk_while_logging_is_one_message_naming_metrics_jsonl(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The write (or the flush at close) fails with ENOSPC: one PairoptError naming the file,
    and closing the log on the way out does not replace it with a second OSError."""
    from unittest.mock import MagicMock

    from pairopt.training.run_log import MetricsLog, Printer

    path = tmp_path / "metrics.jsonl"
    full = OSError(errno.ENOSPC, "No space left on device")
    log = MetricsLog(path, True, MagicMock(), Printer(False), truncate_after=0)
    with (
        pytest.raises(PairoptError, match=rf"could not write {path}: the disk is full"),
        log,
    ):
        log.file = MagicMock(write=MagicMock(side_effect=full), close=MagicMock(side_effect=full))
        log.write(1, "train", {"loss": 0.5}, console=False)
    log = MetricsLog(path, True, MagicMock(), Printer(False), truncate_after=0)
    log.file = MagicMock(close=MagicMock(side_effect=OSError(errno.ENOSPC, "full")))
    with pytest.raises(PairoptError, match=r"the disk is full"):
        log.close()


def test_a_cut_last_metrics_line_is_dropped_on_resume_with_a_note(
    model_dir: Path, run_copy: Path, capsys
) -> None:
    metrics = run_copy / "metrics.jsonl"
    lines = metrics.read_text().splitlines()[:3]  # steps 1-3 (a run stopped after step 3)
    metrics.write_text("\n".join(lines[:2]) + "\n" + lines[2][:17])  # step 3 cut mid-line
    train(
        tiny_config(
            model_dir, run_copy, optim={"max_steps": 4},
            checkpoint={"every": 2, "keep_last": None, "resume": str(run_copy / "checkpoints" / "step-000002")},
        )
    )  # fmt: skip
    assert f"note: {metrics} line 3 was cut short" in capsys.readouterr().out
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 4]


def test_a_damaged_metrics_line_before_the_last_is_an_error_naming_it(
    model_dir: Path, run_copy: Path
) -> None:
    metrics = run_copy / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    lines[1] = "{garbage"
    metrics.write_text("\n".join(lines) + "\n")
    with pytest.raises(
        PairoptError, match=rf"{metrics} line 2 is not a metrics record.*fix or delete"
    ):
        train(resume_config(model_dir, run_copy, max_steps=4))


# ------------------------------------------------------------------------ reference cache


def shift_cached_values(path: Path) -> None:
    """Valid-looking but wrong numbers, with a valid checksum: +3 nats on every chosen log-prob."""
    from pairopt.training.reference_cache import tables_digest

    saved = torch.load(path, weights_only=True)
    tables = {s: (t[0] + 3.0, *t[1:]) for s, t in saved["tables"].items()}
    torch.save({"tables": tables, "sha256": tables_digest(tables)}, path)


def flip_a_cached_number(path: Path) -> None:
    """One bit of the first cached chosen log-prob, where the zip archive stores its bytes."""
    first = torch.load(path, weights_only=True)["tables"]["train"][0]
    raw = path.read_bytes()
    flip_byte(path, raw.index(first.numpy().tobytes()) + 2)


CACHE_DAMAGE = {
    "cut": (truncate, "cannot be read"),
    "empty": (lambda p: p.write_bytes(b""), "cannot be read"),
    "garbled": (lambda p: p.write_bytes(b"\x00" * 500), "cannot be read"),
    "flipped": (flip_a_cached_number, "do not match the checksum"),
    "wrong_values": (shift_cached_values, "are not the reference model's"),
}


@pytest.mark.parametrize("case", CACHE_DAMAGE)
def test_a_damaged_reference_cache_is_named_and_recomputed(
    model_dir: Path, tmp_path: Path, case: str
) -> None:
    damage, expected = CACHE_DAMAGE[case]
    reference = {"strategy": "precompute", "cache_dir": str(tmp_path / "cache")}
    first = train(
        tiny_config(model_dir, tmp_path / "a", reference=reference, optim={"max_steps": 2})
    )
    [path] = (tmp_path / "cache").glob("ref-logps-*.pt")
    damage(path)
    with pytest.warns(
        UserWarning, match=rf"reference log-prob cache {path} is damaged \(.*{expected}"
    ):
        again = train(
            tiny_config(model_dir, tmp_path / "b", reference=reference, optim={"max_steps": 2})
        )
    assert again.reference_cache_hit is False
    assert [h["loss"] for h in again.history] == [h["loss"] for h in first.history]
    third = train(
        tiny_config(model_dir, tmp_path / "c", reference=reference, optim={"max_steps": 1})
    )
    assert third.reference_cache_hit is True  # rewritten whole


# ------------------------------------------------------------------------ resume length


def test_resuming_with_fewer_steps_than_the_checkpoint_is_refused(
    model_dir: Path, run_copy: Path, capsys
) -> None:
    """Not "done: -2 steps" and exit 0: exit 2, naming the checkpoint, its step and the fix;
    config.yaml unchanged, so a plain --resume still continues the run as it was."""
    from pairopt.cli import main as cli

    saved = (run_copy / "config.yaml").read_text()
    code = cli(["train", "--resume", str(run_copy), "--max-steps", "2"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "writtenatstep4,butthisrunendsatstep2" in "".join(err.split())
    assert (run_copy / "config.yaml").read_text() == saved
    assert not (run_copy / LOCK_NAME).exists()


def test_a_resume_failing_before_its_first_step_puts_back_the_config_it_found(
    model_dir: Path, run_copy: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A resume with a changed setting writes its config.yaml before loading the checkpoint;
    failing there (here: loading the state raises) it leaves the run's config.yaml as it was,
    so a plain --resume goes on with the settings the checkpoints were made with."""
    import pairopt.training.setup as setup_module

    saved = (run_copy / "config.yaml").read_bytes()
    entries = sorted(p.name for p in run_copy.iterdir())

    def fail(*args, **kwargs):
        assert (run_copy / "config.yaml").read_bytes() != saved  # rewritten by then
        raise PairoptError("the checkpoint could not be loaded")

    monkeypatch.setattr(setup_module, "resume", fail)
    with pytest.raises(PairoptError, match="could not be loaded"):
        train(resume_config(model_dir, run_copy, lr=5e-3))
    assert (run_copy / "config.yaml").read_bytes() == saved
    assert sorted(p.name for p in run_copy.iterdir()) == entries


def test_resuming_under_another_launch_is_refused(run_copy: Path, capsys) -> None:
    """A checkpoint records its launch (processes, sharding): resumed by one process, a
    checkpoint written by two ZeRO-3 processes is refused before any model loads, naming both
    launches and what to do (its optimiser state is split, its batches were dealt to two)."""
    from pairopt.cli import main as cli
    from pairopt.training.checkpoint import _sealed

    state_file = run_copy / "checkpoints" / "step-000004" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    assert state["launch"] == {"processes": 1, "sharding": "none"}
    state["launch"] = {"processes": 2, "sharding": "zero3"}
    state_file.write_text(json.dumps(_sealed(state)))
    code = cli(["train", "--resume", str(run_copy)])
    err = " ".join(capsys.readouterr().err.split())
    assert code == 2 and "Traceback" not in err
    assert "step-000004: it was written by 2 processes under zero3 and this run is 1 process" in err
    assert "Launch it as before" in err


# ------------------------------------------------------------------------ the lock


def write_lock(run_dir: Path, pid: int, host: str | None = None) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    holder = {"pid": pid, "host": host or socket.gethostname(), "started": "2026-01-01 00:00:00"}
    (run_dir / LOCK_NAME).write_text(json.dumps(holder))


def test_a_lock_held_by_a_live_process_refuses_the_run(model_dir: Path, tmp_path: Path) -> None:
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        write_lock(tmp_path / "run", sleeper.pid)
        with pytest.raises(
            PairoptError, match=rf"in use by another run: pid {sleeper.pid} on host"
        ):
            train(tiny_config(model_dir, tmp_path / "run"))
    finally:
        sleeper.kill()
        sleeper.wait()
    assert (tmp_path / "run" / LOCK_NAME).exists()  # not ours: left alone
    assert [p.name for p in (tmp_path / "run").iterdir()] == [LOCK_NAME]


def test_a_stale_lock_is_reported_never_taken_over(model_dir: Path, tmp_path: Path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # reaped: its pid runs nothing now
    write_lock(tmp_path / "run", dead.pid)
    with pytest.raises(PairoptError) as err:
        train(tiny_config(model_dir, tmp_path / "run"))
    message = str(err.value)
    assert f"locked by pid {dead.pid} on this host" in message and "no longer running" in message
    assert f"delete {tmp_path / 'run' / LOCK_NAME} and run again" in message
    assert (tmp_path / "run" / LOCK_NAME).exists()
    write_lock(tmp_path / "run", 1, host="another-host")
    with pytest.raises(PairoptError, match=r"pid 1 on host another-host"):
        train(tiny_config(model_dir, tmp_path / "run"))
    (tmp_path / "run" / LOCK_NAME).write_text('{"pid": ')  # cut
    with pytest.raises(PairoptError, match=r"cannot be read"):
        train(tiny_config(model_dir, tmp_path / "run"))


def test_two_runs_started_at_once_in_one_directory(model_dir: Path, tmp_path: Path) -> None:
    """Two `pairopt train` processes, same --output-dir, started together: one trains, the other
    exits 2 saying the directory is taken; metrics.jsonl holds one run's steps, once each."""
    run_dir = tmp_path / "run"
    argv = [
        sys.executable, "-m", "pairopt", "train", "--loss", "dpo", "--model", str(model_dir),
        "--output-dir", str(run_dir), "--max-steps", "4", "--data.max_samples", "16",
        "--data.max_eval_samples", "8", "--optim.batch_size", "4", "--optim.cpu_threads", "1",
        "--logging.progress_bar", "false", "--logging.every", "1",
    ]  # fmt: skip
    env = {"OMP_NUM_THREADS": "1", "PAIROPT_CACHE": str(tmp_path / "cache")}
    runs = [
        subprocess.Popen(argv, env={**os.environ, **env}, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    errors = [p.communicate(timeout=240)[1] for p in runs]
    outcomes = sorted(zip((p.returncode for p in runs), errors, strict=True))
    assert [code for code, _ in outcomes] == [0, 2], outcomes[1][1][-2000:]
    refused = "".join(outcomes[1][1].split())
    assert "inusebyanotherrun" in refused or "alreadyholdsarun" in refused, refused
    assert "Traceback" not in outcomes[1][1]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["split"] == "train"] == [1, 2, 3, 4]
    assert not (run_dir / LOCK_NAME).exists()
