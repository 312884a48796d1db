"""The output directory while a run uses it: locked against a second run, and left as it was
found when the run ends before its first step.

    with RunDirectory(output, accelerator, resuming=False) as directory:
        ...                       # directory.steps_done = n after each optimiser step

The lock is `<output>/pairopt.lock`, created with O_CREAT | O_EXCL (one of two runs started at
once wins, the other is refused), holding the pid, host, start time and command line. It is
removed when the run ends, also by an error. A lock left by a process that no longer runs (kill
-9, out of memory) is reported with what to do and never taken over silently: pid numbers are
reused, and another host's processes cannot be checked at all.

A run that fails or is stopped before its first step has nothing worth keeping, and a
config.yaml left behind would make the same command refuse the directory ("already holds a
run"): such a run removes what it added (the whole directory if it made it), and a resumed one
puts back the config.yaml it found (it rewrites it with its own settings before step 1).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from pairopt.errors import PairoptError
from pairopt.training.checkpoint import check_output_dir, list_checkpoints
from pairopt.training.files import atomic_write, check_free_space, write_failed
from pairopt.training.preemption import StopNow, resume_command
from pairopt.training.run_log import any_process

LOCK_NAME = "pairopt.lock"


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid runs on this host (signal 0 checks without sending)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


def lock_holder(output: Path) -> str | None:
    """Why `output` is locked (who holds it and what to do), or None when it is not."""
    lock = output / LOCK_NAME
    if not lock.exists():
        return None
    try:
        holder = json.loads(lock.read_text())
        pid, host, started = int(holder["pid"]), str(holder["host"]), str(holder["started"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        return (
            f"output directory {output} is locked by {lock}, which cannot be read ({err}): "
            "another run may be starting there. If no run uses the directory, delete the lock "
            "file and run again."
        )
    if host == socket.gethostname() and not pid_alive(pid):
        return (
            f"output directory {output} is locked by pid {pid} on this host (started {started}), "
            "which is no longer running: that run was killed (kill -9, out of memory) or crashed "
            f"before it could unlock. If no other run uses the directory, delete {lock} and run "
            "again (--resume continues from its newest checkpoint)."
        )
    return (
        f"output directory {output} is in use by another run: pid {pid} on host {host}, started "
        f"{started} ({lock}). Wait for it to finish or choose another --output-dir; if that run "
        "is gone, delete the lock file."
    )


class RunDirectory:
    """See the module docstring. Filesystem work happens on the main process only; every
    process raises the same way when the directory cannot be taken."""

    def __init__(self, output: Path, accelerator: Any, *, resuming: bool) -> None:
        self.output = output
        self.accelerator = accelerator
        self.resuming = resuming
        self.main = bool(accelerator.is_main_process)
        self.steps_done = 0  # set by the trainer after each optimiser step
        self.checkpointed: int | None = None  # the step of the last checkpoint this run wrote
        self.created = False
        self.before: set[str] = set()
        self.config_before: bytes | None = None  # the config.yaml a resumed run found
        self.token = uuid.uuid4().hex
        self.locked = False

    def __enter__(self) -> RunDirectory:
        problem = None
        if self.main:
            try:
                self._claim()
            except PairoptError as err:
                problem = str(err)
        if any_process(self.accelerator, problem is not None):
            raise PairoptError(
                problem
                or f"the main process could not start the run in {self.output} (see its message)."
            )
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        if self.main:
            if exc is not None and self.steps_done == 0:
                self._undo()
            self._unlock()
        if isinstance(exc, StopNow):
            exc.detail = self._stop_note()

    def write_config(self, text: str, need_bytes: int) -> Path:
        """config.yaml, written atomically once the disk is known to hold `need_bytes` (what
        the run will save); every process raises if the main one cannot."""
        path = self.output / "config.yaml"
        problem: PairoptError | None = None
        if self.main:
            try:
                check_free_space(self.output, need_bytes, "the model this run saves")
                atomic_write(path, text)
            except PairoptError as err:
                problem = err
        if any_process(self.accelerator, problem is not None):
            raise problem or PairoptError(f"the main process could not write {path}")
        return path

    def _claim(self) -> None:
        held = lock_holder(self.output)
        if held:
            raise PairoptError(held)
        check_output_dir(self.output, resuming=self.resuming)
        self.created = not self.output.exists()
        try:
            self.output.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise write_failed(self.output, err) from None
        self.before = {entry.name for entry in self.output.iterdir()}
        with contextlib.suppress(OSError):
            self.config_before = (self.output / "config.yaml").read_bytes()
        lock = self.output / LOCK_NAME
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
        except FileExistsError:  # another run took it since lock_holder looked
            self._undo()
            raise PairoptError(lock_holder(self.output) or f"{lock} appeared meanwhile") from None
        except OSError as err:
            self._undo()
            raise write_failed(lock, err) from None
        holder = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "command": sys.argv,
            "token": self.token,
        }
        with os.fdopen(fd, "w") as file:
            json.dump(holder, file)
        self.locked = True

    def _unlock(self) -> None:
        lock = self.output / LOCK_NAME
        if not self.locked:
            return
        with contextlib.suppress(OSError, ValueError):
            if json.loads(lock.read_text()).get("token") == self.token:
                lock.unlink()
        self.locked = False

    def _undo(self) -> None:
        """Remove what this run added to the directory (all of it, if it made the directory)."""
        if self.created:
            shutil.rmtree(self.output, ignore_errors=True)
            self.locked = False
            return
        with contextlib.suppress(OSError):
            for entry in self.output.iterdir():
                if entry.name in self.before or entry.name == LOCK_NAME:
                    continue
                if entry.is_dir():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    entry.unlink()
        config = self.output / "config.yaml"
        with contextlib.suppress(OSError, PairoptError):
            if self.config_before is not None and config.read_bytes() != self.config_before:
                atomic_write(config, self.config_before)

    def _stop_note(self) -> str:
        """For a StopNow leaving the run: what is kept and how to go on."""
        if self.steps_done == 0:
            if self.resuming:
                return (
                    "before its first step, so nothing new was saved: resume again with: "
                    f"{resume_command(self.output)}"
                )
            return "before the first step, so nothing was saved: run the same command again"
        done = f"after {self.steps_done} completed step{'s' if self.steps_done != 1 else ''}"
        found = list_checkpoints(self.output)
        if found:
            return (
                f"{done}; the newest checkpoint is {found[-1]}. Resume with: "
                f"{resume_command(self.output)}"
            )
        return (
            f"{done}, with no checkpoint written: {self.output} cannot be resumed (start again "
            "in another --output-dir, or delete it)"
        )
