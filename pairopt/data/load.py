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
  TRL's `extract_prompt` does);
- ranked: a prompt with k responses and their scores (`pairopt.data.ranked_rows`); its rows
  have prompt_ids, responses_ids and scores instead of chosen_ids and rejected_ids.

`pairopt.data.groups.make_groups` then turns the rows of either kind into groups (a prompt, its
responses, the pairs to train on), which is what the trainer reads.

Tokenisation and truncation (TRL semantics) happen row by row in
`pairopt.rows.RowTokenizer`: both responses share the same prompt ids, each response ends with
one EOS, `max_prompt_length` / `max_completion_length` / `max_length` cut, and a row left with
no room for a response is dropped and counted.

Every row is checked; a bad row either fails the load (row index, column, reason, fix) or is
skipped and counted, per `on_bad_row`. All per-row work is one `Dataset.map(batched=True)`
whose outcome (status, truncation flags) is stored in columns, so a load served from the
`datasets` cache reports the same counts as the first one.
"""

import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets

from pairopt.data.config import DataConfig
from pairopt.data.files import check_utf8, unused_files
from pairopt.data.formats import DataFormat, detect_format
from pairopt.data.ranked_rows import RANKED_FEATURES, RankedRowTokenizer
from pairopt.data.report import DataReport, SplitReport
from pairopt.data.rows import OUTPUT_FEATURES, STATUS_COLUMNS, RowTokenizer
from pairopt.errors import PairoptError
from pairopt.pairs import PreferencePair
from pairopt.sources import DATA_FILE_BUILDERS, looks_like_data_file, resolve_builtin


@dataclass
class PreferenceData:
    """Tokenised pairs: `train`/`eval` have int columns prompt_ids, chosen_ids, rejected_ids
    (ranked data, `ranked`: prompt_ids, responses_ids, scores; after `make_groups`, groups:
    pairopt.data.groups.GROUP_FEATURES)."""

    train: datasets.Dataset
    eval: datasets.Dataset | None
    report: DataReport
    ranked: bool = False


def rows_to_pairs(rows: dict[str, list]) -> list[PreferencePair]:
    """A columnar batch (`dataset[i:j]`, a DataLoader batch of dicts collated to lists) -> pairs."""
    return [
        PreferencePair(prompt=p, chosen=c, rejected=r)
        for p, c, r in zip(
            rows["prompt_ids"], rows["chosen_ids"], rows["rejected_ids"], strict=True
        )
    ]


# Loading


def _load_dataset_dict(cfg: DataConfig) -> tuple[datasets.DatasetDict, str]:
    """Read every split of the source; returns the splits and a description for messages."""
    spec = resolve_builtin(cfg.dataset)
    path = Path(spec).expanduser()
    common: dict[str, Any] = {"cache_dir": cfg.cache_dir}
    if path.is_file():
        builder = DATA_FILE_BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise PairoptError(
                f"Cannot read {path}: unknown file type {path.suffix!r}. Supported: "
                f"{', '.join(DATA_FILE_BUILDERS)} (or a folder of such files, or a hub dataset id)."
            )
        with path.open("rb") as file:
            start = file.read(1 << 16)
        if not start.strip() and path.stat().st_size <= len(start):
            raise PairoptError(f"Cannot read {path}: the file is empty (no pairs in it).")
        check_utf8([path])
        where, args, kwargs = str(path), (builder,), {"data_files": str(path), **common}
    elif path.is_dir():
        check_utf8(sorted(path.rglob("*")))
        where, args, kwargs = str(path), (str(path),), {"name": cfg.subset, **common}
    elif looks_like_data_file(spec):
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


def _keep_ok(statuses: list[str]) -> list[bool]:
    return [status == "" for status in statuses]


def _tokenize_split(
    raw: datasets.Dataset,
    cfg: DataConfig,
    tokenizer: Any,
    data_format: DataFormat,
    where: str,
    split: str,
    report_name: str,
    max_tokens: int | None = None,
) -> tuple[datasets.Dataset, SplitReport]:
    row_tokenizer = RankedRowTokenizer if data_format.ranked else RowTokenizer
    processed = raw.map(
        row_tokenizer(tokenizer, cfg, data_format, where, split, max_tokens),
        batched=True,
        with_indices=True,
        remove_columns=raw.column_names,
        features=RANKED_FEATURES if data_format.ranked else OUTPUT_FEATURES,
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
        resplit=sum(kept["_resplit"]),
        truncated=sum(p or r for p, r in zip(prompt_cut, response_cut, strict=True)),
        dropped={s.split(":", 1)[1]: n for s, n in statuses.items() if s.startswith("drop:")},
        skipped={s.split(":", 1)[1]: n for s, n in statuses.items() if s.startswith("skip:")},
    )
    return kept.remove_columns(STATUS_COLUMNS), report


def load_preference_data(
    cfg: DataConfig, tokenizer: Any, *, seed: int = 0, max_tokens: int | None = None
) -> PreferenceData:
    """Read, check, tokenise and truncate the pairs of `cfg`; see the module docstring.

    `seed` only matters when the eval pairs are held out from train (`eval_fraction`).
    `max_tokens`: the model's context; without data.max_length, a pair whose prompt + response
    is longer is a bad row (`too_long`). Raises PairoptError for anything the user must fix
    (missing file, column, bad row, ...).
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
    data_format = detect_format(train_raw, cfg, where, cfg.train_split)
    needs_template = data_format.messages and not getattr(tokenizer, "chat_template", None)
    if needs_template:
        raise PairoptError(
            f"{where} holds conversations ({data_format.name} format) but the tokenizer has no chat "
            "template. Use a tokenizer with one (set tokenizer.chat_template) or standard-format data."
        )
    train, train_report = _tokenize_split(
        train_raw, cfg, tokenizer, data_format, where, cfg.train_split, "train", max_tokens
    )
    train, eval_ds, eval_report, eval_source = _eval_split(
        splits, train, cfg, tokenizer, where, seed, max_tokens
    )
    reports = [train_report] + ([eval_report] if eval_report is not None else [])

    format_name = data_format.name
    if data_format.implicit and cfg.format == "auto":  # say why: the column may be misnamed
        format_name += (
            f", because there is no {cfg.prompt_column!r} column: the shared beginning of "
            "chosen and rejected is the prompt; set data.prompt_column if another column holds it"
        )
    used = [cfg.train_split] + ([str(cfg.eval_split)] if eval_report is not None else [])
    report = DataReport(
        source=where,
        format=format_name,
        splits=reports,
        eval_source=eval_source,
        unused_files=unused_files(cfg, used),
    )
    if len(train) == 0:
        raise PairoptError(f"No usable training pairs are left. {report}")
    return PreferenceData(train=train, eval=eval_ds, report=report, ranked=data_format.ranked)


