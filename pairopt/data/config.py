"""The data section of a training config: where the pairs come from and how they become ids.

Light (pydantic only, no `datasets`): the config schema imports it, and a bad value fails
before anything loads.
"""

from __future__ import annotations

from typing import Literal

import pydantic
from pydantic import Field


class DataConfig(pydantic.BaseModel):
    """Where the preference pairs (or ranked responses) come from and how they become token ids."""

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
    format: Literal["auto", "standard", "conversational", "implicit", "ranked"] = Field(
        "auto",
        description="standard: prompt/chosen/rejected strings; conversational: lists of "
        "{role, content} messages rendered with the chat template; implicit: no prompt column, "
        "the shared beginning of chosen and rejected is the prompt; ranked: a prompt with k "
        "responses and their scores (responses_column, scores_column); auto: detect from the "
        "data (chosen/rejected columns: pairwise, else a responses column: ranked).",
    )
    prompt_column: str = Field("prompt", min_length=1, description="Column holding the prompt.")
    chosen_column: str = Field(
        "chosen", min_length=1, description="Column holding the preferred response."
    )
    rejected_column: str = Field(
        "rejected", min_length=1, description="Column holding the dispreferred response."
    )
    responses_column: str = Field(
        "responses",
        min_length=1,
        description="Ranked format: column holding the list of k responses (strings, message "
        "lists, or objects with response_key), e.g. all_generated_responses (on-policy data).",
    )
    scores_column: str = Field(
        "scores",
        min_length=1,
        description="Ranked format: column holding the k scores (or ranks, see score_order) of "
        "the responses, e.g. all_rm_scores. Not read when score_key is set.",
    )
    response_key: str | None = Field(
        None,
        min_length=1,
        description="Ranked format, responses that are objects: the key holding the response, "
        "e.g. response (UltraFeedback completions) or answer (Nectar answers).",
    )
    score_key: str | None = Field(
        None,
        min_length=1,
        description="Ranked format, responses that are objects: the key holding the score, e.g. "
        "overall_score (UltraFeedback) or rank (Nectar); scores_column is then not read.",
    )
    score_order: Literal["higher_is_better", "lower_is_better"] = Field(
        "higher_is_better",
        description="Ranked format: whether a higher score is better (reward-model scores, "
        "ratings) or a lower one (ranks, 1 = best, e.g. Nectar).",
    )
    pairs: Literal["best_worst", "all", "best_vs_rest"] = Field(
        "best_worst",
        description="Ranked format: the pairs a pair loss trains on per prompt: best_worst (the "
        "best against the worst response, one pair), all (every two responses whose scores "
        "differ), best_vs_rest (the best against each other one). Tied scores never form a pair.",
    )
    min_score_gap: float = Field(
        0.0,
        ge=0.0,
        allow_inf_nan=False,
        description="Ranked format: a pair needs scores at least this far apart (and never "
        "equal); a prompt left with no pair is dropped and counted.",
    )
    group_by_prompt: bool = Field(
        True,
        description="Pairwise rows with the same tokenised prompt become one group: the prompt "
        "is computed once for all their responses, identical responses once. Rows with a "
        "prompt of their own are unchanged.",
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
        description="A bad row (wrong type, empty or whitespace prompt or response, chosen == "
        "rejected also after truncation, unknown message role, a response not ending with an "
        "assistant turn, prompt + response longer than the model's context without max_length): "
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
        ranked = [self.prompt_column, self.responses_column]
        if self.score_key is None:
            ranked.append(self.scores_column)
        if len(set(ranked)) != len(ranked):
            raise ValueError(f"prompt/responses/scores columns must differ, got {ranked}")
        if self.score_key is not None and self.response_key is None:
            raise ValueError(
                "score_key reads the score from response objects: set response_key too (the "
                "key of the response in the same objects)"
            )
        return self
