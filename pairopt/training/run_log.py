"""What a run reports: step metrics (global means), metrics.jsonl, trackers, console, summary."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from pairopt.errors import PairoptError
from pairopt.training.files import atomic_write, write_failed


def add_metric(sums: dict[str, torch.Tensor], key: str, value: torch.Tensor) -> None:
    sums[key] = sums[key] + value if key in sums else value


def global_means(
    sums: dict[str, torch.Tensor], accelerator: Any, pairs_in_step: int
) -> dict[str, float]:
    """Pair-weighted means over every micro-batch of the step on every process."""
    keys = sorted(sums)
    stacked = torch.stack([sums[k].float().reshape(()) for k in keys]).to(accelerator.device)
    if accelerator.num_processes > 1:
        stacked = accelerator.reduce(stacked, "sum")
    return {
        key: float(value) / pairs_in_step for key, value in zip(keys, stacked.tolist(), strict=True)
    }


class MetricsWindow:
    """The training metrics of a window of steps folded into one record (TRL's logging_steps):
    the steps' metrics (loss, rewards/*, logps/*, ...) averaged over the window's examples (each
    step's means are over its examples: pairs, or groups for a listwise loss); the last step's
    lr, epoch and grad_norm; tokens/s and pairs/s over the window's time; `window_steps`."""

    LAST = ("lr", "epoch", "grad_norm")

    def __init__(self) -> None:
        self.steps: list[tuple[dict[str, float], int, int]] = []

    def add(self, metrics: dict[str, float], examples: int, pairs: int) -> None:
        self.steps.append((metrics, examples, pairs))

    def flush(self) -> dict[str, float]:
        """The window's record; the window starts empty again."""
        steps, self.steps = self.steps, []
        examples = sum(n for _, n, _ in steps)
        pairs = sum(p for _, _, p in steps)
        seconds = sum(m["step_s"] for m, _, _ in steps)
        tokens = sum(m["tokens_per_s"] * m["step_s"] for m, _, _ in steps)
        record: dict[str, float] = {}
        for key in steps[-1][0]:
            if key in self.LAST:
                record[key] = steps[-1][0][key]
            elif key not in ("tokens_per_s", "pairs_per_s", "step_s"):
                record[key] = sum(m[key] * n for m, n, _ in steps if key in m) / examples
        record.update(
            tokens_per_s=tokens / seconds if seconds > 0 else 0.0,
            pairs_per_s=pairs / seconds if seconds > 0 else 0.0,
            step_s=seconds / len(steps),
            window_steps=float(len(steps)),
        )
        return record


def any_process(accelerator: Any, flag: bool) -> bool:
    """True on every process when `flag` is True on at least one of them (a collective: every
    process must call it), so that all processes take the same branch (stop, recompute, fail)."""
    if accelerator.num_processes <= 1:
        return flag
    mark = torch.tensor([1.0 if flag else 0.0], device=accelerator.device)
    return bool(accelerator.reduce(mark, "sum").item() > 0)


def fail_together(accelerator: Any, error: Exception | None) -> None:
    """Raise one PairoptError on every process when `error` is set on any (a collective: every
    process calls it once, with its own error or None), with the message of the first process
    that has one; return when none has. A process that raised alone would leave the others
    waiting in the next collective for ever."""
    if not any_process(accelerator, error is not None):
        return
    messages = [str(error) if error is not None else None]
    if accelerator.num_processes > 1:
        from accelerate.utils import gather_object

        messages = gather_object(messages)
    raise PairoptError(next(m for m in messages if m is not None))


class Printer:
    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled

    def __call__(self, message: str) -> None:
        if self.enabled:
            from tqdm.auto import tqdm

            tqdm.write(message)


class MetricsLog:
    """metrics.jsonl (one JSON object per line), accelerate trackers, and console lines.

    A context manager: the file is closed when the run ends, also by an error. Only the main
    process (`write_file`) writes the file; `say` prints the console lines. A resumed run keeps
    the lines up to its checkpoint's step (`truncate_after`); a cut last line (a full disk, a
    killed run) is dropped with a note, a damaged line before it is an error naming it.
    """

    def __init__(
        self,
        path: Path,
        write_file: bool,
        accelerator: Any,
        say: Printer,
        *,
        truncate_after: int,
    ) -> None:
        self.accelerator = accelerator
        self.say = say
        self.file = None
        self.path = path
        if write_file:
            kept = []
            if truncate_after > 0 and path.is_file():  # a resumed run replaces what came after
                kept = [
                    line
                    for line, record in self._records(path, say)
                    if record["step"] <= truncate_after
                ]
            atomic_write(path, "".join(line + "\n" for line in kept))
            self.file = path.open("a")

    @staticmethod
    def _records(path: Path, say: Printer) -> list[tuple[str, dict[str, Any]]]:
        lines = path.read_bytes().decode("utf-8", errors="replace").splitlines()
        records = []
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                int(record["step"])
            except (ValueError, KeyError, TypeError) as err:
                if number == len(lines):
                    say(
                        f"note: {path} line {number} was cut short (a full disk or a killed run "
                        "leaves that); it is dropped."
                    )
                    break
                raise PairoptError(
                    f"{path} line {number} is not a metrics record ({type(err).__name__}: "
                    f"{err}): fix or delete that line, then resume again."
                ) from None
            records.append((line, record))
        return records

    def write(self, step: int, split: str, metrics: dict[str, float], *, console: bool) -> None:
        if self.file is not None:
            try:
                self.file.write(json.dumps({"step": step, "split": split, **metrics}) + "\n")
                self.file.flush()
            except OSError as err:
                raise write_failed(self.path, err, need=4096) from None
        self.accelerator.log({f"{split}/{key}": value for key, value in metrics.items()}, step=step)
        if console:
            keys = ("loss", "rewards/accuracies", "rewards/margins", "lr", "tokens_per_s")
            shown = " | ".join(f"{_short(k)} {metrics[k]:.4g}" for k in keys if k in metrics)
            self.say(f"[{split} step {step}] {shown}")

    def close(self) -> None:
        if self.file is not None:
            file, self.file = self.file, None
            try:
                file.close()  # flushes what is buffered: a full disk can fail here too
            except OSError as err:
                raise write_failed(self.path, err, need=4096) from None

    def __enter__(self) -> MetricsLog:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is None:
            self.close()
            return
        with contextlib.suppress(PairoptError):  # the error under way is the one to report
            self.close()


@contextmanager
def trackers(
    accelerator: Any, report_to: Sequence[str], name: str, config: dict[str, Any]
) -> Iterator[None]:
    """accelerate's trackers for the run, finished when it ends (also by an error).

    Not `accelerator.end_training()`: that also destroys the process group, which the final
    save still needs (and a second run in the same process too)."""
    if not report_to:
        yield
        return
    accelerator.init_trackers(name, config=config)
    try:
        yield
    finally:
        for tracker in accelerator.trackers:
            tracker.finish()


def _short(key: str) -> str:
    return {"rewards/accuracies": "acc", "rewards/margins": "margin", "tokens_per_s": "tok/s"}.get(
        key, key
    )


def progress_bar(enabled: bool, total: int, initial: int) -> Any:
    """The training bar (a context manager; disabled: a no-op with the same methods)."""
    from tqdm.auto import tqdm

    return tqdm(
        total=total,
        initial=initial,
        desc="train",
        unit="step",
        dynamic_ncols=True,
        disable=not enabled,
    )


def work_bar(enabled: bool, total: int, desc: str) -> Any:
    """A transient progress bar for a pass over the data (reference precompute, evaluation)."""
    from tqdm.auto import tqdm

    return tqdm(
        total=total, desc=desc, unit="batch", leave=False, dynamic_ncols=True, disable=not enabled
    )


def print_summary(
    say: Printer,
    loss: str,
    evals: list[dict[str, float]],
    steps: int,
    wall_s: float,
    pairs_per_s: float,
    saved_to: Path | None,
) -> None:
    lines = [f"done: {steps} steps in {wall_s:.0f} s wall time, {pairs_per_s:.1f} train pairs/s"]
    if evals:
        final = evals[-1]
        accuracy = final.get("rewards/accuracies")
        if accuracy is not None:
            lines.append(
                f"held-out preference accuracy: {accuracy:.1%} of {int(final['pairs'])} eval pairs "
                f"(chosen ranked above rejected by the {loss} implicit reward)"
            )
        lines.append(f"eval loss: {final['loss']:.4f}")
    if saved_to is not None:
        lines.append(
            f"model and tokenizer saved to {saved_to} (AutoModelForCausalLM.from_pretrained loads it)"
        )
    for line in lines:
        say(line)


@contextmanager
def quiet_libraries(quiet: bool) -> Iterator[None]:
    """With `quiet`, the progress bars of `datasets` (tokenising) are off for the run, and
    DeepSpeed's log, which goes to stdout, passes errors only (transformers' save_pretrained
    imports deepspeed whenever it is installed, and its import logs a warning on a CPU)."""
    if not quiet:
        yield
        return
    import logging

    from datasets.utils import logging as datasets_logging

    was_enabled = datasets_logging.is_progress_bar_enabled()
    datasets_logging.disable_progress_bar()
    deepspeed_log = logging.getLogger("DeepSpeed")  # its name in deepspeed/utils/logging.py

    def errors_only(record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR

    deepspeed_log.addFilter(errors_only)
    try:
        yield
    finally:
        deepspeed_log.removeFilter(errors_only)
        if was_enabled:
            datasets_logging.enable_progress_bar()
