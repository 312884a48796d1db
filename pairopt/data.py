"""Preference data in, token ids out: any TRL-style paired dataset, tokenised as docs/configuration.md (Data) says.

    load_preference_data(DataConfig(dataset="my/prefs.jsonl"), tokenizer) -> PreferenceData
    rows_to_pairs(batch) -> list[PreferencePair]        # a datasets batch, ready for the engine

Sources: a hub id, a local file (.json/.jsonl/.parquet/.csv), a local folder (splits inferred
from file names by `datasets`), or `builtin:<name>` (shipped under pairopt/assets/).

Formats (the ones TRL users bring), detected from the columns unless `format` says otherwise:
- standard: `prompt`, `chosen`, `rejected` strings;
- conversational: the same columns as lists of `{"role", "content"}` messages, rendered with the
  tokenizer's chat template; the prompt with `add_generation_prompt=True`, each response is the
  text the full conversation renders *after* the rendered prompt;
- implicit prompt: no prompt column; `chosen`/`rejected` are whole texts or conversations and
  their shared beginning becomes the prompt (common leading messages; for text, the common
  prefix backed up to a word boundary, with one separating space moved into the responses, as
  TRL's `extract_prompt` does).

Tokenisation and truncation (TRL semantics) happen row by row in
`pairopt.rows.RowTokenizer`: both responses share the same prompt ids, each response ends with
one EOS, `max_prompt_length` / `max_completion_length` / `max_length` cut, and a row left with
no room for a response is dropped and counted.

Every row is checked; a bad row either fails the load (row index, column, reason, fix) or is
skipped and counted, per `on_bad_row`. All per-row work is one `Dataset.map(batched=True)`
whose outcome (status, truncation flags) is stored in columns, so a load served from the
`datasets` cache reports the same counts as the first one.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import datasets
import pydantic
from pydantic import Field

from pairopt.errors import PairoptError
from pairopt.pairs import PreferencePair
from pairopt.rows import OUTPUT_FEATURES, STATUS_COLUMNS, Layout, RowTokenizer

ASSETS_DIR = Path(__file__).resolve().parent / "assets"
BUILTIN_PREFIX = "builtin:"
# file suffix -> datasets packaged builder
FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


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


@dataclass
class SplitReport:
    """What happened to one split's rows. `dropped` and `skipped` map a reason to a count."""

    name: str
    rows_read: int
    rows_kept: int
    prompts_truncated: int  # kept rows whose prompt was cut
    responses_truncated: int  # kept rows with at least one response cut
    truncated: int  # kept rows with anything cut
    dropped: dict[str, int] = field(default_factory=dict)  # DROP_REASONS
    skipped: dict[str, int] = field(default_factory=dict)  # BAD_ROW_REASONS

    def __str__(self) -> str:
        parts = [f"{self.name}: {self.rows_read} rows read, {self.rows_kept} kept"]
        if self.truncated:
            parts.append(
                f"{self.truncated} truncated ({self.prompts_truncated} prompts, "
                f"{self.responses_truncated} with a response cut)"
            )
        if self.dropped:
            parts.append(f"{sum(self.dropped.values())} dropped ({_reasons(self.dropped)})")
        if self.skipped:
            parts.append(
                f"{sum(self.skipped.values())} bad rows skipped ({_reasons(self.skipped)})"
            )
        return ", ".join(parts)


@dataclass
class DataReport:
    """Counts for the whole load; `str(report)` is a one-paragraph summary for the log."""

    source: str
    format: str  # resolved format: standard, conversational, implicit (text) or implicit (messages)
    splits: list[SplitReport]
    eval_source: str  # where the eval pairs came from, or why there are none

    @property
    def rows_read(self) -> int:
        return sum(s.rows_read for s in self.splits)

    @property
    def rows_kept(self) -> int:
        return sum(s.rows_kept for s in self.splits)

    @property
    def truncated(self) -> int:
        return sum(s.truncated for s in self.splits)

    @property
    def dropped(self) -> dict[str, int]:
        return dict(sum((Counter(s.dropped) for s in self.splits), Counter()))

    @property
    def skipped(self) -> dict[str, int]:
        return dict(sum((Counter(s.skipped) for s in self.splits), Counter()))

    def __str__(self) -> str:
        splits = "; ".join(str(s) for s in self.splits)
        return (
            f"Data from {self.source} ({self.format} format). {splits}. Eval: {self.eval_source}."
        )


@dataclass
class PreferenceData:
    """Tokenised pairs: `train`/`eval` have int columns prompt_ids, chosen_ids, rejected_ids."""

    train: datasets.Dataset
    eval: datasets.Dataset | None
    report: DataReport


def _reasons(counts: dict[str, int]) -> str:
    return ", ".join(f"{reason}: {n}" for reason, n in sorted(counts.items()))


def rows_to_pairs(rows: dict[str, list]) -> list[PreferencePair]:
    """A columnar batch (`dataset[i:j]`, a DataLoader batch of dicts collated to lists) -> pairs."""
    return [
        PreferencePair(prompt=p, chosen=c, rejected=r)
        for p, c, r in zip(
            rows["prompt_ids"], rows["chosen_ids"], rows["rejected_ids"], strict=True
        )
    ]


