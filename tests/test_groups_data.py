"""Many responses per prompt in the data layer: ranked rows in the common shapes, pairs picked
from scores, pairwise rows grouped by prompt, the report, batches of groups, the shipped
tiny-prefs-groups. Files are written into tmp_path; nothing touches the network.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import datasets
import pydantic
import pytest
from data_fixtures import write_jsonl

from pairopt.data.batch import rows_to_batch
from pairopt.data.config import DataConfig
from pairopt.data.groups import group_pairwise, make_groups, pick_pairs, select_pairs
from pairopt.data.load import PreferenceData, load_preference_data
from pairopt.errors import PairoptError
from pairopt.sources import resolve_builtin

pytestmark = pytest.mark.usefixtures("quiet_datasets")


def load(path: Path, tok: Any, all_responses: bool = False, **kw: Any) -> PreferenceData:
    cfg = DataConfig(dataset=str(path), cache_dir=str(path.parent / "cache"), **kw)
    return make_groups(load_preference_data(cfg, tok), cfg, all_responses=all_responses)


def ids(tok: Any, text: str, special: bool = False) -> list[int]:
    return tok(text, add_special_tokens=special)["input_ids"]


def response(tok: Any, text: str) -> list[int]:
    return [*ids(tok, text), tok.eos_token_id]


# --- pairs from scores -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "gap", "expected"),
    [
        # scores (5, 2, 9, 2, 9): the first best is 2, the last worst is 3
        ("best_worst", 0.0, [(2, 3)]),
        ("best_vs_rest", 0.0, [(2, 0), (2, 1), (2, 3)]),  # 4 ties 2: no pair
        # every two whose scores differ, the higher first; (1, 3) and (2, 4) tie
        ("all", 0.0, [(0, 1), (2, 0), (0, 3), (4, 0), (2, 1), (4, 1), (2, 3), (4, 3)]),
        ("all", 4.0, [(2, 0), (4, 0), (2, 1), (4, 1), (2, 3), (4, 3)]),  # 5 - 2 = 3 < 4
        ("best_worst", 7.5, []),  # 9 - 2 = 7 < 7.5: no pair at all
    ],
)
def test_pick_pairs(mode: str, gap: float, expected: list[tuple[int, int]]) -> None:
    assert pick_pairs([5.0, 2.0, 9.0, 2.0, 9.0], mode, gap) == expected


def test_all_tied_scores_give_no_pair() -> None:
    for mode in ("best_worst", "all", "best_vs_rest"):
        assert pick_pairs([3.0, 3.0, 3.0], mode, 0.0) == []


def ranked_rows(rows: list[tuple[list[int], list[list[int]], list[float]]]) -> datasets.Dataset:
    return datasets.Dataset.from_dict(
        {
            "prompt_ids": [r[0] for r in rows],
            "responses_ids": [r[1] for r in rows],
            "scores": [r[2] for r in rows],
        }
    )


def test_select_pairs_dedupes_prunes_and_drops() -> None:
    """Row 0: responses A, B, A (again), C scored 1, 3, 5, 2: the repeated A is kept once with
    its first score (1); best_worst pairs B (3) > A (1) and computes only those two. Row 1 ties
    everywhere: dropped. With all_responses, C stays (a listwise loss ranks it)."""
    A, B, C = [7, 2], [8, 8, 2], [9, 2]
    rows = ranked_rows([([1, 5], [A, B, A, C], [1.0, 3.0, 5.0, 2.0]), ([1, 6], [A, B], [2.0, 2.0])])
    groups, stats = select_pairs(rows, "best_worst", 0.0, all_responses=False)
    assert len(groups) == 1
    assert groups[0]["responses_ids"] == [A, B] and groups[0]["scores"] == [1.0, 3.0]
    assert (groups[0]["chosen_idx"], groups[0]["rejected_idx"]) == ([1], [0])
    assert (stats.duplicates, stats.no_pair, stats.unpaired_dropped) == (1, 1, 1)
    kept, _ = select_pairs(rows, "best_worst", 0.0, all_responses=True)
    assert kept[0]["responses_ids"] == [A, B, C] and kept[0]["scores"] == [1.0, 3.0, 2.0]
    assert (kept[0]["chosen_idx"], kept[0]["rejected_idx"]) == ([1], [0])


def test_group_pairwise_by_prompt() -> None:
    """Rows 0, 2, 3 share prompt [1, 5]; row 2 repeats row 0's chosen (kept once) and row 3
    repeats row 0 entirely (two pairs, as two rows). Row 1 has its own prompt: unchanged."""
    rows = datasets.Dataset.from_dict(
        {
            "prompt_ids": [[1, 5], [1, 6], [1, 5], [1, 5]],
            "chosen_ids": [[7, 2], [8, 2], [7, 2], [7, 2]],
            "rejected_ids": [[9, 2], [2], [4, 2], [9, 2]],
        }
    )
    groups, stats = group_pairwise(rows, by_prompt=True)
    assert len(groups) == 2
    first, second = groups[0], groups[1]
    assert first["responses_ids"] == [[7, 2], [9, 2], [4, 2]]
    assert (first["chosen_idx"], first["rejected_idx"]) == ([0, 0, 0], [1, 2, 1])
    assert first["rows"] == [0, 2, 3] and first["scores"] == []
    assert second["responses_ids"] == [[8, 2], [2]] and second["rows"] == [1]
    # tokens: grouped 2 + (2 + 2 + 2) + 2 + (2 + 1) = 13; pair-shared (2 + 4) x 3 + (2 + 3) = 23
    assert (stats.groups, stats.responses, stats.pairs, stats.duplicates) == (2, 5, 4, 3)
    assert (stats.grouped, stats.pair_shared, stats.unshared) == (13, 23, 31)
    ungrouped, _ = group_pairwise(rows, by_prompt=False)
    assert len(ungrouped) == 4 and ungrouped[3]["responses_ids"] == [[7, 2], [9, 2]]


def test_rows_to_batch_indexes_responses_flat() -> None:
    rows = {
        "prompt_ids": [[1, 5], [1, 6]],
        "responses_ids": [[[7, 2], [9, 2], [4, 2]], [[8, 2], [2]]],
        "scores": [[3.0, 1.0, 2.0], [1.0, 0.0]],
        "chosen_idx": [[0, 2], [0]],
        "rejected_idx": [[1, 1], [1]],
        "rows": [[0], [1]],
    }
    batch = rows_to_batch(rows)
    assert batch.chosen.tolist() == [0, 2, 3] and batch.rejected.tolist() == [1, 1, 4]
    assert batch.scores.tolist() == [[3.0, 1.0, 2.0], [1.0, 0.0, 0.0]] and batch.scored
    assert batch.tokens() == (2 + 6) + (2 + 3) and batch.num_responses == 5


# --- ranked rows in the common shapes --------------------------------------------------------

PROMPT = "Tell me about the garden."
ANSWERS = [" The roses are green.", " Whatever.", " It has soil.", " The roses are green."]


def test_on_policy_columns_with_format_ranked(tmp_path: Path, tok: Any) -> None:
    """On-policy sets carry chosen/rejected too, so format: ranked picks the k responses."""
    row = {
        "prompt": PROMPT,
        "all_generated_responses": ANSWERS[:3],
        "all_rm_scores": [0.8, -1.5, 0.1],
        "chosen": ANSWERS[0],
        "rejected": ANSWERS[1],
    }
    path = write_jsonl(tmp_path / "onpolicy.jsonl", [row])
    data = load(
        path,
        tok,
        format="ranked",
        responses_column="all_generated_responses",
        scores_column="all_rm_scores",
        pairs="all",
    )
    group = data.train[0]
    assert group["prompt_ids"] == ids(tok, PROMPT, special=True)
    assert group["responses_ids"] == [response(tok, a) for a in ANSWERS[:3]]
    assert group["scores"] == [0.8, -1.5, 0.1]
    # all: 0 > 1, 0 > 2, 2 > 1
    assert list(zip(group["chosen_idx"], group["rejected_idx"], strict=True)) == [
        (0, 1),
        (0, 2),
        (2, 1),
    ]
    assert "ranked (text)" in str(data.report) and "pairs=all: 3 pairs" in str(data.report)


def test_ultrafeedback_completions_by_keys(tmp_path: Path, tok: Any) -> None:
    row = {
        "instruction": PROMPT,
        "completions": [
            {"model": "a", "response": ANSWERS[0], "overall_score": 8.5},
            {"model": "b", "response": ANSWERS[1], "overall_score": 2.0},
            {"model": "c", "response": ANSWERS[2], "overall_score": 6.0},
        ],
    }
    path = write_jsonl(tmp_path / "uf.jsonl", [row])
    data = load(
        path,
        tok,
        prompt_column="instruction",
        responses_column="completions",
        response_key="response",
        score_key="overall_score",
    )  # format auto: no chosen/rejected, a responses column -> ranked
    group = data.train[0]
    assert group["scores"] == [8.5, 2.0]  # best_worst: the other response is not computed
    assert group["responses_ids"] == [response(tok, ANSWERS[0]), response(tok, ANSWERS[1])]
    assert (group["chosen_idx"], group["rejected_idx"]) == ([0], [1])


def test_nectar_ranks_lower_is_better(tmp_path: Path, tok: Any) -> None:
    """Ranks 1 (best) .. 3 are stored negated, so "higher is better" holds downstream; the
    repeated answer (rank 4) is the same tokens as rank 1's and is kept once."""
    row = {
        "prompt": PROMPT,
        "answers": [
            {"answer": a, "model": "m", "rank": r}
            for a, r in zip(ANSWERS, [1, 3, 2, 4], strict=True)
        ],
    }
    path = write_jsonl(tmp_path / "nectar.jsonl", [row])
    data = load(
        path,
        tok,
        all_responses=True,
        responses_column="answers",
        response_key="answer",
        score_key="rank",
        score_order="lower_is_better",
        pairs="best_vs_rest",
    )
    group = data.train[0]
    assert group["scores"] == [-1.0, -3.0, -2.0]
    assert (group["chosen_idx"], group["rejected_idx"]) == ([0, 0], [1, 2])
    assert "1 repeated responses counted once" in str(data.report)


