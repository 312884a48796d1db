"""What the layout promises beyond import-linter's contracts: the Python API, the reference-loss
base, one source for the LM-head vocabulary, resources closed on errors, and built-in losses that
a user's own `losses` module cannot silently replace."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from tiny_models import make_model
from train_fixtures import make_tiny_model_dir, tiny_config
from transformers import LlamaConfig, LlamaForCausalLM

import pairopt
import pairopt.training.steps as steps
import pairopt.training.trainer as trainer
from pairopt.engine.logps import default_chunk_size, token_logps, vocab_size
from pairopt.errors import PairoptError
from pairopt.loss import LogRatios, LossConfig, LossOutput, ReferencePairLoss, reward_metrics

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model_dir(tmp_path_factory.mktemp("models"))


# ------------------------------------------------------------------------- the Python API


def small_run(model_dir: Path, output: Path) -> dict:
    return {
        "model": {"name_or_path": str(model_dir)},
        "data": {"max_samples": 32, "max_eval_samples": 8},
        "loss": "dpo",
        "optim": {"lr": 1e-2, "batch_size": 4, "max_steps": 3, "seed": 0},
        "output": {"dir": str(output)},
    }


def test_train_from_a_dict_quietly(model_dir: Path, tmp_path: Path, capsys) -> None:
    result = pairopt.train(small_run(model_dir, tmp_path / "run"), quiet=True)
    out, err = capsys.readouterr()
    assert out == "" and "train" not in err  # no console lines, no progress bars
    assert result.steps == 3 and len(result.history) == 3
    assert {"loss", "rewards/accuracies", "lr"} <= result.history[0].keys()
    assert result.final_eval is not None and result.final_eval["pairs"] == 8
    # logging.every 10 (the default) over 3 steps: one record, for the last (partial) window
    assert (tmp_path / "run" / "metrics.jsonl").read_text().count('"split": "train"') == 1
    assert (tmp_path / "run" / "config.json").is_file()  # the model is saved all the same


def test_train_from_yaml_or_config_gives_the_same_run(model_dir: Path, tmp_path: Path) -> None:
    data = small_run(model_dir, tmp_path / "a")
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(data))
    from_yaml = pairopt.train(path, quiet=True)
    data["output"]["dir"] = str(tmp_path / "b")
    from_config = pairopt.train(pairopt.load_config(data), quiet=True)
    assert [h["loss"] for h in from_yaml.history] == [h["loss"] for h in from_config.history]


def test_a_bad_config_dict_names_the_field(tmp_path: Path) -> None:
    with pytest.raises(PairoptError, match=r"optim.lr = -1 .*greater than 0"):
        pairopt.train({"loss": "dpo", "optim": {"lr": -1}, "output": {"dir": str(tmp_path)}})


def test_metrics_file_and_bar_are_closed_when_a_step_fails(
    model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    logs: list = []
    real_log, real_step = steps.MetricsLog, steps.train_step

    def spy_log(*args, **kwargs):
        logs.append(real_log(*args, **kwargs))
        return logs[-1]

    def failing_step(run, step, epoch, micro_batches):
        if step == 1:
            raise RuntimeError("injected")
        return real_step(run, step, epoch, micro_batches)

    monkeypatch.setattr(steps, "MetricsLog", spy_log)
    monkeypatch.setattr(steps, "train_step", failing_step)
    with pytest.raises(RuntimeError, match="injected"):
        trainer.train(tiny_config(model_dir, tmp_path / "out"))
    assert len(logs) == 1 and logs[0].file is None  # closed by the with-block
    lines = (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 1  # step 1 was written and flushed before step 2 failed


# ------------------------------------------------------------------------- losses


class ScaledMargin(ReferencePairLoss):
    """β·Δ as a loss: the base hands over the log-ratios."""

    class Config(LossConfig):
        beta: float = 0.5

    def compute_ratios(self, ratios: LogRatios) -> LossOutput:
        return LossOutput(self.config.beta * ratios.margin, ratios.metrics(self.config.beta))


def test_reference_loss_base_gives_log_ratios() -> None:
    """S_c = -1, S_r = -3, S_c^ref = -2, S_r^ref = -2: s_c = 1, s_r = -1, Δ = 2, loss βΔ = 1."""
    policy = pairopt.PairLogps(
        torch.tensor([-1.0]), torch.tensor([-3.0]), torch.tensor([2]), torch.tensor([4])
    )
    reference = pairopt.PairLogps(
        torch.tensor([-2.0]), torch.tensor([-2.0]), torch.tensor([2]), torch.tensor([4])
    )
    loss = ScaledMargin()
    assert loss.requires_reference
    out = loss(policy, reference)
    torch.testing.assert_close(out.losses, torch.tensor([1.0]))
    ratios = LogRatios(policy, reference)
    # per token: (-1/2 - -2/2) - (-3/4 - -2/4) = 0.5 + 0.25
    torch.testing.assert_close(ratios.per_token_margin(), torch.tensor([0.75]))
    expected = reward_metrics(policy, *ratios.rewards(0.5))
    assert {k: float(v) for k, v in out.metrics.items()} == {
        k: float(v) for k, v in expected.items()
    }
    assert float(out.metrics["rewards/margins"]) == 1.0  # β·Δ
    with pytest.raises(PairoptError, match="needs the reference model's log-probs"):
        loss(policy, None)


# ------------------------------------------------------------------------- engine


def test_lm_head_vocabulary_comes_from_the_config() -> None:
    """Under ZeRO-3 the head's weight outside a gathered forward is a (0,) placeholder; the
    chunk size must still be sized for the real vocabulary."""
    model = make_model("llama")
    assert vocab_size(model) == 101
    sharded = LlamaForCausalLM(
        LlamaConfig(vocab_size=32000, hidden_size=8, num_hidden_layers=1, num_attention_heads=2)
    )
    sharded.lm_head.weight = torch.nn.Parameter(torch.empty(0))  # what ZeRO-3 leaves behind
    assert vocab_size(sharded) == 32000
    assert default_chunk_size(vocab_size(sharded)) == 2**25 // 32000  # not 2**25 rows


def test_configured_chunk_bounds_the_head_calls() -> None:
    rows: list[int] = []

    def head(hidden: torch.Tensor) -> torch.Tensor:
        rows.append(hidden.shape[0])
        return hidden @ torch.ones(4, 7)

    token_logps(head, torch.randn(10, 4), torch.randint(0, 7, (10,)), chunk_size=3)
    assert rows == [3, 3, 3, 1]


# ------------------------------------------------------------------------- a user's `losses`


@pytest.mark.parametrize("kind", ["module", "package"])
def test_a_users_losses_module_cannot_replace_the_builtins(tmp_path: Path, kind: str) -> None:
    """`python -m pairopt` puts the working directory first on sys.path."""
    if kind == "module":
        shadow = tmp_path / "losses.py"
        shadow.write_text("SHADOW = True\n")
    else:
        (tmp_path / "losses").mkdir()
        shadow = tmp_path / "losses" / "__init__.py"
        shadow.write_text("SHADOW = True\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-m", "pairopt", "losses"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2, done.stdout + done.stderr
    assert str(shadow) in done.stderr.replace("\n", " ") or str(shadow) in done.stderr
    assert "in place of pairopt's built-in losses" in done.stderr.replace("\n", " ")
    assert "Traceback" not in done.stderr


def test_a_namespace_folder_named_losses_is_harmless(tmp_path: Path) -> None:
    (tmp_path / "losses").mkdir()  # no __init__.py: a namespace portion never wins the import
    done = subprocess.run(
        [sys.executable, "-m", "pairopt", "losses"],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "dpo" in done.stdout


def test_the_python_api_example_runs(tmp_path: Path, capsys, monkeypatch) -> None:
    """examples/train_api.py, on the shipped tiny model and data, a few steps."""
    import importlib.util

    monkeypatch.setenv("PAIROPT_CACHE", str(tmp_path / "cache"))
    spec = importlib.util.spec_from_file_location("train_api", ROOT / "examples" / "train_api.py")
    assert spec is not None and spec.loader is not None
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    result = example.main(steps=3, output_dir=str(tmp_path / "run"))
    assert result.steps == 3 and result.final_eval is not None
    assert "over 3 steps" in capsys.readouterr().out
