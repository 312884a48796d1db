"""Stopping a run cleanly on SIGTERM or SIGINT (what schedulers, spot instances and Ctrl-C send).

The first signal only sets a flag. The trainer finishes the optimiser step under way, writes a
checkpoint of it (also with `checkpoint.every 0`), prints where it is and the command that
resumes it, and raises `RunStopped`; `pairopt train` exits with `STOPPED_EXIT_CODE`. A second
signal stops at once (`StopNow`, exit code 128 + the signal's number, as a shell reports a
process killed by it). Before the first step there is nothing to save, so a signal then stops
at once as well.

With several processes each one has its own flag; the trainer reduces them after every step
(`run_log.any_process`), so all of them stop after the same step and write one checkpoint.

Handlers are installed only in the main thread (Python runs signal handlers there, and
`signal.signal` refuses other threads) and the previous ones are put back when the run ends,
so `pairopt.train` called twice in one process, or from a notebook, behaves the same each time.
"""

from __future__ import annotations

import shlex
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

# EX_TEMPFAIL in sysexits.h ("a temporary failure; the user is invited to retry"): the run
# stopped on request with a checkpoint, and the same job can be resumed. Distinct from 0 (done),
# 1 (a crash), 2 (bad input) and 128 + N (killed by signal N).
STOPPED_EXIT_CODE = 75
SIGNALS = (signal.SIGTERM, signal.SIGINT)


def resume_command(output: Path) -> str:
    """The command that continues the run in `output` (its config.yaml and newest checkpoint)."""
    return f"pairopt train --resume {shlex.quote(str(output))}"


class RunStopped(Exception):
    """The run stopped after a signal, with a checkpoint of its last step (`checkpoint`)."""

    exit_code = STOPPED_EXIT_CODE

    def __init__(self, message: str, *, checkpoint: Path, step: int) -> None:
        super().__init__(message)
        self.checkpoint = checkpoint
        self.step = step


class StopNow(KeyboardInterrupt):
    """A signal that stops the run at once: the second one, or one before the first step.

    `detail` is filled in on the way out (run_directory.RunDirectory) with what was kept and
    how to go on."""

    def __init__(self, signum: int, *, second: bool) -> None:
        super().__init__(signum)
        self.signum = signum
        self.second = second
        self.detail = ""

    @property
    def exit_code(self) -> int:
        return 128 + self.signum

    def __str__(self) -> str:
        name = signal.Signals(self.signum).name
        what = f"a second {name}" if self.second else name
        return f"stopped at once by {what}{' ' + self.detail if self.detail else ''}"


class StopRequest:
    """What the handlers set: the signal received, once the loop has a step to finish (`armed`)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.armed = False

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else ""

    def handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None or not self.armed:
            raise StopNow(signum, second=self.signum is not None)
        self.signum = signum


@contextmanager
def stop_signals() -> Iterator[StopRequest]:
    """SIGTERM and SIGINT handled as the module docstring says, for the duration of the block."""
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request
        return
    previous = {sig: signal.getsignal(sig) for sig in SIGNALS}
    for sig in SIGNALS:
        signal.signal(sig, request.handle)
    try:
        yield request
    finally:
        for sig, handler in previous.items():
            # None: a handler installed outside Python; the default is the closest we can restore
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