def test_conversational_ranked_rows(tmp_path: Path, tok: Any) -> None:
    """A message-list prompt; responses as strings are assistant messages, rendered with the
    chat template exactly like conversational pairs."""
    messages = [{"role": "user", "content": "Hi there."}]
    row = {"prompt": messages, "responses": ["Hello.", "Go away."], "scores": [1, 0]}
    path = write_jsonl(tmp_path / "chat.jsonl", [row])
    data = load(path, tok)
    group = data.train[0]
    prompt_text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert group["prompt_ids"] == ids(tok, prompt_text)  # the template's BOS, not a second one
    assert group["responses_ids"][0] == ids(tok, "Hello.</s>")
    assert "ranked (messages)" in str(data.report)


@pytest.mark.parametrize(
    ("row", "reason"),
    [
        ({"prompt": PROMPT, "responses": [" A."], "scores": [1]}, "too_few_responses"),
        ({"prompt": PROMPT, "responses": [" A.", " B."], "scores": [1]}, "bad_score"),
        ({"prompt": PROMPT, "responses": [" A.", " B."], "scores": [1, None]}, "bad_score"),
        ({"prompt": PROMPT, "responses": [" A.", "  "], "scores": [1, 2]}, "empty_response"),
        ({"prompt": PROMPT, "responses": " A.", "scores": [1, 2]}, "wrong_type"),
    ],
)
def test_bad_ranked_rows_name_the_row_or_are_skipped(
    tmp_path: Path, tok: Any, row: dict[str, Any], reason: str
) -> None:
    good = {"prompt": PROMPT, "responses": [" A.", " B."], "scores": [2, 1]}
    path = write_jsonl(tmp_path / "bad.jsonl", [good, row])
    with pytest.raises(PairoptError, match=rf"Row 1 of split 'train'.*\[{reason}\]"):
        load(path, tok)
    data = load(path, tok, on_bad_row="skip")
    assert len(data.train) == 1 and data.report.skipped == {reason: 1}


