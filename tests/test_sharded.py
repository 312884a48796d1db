"""Sharded training on two CPU processes (gloo): FSDP2, DeepSpeed ZeRO-3 and ZeRO-2, each
launched as a user launches it: `accelerate launch --config_file examples/accelerate_<engine>.yaml
--num_processes 2 --mixed_precision no tests/sharded_worker.py ...`.

accelerate applies FSDP and DeepSpeed only on accelerator devices; tests/sharded_cpu.py makes its
real FSDP2 and DeepSpeed code run on this CPU machine (a test-only override of accelerate's
distributed type, explained there), so the pairopt code under test is the code that runs on GPUs.
Each test says what it runs.

One process with grad_accum 2 computes what two processes with grad_accum 1 compute (the same
micro-batches, the mean over all pairs of the step), so the sharded runs are compared with one
process, in float32:
- engine (compute_logps through the sharded module): values and gathered parameter gradients
  within 1e-5 (seen: FSDP2 0, ZeRO-3 2.4e-7: DeepSpeed reduces gradients in another order);
- trainer (3 AdamW steps at lr 1e-2): losses and evaluation within rtol 1e-4 / atol 1e-5, weights
  within 1e-4 (test_trainer.TRAJECTORY_TOL and WEIGHTS_TOL: Adam divides by sqrt(v), which turns
  rounding of a near-zero gradient into up to ~1e-5);
- a run resumed after a kill against the same run uninterrupted, both sharded: within 1e-6.

All of them are marked `sharded` (pytest -m sharded runs exactly these) and `slow` (the
lowest-versions rerun in .ci/run skips them; accelerate < 1.6 has no FSDP2).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from train_fixtures import make_tiny_model_dir, sharded_runs

from pairopt.training.policy import load_model
from pairopt.training.trainer import train

# one xdist worker runs them all, one after another (pyproject's --dist loadgroup), while the
# other runs the rest of the suite: each launch needs both cores
pytestmark = [pytest.mark.sharded, pytest.mark.slow, pytest.mark.xdist_group("sharded")]

TESTS = Path(__file__).parent
CONFIGS = {
    "fsdp2": "accelerate_fsdp2.yaml",
    "zero3": "accelerate_deepspeed_zero3.yaml",
    "zero2": "accelerate_deepspeed_zero2.yaml",
}
ENGINE_TOL = 1e-5
TRAJECTORY_TOL = {"rtol": 1e-4, "atol": 1e-5}
WEIGHTS_TOL = {"rtol": 0.0, "atol": 1e-4}
RESUME_TOL = {"rtol": 1e-6, "atol": 1e-6}
# the engine worker's differences against one process: values and gathered gradients after
# steps 0 and 2, the sharded copy reference, the LoRA policy's adapter-disabled base and grads
ENGINE_KEYS = ("values_0", "grads_0", "values_2", "grads_2", "copy_values", "lora_base_values",
               "lora_grads")  # fmt: skip
CHUNK, DEFAULT_ROWS = 4, 6  # tests/sharded_worker.py: the configured chunk, the default one there


def launch(engine: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess[str]:
    """tests/sharded_worker.py ARGS on two processes under the engine's example config."""
    if engine.startswith("zero"):
        pytest.importorskip("deepspeed")
    command = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", str(TESTS.parent / "examples" / CONFIGS[engine]),
        "--num_processes", "2", "--mixed_precision", "no", "--main_process_port", "0",
        str(TESTS / "sharded_worker.py"), *args,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(TESTS), "DS_ACCELERATOR": "cpu"}
    with one_launch_at_a_time():
        return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)


