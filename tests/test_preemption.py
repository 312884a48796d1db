"""SIGTERM / SIGINT: the step under way finishes, a checkpoint is written (also with
checkpoint.every 0), the message names it and the resume command, the exit code is 75; a second
signal stops at once; `--resume` then continues exactly (weights equal an uninterrupted run's).

The signals are real: one test sends SIGTERM to a `python -m pairopt train` process once its
first step is in metrics.jsonl; the in-process tests raise the signal from inside a loss at a
chosen step, so the step it lands in is known exactly.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from train_fixtures import make_tiny_model_dir, params, tiny_config
from transformers import AutoModelForCausalLM

import pairopt
from pairopt.cli import main as cli
from pairopt.training.checkpoint import checkpoint_problem, list_checkpoints
from pairopt.training.preemption import STOPPED_EXIT_CODE, RunStopped
from pairopt.training.run_directory import LOCK_NAME
from pairopt.training.trainer import train

# A resumed run recomputes the same float32 numbers in the same order; the subprocess may use
# other kernels' thread splits, hence not bit-exact (the in-process resume test is).
RESUME_TOL = {"rtol": 1e-5, "atol": 1e-6}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.set_num_threads(1)
    return make_tiny_model_dir(tmp_path_factory.mktemp("models"))


def squash(text: str) -> str:
    return "".join(text.split())


def signalling_dpo(name: str, signals: list[int], at_call: int):
    """DPO (β = 0.1) whose `at_call`-th call raises each of `signals` in this process."""

    @pairopt.register_loss(name)
    class SignallingDPO(pairopt.ReferencePairLoss):
        calls = 0

        def compute_ratios(self, ratios):
            type(self).calls += 1
            if type(self).calls == at_call:
                for signum in signals:
                    signal.raise_signal(signum)
            losses = -F.logsigmoid(0.1 * ratios.margin)
            return pairopt.LossOutput(losses, ratios.metrics(0.1))

    return SignallingDPO


@pytest.mark.parametrize(
    "reference", [{}, {"strategy": "copy", "sync_steps": 1, "sync_alpha": 0.5}], ids=["", "synced"]
)
def test_sigint_checkpoints_the_step_and_resume_is_exact(
    registry, model_dir: Path, tmp_path: Path, capsys, reference: dict
) -> None:
    """SIGINT inside step 2 of 4 (checkpoint.every 0): step 2 finishes and is checkpointed,
    RunStopped says where and how to resume; resuming runs steps 3-4 and ends with the weights
    of 4 steps straight. The handlers are the previous ones again afterwards. With logging
    windows of 3 steps, the stop writes the window it cuts short (steps 1-2). With a TR-DPO
    reference synced every step, the checkpoint holds the reference after step 2's sync."""
    signalling_dpo("test_sigint_at_2", [signal.SIGINT], at_call=2)
    signalling_dpo("test_no_signal", [], at_call=0)
    before = (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT))
    run_dir = tmp_path / "run"
    common = {
        "optim": {"max_steps": 4},
        "checkpoint": {"every": 0},
        "logging": {"progress_bar": False, "every": 3},
        "reference": reference,
    }
    with pytest.raises(RunStopped) as stopped:
        train(tiny_config(model_dir, run_dir, loss={"name": "test_sigint_at_2"}, **common))
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before
    checkpoint = run_dir / "checkpoints" / "step-000002"
    assert stopped.value.step == 2 and stopped.value.checkpoint == checkpoint
    assert stopped.value.exit_code == STOPPED_EXIT_CODE == 75
    message = str(stopped.value)
    assert "stopped by SIGINT after step 2 of 4" in message and str(checkpoint) in message
    assert f"Resume with: pairopt train --resume {run_dir}" in message
    assert checkpoint_problem(checkpoint) is None and not (run_dir / LOCK_NAME).exists()
    assert not (run_dir / "config.json").exists()  # stopped: no final model
    assert "SIGINT received: step 2 is done; writing its checkpoint" in capsys.readouterr().out

    resume = {"every": 0, "resume": str(run_dir)}
    resumed = train(
        tiny_config(
            model_dir, run_dir, loss={"name": "test_sigint_at_2"}, optim=common["optim"],
            checkpoint=resume, logging=common["logging"], reference=reference,
        )
    )  # fmt: skip
    straight = train(
        tiny_config(model_dir, tmp_path / "straight", loss={"name": "test_no_signal"}, **common)
    )
    assert len(resumed.history) == 2  # steps 3 and 4
    assert [h["loss"] for h in resumed.history] == pytest.approx(
        [h["loss"] for h in straight.history[2:]], rel=1e-6
    )
    torch.testing.assert_close(
        params(resumed.policy), params(straight.policy), rtol=1e-6, atol=1e-7
    )
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    # the window cut by the stop (steps 1-2), the resumed run's windows (3; 4), the final eval
    assert [(r["step"], r.get("window_steps")) for r in records] == [
        (2, 2.0),
        (3, 1.0),
        (4, 1.0),
        (4, None),
    ]


