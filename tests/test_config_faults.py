"""Configs and custom losses a user gets wrong: one PairoptError naming the file and line (or the
loss and what it returned), exit code 2 and no traceback from the CLI; a run that fails before
its first step leaves no directory behind, so the same command runs once the fault is fixed."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from train_fixtures import make_tiny_model_dir

import pairopt
from pairopt.cli import main as cli
from pairopt.errors import PairoptError
from pairopt.pairs import PairLogps
from pairopt.training.config import CONFIG_END
from pairopt.training.flags import parse_train_args


def squash(text: str) -> str:
    return "".join(text.split())


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = cli(["train", *argv])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err


DUPLICATES = {
    "section": ("loss: dpo\noptim:\n  lr: 1.0e-3\noptim:\n  max_steps: 5\n", "line 4: key 'optim'", "line 2"),
    "field": ("loss: dpo\noptim:\n  lr: 1.0e-3\n  warmup_steps: 3\n  lr: 2.0e-3\n", "line 5: key 'lr'", "line 3"),
}  # fmt: skip


@pytest.mark.parametrize("case", DUPLICATES)
def test_a_key_given_twice_in_a_yaml_config_is_an_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str
) -> None:
    """PyYAML keeps the last of two equal keys and drops the first without a word."""
    text, where, first = DUPLICATES[case]
    config = tmp_path / "run.yaml"
    config.write_text(text)
    code, err = run_cli(["--config", str(config)], capsys)
    assert code == 2
    assert squash(
        f"config file '{config}' {where} is given a second time (first at {first})"
    ) in squash(err)
    with pytest.raises(PairoptError, match="given a second time"):
        pairopt.load_config(config)


def test_a_config_that_is_not_utf8_names_the_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "run.yaml"
    config.write_bytes(b"loss: dpo\noptim:\n  lr: 1.0e-3  # caf\xe9\n")  # 0xe9 is byte 20 of line 3
    code, err = run_cli(["--config", str(config)], capsys)
    assert code == 2
    assert squash(f"config file '{config}' line 3, column 20: byte 0xe9 is not UTF-8") in squash(
        err
    )


def saved_run(tmp_path: Path) -> tuple[Path, str]:
    """A run directory as a run leaves it: config.yaml (ending with CONFIG_END), a checkpoint."""
    run = tmp_path / "run"
    (run / "checkpoints" / "step-000002").mkdir(parents=True)
    text = parse_train_args(
        ["--loss", "ipo", "--optim.lr", "3e-4", "--output-dir", str(run)]
    ).to_yaml()
    (run / "config.yaml").write_text(text)
    return run, text


def test_a_cut_saved_config_is_refused_on_resume(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Cut before its optim section, the file still parses, and optim would silently be the
    defaults (lr 5e-6, not 3e-4): the missing end line says it was cut."""
    run, text = saved_run(tmp_path)
    assert text.rstrip().endswith(CONFIG_END)
    lines = text.splitlines()
    cut = lines[: next(i for i, line in enumerate(lines) if line.startswith("optim:"))]
    (run / "config.yaml").write_text("\n".join(cut) + "\n")
    code, err = run_cli(["--resume", str(run)], capsys)
    assert code == 2
    assert squash(f"{run / 'config.yaml'} is cut short: it ends at line {len(cut)}") in squash(err)
    assert "trainer_state.json" in err
    # A complete hand-written file only needs the end line.
    (run / "config.yaml").write_text("\n".join(lines[:-1]) + "\n")
    assert run_cli(["--resume", str(run)], capsys)[0] == 2
    (run / "config.yaml").write_text("\n".join(lines[:-1]) + f"\n{CONFIG_END}\n")
    assert parse_train_args(["--resume", str(run)]).optim.lr == 3e-4


def test_a_saved_config_that_is_not_utf8_is_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run, text = saved_run(tmp_path)
    (run / "config.yaml").write_bytes(text.encode().replace(b"ipo", b"ip\xff", 1))
    code, err = run_cli(["--resume", str(run)], capsys)
    assert code == 2 and squash(f"'{run / 'config.yaml'}' line") in squash(err)
    assert "is not UTF-8" in err