def _eval_split(
    splits: datasets.DatasetDict,
    train: datasets.Dataset,
    cfg: DataConfig,
    tokenizer: Any,
    where: str,
    seed: int,
    max_tokens: int | None = None,
) -> tuple[datasets.Dataset, datasets.Dataset | None, SplitReport | None, str]:
    """(train, eval pairs, the eval split's report, a line saying where they came from): the
    eval split tokenised, or a seeded fraction held out from `train` (no report of its own)."""
    if cfg.eval_split is not None and cfg.eval_split in splits:
        eval_raw = splits[cfg.eval_split]
        if cfg.max_eval_samples is not None:
            eval_raw = eval_raw.select(range(min(cfg.max_eval_samples, len(eval_raw))))
        eval_format = detect_format(eval_raw, cfg, where, cfg.eval_split)
        eval_ds, eval_report = _tokenize_split(
            eval_raw, cfg, tokenizer, eval_format, where, cfg.eval_split, "eval", max_tokens
        )
        return train, eval_ds, eval_report, f"split {cfg.eval_split!r}, {len(eval_ds)} pairs"
    if cfg.eval_fraction > 0 and len(train) > 0:  # none left: reported by the caller, with why
        held_out = math.ceil(cfg.eval_fraction * len(train))
        if held_out >= len(train):
            raise PairoptError(
                f"eval_fraction={cfg.eval_fraction} of the {len(train)} usable training pairs "
                f"would hold out {held_out} and leave none to train on. Lower data.eval_fraction, "
                "or set data.eval_split to a split of held-out pairs."
            )
        held = train.train_test_split(test_size=cfg.eval_fraction, seed=seed)
        eval_ds = held["test"]
        if cfg.max_eval_samples is not None:
            eval_ds = eval_ds.select(range(min(cfg.max_eval_samples, len(eval_ds))))
        missing = f"no split {cfg.eval_split!r}; " if cfg.eval_split is not None else ""
        return (
            held["train"],
            eval_ds,
            None,
            f"{missing}{len(eval_ds)} pairs held out from train "
            f"(eval_fraction={cfg.eval_fraction}, seed {seed})",
        )
    if cfg.eval_split is not None:
        others = [name for name in splits if name != cfg.train_split]
        choose = f"--data.eval_split {others[0]}, or " if others else ""
        return (
            train,
            None,
            None,
            f"none (no split {cfg.eval_split!r}; splits present: {', '.join(splits)}; set "
            f"{choose}--data.eval_fraction to hold out part of train)",
        )
    return train, None, None, "none (eval_split is None)"