def test_a_second_signal_stops_at_once(registry, model_dir: Path, tmp_path: Path, capsys) -> None:
    """Two SIGTERMs inside step 2 of a run with no periodic checkpoints: no step finishes after
    them, exit code 128 + 15, the message says no checkpoint exists; the lock is gone."""
    signalling_dpo("test_two_sigterms", [signal.SIGTERM, signal.SIGTERM], at_call=2)
    run_dir = tmp_path / "run"
    code = cli(
        [
            "train", "--loss", "test_two_sigterms", "--model", str(model_dir), "--output-dir",
            str(run_dir), "--max-steps", "4", "--data.max_samples", "48",
            "--data.max_eval_samples", "16", "--optim.batch_size", "4", "--logging.progress_bar",
            "false", "--logging.every", "1",
        ]
    )  # fmt: skip
    err = capsys.readouterr().err
    assert code == 128 + signal.SIGTERM == 143 and "Traceback" not in err
    assert (
        "stopped at once by a second SIGTERM after 1 completed step, with no checkpoint written"
        in err
    )
    assert "cannot be resumed" in err
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 1  # step 2 never ended
    assert not (run_dir / LOCK_NAME).exists() and not (run_dir / "checkpoints").exists()


def test_a_signal_before_the_first_step_stops_at_once_and_leaves_nothing(
    model_dir: Path, tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGTERM while the model loads: nothing to save, so the run stops at once, the directory
    it made is removed, and the same command then runs."""
    import pairopt.training.setup as setup

    real = setup.build_models
    calls = []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            signal.raise_signal(signal.SIGTERM)
        return real(*args, **kwargs)

    monkeypatch.setattr(setup, "build_models", interrupted)
    run_dir = tmp_path / "run"
    argv = [
        "train", "--loss", "dpo", "--model", str(model_dir), "--output-dir", str(run_dir),
        "--max-steps", "1", "--data.max_samples", "16", "--data.max_eval_samples", "8",
        "--logging.progress_bar", "false", "--logging.every", "1",
    ]  # fmt: skip
    assert cli(argv) == 143
    err = capsys.readouterr().err
    assert "stopped at once by SIGTERM before the first step, so nothing was saved" in err
    assert not run_dir.exists()
    assert cli(argv) == 0 and (run_dir / "model.safetensors").is_file()


def _wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def test_sigterm_to_the_cli_process_then_resume_equals_an_uninterrupted_run(
    model_dir: Path, tmp_path: Path
) -> None:
    """What a scheduler does: SIGTERM to `pairopt train` once step 1 is logged. Exit code 75,
    the checkpoint and the resume command on stderr; the printed command continues the run to
    the weights of 24 steps straight."""
    steps, run_dir = 24, tmp_path / "run"
    argv = [
        sys.executable, "-m", "pairopt", "train", "--loss", "dpo", "--model", str(model_dir),
        "--output-dir", str(run_dir), "--max-steps", str(steps), "--data.max_samples", "48",
        "--data.max_eval_samples", "16", "--optim.lr", "1e-2", "--optim.batch_size", "4",
        "--optim.seed", "0", "--optim.schedule", "constant", "--optim.cpu_threads", "1",
        "--logging.progress_bar", "false", "--logging.every", "1",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PAIROPT_CACHE": str(tmp_path / "cache")}
    process = subprocess.Popen(
        argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    metrics = run_dir / "metrics.jsonl"
    try:
        _wait_for(lambda: metrics.is_file() and metrics.read_text().count("\n") >= 1, 180, "step 1")
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 75, err[-3000:]
    assert "Traceback" not in err
    checkpoints = list_checkpoints(run_dir)
    assert len(checkpoints) == 1 and checkpoint_problem(checkpoints[0]) is None
    stopped_at = int(checkpoints[0].name.split("-")[1])
    assert 1 <= stopped_at < steps
    assert squash(f"stopped by SIGTERM after step {stopped_at} of {steps}") in squash(err)
    assert squash(str(checkpoints[0])) in squash(err)
    assert squash(f"Resume with: pairopt train --resume {run_dir}") in squash(err)

    assert cli(["train", "--resume", str(run_dir)]) == 0  # the printed command, in-process
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["step"] for r in records if r["split"] == "train"] == list(range(1, steps + 1))
    straight = train(tiny_config(model_dir, tmp_path / "straight", optim={"max_steps": steps}))
    resumed = AutoModelForCausalLM.from_pretrained(run_dir)
    torch.testing.assert_close(params(resumed), params(straight.policy), **RESUME_TOL)


@pytest.mark.slow
def test_two_processes_stop_after_the_same_step(model_dir: Path, tmp_path: Path) -> None:
    """torchrun, 2 gloo processes; SIGTERM reaches only rank 1, inside step 2. The flag is
    reduced after every step, so both stop after step 2 with one complete checkpoint holding
    both processes' RNG states; resumed, both run step 3 and end with the same weights."""
    worker = Path(__file__).with_name("preempt_worker.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parent)}
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        str(worker), str(model_dir), str(tmp_path),
    ]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["step"] for r in results] == [2, 2]
    checkpoint = Path(results[0]["checkpoint"])
    assert checkpoint_problem(checkpoint) is None
    assert {"random_states_0.pkl", "random_states_1.pkl"} <= {p.name for p in checkpoint.iterdir()}
    assert [r["resumed_steps"] for r in results] == [1, 1]  # step 3 of 3, on both processes
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    torch.testing.assert_close(rank0, rank1, rtol=0, atol=0)


