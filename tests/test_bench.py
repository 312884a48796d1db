"""`pairopt bench` on a tiny profile and a tiny model: it runs, writes JSON, text and PNG."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pairopt.bench import cli as bench_cli
from pairopt.bench import data as bench_data
from pairopt.bench import run as bench_run
from pairopt.bench.measure import memory_sweep
from pairopt.cli import main as cli_main
from pairopt.pairs import PreferencePair

TINY_MODEL = ["--hidden", "32", "--layers", "1", "--heads", "2", "--kv-heads", "2"]
TINY_MODEL += ["--intermediate", "64", "--vocab", "64", "--threads", "1"]


@pytest.fixture
def tiny_profiles(tmp_path: Path) -> Path:
    profiles = {
        "profiles": [
            {"name": "tiny", "prompt_tokens": 12, "completion_tokens": 5},
            {"name": "tiny_long_answers", "prompt_tokens": 4, "completion_tokens": 10},
        ]
    }
    path = tmp_path / "profiles.json"
    path.write_text(json.dumps(profiles))
    return path


def test_ideal_speedup_arithmetic():
    """P=4, C=2, R=2: unshared 2*4 + 2 + 2 = 12 tokens, shared 4 + 2 + 2 = 8: ideal 1.5."""
    pair = PreferencePair([1] * 4, [2] * 2, [3] * 2)
    assert bench_data.ideal_speedup([pair, pair]) == pytest.approx(1.5)


def test_shipped_profiles_are_the_papers_six():
    profiles = bench_data.load_profiles()
    assert sorted(profiles) == [
        "capybara",
        "hh_rlhf",
        "metamath_dpo",
        "tldr",
        "tulu_helpsteer",
        "ultrafeedback",
    ]
    for p in profiles.values():
        P, C = p["prompt_tokens"], p["completion_tokens"]
        assert p["ideal_speedup"] == pytest.approx(2 * (P + C) / (P + 2 * C), abs=1e-3)


def test_bench_command_writes_json_table_and_png(tiny_profiles: Path, tmp_path: Path):
    out = tmp_path / "out"
    argv = ["bench", "--profiles-file", str(tiny_profiles), "--pairs-per-step", "3"]
    argv += ["--steps", "2", "--warmup", "1", "--out", str(out), *TINY_MODEL]
    assert cli_main(argv) == 0
    report = json.loads((out / "bench.json").read_text())
    assert (out / "bench.txt").read_text().startswith("tiny:")
    png = (out / "bench.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p["profile"] for p in report["profiles"]] == ["tiny", "tiny_long_answers"]
    for prof in report["profiles"]:
        modes = prof["modes"]
        assert list(modes) == list(bench_run.MODES)
        assert prof["best_baseline"] in bench_run.BASELINES
        # the same pairs in every mode: ideal from the measured pairs, around 12+5+5 vs 29
        assert 1.0 < prof["ideal_speedup"] < 2.0
        for m in modes.values():
            assert m["step_s"] > 0 and len(m["step_s_all"]) == 2
            assert 0 < m["packing_efficiency"] <= 1
            assert m["peak_memory_mib"] > 0
            assert m["fraction_of_ideal"] == pytest.approx(
                m["speedup"][prof["best_baseline"]] / prof["ideal_speedup"]
            )
        # packing removes padding: the packed layouts waste no more than the padded ones
        assert modes["shared-packed"]["packing_efficiency"] >= modes["shared"]["packing_efficiency"]
        assert modes["unshared-packed"]["rows"] == 1  # the whole step in one row
    assert report["model"]["hidden"] == 32
    assert report["options"]["pairs_per_step"] == 3


def test_bench_on_a_jsonl_dataset(tmp_path: Path):
    rows = [
        {"prompt": [1] * (5 + i % 3), "chosen": [2] * (2 + i % 2), "rejected": [3] * 3}
        for i in range(6)
    ]
    data = tmp_path / "mine.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    out = tmp_path / "out"
    argv = ["--data", str(data), "--pairs-per-step", "2", "--steps", "2", "--warmup", "1"]
    argv += ["--modes", "unshared-packed,shared-packed", "--no-png", "--no-memory"]
    assert bench_cli.main([*argv, "--out", str(out), *TINY_MODEL]) == 0
    report = json.loads((out / "bench.json").read_text())
    (prof,) = report["profiles"]
    assert prof["profile"] == "mine" and list(prof["modes"]) == ["unshared-packed", "shared-packed"]
    assert not (out / "bench.png").exists()


def test_bad_input_is_one_error(capsys, tmp_path: Path):
    assert cli_main(["bench", "--profiles", "nope", "--out", str(tmp_path)]) == 2
    assert "unknown nope" in capsys.readouterr().err
    data = tmp_path / "text.jsonl"
    data.write_text(json.dumps({"prompt": "hi", "chosen": "a", "rejected": "b"}))
    assert cli_main(["bench", "--data", str(data), "--out", str(tmp_path)]) == 2
    assert "--tokenizer" in capsys.readouterr().err


@pytest.fixture
def no_model(monkeypatch):
    """Bad input must fail before any model is built: building one fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was built for bad input")

    monkeypatch.setattr(bench_run, "build_model", refuse)
    monkeypatch.setattr("pairopt.bench.cli.memory_sweep", refuse)