@contextlib.contextmanager
def one_launch_at_a_time() -> Iterator[None]:
    """Across pytest-xdist workers: two launches at once would put four processes on this
    machine's two cores and let two launchers pick their rendezvous port at the same time
    (--main_process_port 0: a free port is chosen, then bound later)."""
    with open(Path(tempfile.gettempdir()) / "pairopt-sharded-launch.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def failed(done: subprocess.CompletedProcess[str]) -> str:
    return f"rc {done.returncode}\n{done.stdout[-2000:]}\n{done.stderr[-6000:]}"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.set_num_threads(1)
    return make_tiny_model_dir(tmp_path_factory.mktemp("models"))


# ------------------------------------------------------------------------------ engine


@pytest.mark.parametrize("engine", ["fsdp2", "zero3"])
def test_fsdp2_and_zero3_engine_equal_the_whole_model(engine: str, tmp_path: Path) -> None:
    """compute_logps through accelerate's sharded PolicyLogps (3 steps), the copy reference as
    the trainer places it (sharding.shard_frozen) and a LoRA policy with its adapter-disabled
    reference (the LM head frozen) equal the whole model in one process: values and gathered
    gradients (each process has its own groups, 27 and 29 scored tokens: 7 and 8 chunks).

    The LM head runs in chunks of the configured size (4 rows; the frozen copy at the default
    size, 6 rows under a patched logits budget), seen in the head's own forward. It is gathered
    once for the forward and once for the backward however many chunks there are: FSDP2 makes
    the same all-gathers with one chunk as with 7 (5: the root group once, each layer twice;
    the head is in the root group there, gathered by the root's forward however it is called,
    so only the ZeRO-3 count below would change if the head ran once per chunk);
    ZeRO-3 fetches the head's weight twice in the first step and once in the next ones
    (DeepSpeed keeps it from the forward to the backward once it has traced a step). Under both
    the copy reference holds about half of the weights on each process."""
    done = launch(engine, "engine", str(tmp_path))
    assert done.returncode == 0, failed(done)
    for rank in (0, 1):
        seen = json.loads((tmp_path / f"engine-rank{rank}.json").read_text())
        assert seen["sharding"] == engine
        for key in ENGINE_KEYS:
            assert seen[key] <= ENGINE_TOL, (rank, key, seen[key])
        rows = [seen[f"head_rows_{s}"] for s in range(3)]
        assert [*rows, seen["lora_rows"], seen["lora_base_rows"]] == [CHUNK] * 5
        assert seen["copy_rows"] == DEFAULT_ROWS
        if engine == "fsdp2":
            assert seen["gathers_0"] == seen["gathers_2"] == seen["gathers_one_chunk"] == 5
        else:
            assert [seen[f"gathers_{s}"] for s in range(3)] == [2, 1, 1]
        assert seen["copy_local_numel"] < 0.55 * seen["whole_numel"]
        print(f"\n{engine} rank {rank}: largest differences", {k: seen[k] for k in ENGINE_KEYS})


# ------------------------------------------------------------------------------ trainer


@pytest.fixture(scope="module")
def one_process(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The runs of train_fixtures.sharded_runs in this process, with grad_accum 2."""
    out = tmp_path_factory.mktemp("one-process")
    configs = sharded_runs(model_dir, out, grad_accum=2)
    return {name: train(cfg, quiet=True) for name, cfg in configs.items()}


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], **tol: float) -> float:
    """Asserts the two state dicts agree within `tol`; the largest difference."""
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))
    torch.testing.assert_close(a, b, **tol)
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def losses(out: Path, name: str) -> tuple[list[float], dict[str, float]]:
    record = json.loads((out / f"{name}.json").read_text())
    return record["loss"], record["eval"]


@pytest.mark.parametrize("engine", ["fsdp2", "zero3", "zero2"])
def test_fsdp2_zero3_zero2_trainer_runs_like_one_process_and_resumes_after_a_kill(
    engine: str, model_dir: Path, one_process: dict[str, Any], tmp_path: Path
) -> None:
    """`pairopt.train` on two processes (tests/sharded_worker.py train): first under the
    engine's config without the CPU override, which pairopt refuses (accelerate would run DDP);
    then a loss whose output is NaN on process 1 only, which stops both processes in step 1
    with process 1's message (alone it would leave process 0 waiting in the backward); then
    3 steps each with the copy reference, the precomputed one (computed, then read from the
    cache and spot-checked by a second run; each process has a cache directory of its own, as
    on nodes with local disks, and only the main process's counts), and a LoRA policy with the adapter-disabled
    reference, saving the model, the adapter and the merged model; then the copy run again under
    another name, killed (SIGKILL, every process) in step 3 after the checkpoint of step 2, and
    resumed by a second launch once its stale lock is deleted, as the lock's message says.

    Losses, evaluation and saved weights equal one process's (the module docstring's tolerances);
    the saved model loads with transformers, the adapter with PEFT onto the initial weights and
    merges into the saved merged model; the resumed run equals the uninterrupted one."""
    out = tmp_path / "out"
    done = launch(engine, "train", str(model_dir), str(out))
    assert done.returncode != 0 and (out / "killed/checkpoints/step-000002").is_dir(), failed(done)
    assert "does not apply it here" in (out / "refused.txt").read_text()
    assert f"sharding: {engine} over 2 processes" in done.stdout
    nan = [(out / f"nan-rank{rank}.txt").read_text() for rank in (0, 1)]
    assert nan[0] == nan[1] and nan[0].startswith("step 1: the loss is nan (not finite)"), nan
    diffs: dict[str, float] = {}
    for name in ("copy", "precompute", "lora"):
        got, got_eval = losses(out, name)
        want = [step["loss"] for step in one_process[name].history]
        torch.testing.assert_close(torch.tensor(got), torch.tensor(want), **TRAJECTORY_TOL)
        want_eval = one_process[name].final_eval
        torch.testing.assert_close(got_eval, want_eval, **TRAJECTORY_TOL)
        diffs[f"{name} loss"] = max(abs(a - b) for a, b in zip(got, want, strict=True))
    for rank in (0, 1):  # the main process decides, for all: its cache directory is the one
        assert (out / f"precompute-hit-rank{rank}.txt").read_text() == "False"
        assert (out / f"precompute_hit-hit-rank{rank}.txt").read_text() == "True"
    assert list((out / "cache-rank0").rglob("*.pt")) and not (out / "cache-rank1").exists()
    diffs.update(saved_models_match(out, one_process, model_dir))
    (out / "killed/pairopt.lock").unlink()
    done = launch(engine, "resume", str(model_dir), str(out))
    assert done.returncode == 0, failed(done)
    resumed, resumed_eval = losses(out, "resumed")
    straight, straight_eval = losses(out, "copy")
    assert resumed == pytest.approx(straight[2:], rel=1e-6)
    assert resumed_eval == pytest.approx(straight_eval, rel=1e-6)
    diffs["resumed weights"] = close(
        weights(out / "killed/model.safetensors"), weights(out / "copy/model.safetensors"),
        **RESUME_TOL,
    )  # fmt: skip
    print(f"\n{engine}: largest differences {json.dumps(diffs)}")


def saved_models_match(out: Path, one_process: dict[str, Any], model_dir: Path) -> dict[str, float]:
    """The sharded runs' saved model, adapter and merged model against one process's; each
    loads (transformers, PEFT) and the adapter on the initial weights is the merged model."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    single = {name: result.output_dir for name, result in one_process.items()}
    diffs = {
        "copy weights": close(
            weights(out / "copy/model.safetensors"),
            weights(single["copy"] / "model.safetensors"),
            **WEIGHTS_TOL,
        ),
        "adapter": close(
            weights(out / "lora/adapter/adapter_model.safetensors"),
            weights(single["lora"] / "adapter/adapter_model.safetensors"),
            **WEIGHTS_TOL,
        ),
        "merged weights": close(
            weights(out / "lora/model.safetensors"),
            weights(single["lora"] / "model.safetensors"),
            **WEIGHTS_TOL,
        ),
    }
    saved = weights(out / "copy/model.safetensors")
    model, info = AutoModelForCausalLM.from_pretrained(out / "copy", output_loading_info=True)
    assert not any(info[key] for key in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    loaded = model.state_dict()
    assert close({key: loaded[key] for key in saved}, saved) == 0.0
    initial = load_model(sharded_runs(model_dir, out)["lora"].model, seed=0)  # the run's seed
    merged = PeftModel.from_pretrained(initial, out / "lora/adapter").merge_and_unload()
    saved = AutoModelForCausalLM.from_pretrained(out / "lora")
    diffs["adapter merged by PEFT"] = close(
        dict(merged.state_dict()), dict(saved.state_dict()), rtol=0.0, atol=1e-6
    )
    return diffs
