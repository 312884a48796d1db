"""Training on many responses per prompt (CPU, the 2-layer, 32-wide test Llama).

The central check: one optimiser step on ranked groups (every response computed once, each
pair's log-probs indexed out of them) equals one step on the same pairs written out as
pairwise rows and computed the classic way (unshared, every response again for each of its
pairs): the same loss and the same weights afterwards.
"""

from __future__ import annotations

import json
from itertools import combinations
from pathlib import Path
from typing import Any

import pytest
import torch
from train_fixtures import make_tiny_model_dir, params, tiny_config

from pairopt.errors import PairoptError
from pairopt.training.policy import load_model
from pairopt.training.trainer import train

STEP_TOL = {"rtol": 1e-5, "atol": 1e-6}  # one step, same numbers summed in another order
# SGD at lr 1 without clipping: the weights move by exactly the gradient, so this compares
# gradients (Adam's first step would turn a 1e-9 difference in a near-zero gradient into ~lr)
SGD = {"optimizer": "sgd", "lr": 1.0, "max_grad_norm": None}
GRAD_TOL = {"rtol": 1e-5, "atol": 1e-6}

TOPICS = ["garden", "ocean", "forest", "city", "kitchen", "library"]
GOOD = [" The {t} is calm.", " I like the {t}.", " Visit the {t} soon."]
BAD = [" Whatever.", " Go away.", " Not the {t}."]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.set_num_threads(1)
    return make_tiny_model_dir(tmp_path_factory.mktemp("models"))


def ranked_rows() -> list[dict[str, Any]]:
    """Six prompts with 3, 4, 3, 4, 3, 4 responses; scores with one tie in the 4-groups."""
    rows = []
    for i, t in enumerate(TOPICS):
        responses = [g.format(t=t) for g in GOOD[: 2 + i % 2]] + [BAD[i % 3].format(t=t)]
        scores = [3.0, 2.0, 0.0] if len(responses) == 3 else [3.0, 2.0, 2.0, 0.0]
        rows.append({"prompt": f"Tell me about the {t}.", "responses": responses, "scores": scores})
    return rows


def as_pairs(rows: list[dict[str, Any]]) -> list[dict[str, str]]:
    """Every two responses whose scores differ, the better as chosen (data.pairs all)."""
    out = []
    for row in rows:
        for i, j in combinations(range(len(row["responses"])), 2):
            si, sj = row["scores"][i], row["scores"][j]
            if si != sj:
                c, r = (i, j) if si > sj else (j, i)
                out.append(
                    {
                        "prompt": row["prompt"],
                        "chosen": row["responses"][c],
                        "rejected": row["responses"][r],
                    }
                )
    return out


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def one_step(model_dir: Path, out: Path, dataset: str, **sections: Any):
    base = {
        "data": {"dataset": dataset, "eval_split": None, **sections.pop("data", {})},
        "optim": {"batch_size": 64, "max_steps": 1},
        "eval": {"at_end": False},
        "reference": {"strategy": "copy"},
    }
    for key, value in sections.items():
        base[key] = {**base.get(key, {}), **value}
    return train(tiny_config(model_dir, out, **base))


def test_a_step_on_groups_equals_the_step_on_the_pairs_unshared(
    model_dir: Path, tmp_path: Path
) -> None:
    rows = ranked_rows()
    pairs = as_pairs(rows)
    assert len(pairs) == 3 * 3 + 3 * 5  # per group of 3: 3 pairs; of 4 with one tie: 5
    grouped = one_step(
        model_dir,
        tmp_path / "grouped",
        write_jsonl(tmp_path / "ranked.jsonl", rows),
        data={"pairs": "all"},
        optim=SGD,
    )
    classic = one_step(
        model_dir,
        tmp_path / "classic",
        write_jsonl(tmp_path / "pairs.jsonl", pairs),
        data={"group_by_prompt": False},
        engine={"share_prefix": False},
        optim=SGD,
    )
    step_g, step_c = grouped.history[0], classic.history[0]
    for key in ("loss", "rewards/accuracies", "rewards/margins", "logps/chosen"):
        torch.testing.assert_close(step_g[key], step_c[key], **STEP_TOL, msg=key)
    after = params(grouped.policy)
    torch.testing.assert_close(after, params(classic.policy), **GRAD_TOL)
    cfg = tiny_config(model_dir, tmp_path / "unused")
    before = params(load_model(cfg.model, seed=cfg.optim.seed))
    # every parameter moved by far more than the tolerance: the comparison is not vacuous
    assert min(float((after[n] - before[n]).abs().max()) for n in before) > 1e-5


def test_pairwise_rows_grouped_by_prompt_train_the_same_pairs(
    model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The same pairwise file with and without group_by_prompt: one step, same loss; the
    report counts the prompts, the responses kept once, and the tokens saved."""
    path = write_jsonl(tmp_path / "pairs.jsonl", as_pairs(ranked_rows()))
    grouped = one_step(model_dir, tmp_path / "a", path)
    out = capsys.readouterr().out
    assert "24 rows -> 6 prompts, 21 responses, 24 pairs" in out
    assert "27 repeated responses counted once" in out
    assert "grouped vs" in out and "with one prompt per pair" in out
    plain = one_step(model_dir, tmp_path / "b", path, data={"group_by_prompt": False})
    torch.testing.assert_close(grouped.history[0]["loss"], plain.history[0]["loss"], **STEP_TOL)


def test_listwise_loss_trains_with_a_precomputed_per_response_reference(
    model_dir: Path, tmp_path: Path
) -> None:
    """plackett_luce on ranked data: precomputed reference (one value per response) gives the
    live reference's trajectory, and a second run reads the cache."""
    path = write_jsonl(tmp_path / "ranked.jsonl", ranked_rows())
    cache = {"strategy": "precompute", "cache_dir": str(tmp_path / "cache")}
    common = {"loss": {"name": "plackett_luce"}, "optim": {"batch_size": 2, "max_steps": 3}}
    live = one_step(model_dir, tmp_path / "live", path, **common)
    pre = one_step(model_dir, tmp_path / "pre", path, reference=cache, **common)
    again = one_step(model_dir, tmp_path / "again", path, reference=cache, **common)
    assert pre.reference_cache_hit is False and again.reference_cache_hit is True
    losses = [[step["loss"] for step in r.history] for r in (live, pre, again)]
    assert len(losses[0]) == 3
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-4, atol=1e-5)
    assert losses[2] == losses[1]
    # batch_size counts groups for a listwise loss: 6 groups / 2 per step = 3 steps per epoch
    assert live.history[0]["pairs_per_s"] > 0


def test_listwise_loss_on_pairwise_data_is_refused_before_the_model(
    model_dir: Path, tmp_path: Path
) -> None:
    path = write_jsonl(tmp_path / "pairs.jsonl", as_pairs(ranked_rows()))
    with pytest.raises(PairoptError, match=r"'plackett_luce' is listwise.*is pairwise"):
        one_step(model_dir, tmp_path / "o", path, loss={"name": "plackett_luce"})
    assert not (tmp_path / "o").exists()


def test_a_group_over_the_row_budget_names_its_row(model_dir: Path, tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "ranked.jsonl", ranked_rows())
    with pytest.raises(PairoptError, match=r"train row \d+ needs \d+ tokens in one row \(prompt "):
        one_step(
            model_dir,
            tmp_path / "o",
            path,
            data={"pairs": "all"},
            engine={"max_tokens_per_row": 24},
        )