def bench_error(capsys, argv: list[str], tmp_path: Path) -> str:
    """Exit code 2, one error message (no traceback), nothing written; the message."""
    out = tmp_path / "out"
    assert cli_main(["bench", *argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("pairopt bench: error: ") and "Traceback" not in err
    assert not out.exists()
    return " ".join(err.split())  # unwrapped


def write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


GOOD_ROW = json.dumps({"prompt": [1, 2], "chosen": [3], "rejected": [4]})


@pytest.mark.parametrize(
    ("name", "text", "expected"),
    [
        ("bad.jsonl", GOOD_ROW + "\n\nnot json\n", "bad.jsonl line 3: not JSON"),
        ("list.jsonl", "[1, 2]\n", "list.jsonl line 1: a JSON list, not an object"),
        ("missing.jsonl", '{"prompt": [1], "chosen": [2]}\n', "missing field(s) rejected"),
        (
            "mixed.jsonl",
            '{"prompt": [1], "chosen": "a", "rejected": [2]}\n',
            "chosen is str",
        ),
        ("empty_resp.jsonl", '{"prompt": [1], "chosen": [], "rejected": [2]}\n', "chosen has no"),
        ("blank.jsonl", "\n\n", "blank.jsonl: no rows"),
    ],
)
def test_bad_data_file(capsys, tmp_path: Path, no_model, name, text, expected):
    path = write(tmp_path / name, text)
    assert expected in bench_error(capsys, ["--data", path], tmp_path)


def test_data_that_is_a_directory_or_missing(capsys, tmp_path: Path, no_model):
    folder = tmp_path / "folder"
    folder.mkdir()
    err = bench_error(capsys, ["--data", str(folder)], tmp_path)
    assert f"--data {folder}: is a directory" in err
    err = bench_error(capsys, ["--data", str(tmp_path / "nope.jsonl")], tmp_path)
    assert "nope.jsonl: no such file" in err


def test_too_little_data_fails_before_the_model(capsys, tmp_path: Path, no_model):
    path = write(tmp_path / "few.jsonl", GOOD_ROW + "\n")
    err = bench_error(capsys, ["--data", path, "--pairs-per-step", "2"], tmp_path)
    assert "profile few: 0 batches of 2 pairs" in err


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("{not json", "not JSON (Expecting property name"),
        ("[]", 'non-empty "profiles" list'),
        ('{"profiles": [3]}', "profile 1 is int"),
        (
            '{"profiles": [{"name": "p", "completion_tokens": 5}]}',
            "profile 'p' lacks prompt_tokens; every profile needs name, prompt_tokens, "
            "completion_tokens",
        ),
        ('{"profiles": [{"prompt_tokens": 5, "completion_tokens": 5}]}', "profile 1 lacks name"),
        (
            '{"profiles": [{"name": "p", "prompt_tokens": "x", "completion_tokens": 5}]}',
            "profile 'p' has prompt_tokens 'x'",
        ),
    ],
)
def test_bad_profiles_file(capsys, tmp_path: Path, no_model, text, expected):
    path = write(tmp_path / "profiles.json", text)
    err = bench_error(capsys, ["--profiles-file", path], tmp_path)
    assert f"--profiles-file {path}" in err and expected in err


