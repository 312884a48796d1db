"""Dicts, YAML files and the built-in preset -> a validated TrainConfig, with readable errors.

`build_config(data, sources)` is the one road from raw values to a config, for the CLI
(pairopt.training.flags) and the Python API (`pairopt.train({...})`): it applies the
out-of-the-box preset for the shipped tiny model and turns pydantic's errors into one
`PairoptError` naming each field, the value, where it came from and what is allowed.
"""

from __future__ import annotations

import copy
import difflib
from pathlib import Path
from typing import Any

import pydantic
import yaml
from pydantic import BaseModel

from pairopt.errors import PairoptError
from pairopt.training.config import CONFIG_END, TrainConfig, model_in

TINY_MODEL = "builtin:tiny-llama"

# The out-of-the-box run (`pairopt train --loss NAME`, the shipped tiny model and data) starts
# from these values instead of the field defaults, which suit pretrained hub models (lr 5e-6). A
# randomly initialised 160k-parameter model needs a large step and a few thousand pairs to learn
# to read the prompt: pairopt/assets/README.md measured DPO at 0.97 held-out accuracy after
# 300 steps of 16 pairs at lr 1e-3; 2 epochs here are 374 such steps. The reference log-probs
# are precomputed once and cached, which saves the reference forward at every step. A --config
# file or flags override any of these; with another model they do not apply. One CPU thread:
# the model's matrices are too small to split, and on two shared cores the default two threads
# made the same run 7x slower in CPU time (430 s vs 60 s, measured with another job running).
TINY_RUN_PRESET: dict[str, Any] = {
    "optim": {
        "lr": 1e-3,
        "batch_size": 16,
        "epochs": 2,
        "warmup_steps": 20,
        "schedule": "linear",
        "cpu_threads": 1,
    },
    "reference": {"strategy": "precompute"},
}


def build_config(data: dict[str, Any], sources: dict[str, str] | None = None) -> TrainConfig:
    """Raw values (sections of dicts) -> a validated TrainConfig.

    `loss: NAME` is short for `loss: {name: NAME}`. With the shipped tiny model (the default),
    TINY_RUN_PRESET supplies the starting values that the data leaves unset.
    """
    data = copy.deepcopy(data)
    if isinstance(data.get("loss"), str):
        data["loss"] = {"name": data["loss"]}
    model = data.get("model", {})
    if isinstance(model, dict) and model.get("name_or_path", TINY_MODEL) == TINY_MODEL:
        data = _merged(copy.deepcopy(TINY_RUN_PRESET), data)
    return validate_config(data, sources)