def available_builtins() -> list[str]:
    return sorted(
        p.name for p in ASSETS_DIR.iterdir() if p.is_dir() and not p.name.startswith(("_", "."))
    )


def resolve_builtin(path: str) -> str:
    """`builtin:<name>` -> the absolute path of pairopt/assets/<name>; any other path unchanged."""
    if not path.startswith(BUILTIN_PREFIX):
        return path
    name = path[len(BUILTIN_PREFIX) :]
    if name not in available_builtins():
        raise PairoptError(
            f"Unknown built-in asset {path!r}. Available: "
            + ", ".join(BUILTIN_PREFIX + n for n in available_builtins())
            + "."
        )
    return str(ASSETS_DIR / name)


# ---------------------------------------------------------------------------------------------
# Loading


def _looks_local(spec: str) -> bool:
    """A spec that cannot be a hub id: an explicit path or a data-file name."""
    return (
        spec.startswith(("/", "./", "../", "~", ".\\"))
        or Path(spec).suffix.lower() in FILE_BUILDERS
    )


def _load_dataset_dict(cfg: DataConfig) -> tuple[datasets.DatasetDict, str]:
    """Read every split of the source; returns the splits and a description for messages."""
    spec = resolve_builtin(cfg.dataset)
    path = Path(spec).expanduser()
    common: dict[str, Any] = {"cache_dir": cfg.cache_dir}
    if path.is_file():
        builder = FILE_BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise PairoptError(
                f"Cannot read {path}: unknown file type {path.suffix!r}. Supported: "
                f"{', '.join(FILE_BUILDERS)} (or a folder of such files, or a hub dataset id)."
            )
        with path.open("rb") as file:
            start = file.read(1 << 16)
        if not start.strip() and path.stat().st_size <= len(start):
            raise PairoptError(f"Cannot read {path}: the file is empty (no pairs in it).")
        where, args, kwargs = str(path), (builder,), {"data_files": str(path), **common}
    elif path.is_dir():
        where, args, kwargs = str(path), (str(path),), {"name": cfg.subset, **common}
    elif _looks_local(spec):
        raise PairoptError(
            f"Dataset path {spec!r} does not exist (resolved to {path.resolve()}). Set dataset to "
            "an existing .json/.jsonl/.parquet/.csv file or folder, or to a hub dataset id."
        )
    else:
        where, args = f"hub dataset {spec!r}", (spec,)
        kwargs = {"name": cfg.subset, "revision": cfg.revision, **common}
    try:
        loaded = datasets.load_dataset(*args, **kwargs)
    except Exception as err:  # any reader/hub failure becomes one actionable message
        if not path.exists():
            hint = f" There is no local file or folder {str(path.resolve())!r} either."
        elif path.is_dir():
            hint = (
                " A folder must hold .json/.jsonl/.parquet/.csv files with pairs in them, named "
                "by split (train.jsonl, test.jsonl, ...), all of one file type."
            )
        else:
            hint = (
                f" Check that it is valid {path.suffix.lstrip('.').upper()} with one pair per "
                "record and that each column holds one kind of value in every row."
            )
        raise PairoptError(f"Could not load {where}: {type(err).__name__}: {err}.{hint}") from err
    if not isinstance(loaded, datasets.DatasetDict):
        raise PairoptError(f"Expected splits from {where}, got {type(loaded).__name__}.")
    return loaded, where


# ---------------------------------------------------------------------------------------------
# Format detection


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


def _detect_layout(ds: datasets.Dataset, cfg: DataConfig, where: str, split: str) -> Layout:
    columns = ds.column_names
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
        return Layout(messages=cfg.format == "conversational", implicit=False)
    # Sniff the first non-null chosen value; mixed rows are caught per row later.
    sample = ds.select(range(min(len(ds), 100)))[cfg.chosen_column]
    for index, value in enumerate(sample):
        if isinstance(value, str):
            return Layout(messages=False, implicit=implicit)
        if isinstance(value, list):
            return Layout(messages=True, implicit=implicit)
        if value is not None:
            raise PairoptError(
                f"Row {index} of split {split!r} of {where}: column {cfg.chosen_column!r} holds "
                f"{type(value).__name__}; expected a string or a list of {{role, content}} messages. "
                "Set chosen_column to the right column."
            )
    return Layout(messages=False, implicit=implicit)  # all null: every row reports wrong_type


def _keep_ok(statuses: list[str]) -> list[bool]:
    return [status == "" for status in statuses]


