"""The row format of a dataset (standard, conversational, implicit prompt, ranked), detected
from its columns."""

from __future__ import annotations

from dataclasses import dataclass

import datasets

from pairopt.data.config import DataConfig
from pairopt.errors import PairoptError


@dataclass(frozen=True)
class DataFormat:
    """Resolved format: where the prompt comes from and whether values are text or messages."""

    messages: bool  # values are lists of {role, content} (rendered with the chat template)
    implicit: bool  # no prompt column: the shared beginning of chosen/rejected is the prompt
    ranked: bool = False  # a prompt with k scored responses (pairopt.data.ranked_rows)

    @property
    def name(self) -> str:
        if self.ranked:
            return "ranked (messages)" if self.messages else "ranked (text)"
        if self.implicit:
            return "implicit (messages)" if self.messages else "implicit (text)"
        return "conversational" if self.messages else "standard"


def _missing_column(
    where: str, split: str, column: str, columns: list[str], setting: str
) -> PairoptError:
    hint = (
        " If chosen and rejected hold whole conversations, set format: implicit."
        if setting == "prompt_column"
        else ""
    )
    return PairoptError(
        f"Split {split!r} of {where} has no column {column!r} (columns present: "
        f"{', '.join(columns)}). Set {setting} to the column that holds it.{hint}"
    )


def detect_format(ds: datasets.Dataset, cfg: DataConfig, where: str, split: str) -> DataFormat:
    columns = ds.column_names
    pairwise = cfg.chosen_column in columns and cfg.rejected_column in columns
    if cfg.format == "ranked" or (
        cfg.format == "auto" and not pairwise and cfg.responses_column in columns
    ):
        return detect_ranked(ds, cfg, where, split)
    for column, setting in (
        (cfg.chosen_column, "chosen_column"),
        (cfg.rejected_column, "rejected_column"),
    ):
        if column not in columns:
            raise _missing_column(where, split, column, columns, setting)
    implicit = cfg.format == "implicit" or (
        cfg.format == "auto" and cfg.prompt_column not in columns
    )
    if not implicit and cfg.prompt_column not in columns:
        raise _missing_column(where, split, cfg.prompt_column, columns, "prompt_column")
    if cfg.format in ("standard", "conversational"):
        return DataFormat(messages=cfg.format == "conversational", implicit=False)
    # Sniff the first non-null chosen value; mixed rows are caught per row later.
    sample = ds.select(range(min(len(ds), 100)))[cfg.chosen_column]
    for index, value in enumerate(sample):
        if isinstance(value, str):
            return DataFormat(messages=False, implicit=implicit)
        if isinstance(value, list):
            return DataFormat(messages=True, implicit=implicit)
        if value is not None:
            raise PairoptError(
                f"Row {index} of split {split!r} of {where}: column {cfg.chosen_column!r} holds "
                f"{type(value).__name__}; expected a string or a list of {{role, content}} messages. "
                "Set chosen_column to the right column."
            )
    return DataFormat(messages=False, implicit=implicit)  # all null: every row reports wrong_type


def detect_ranked(ds: datasets.Dataset, cfg: DataConfig, where: str, split: str) -> DataFormat:
    """Ranked rows: the prompt, responses (and scores) columns exist; text or messages is read
    from the prompt (a string, or a list of {role, content} messages)."""
    columns = ds.column_names
    needed = [(cfg.prompt_column, "prompt_column"), (cfg.responses_column, "responses_column")]
    if cfg.score_key is None:
        needed.append((cfg.scores_column, "scores_column"))
    for column, setting in needed:
        if column not in columns:
            raise _missing_column(where, split, column, columns, setting)
    for value in ds.select(range(min(len(ds), 100)))[cfg.prompt_column]:
        if isinstance(value, list):
            return DataFormat(messages=True, implicit=False, ranked=True)
        if isinstance(value, str):
            break
    return DataFormat(messages=False, implicit=False, ranked=True)  # wrong types: per row
