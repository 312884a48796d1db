"""Tokenised rows -> groups: one prompt, its distinct responses, and the pairs to train on.

Every split the trainer sees is a dataset of groups (`GROUP_FEATURES`), one row per group:

    prompt_ids     the prompt's token ids
    responses_ids  its k distinct responses (token ids), k >= 2
    scores         their scores, higher is better (ranked data; empty for pairwise data)
    chosen_idx     the pairs: chosen_idx[m] is preferred to rejected_idx[m] (indices into
    rejected_idx   responses_ids)
    rows           the rows of the split the group came from, counted among the rows kept
                   after bad ones were skipped (for messages)

Pairwise rows (`group_pairwise`): with `group_by_prompt`, rows whose tokenised prompts are
equal become one group; a response that occurs in several of them (the same token ids) is kept
once, and every row stays one pair (a repeated row is two pairs, as it was two rows). Groups
are in the order of their first row, so rows with a prompt of their own give exactly the rows
they were, in the same order. Without `group_by_prompt`, every row is a group of two.

Ranked rows (`select_pairs`): identical responses of a row are kept once (the first, with its
score); `pairs` picks the pairs by score: `best_worst` (the first best against the last worst),
`all` (every two whose scores differ), `best_vs_rest` (the first best against each other);
scores that tie, or differ by less than `min_score_gap`, never form a pair, and a row left with
no pair is dropped and counted. Unless `all_responses` (a listwise loss reads every response),
responses in no pair are dropped too: a pair loss would compute them for nothing.

Naive equivalent of a group: its pairs as separate rows (prompt, chosen, rejected), each
response computed once per pair it is in; `GroupStats` counts the tokens of both.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from itertools import combinations
from typing import Any

import datasets

from pairopt.data.config import DataConfig
from pairopt.data.load import PreferenceData
from pairopt.data.report import GroupStats
from pairopt.errors import PairoptError

GROUP_FEATURES = datasets.Features(
    {
        "prompt_ids": datasets.List(datasets.Value("int32")),
        "responses_ids": datasets.List(datasets.List(datasets.Value("int32"))),
        "scores": datasets.List(datasets.Value("float64")),
        "chosen_idx": datasets.List(datasets.Value("int32")),
        "rejected_idx": datasets.List(datasets.Value("int32")),
        "rows": datasets.List(datasets.Value("int64")),
    }
)
PAIR_MODES = ("best_worst", "all", "best_vs_rest")


Pairs = list[tuple[int, int]]  # (chosen, rejected) indices into a group's responses


def make_groups(data: PreferenceData, cfg: DataConfig, *, all_responses: bool) -> PreferenceData:
    """The train and eval rows as groups, with the counts in the data report.

    `all_responses`: keep the responses of ranked rows that are in no pair (a listwise loss
    reads them all); a pair loss would only compute them for nothing.
    """

    def convert(rows: datasets.Dataset) -> tuple[datasets.Dataset, GroupStats]:
        if data.ranked:
            return select_pairs(rows, cfg.pairs, cfg.min_score_gap, all_responses)
        return group_pairwise(rows, cfg.group_by_prompt)

    train, train_stats = convert(data.train)
    eval_ds, eval_stats = convert(data.eval) if data.eval is not None else (None, None)
    splits = list(data.report.splits)
    for i, split in enumerate(splits):
        stats = {"train": train_stats, "eval": eval_stats}.get(split.name)
        if stats is not None:
            splits[i] = dataclasses.replace(split, groups=stats)
    report = dataclasses.replace(data.report, splits=splits)
    if len(train) == 0:
        raise PairoptError(
            f"No training pairs are left: every prompt's scores tie (or differ by less than "
            f"data.min_score_gap={cfg.min_score_gap}). {report}"
        )
    return PreferenceData(train=train, eval=eval_ds, report=report, ranked=data.ranked)


class GroupBuilder:
    """Collects groups as columns (GROUP_FEATURES) and their statistics."""

    def __init__(self) -> None:
        self.columns: dict[str, list[Any]] = {name: [] for name in GROUP_FEATURES}
        self.stats = GroupStats()

    def add(
        self,
        prompt: Sequence[int],
        responses: Sequence[Sequence[int]],
        scores: Sequence[float],
        pairs: Pairs,
        rows: Sequence[int],
    ) -> None:
        for name, value in (
            ("prompt_ids", list(prompt)),
            ("responses_ids", [list(r) for r in responses]),
            ("scores", list(scores)),
            ("chosen_idx", [c for c, _ in pairs]),
            ("rejected_idx", [r for _, r in pairs]),
            ("rows", list(rows)),
        ):
            self.columns[name].append(value)
        self.stats.add(prompt, responses, pairs)

    def dataset(self) -> datasets.Dataset:
        return datasets.Dataset.from_dict(self.columns, features=GROUP_FEATURES)


def group_pairwise(
    tokenised: datasets.Dataset, by_prompt: bool
) -> tuple[datasets.Dataset, GroupStats]:
    """Pairwise rows (prompt_ids, chosen_ids, rejected_ids) -> groups; see the module docstring."""
    prompts, chosen, rejected = (tokenised[c] for c in ("prompt_ids", "chosen_ids", "rejected_ids"))
    order: dict[Any, int] = {}  # group key -> group number, in order of first row
    members: list[tuple[list[int], dict[tuple[int, ...], int], Pairs, list[int]]] = []
    duplicates = 0
    for row, (p, c, r) in enumerate(zip(prompts, chosen, rejected, strict=True)):
        key = tuple(p) if by_prompt else row
        if key not in order:
            order[key] = len(members)
            members.append((p, {}, [], []))
        _, responses, pairs, rows = members[order[key]]  # responses: ids -> index, in order
        for response in (tuple(c), tuple(r)):
            duplicates += response in responses
            responses.setdefault(response, len(responses))
        pairs.append((responses[tuple(c)], responses[tuple(r)]))
        rows.append(row)
    builder = GroupBuilder()
    for p, responses, pairs, rows in members:
        builder.add(p, list(responses), [], pairs, rows)
    builder.stats.rows, builder.stats.duplicates = len(prompts), duplicates
    return builder.dataset(), builder.stats


def pick_pairs(scores: Sequence[float], mode: str, min_gap: float) -> Pairs:
    """The pairs of one ranked group by `mode` (see the module docstring); ties never pair."""

    def apart(i: int, j: int) -> bool:
        return scores[i] > scores[j] and scores[i] - scores[j] >= min_gap

    k = len(scores)
    best = max(range(k), key=lambda i: (scores[i], -i))  # the first of the best
    if mode == "best_worst":
        worst = min(range(k), key=lambda i: (scores[i], -i))  # the last of the worst
        return [(best, worst)] if apart(best, worst) else []
    if mode == "best_vs_rest":
        return [(best, j) for j in range(k) if apart(best, j)]
    if mode == "all":
        out = []
        for i, j in combinations(range(k), 2):
            if apart(i, j):
                out.append((i, j))
            elif apart(j, i):
                out.append((j, i))
        return out
    raise ValueError(f"unknown pairs mode {mode!r}; choose from {', '.join(PAIR_MODES)}")


def select_pairs(
    tokenised: datasets.Dataset, mode: str, min_gap: float, all_responses: bool
) -> tuple[datasets.Dataset, GroupStats]:
    """Ranked rows (prompt_ids, responses_ids, scores) -> groups with their pairs."""
    builder = GroupBuilder()
    stats = builder.stats
    columns = (tokenised[c] for c in ("prompt_ids", "responses_ids", "scores"))
    for row, (prompt, responses, scores) in enumerate(zip(*columns, strict=True)):
        seen: dict[tuple[int, ...], int] = {}
        for j, response in enumerate(responses):
            seen.setdefault(tuple(response), j)
        keep = sorted(seen.values())
        stats.duplicates += len(responses) - len(keep)
        responses, scores = [responses[j] for j in keep], [scores[j] for j in keep]
        pairs = pick_pairs(scores, mode, min_gap)
        if not pairs:
            stats.no_pair += 1
            continue
        if not all_responses:
            used = sorted({i for pair in pairs for i in pair})
            stats.unpaired_dropped += len(responses) - len(used)
            renumber = {old: new for new, old in enumerate(used)}
            responses, scores = [responses[j] for j in used], [scores[j] for j in used]
            pairs = [(renumber[c], renumber[r]) for c, r in pairs]
        builder.add(prompt, responses, scores, pairs, [row])
    stats.rows, stats.pairs_mode = len(tokenised), mode
    return builder.dataset(), stats