def test_no_pair_left_is_one_error(tmp_path: Path, tok: Any) -> None:
    rows = [{"prompt": PROMPT, "responses": [" A.", " B."], "scores": [1, 1.5]}]
    path = write_jsonl(tmp_path / "close.jsonl", rows)
    with pytest.raises(PairoptError, match=r"No training pairs are left.*min_score_gap=1.0"):
        load(path, tok, min_score_gap=1.0)


def test_ranked_truncation_cuts_each_response(tmp_path: Path, tok: Any) -> None:
    long = " The roses are green and the soil is dark and the seeds are small."
    row = {"prompt": PROMPT, "responses": [long, " No."], "scores": [2, 1]}
    path = write_jsonl(tmp_path / "t.jsonl", [row])
    data = load(path, tok, max_completion_length=4)
    assert data.train[0]["responses_ids"][0] == response(tok, long)[:4]
    assert data.report.splits[0].responses_truncated == 1


def test_ranked_config_rules() -> None:
    with pytest.raises(pydantic.ValidationError, match="set response_key too"):
        DataConfig(score_key="rank")
    with pytest.raises(pydantic.ValidationError, match="columns must differ"):
        DataConfig(responses_column="prompt")
    with pytest.raises(pydantic.ValidationError):
        DataConfig(pairs="some")  # type: ignore[arg-type]
    with pytest.raises(pydantic.ValidationError):
        DataConfig(min_score_gap=-1.0)


# --- the shipped multi-response data ---------------------------------------------------------


def test_shipped_groups_dataset(tmp_path: Path, tok: Any) -> None:
    """builtin:tiny-prefs-groups: 1,000 train and 200 test prompts with 3 to 6 scored responses;
    no test prompt occurs in train; no group is all ties."""
    cfg = DataConfig(dataset="builtin:tiny-prefs-groups", cache_dir=str(tmp_path), pairs="all")
    data = make_groups(load_preference_data(cfg, tok), cfg, all_responses=True)
    assert data.ranked and data.eval is not None
    assert (len(data.train), len(data.eval)) == (1000, 200)
    sizes = {len(r) for r in data.train["responses_ids"]}
    assert sizes == {3, 4, 5, 6}
    stats = data.report.splits[0].groups
    assert stats is not None and stats.no_pair == 0 and stats.pairs > 5 * stats.groups
    shipped = Path(resolve_builtin("builtin:tiny-prefs-groups"))
    train_prompts, test_prompts = (
        {json.loads(line)["prompt"] for line in (shipped / name).read_text().splitlines()}
        for name in ("train.jsonl", "test.jsonl")
    )
    assert not test_prompts & train_prompts and len(train_prompts) == 1000
    batch = rows_to_batch(data.train[:4])
    sizes = [len(g.responses) for g in batch.groups]
    assert batch.scores.shape == (4, max(sizes))
    assert batch.num_pairs == sum(len(c) for c in data.train[:4]["chosen_idx"])
