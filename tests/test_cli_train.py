"""`pairopt train` through the CLI: every kind of bad input is one paragraph, exit code 2, no
traceback, and is reported before any model or dataset is loaded."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from train_fixtures import make_tiny_model_dir

import pairopt.training.policy
import pairopt.training.setup
from pairopt.cli import main as cli


@pytest.fixture(autouse=True)
def nothing_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Bad input must fail in validation: loading a model, tokenizer or dataset is a test failure."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a model/tokenizer/dataset was loaded before the input was validated")

    monkeypatch.setattr(pairopt.training.setup, "load_model", refuse)
    monkeypatch.setattr(pairopt.training.policy, "load_causal_lm", refuse)
    monkeypatch.setattr(pairopt.training.setup, "load_tokenizer", refuse)
    monkeypatch.setattr("pairopt.training.setup.load_preference_data", refuse)


def squash(text: str) -> str:
    """Whitespace removed: the CLI wraps messages at 100 columns (inside paths, too)."""
    return "".join(text.split())


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = cli(["train", *argv])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err


# (argv, what the message must say) — one row per kind of bad input.
BAD_INPUT = [
    pytest.param([], ["no loss chosen", "--loss", "dpo"], id="no-loss"),
    pytest.param(
        ["--loss", "dpoo"], ["unknown loss 'dpoo'", "dpo", "--loss-module"], id="unknown-loss"
    ),
    pytest.param(
        ["--loss", "dpo", "--loss.beta", "-1"],
        ["beta", "-1", "greater than 0"],
        id="bad-loss-param",
    ),
    pytest.param(
        ["--loss", "dpo", "--loss.gamma", "1"], ["gamma", "beta"], id="param-of-another-loss"
    ),
    pytest.param(
        ["--loss", "simpo", "--loss.beta", "0"],
        ["simpo", "beta", "greater than 0"],
        id="bad-simpo-param",
    ),
    pytest.param(
        ["--loss", "dpo", "--optim.lrr", "1e-3"],
        ["unknown option --optim.lrr", "--optim.lr"],
        id="unknown-flag",
    ),
    pytest.param(
        ["--loss", "dpo", "--optimm.lr", "1"],
        ["unknown option --optimm.lr", "--optim.lr"],
        id="unknown-section",
    ),
    pytest.param(
        ["--loss", "dpo", "--optim.lr", "-1"],
        ["optim.lr", "-1", "--optim.lr", "greater than 0"],
        id="negative-lr",
    ),
    pytest.param(
        ["--loss", "dpo", "--optim.lr", "fast"],
        ["optim.lr", "'fast'", "valid number"],
        id="not-a-number",
    ),
    pytest.param(
        ["--loss", "dpo", "--optim.schedule", "cosin"],
        ["optim.schedule", "'cosin'", "'cosine'"],
        id="bad-choice",
    ),
    pytest.param(
        ["--loss", "dpo", "--engine.share_prefix", "maybe"],
        ["engine.share_prefix", "'maybe'", "boolean"],
        id="bad-bool",
    ),
    pytest.param(
        ["--loss", "dpo", "--max-steps", "0"],
        ["optim.max_steps", "0", "--max-steps", "greater than 0"],
        id="zero-steps",
    ),
    pytest.param(
        ["--loss", "dpo", "--optim.batch_size", "null"],
        ["optim.batch_size", "optim.batch_tokens"],
        id="no-batch-size",
    ),
    pytest.param(
        ["--loss", "dpo", "--model", "./no-such-model"],
        ["model.name_or_path", "./no-such-model"],
        id="missing-model-dir",
    ),
    pytest.param(
        ["--loss", "dpo", "--model", "builtin:nope"],
        ["model.name_or_path", "builtin:nope"],
        id="unknown-builtin-model",
    ),
    pytest.param(
        ["--loss", "dpo", "--dataset", "./no-such.jsonl"],
        ["data.dataset", "./no-such.jsonl", "does not exist"],
        id="missing-dataset",
    ),
    pytest.param(
        ["--loss", "dpo", "--data.max_samples", "0"], ["data.max_samples", "0"], id="bad-data-field"
    ),
    pytest.param(
        ["--loss", "dpo", "--config", "no-such.yaml"],
        ["config file", "no-such.yaml", "does not exist"],
        id="missing-config",
    ),
    pytest.param(
        ["--loss", "dpo", "--resume", "no-such-dir"],
        ["--resume", "no-such-dir"],
        id="missing-resume",
    ),
    pytest.param(
        ["--loss", "dpo", "--reference.strategy", "adapter"],
        ["adapter", "model.lora"],
        id="adapter-without-lora",
    ),
    pytest.param(
        ["--loss", "dpo", "--logging.report_to", "no_tracker"],
        ["logging.report_to", "no_tracker"],
        id="unknown-tracker",
    ),
    pytest.param(["--loss", "dpo", "stray"], ["unexpected argument 'stray'"], id="positional"),
    pytest.param(
        ["--loss", "dpo", "--loss-module", "no_such_module_xyz"],
        ["no_such_module_xyz"],
        id="missing-loss-module",
    ),
    pytest.param(
        ["--loss", "dpo", "--optim.lr"], ["--optim.lr needs a value"], id="flag-without-value"
    ),
    pytest.param(["--loss"], ["--loss needs a value"], id="loss-without-value"),
    pytest.param(
        ["--loss", "dpo", "--loss-module"], ["--loss-module needs a value"], id="bare-loss-module"
    ),
    pytest.param(
        ["--loss", "dpo", "--output-dir", ""], ["--output-dir is empty"], id="empty-output-dir"
    ),
    pytest.param(
        ["--loss", "dpo", "--resume"],
        ["--resume with no value", "--output-dir RUN"],
        id="bare-resume-without-output-dir",
    ),
    pytest.param(
        ["--loss", "dpo", "--engine.bucket_size", "100000"],
        ["engine.bucket_size", "less than or equal to 8192"],
        id="huge-bucket",
    ),
]


@pytest.mark.parametrize(("argv", "expected"), BAD_INPUT)
def test_bad_input_is_one_clear_paragraph(
    argv: list[str],
    expected: list[str],
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)
    code, err = run(argv, capsys)
    assert code == 2
    assert err.startswith("pairopt train: error: ")
    for fragment in expected:
        assert squash(fragment) in squash(err), f"{fragment!r} missing from: {err}"
    assert not (tmp_path / "pairopt-output").exists()  # nothing written for a rejected run


def test_bad_yaml_key_names_the_key_and_the_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "run.yaml"
    config.write_text("loss:\n  name: dpo\noptim:\n  lr: 1.0e-4\n  warmup: 10\n")
    code, err = run(["--config", str(config)], capsys)
    assert code == 2
    assert (
        "'optim.warmup'" in err
        and squash(str(config)) in squash(err)
        and "optim.warmup_steps" in err
    )


def test_bad_yaml_value_names_the_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "run.yaml"
    config.write_text("loss: {name: ipo, beta: -0.5}\n")
    code, err = run(["--config", str(config)], capsys)
    assert code == 2 and "beta" in err and "-0.5" in err


def test_invalid_yaml_and_non_mapping(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    broken = tmp_path / "broken.yaml"
    broken.write_text("loss: [dpo\n")
    assert run(["--config", str(broken)], capsys)[0] == 2
    listed = tmp_path / "list.yaml"
    listed.write_text("- dpo\n")
    code, err = run(["--config", str(listed)], capsys)
    assert code == 2 and "mapping" in err


def test_existing_run_directory_is_not_overwritten(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text("loss: {name: dpo}\n")
    argv = ["--loss", "dpo", "--output-dir", str(run_dir)]
    code, err = run(argv, capsys)  # stopped before its first checkpoint: nothing to resume
    assert code == 2 and squash("already holds a run") in squash(err)
    assert squash("it has no checkpoint to resume from") in squash(err)
    (run_dir / "config.json").write_text("{}")
    code, err = run(argv, capsys)
    assert code == 2 and squash("a finished one") in squash(err)
    checkpoint = run_dir / "checkpoints" / "step-000002"
    checkpoint.mkdir(parents=True)
    (checkpoint / "trainer_state.json").write_text("{}")
    code, err = run(argv, capsys)
    assert code == 2 and squash("pass --resume to continue it") in squash(err)


def test_unwritable_output_directory_is_refused_before_loading(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    code, err = run(["--loss", "dpo", "--output-dir", str(a_file)], capsys)
    assert code == 2 and squash("is a file") in squash(err)
    code, err = run(["--loss", "dpo", "--output-dir", str(a_file / "run")], capsys)
    assert code == 2 and squash("cannot be created") in squash(err)


def test_lora_without_peft_says_how_to_install(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "peft" else real(name, *a)
    )
    code, err = run(["--loss", "dpo", "--model.lora.r", "8"], capsys)
    assert code == 2 and squash("pip install 'pairopt[lora]'") in squash(err)


def test_help_lists_every_option(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli(["train", "--help"]) == 0
    out = capsys.readouterr().out
    for option in (
        "--optim.lr",
        "--engine.share_prefix",
        "--reference.strategy",
        "--model.lora.r",
        "--data.dataset",
        "--checkpoint.every",
        "--loss",
    ):
        assert option in out


def test_python_dash_m_reports_without_traceback(tmp_path: Path) -> None:
    """The real entry point, in a fresh interpreter: exit code and stderr as a user sees them."""
    done = subprocess.run(
        [sys.executable, "-m", "pairopt", "train", "--loss", "dpo", "--optim.warmup_ratio", "1.5"],
        capture_output=True, text=True, cwd=tmp_path, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert "optim.warmup_ratio" in done.stderr and squash("less than 1") in squash(done.stderr)
    top = subprocess.run(
        [sys.executable, "-m", "pairopt", "--help"], capture_output=True, text=True, timeout=60
    )
    assert top.returncode == 0 and "train" in top.stdout


def test_a_good_command_line_trains(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The same path with valid input: exit 0, the summary printed, the outputs written."""
    monkeypatch.undo()  # loading is allowed here
    model_dir = make_tiny_model_dir(tmp_path)
    argv = [
        "--loss", "ipo", "--model", str(model_dir), "--output-dir", str(tmp_path / "out"), "--max-steps", "2",
        "--data.max_samples", "16", "--data.max_eval_samples", "8", "--optim.lr", "1e-3",
        "--logging.progress_bar", "false", "--loss.beta", "0.2",
    ]  # fmt: skip
    assert cli(["train", *argv]) == 0
    out = capsys.readouterr().out
    assert "held-out preference accuracy" in out and "beta: 0.2" in out
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_a_row_budget_below_a_pair_fails_before_the_model_loads(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Needs the tokenised data, so here only the model must not load."""
    monkeypatch.undo()  # the autouse fixture's patches: the data may load for this check

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model was loaded before the row budget was checked")

    monkeypatch.setattr(pairopt.training.setup, "load_model", refuse)
    monkeypatch.setenv("PAIROPT_CACHE", str(tmp_path / "cache"))
    argv = [
        "--loss",
        "dpo",
        "--engine.max_tokens_per_row",
        "10",
        "--output-dir",
        str(tmp_path / "o"),
    ]
    code, err = run(argv, capsys)
    assert code == 2
    assert squash("over engine.max_tokens_per_row=10") in squash(err)
    assert squash("3000 of 3000 train pairs") in squash(err) and "data.max_length" in err
