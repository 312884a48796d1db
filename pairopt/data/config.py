"""The data section of a training config: where the pairs come from and how they become ids.

Light (pydantic only, no `datasets`): the config schema imports it, and a bad value fails
before anything loads.
"""

from __future__ import annotations

from typing import Literal

import pydantic
from pydantic import Field


class DataConfig(pydantic.BaseModel):
    """Where the preference pairs come from and how they become token ids."""

    model_config = pydantic.ConfigDict(extra="forbid", frozen=True)

    dataset: str = Field(
        "builtin:tiny-prefs",
        min_length=1,
        description="Hub dataset id, local file (.json/.jsonl/.parquet/.csv), local folder, or "
        "builtin:<name> for a dataset shipped with pairopt.",
    )
    subset: str | None = Field(
        None, description="Configuration (subset) name of a hub dataset, e.g. 'default'."
    )
    revision: str | None = Field(None, description="Hub dataset revision (branch, tag or commit).")
    train_split: str = Field("train", min_length=1, description="Split to train on.")
    eval_split: str | None = Field(
        "test",
        description="Split with held-out pairs; if the dataset has no such split, eval_fraction "
        "of train is held out instead. None: never read an eval split.",
    )
    eval_fraction: float = Field(
        0.0,
        ge=0.0,
        lt=1.0,
        description="Fraction of train held out for evaluation (seeded) when the eval split is "
        "missing; 0 means no evaluation set in that case.",
    )
    format: Literal["auto", "standard", "conversational", "implicit"] = Field(
        "auto",
        description="standard: prompt/chosen/rejected strings; conversational: lists of "
        "{role, content} messages rendered with the chat template; implicit: no prompt column, "
        "the shared beginning of chosen and rejected is the prompt; auto: detect from the data.",
    )
    prompt_column: str = Field("prompt", min_length=1, description="Column holding the prompt.")
    chosen_column: str = Field(
        "chosen", min_length=1, description="Column holding the preferred response."
    )
    rejected_column: str = Field(
        "rejected", min_length=1, description="Column holding the dispreferred response."
    )
    max_length: int | None = Field(
        None,
        ge=2,
        description="Most tokens in prompt + one response; each response is cut to fit. None: no limit.",
    )
    max_prompt_length: int | None = Field(
        None, ge=1, description="Most prompt tokens; longer prompts are cut. None: no limit."
    )
    max_completion_length: int | None = Field(
        None, ge=1, description="Most tokens per response; longer ones are cut. None: no limit."
    )
    prompt_truncation: Literal["keep_end", "keep_start"] = Field(
        "keep_end",
        description="Which part of a too-long prompt to keep: its end (nearest the response; "
        "a leading BOS is kept too) or its start.",
    )
    on_bad_row: Literal["error", "skip"] = Field(
        "error",
        description="A bad row (wrong type, empty response, chosen == rejected, empty prompt): "
        "fail naming the row, or skip it and count it in the data report.",
    )
    max_samples: int | None = Field(
        None, ge=1, description="Use only the first N rows of the train split. None: all."
    )
    max_eval_samples: int | None = Field(
        None, ge=1, description="Use only the first N rows of the eval split. None: all."
    )
    num_proc: int | None = Field(
        None, ge=1, description="Processes for tokenisation (datasets map). None: this one."
    )
    cache_dir: str | None = Field(
        None, description="datasets cache folder. None: the datasets default (HF_DATASETS_CACHE)."
    )

    @pydantic.model_validator(mode="after")
    def _check_lengths_and_columns(self) -> DataConfig:
        if (
            self.max_length is not None
            and self.max_prompt_length is not None
            and self.max_prompt_length >= self.max_length
        ):
            raise ValueError(
                f"max_prompt_length ({self.max_prompt_length}) must be < max_length "
                f"({self.max_length}), or every long prompt leaves no room for a response"
            )
        columns = [self.prompt_column, self.chosen_column, self.rejected_column]
        if len(set(columns)) != 3:
            raise ValueError(f"prompt/chosen/rejected columns must differ, got {columns}")
        return self