def _tokenize_split(
    raw: datasets.Dataset,
    cfg: DataConfig,
    tokenizer: Any,
    layout: Layout,
    where: str,
    split: str,
    report_name: str,
) -> tuple[datasets.Dataset, SplitReport]:
    processed = raw.map(
        RowTokenizer(tokenizer, cfg, layout, where, split),
        batched=True,
        with_indices=True,
        remove_columns=raw.column_names,
        features=OUTPUT_FEATURES,
        num_proc=cfg.num_proc,
        desc=f"Tokenising {split}",
    )
    statuses = Counter(processed["_status"])
    ok = statuses.pop("", 0)
    kept = processed
    if ok != len(processed):
        kept = processed.filter(
            _keep_ok, input_columns="_status", batched=True, num_proc=cfg.num_proc
        )
    prompt_cut, response_cut = kept["_prompt_truncated"], kept["_response_truncated"]
    report = SplitReport(
        name=report_name,
        rows_read=len(raw),
        rows_kept=ok,
        prompts_truncated=sum(prompt_cut),
        responses_truncated=sum(response_cut),
        truncated=sum(p or r for p, r in zip(prompt_cut, response_cut, strict=True)),
        dropped={s.split(":", 1)[1]: n for s, n in statuses.items() if s.startswith("drop:")},
        skipped={s.split(":", 1)[1]: n for s, n in statuses.items() if s.startswith("skip:")},
    )
    return kept.remove_columns(STATUS_COLUMNS), report


def load_preference_data(cfg: DataConfig, tokenizer: Any, *, seed: int = 0) -> PreferenceData:
    """Read, check, tokenise and truncate the pairs of `cfg`; see the module docstring.

    `seed` only matters when the eval pairs are held out from train (`eval_fraction`).
    Raises PairoptError for anything the user must fix (missing file, column, bad row, ...).
    """
    if tokenizer.eos_token_id is None:
        raise PairoptError(
            "The tokenizer has no EOS token, and every response must end with one (docs/configuration.md, Data). "
            "Set tokenizer.eos_token (e.g. to the end-of-turn token of its chat template)."
        )
    splits, where = _load_dataset_dict(cfg)
    if cfg.train_split not in splits:
        raise PairoptError(
            f"{where} has no split {cfg.train_split!r} (splits: {', '.join(splits)}). Set train_split."
        )
    train_raw = splits[cfg.train_split]
    if cfg.max_samples is not None:
        train_raw = train_raw.select(range(min(cfg.max_samples, len(train_raw))))
    layout = _detect_layout(train_raw, cfg, where, cfg.train_split)
    needs_template = layout.messages and not getattr(tokenizer, "chat_template", None)
    if needs_template:
        raise PairoptError(
            f"{where} holds conversations ({layout.name} format) but the tokenizer has no chat "
            "template. Use a tokenizer with one (set tokenizer.chat_template) or standard-format data."
        )
    train, train_report = _tokenize_split(
        train_raw, cfg, tokenizer, layout, where, cfg.train_split, "train"
    )
    reports = [train_report]

    eval_ds: datasets.Dataset | None = None
    if cfg.eval_split is not None and cfg.eval_split in splits:
        eval_raw = splits[cfg.eval_split]
        if cfg.max_eval_samples is not None:
            eval_raw = eval_raw.select(range(min(cfg.max_eval_samples, len(eval_raw))))
        eval_layout = _detect_layout(eval_raw, cfg, where, cfg.eval_split)
        eval_ds, eval_report = _tokenize_split(
            eval_raw, cfg, tokenizer, eval_layout, where, cfg.eval_split, "eval"
        )
        reports.append(eval_report)
        eval_source = f"split {cfg.eval_split!r}, {len(eval_ds)} pairs"
    elif cfg.eval_fraction > 0 and len(train) > 0:  # none left: reported below, with why
        held_out = math.ceil(cfg.eval_fraction * len(train))
        if held_out >= len(train):
            raise PairoptError(
                f"eval_fraction={cfg.eval_fraction} of the {len(train)} usable training pairs "
                f"would hold out {held_out} and leave none to train on. Lower data.eval_fraction, "
                "or set data.eval_split to a split of held-out pairs."
            )
        held = train.train_test_split(test_size=cfg.eval_fraction, seed=seed)
        train, eval_ds = held["train"], held["test"]
        if cfg.max_eval_samples is not None:
            eval_ds = eval_ds.select(range(min(cfg.max_eval_samples, len(eval_ds))))
        missing = f"no split {cfg.eval_split!r}; " if cfg.eval_split is not None else ""
        eval_source = f"{missing}{len(eval_ds)} pairs held out from train (eval_fraction={cfg.eval_fraction}, seed {seed})"
    elif cfg.eval_split is not None:
        others = [name for name in splits if name != cfg.train_split]
        choose = f"--data.eval_split {others[0]}, or " if others else ""
        eval_source = (
            f"none (no split {cfg.eval_split!r}; splits present: {', '.join(splits)}; set "
            f"{choose}--data.eval_fraction to hold out part of train)"
        )
    else:
        eval_source = "none (eval_split is None)"

    format_name = layout.name
    if layout.implicit and cfg.format == "auto":  # say why, in case the prompt column was misnamed
        format_name += (
            f", because there is no {cfg.prompt_column!r} column: the shared beginning of "
            "chosen and rejected is the prompt; set data.prompt_column if another column holds it"
        )
    report = DataReport(source=where, format=format_name, splits=reports, eval_source=eval_source)
    if len(train) == 0:
        raise PairoptError(f"No usable training pairs are left. {report}")
    return PreferenceData(train=train, eval=eval_ds, report=report)
