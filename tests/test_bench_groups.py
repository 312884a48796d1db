"""`pairopt bench --group-profiles`: k responses per prompt, group-shared vs pair-shared vs
unshared on the same pairs, with the token ideal; and the shipped on-policy profile."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pairopt.bench import data as bench_data
from pairopt.bench.groups import GROUP_MODES, GroupStep, draw_group_steps, group_pairs
from pairopt.bench.run import BenchOptions
from pairopt.cli import main as cli_main
from pairopt.pairs import PreferencePair, ResponseGroup

TINY_MODEL = ["--hidden", "32", "--layers", "1", "--heads", "2", "--kv-heads", "2"]
TINY_MODEL += ["--intermediate", "64", "--vocab", "64", "--threads", "1"]


def test_token_ideal_arithmetic():
    """P = 4, k = 3 responses of 2 tokens, all 3 pairs: group-shared 4 + 3·2 = 10 tokens;
    pair-shared 3·(4 + 2 + 2) = 24; unshared 3·(2·4 + 2 + 2) = 36: ideals 3.6 and 2.4."""
    prompt, (a, b, c) = [1] * 4, ([2] * 2, [3] * 2, [4] * 2)
    step = GroupStep(
        [ResponseGroup(prompt, [a, b, c])],
        chosen=None,  # type: ignore[arg-type]  # not needed for token counts
        rejected=None,  # type: ignore[arg-type]
        pairs=[
            PreferencePair(prompt, a, b),
            PreferencePair(prompt, a, c),
            PreferencePair(prompt, b, c),
        ],
    )
    assert [step.tokens(m) for m in GROUP_MODES] == [10, 24, 36]


def test_group_pairs_follow_the_scores():
    assert group_pairs([2, 0, 1], "best_worst") == [(0, 1)]
    assert group_pairs([2, 0, 1], "all") == [(0, 1), (0, 2), (2, 1)]


def test_drawn_steps_index_the_pairs_responses():
    """Every pair's chosen and rejected are the responses its flat indices point at; with
    best_worst only those two responses of a prompt are computed."""
    profile = {"prompt_tokens": 6, "completion_tokens": 4, "responses": 4}
    opts = BenchOptions(steps=1, warmup=0)
    for how, per_prompt, computed in (("all", 6, 4), ("best_worst", 1, 2)):
        (step,) = draw_group_steps(profile, how, opts, groups_per_step=2, vocab=50, seed=3)
        flat = [r for g in step.groups for r in g.responses]
        assert len(step.pairs) == 2 * per_prompt
        assert [len(g.responses) for g in step.groups] == [computed, computed]
        for pair, c, r in zip(
            step.pairs, step.chosen.tolist(), step.rejected.tolist(), strict=True
        ):
            assert (flat[c], flat[r]) == (pair.chosen, pair.rejected)


def test_shipped_group_profile_states_its_source():
    (name, profile), *_ = bench_data.load_group_profiles().items()
    assert name == "ultrafeedback_onpolicy" and profile["responses"] == 5
    assert "llama3-ultrafeedback-armorm" in profile["source"]
    P, C, k = profile["prompt_tokens"], profile["completion_tokens"], profile["responses"]
    pairs = k * (k - 1) // 2
    assert profile["ideal_speedup_all"] == pytest.approx(
        pairs * (2 * P + 2 * C) / (P + k * C), abs=1e-3
    )
    assert profile["ideal_speedup_best_worst"] == pytest.approx(
        (2 * P + 2 * C) / (P + 2 * C), abs=1e-3
    )


def test_bench_group_profiles_command(tmp_path: Path):
    profiles = {
        "profiles": [{"name": "pairs", "prompt_tokens": 6, "completion_tokens": 3}],
        "group_profiles": [
            {"name": "tiny_k4", "prompt_tokens": 10, "completion_tokens": 4, "responses": 4}
        ],
    }
    path = tmp_path / "profiles.json"
    path.write_text(json.dumps(profiles))
    out = tmp_path / "out"
    argv = ["bench", "--profiles-file", str(path), "--group-profiles", "tiny_k4"]
    argv += ["--steps", "2", "--warmup", "1", "--no-png", "--out", str(out), *TINY_MODEL]
    assert cli_main(argv) == 0
    report = json.loads((out / "bench.json").read_text())
    assert report["profiles"] == []  # --group-profiles alone: no pair profile
    results = report["group_profiles"]
    assert [(r["profile"], r["pairs"]) for r in results] == [
        ("tiny_k4", "all"),
        ("tiny_k4", "best_worst"),
    ]
    for res in results:
        assert list(res["modes"]) == list(GROUP_MODES)
        group = res["modes"]["group-shared"]
        assert res["fraction_of_ideal"] == pytest.approx(
            group["speedup"]["unshared"] / res["ideal_vs_unshared"]
        )
        assert all(len(m["step_s_all"]) == 2 for m in res["modes"].values())
    everything, best_worst = results
    assert everything["pairs_per_step"] == 2 * 6 and best_worst["pairs_per_step"] == 2
    assert everything["ideal_vs_unshared"] > 3 > best_worst["ideal_vs_unshared"] > 1
    assert "group-shared vs unshared" in (out / "bench.txt").read_text()


def test_bad_group_options(capsys, tmp_path: Path):
    assert cli_main(["bench", "--group-profiles", "nope", "--out", str(tmp_path)]) == 2
    assert "unknown nope" in capsys.readouterr().err
    argv = ["bench", "--group-profiles", "all", "--group-pairs", "some", "--out", str(tmp_path)]
    assert cli_main(argv) == 2
    assert "--group-pairs 'some'" in capsys.readouterr().err
    assert cli_main(["bench", "--profiles", "none", "--out", str(tmp_path)]) == 2
    assert "nothing to measure" in capsys.readouterr().err
    assert cli_main(["bench", "--peer", "--group-profile", "nope", "--vocab", "64"]) == 2
    assert "--group-profile 'nope'" in capsys.readouterr().err