def test_a_signal_during_the_final_evaluation_checkpoints_the_last_step(
    model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGTERM after the first of 4 eval batches: the evaluation stops before the next batch and
    the last step (2 of 2) is checkpointed, instead of a long evaluation running into the
    scheduler's SIGKILL; the resumed run only evaluates and saves."""
    import pairopt.training.evaluation as evaluation

    real_bar = evaluation.work_bar

    class SignallingBar:
        def __init__(self, *args, **kwargs):
            self.bar, self.calls = real_bar(*args, **kwargs), 0

        def update(self, n):
            self.calls += 1
            if self.calls == 1:
                signal.raise_signal(signal.SIGTERM)
            self.bar.update(n)

        def close(self):
            self.bar.close()

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.bar.close()

    monkeypatch.setattr(evaluation, "work_bar", SignallingBar)
    run_dir = tmp_path / "run"
    sections = {"optim": {"max_steps": 2}, "eval": {"batch_size": 4}}
    with pytest.raises(RunStopped) as stopped:
        train(tiny_config(model_dir, run_dir, **sections))
    assert stopped.value.step == 2 and "after step 2 of 2" in str(stopped.value)
    assert not (run_dir / "config.json").exists()
    monkeypatch.setattr(evaluation, "work_bar", real_bar)
    resumed = train(
        tiny_config(model_dir, run_dir, **sections, checkpoint={"resume": str(run_dir)})
    )
    assert resumed.history == [] and resumed.final_eval is not None
    assert resumed.final_eval["pairs"] == 16 and (run_dir / "config.json").is_file()