# ------------------------------------------------------------------------ custom losses


def logps(n: int = 3, *, grad: bool = True, value: float = -2.0) -> PairLogps:
    chosen = torch.full((n,), value, requires_grad=grad)
    rejected = torch.full((n,), value - 1.0, requires_grad=grad)
    tokens = torch.full((n,), 4)
    return PairLogps(chosen, rejected, tokens, tokens)


def faulty_loss(name: str, fault: str):
    """A margin loss (-log σ(S_c - S_r)) that returns what `fault` says."""

    @pairopt.register_loss(name)
    class Faulty(pairopt.PairLoss):
        broken = True

        def compute(self, policy, reference):
            losses = -F.logsigmoid(policy.chosen_logps - policy.rejected_logps)  # (N,)
            metrics = {"rewards/accuracies": (losses < math.log(2)).float().mean()}
            if type(self).broken:
                if fault == "shape":
                    losses = losses[:, None]  # (N, 1)
                elif fault == "detached":
                    losses = losses.detach()
                elif fault == "not_finite":
                    losses = losses * torch.tensor([1.0, float("nan"), 1.0])[: len(losses)]
                elif fault == "metric":
                    metrics["margin"] = policy.chosen_logps.detach()  # (N,), not a scalar
                elif fault == "tuple":
                    return losses, metrics
            return pairopt.LossOutput(losses, metrics)

    return Faulty


FAULTS = {
    "shape": "returned losses of shape (3, 1) for 3 pairs; a loss returns one value per pair",
    "detached": "returned losses without a gradient",
    "not_finite": "the loss is nan (not finite): loss 'test_fault_not_finite' returned nan for 1 of 3 pairs",
    "metric": "returned metric 'margin' as (3,); metrics are scalar tensors",
    "tuple": "returned tuple; compute must return LossOutput(losses, metrics)",
}


@pytest.mark.parametrize("fault", FAULTS)
def test_a_custom_loss_returning_the_wrong_thing_is_named(registry, fault: str) -> None:
    loss = faulty_loss(f"test_fault_{fault}", fault)()
    with pytest.raises(PairoptError) as err:
        loss(logps())
    assert f"loss 'test_fault_{fault}'" in str(err.value) and FAULTS[fault] in str(err.value)
    type(loss).broken = False
    assert loss(logps()).losses.shape == (3,)  # the same loss, fixed, passes


def test_non_finite_inputs_are_told_apart_from_a_faulty_formula(registry) -> None:
    loss = faulty_loss("test_fault_none", "none")()
    with pytest.raises(
        PairoptError, match=r"the log-probs given to loss 'test_fault_none' are not finite"
    ):
        loss(logps(value=float("nan")))


def test_a_run_failing_at_step_1_leaves_no_directory(
    registry, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The loss fails in step 1: exit 2 naming the step and the loss; the run directory is gone
    (no config.yaml left to make the same command refuse it), and the command runs once fixed."""
    faulty = faulty_loss("test_fault_step1", "shape")
    model_dir = make_tiny_model_dir(tmp_path)
    run_dir = tmp_path / "run"
    argv = [
        "--loss", "test_fault_step1", "--model", str(model_dir), "--output-dir", str(run_dir),
        "--max-steps", "1", "--data.max_samples", "16", "--data.max_eval_samples", "8",
        "--optim.batch_size", "4", "--logging.progress_bar", "false",
    ]  # fmt: skip
    code, err = run_cli(argv, capsys)
    assert code == 2
    assert squash(
        "step 1: loss 'test_fault_step1' returned losses of shape (4, 1) for 4 pairs"
    ) in squash(err)
    assert squash("The run stops without saving a model.") in squash(err)
    assert not run_dir.exists()
    faulty.broken = False
    assert run_cli(argv, capsys)[0] == 0 and (run_dir / "model.safetensors").is_file()