def test_tokenizer_directory(capsys, tmp_path: Path, no_model):
    data = write(tmp_path / "text.jsonl", '{"prompt": "hi", "chosen": "a", "rejected": "b"}\n')
    err = bench_error(capsys, ["--data", data, "--tokenizer", "./nowhere"], tmp_path)
    assert "--tokenizer ./nowhere: the local tokenizer directory does not exist" in err
    empty = tmp_path / "empty_tok"
    empty.mkdir()
    err = bench_error(capsys, ["--data", data, "--tokenizer", str(empty)], tmp_path)
    assert f"--tokenizer {empty}: transformers cannot load a tokenizer" in err


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--steps", "0"], "--steps must be >= 1, got 0"),
        (["--warmup", "-1"], "--warmup must be >= 0, got -1"),
        (["--threads", "-1"], "--threads must be >= 0 (0: leave), got -1"),
        (["--row-tokens", "-5"], "--row-tokens must be >= 0 (0: a whole step per row), got -5"),
        (["--pairs-per-step", "0"], "--pairs-per-step must be >= 1, got 0"),
        (["--bucket-size", "-3"], "--bucket-size must be >= 1, got -3"),
        (["--chunk-size", "0"], "--chunk-size must be >= 1, got 0"),
        (["--hidden", "0"], "--hidden must be >= 1, got 0"),
        (["--layers", "0"], "--layers must be >= 1, got 0"),
        (["--heads", "-2"], "--heads must be >= 1, got -2"),
        (["--kv-heads", "0"], "--kv-heads must be >= 1, got 0"),
        (["--intermediate", "0"], "--intermediate must be >= 1, got 0"),
        (["--vocab", "0"], "--vocab must be >= 1, got 0"),
        (["--sweep-tokens", "0", "--memory-sweep", "64"], "--sweep-tokens must be >= 1, got 0"),
        (["--heads", "3"], "--hidden 256 is not divisible by --heads 3"),
        (["--heads", "4", "--kv-heads", "3"], "--heads 4 is not divisible by --kv-heads 3"),
        (["--hidden", "6", "--heads", "2", "--kv-heads", "2"], "head size 3, odd"),
        (["--memory-sweep", "abc"], "--memory-sweep 'abc': 'abc' is not a vocabulary size"),
        (["--memory-sweep", "0"], "--memory-sweep '0': '0' is not a vocabulary size"),
        (["--memory-sweep", "64,,128"], "'' is not a vocabulary size"),
        (["--backend", "flex", "--device", "cpu"], "--backend flex: backend='flex' needs a CUDA"),
        (["--backend", "magic"], "--backend 'magic': choose auto, sdpa, eager, flex, varlen"),
        (["--device", "tpu"], "--device 'tpu': not a device torch knows"),
        (["--jitter", "1.5"], "--jitter must be in [0, 1), got 1.5"),
        (
            ["--row-tokens", "8", "--profiles", "tldr"],
            "--row-tokens 8: profile tldr has a pair needing",
        ),
    ],
)
def test_bad_options_are_refused_up_front(capsys, tmp_path: Path, no_model, argv, expected):
    assert expected in bench_error(capsys, argv, tmp_path)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_a_gpu(capsys, tmp_path: Path, no_model):
    assert "--device cuda: no CUDA device here" in bench_error(
        capsys, ["--device", "cuda"], tmp_path
    )


@pytest.mark.parametrize("argv", [["--steps", "0"], ["--heads", "3"], ["--vocab", "2"]])
def test_peer_options_are_checked_before_trl(capsys, tmp_path: Path, argv):
    err = bench_error(capsys, ["--peer", *argv], tmp_path)
    assert argv[0] in err


def test_memory_sweep_chunked_head_stays_flat():
    """4x the vocabulary: full logits grow ~4x, the chunked head by far less (its chunk of
    16 rows is small next to the weight gradient it adds into)."""
    rows = memory_sweep(
        [512, 2048], hidden=16, tokens=256, chunk_size=16, chunk_elements=2**14, device="cpu"
    )
    small, large = rows
    assert large["full_logits_mib"] > 3 * small["full_logits_mib"]
    assert large["chunked_mib"] < large["full_logits_mib"] / 4