def _merged(base: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    for key, value in new.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merged(base[key], value)
        else:
            base[key] = value
    return base


def validate_config(data: dict[str, Any], sources: dict[str, str] | None = None) -> TrainConfig:
    """dict -> TrainConfig, with pydantic's errors as one PairoptError naming field, value, source."""
    try:
        return TrainConfig.model_validate(data)
    except pydantic.ValidationError as err:
        raise PairoptError(_describe(err, sources or {})) from None


def load_config(source: str | Path | dict[str, Any], **overrides: Any) -> TrainConfig:
    """A YAML file or a dict of sections, plus overrides per section (e.g. optim={"lr": 1e-5})
    -> TrainConfig, read as `pairopt train --config FILE` reads it (preset included)."""
    if isinstance(source, dict):
        data, where = copy.deepcopy(source), "the config dict"
    else:
        data, where = read_yaml(Path(source)), str(source)
    for section, values in overrides.items():
        data.setdefault(section, {}).update(values)
    return build_config(data, dict.fromkeys(flat_keys(data), where))


class _DuplicateKey(Exception):
    def __init__(self, key: Any, first: int, again: int) -> None:
        super().__init__(key)
        self.key, self.first, self.again = key, first, again


class UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping: PyYAML keeps the last one
    and drops the first without a word, so a setting the user wrote would silently not apply."""


def _construct_unique_mapping(
    loader: UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False
) -> Any:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        line = key_node.start_mark.line + 1
        if isinstance(key, str | int | float | bool) and key in seen:
            raise _DuplicateKey(key, seen[key], line)
        if isinstance(key, str | int | float | bool):
            seen[key] = line
    return loader.construct_mapping(node, deep=deep)


UniqueKeyLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_unique_mapping
)


def read_text(path: Path, what: str = "config file") -> str:
    """A file's text, or a PairoptError naming the line and column of a byte that is not UTF-8."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        column = err.start - (raw.rfind(b"\n", 0, err.start) + 1) + 1
        raise PairoptError(
            f"{what} {str(path)!r} line {line}, column {column}: byte 0x{raw[err.start]:02x} is "
            "not UTF-8 text. Save the file as UTF-8 (or remove that character)."
        ) from None


def read_yaml(path: Path, *, saved_by_run: bool = False) -> dict[str, Any]:
    """A YAML config file as a dict of sections. Duplicate keys and bytes that are not UTF-8 are
    errors naming the line. `saved_by_run`: a run's own config.yaml (--resume), which must end
    with CONFIG_END; one without it was cut short, and its missing settings would silently be
    defaults."""
    if not path.is_file():
        raise PairoptError(f"config file {str(path)!r} does not exist")
    text = read_text(path)
    if saved_by_run:
        _check_complete(path, text)
    try:
        loaded = yaml.load(text, Loader=UniqueKeyLoader)  # a SafeLoader: no arbitrary objects
    except _DuplicateKey as dup:
        raise PairoptError(
            f"config file {str(path)!r} line {dup.again}: key {dup.key!r} is given a second time "
            f"(first at line {dup.first}); YAML would silently keep only the last one. Remove "
            "one of them."
        ) from None
    except yaml.YAMLError as err:
        raise PairoptError(f"config file {str(path)!r} is not valid YAML: {err}") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise PairoptError(
            f"config file {str(path)!r} must hold a mapping of sections (model:, loss:, optim:, ...), "
            f"got a {type(loaded).__name__}"
        )
    if isinstance(loaded.get("loss"), str):  # `loss: dpo` is short for `loss: {name: dpo}`
        loaded["loss"] = {"name": loaded["loss"]}
    return loaded


def _check_complete(path: Path, text: str) -> None:
    lines = text.rstrip().splitlines()
    if lines and lines[-1].strip() == CONFIG_END:
        return
    raise PairoptError(
        f"{path} is cut short: it ends at line {len(lines)} without the line {CONFIG_END!r} that "
        f"pairopt writes last, so the settings after line {len(lines)} would silently take their "
        "defaults on resume. Restore them (the trainer_state.json of a checkpoint lists every "
        f"setting of the run under 'config') and end the file with {CONFIG_END!r}; a complete "
        "file without that line (written by hand or by an older pairopt) only needs it added."
    )


def flat_keys(data: dict[str, Any], prefix: str = "") -> list[str]:
    keys = []
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        keys.append(dotted)
        if isinstance(value, dict):
            keys += flat_keys(value, dotted + ".")
    return keys


def _describe(err: pydantic.ValidationError, sources: dict[str, str]) -> str:
    problems = []
    for error in err.errors():
        loc = [str(part) for part in error["loc"]]
        # A plugin's or a cross-section rule's message is already complete.
        msg = str(error["msg"]).removeprefix("Value error, ")
        key = ".".join(loc)
        source = _source_of(key, sources)
        where = f" (from {source})" if source else ""
        if error["type"] == "extra_forbidden":
            section = ".".join(loc[:-1])
            model = _section_model(loc[:-1])
            valid = ", ".join(model.model_fields) if model is not None else ""
            close = difflib.get_close_matches(
                loc[-1], list(model.model_fields) if model else [], n=2
            )
            prefix = f"{section}." if section else ""
            hint = f" Did you mean {' or '.join(prefix + c for c in close)}?" if close else ""
            problems.append(
                f"unknown key {key!r}{where}; {section or 'the top level'} takes: {valid}.{hint}"
            )
        elif error["type"] == "missing":
            problems.append(f"{key} is required{where}")
        elif error["type"] == "value_error" and len(loc) <= 1:
            problems.append(f"{msg}{where}" if not key else f"{key}: {msg}{where}")
        elif error["type"] == "model_type" and (section_model := _section_model(loc)) is not None:
            first = next(iter(section_model.model_fields))
            problems.append(
                f"{key} = {error.get('input')!r}{where} is not a section: write it as "
                f"{key}: {{{first}: ...}} (its keys: {', '.join(section_model.model_fields)})."
            )
        else:
            description = _description(loc)
            hint = f" ({key}: {description})" if description else ""
            problems.append(
                f"{key} = {error.get('input')!r}{where} is invalid: {msg.rstrip('.')}.{hint}"
            )
    return "invalid configuration: " + " ".join(problems)


def _source_of(key: str, sources: dict[str, str]) -> str | None:
    while key:
        if key in sources:
            return sources[key]
        key = key.rpartition(".")[0]
    return None


def _section_model(loc: list[str]) -> type[BaseModel] | None:
    model: type[BaseModel] | None = TrainConfig
    for part in loc:
        if model is None or part not in model.model_fields:
            return None
        model = model_in(model.model_fields[part].annotation)
    return model


def _description(loc: list[str]) -> str | None:
    if not loc:
        return None
    model = _section_model(loc[:-1])
    if model is None or loc[-1] not in model.model_fields:
        return None
    return model.model_fields[loc[-1]].description
