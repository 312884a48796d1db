"""`pairopt bench` on a tiny profile and a tiny model: it runs, writes JSON, text and PNG."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pairopt import bench
from pairopt.bench_measure import memory_sweep
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
    assert bench.ideal_speedup([pair, pair]) == pytest.approx(1.5)


def test_shipped_profiles_are_the_papers_six():
    profiles = bench.load_profiles()
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
        assert list(modes) == list(bench.MODES)
        assert prof["best_baseline"] in bench.BASELINES
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
    assert bench.main([*argv, "--out", str(out), *TINY_MODEL]) == 0
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


def test_memory_sweep_chunked_head_stays_flat():
    """4x the vocabulary: full logits grow ~4x, the chunked head by far less (its chunk of
    16 rows is small next to the weight gradient it adds into)."""
    rows = memory_sweep(
        [512, 2048], hidden=16, tokens=256, chunk_size=16, chunk_elements=2**14, device="cpu"
    )
    small, large = rows
    assert large["full_logits_mib"] > 3 * small["full_logits_mib"]
    assert large["chunked_mib"] < large["full_logits_mib"] / 4
