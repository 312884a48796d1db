"""`pairopt train` flags -> a validated TrainConfig; the --help text and the docs reference.

Precedence, lowest to highest: field defaults < the run's saved config.yaml (with --resume RUN)
< --config f.yaml < flags. Flags are shortcuts (SHORTCUTS) or a dotted override for every
field (`--optim.lr 5e-4`, `--engine.share_prefix false`, `--model.lora.r 8`, loss parameters
flat: `--loss.beta 0.2`). A flag's text is read by the type of the field it sets (loss
parameters: by the plugin's Config), so `5e-4` is a float, `false` a bool and `123` stays text
for a text field. `python -m pairopt.training.flags` prints the option tables of docs/configuration.md.
"""

from __future__ import annotations

import difflib
import json
import textwrap
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel

from pairopt.errors import PairoptError
from pairopt.loss.registry import available_losses, get_loss_class, load_loss_module
from pairopt.training.config import LossSection, TrainConfig, is_union, model_in
from pairopt.training.config_load import (
    TINY_MODEL,
    TINY_RUN_PRESET,
    build_config,
    flat_keys,
    read_yaml,
)

SHORTCUTS = {
    "--loss": "loss.name",
    "--model": "model.name_or_path",
    "--dataset": "data.dataset",
    "--output-dir": "output.dir",
    "--max-steps": "optim.max_steps",
    "--loss-module": "loss.module",
    "--resume": "checkpoint.resume",
}


def parse_train_args(argv: list[str]) -> TrainConfig:
    """argv (without the command) -> a validated TrainConfig. Raises PairoptError on bad input."""
    flags = _split_flags(argv)
    config_file = None
    overrides: list[tuple[str, str | None, str]] = []  # (dotted key, raw value, the flag as typed)
    for flag, raw in flags:
        if flag == "--config":
            if raw is None:
                raise PairoptError("--config needs a YAML file: --config f.yaml")
            config_file = raw
            continue
        key = SHORTCUTS.get(flag) or flag[2:]
        overrides.append((key, raw, flag))

    data: dict[str, Any] = {}
    sources: dict[str, str] = {}
    file_data = read_yaml(Path(config_file)) if config_file is not None else {}
    resume_flags = [raw or "latest" for key, raw, _ in overrides if key == "checkpoint.resume"]
    resume = resume_flags[-1] if resume_flags else None
    if resume is not None:
        given = _output_dir_given(overrides, file_data)
        if resume == "latest" and given is None:
            raise PairoptError(
                "--resume with no value continues the run in --output-dir: pass --output-dir RUN "
                "too, or --resume RUN (a run or checkpoint directory)."
            )
        run_dir = _resume_run_dir(resume, given)
        if run_dir is not None and (run_dir / "config.yaml").is_file():
            saved = read_yaml(run_dir / "config.yaml", saved_by_run=True)
            saved.setdefault("checkpoint", {})["resume"] = None
            saved.setdefault("output", {})["dir"] = str(run_dir)
            _merge(data, saved, sources, str(run_dir / "config.yaml"))
    if config_file is not None:
        _switch_loss(data, sources, file_data.get("loss"))
        _merge(data, file_data, sources, config_file)

    # Overrides are coerced by the type of the field they set; loss parameters by the plugin's
    # Config, so the loss name (and --loss-module) must be known first.
    for key, raw, flag in overrides:
        if key in ("loss.name", "loss.module") and not (raw or "").strip():
            raise PairoptError(f"{flag} needs a value ({flag} VALUE)")
        if key == "loss.name":
            _switch_loss(data, sources, {"name": raw})
        if key in ("loss.name", "loss.module"):
            _set(data, key, raw if raw is not None else "", sources, flag)
    if resume is not None:
        _set(data, "checkpoint.resume", resume, sources, "--resume")
    loss_fields = _loss_fields(data.get("loss", {}))
    for key, raw, flag in overrides:
        if key in ("loss.name", "loss.module", "checkpoint.resume"):
            continue
        annotation = _annotation(key, loss_fields)
        if annotation is _UNKNOWN:
            raise PairoptError(_unknown_flag(flag, loss_fields))
        _set(data, key, _coerce(raw, annotation, flag), sources, flag)

    if "loss" not in data or "name" not in data["loss"]:
        raise PairoptError(
            f"no loss chosen: pass --loss NAME (or loss.name in a --config file). Available: "
            f"{', '.join(available_losses())}."
        )
    return build_config(data, sources)


def _split_flags(argv: list[str]) -> list[tuple[str, str | None]]:
    """`--key value`, `--key=value` and a bare `--key` (true for booleans, latest for --resume)."""
    out: list[tuple[str, str | None]] = []
    i = 0
    while i < len(argv):
        token = argv[i]
        if not token.startswith("--") or token == "--":
            raise PairoptError(
                f"unexpected argument {token!r}: options are --key value (see pairopt train --help)"
            )
        if "=" in token:
            flag, raw = token.split("=", 1)
            out.append((flag, raw))
            i += 1
        elif i + 1 < len(argv) and not (argv[i + 1].startswith("--") and len(argv[i + 1]) > 2):
            out.append((token, argv[i + 1]))
            i += 2
        else:
            out.append((token, None))
            i += 1
    return out


def _output_dir_given(overrides: list[tuple[str, str | None, str]], file_data: Any) -> str | None:
    """output.dir from the flags, else from the --config file (None when neither sets it)."""
    flagged = [raw for key, raw, _ in overrides if key == "output.dir" and raw]
    if flagged:
        return flagged[-1]
    output = file_data.get("output") if isinstance(file_data, dict) else None
    value = output.get("dir") if isinstance(output, dict) else None
    return str(value) if value else None


def _resume_run_dir(resume: str, output_dir: str | None) -> Path | None:
    """The run directory a --resume value points into ('latest': the output dir, if one is given)."""
    if resume == "latest":
        return Path(output_dir).expanduser() if output_dir else None
    path = Path(resume).expanduser()
    if not path.exists():
        raise PairoptError(
            f"--resume {resume}: no such directory (give a run or checkpoint directory, or 'latest')"
        )
    if (path / "config.yaml").is_file():
        return path
    if path.parent.name == "checkpoints":
        return path.parent.parent
    return None


def _switch_loss(data: dict[str, Any], sources: dict[str, str], new_loss: Any) -> None:
    """Choosing another loss than the one configured so far drops that loss's parameters.

    `--loss simpo` over a YAML file written for dpo must run SimPO with SimPO's defaults, not
    with dpo's `beta`; parameters for the new loss come with it (or as --loss.PARAM flags).
    """
    old = data.get("loss")
    if not (isinstance(old, dict) and isinstance(new_loss, dict)):
        return
    if "name" not in new_loss or old.get("name") in (None, new_loss["name"]):
        return
    data["loss"] = {key: old[key] for key in ("module",) if key in old}
    for key in [k for k in sources if k.startswith("loss.") and k != "loss.module"]:
        del sources[key]


def _merge(data: dict[str, Any], new: dict[str, Any], sources: dict[str, str], source: str) -> None:
    for key, value in new.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            _merge(data[key], value, sources, source)
        else:
            data[key] = value
    for key in flat_keys(new):
        sources[key] = source


def _set(data: dict[str, Any], key: str, value: Any, sources: dict[str, str], flag: str) -> None:
    parts = key.split(".")
    node = data
    for part in parts[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[parts[-1]] = value
    sources[key] = flag


_UNKNOWN = object()


def _loss_fields(loss: Any) -> dict[str, Any]:
    """The loss plugin's parameter annotations, if the name (and module) resolve; else {}."""
    if not isinstance(loss, dict) or not isinstance(loss.get("name"), str):
        return {}
    if loss.get("module"):
        load_loss_module(str(loss["module"]))
    try:
        cls = get_loss_class(loss["name"])
    except PairoptError:
        return {}
    return {name: field.annotation for name, field in cls.Config.model_fields.items()}


def _annotation(key: str, loss_fields: dict[str, Any]) -> Any:
    """The type annotation of a dotted field, or _UNKNOWN."""
    parts = key.split(".")
    if parts[0] == "loss" and len(parts) == 2 and parts[1] in loss_fields:
        return loss_fields[parts[1]]
    model: Any = TrainConfig
    annotation: Any = _UNKNOWN
    for i, part in enumerate(parts):
        if (
            model is None
            or part not in model.model_fields
            or (model is LossSection and part == "params")
        ):
            return _UNKNOWN
        annotation = model.model_fields[part].annotation
        model = model_in(annotation)
        if i < len(parts) - 1 and model is None:
            return _UNKNOWN
    return annotation


def _wants_string(annotation: Any) -> bool:
    if annotation in (str, Path):
        return True
    if typing.get_origin(annotation) is Literal:
        return all(isinstance(arg, str) for arg in typing.get_args(annotation))
    if is_union(annotation):
        return any(
            _wants_string(arg) for arg in typing.get_args(annotation) if arg is not type(None)
        )
    return False


def _coerce(raw: str | None, annotation: Any, flag: str) -> Any:
    """A command-line string -> the value for a field of this type."""
    if raw is None:
        if annotation is bool or (is_union(annotation) and bool in typing.get_args(annotation)):
            return True
        raise PairoptError(f"{flag} needs a value ({flag} VALUE)")
    if raw.lower() in ("null", "none", "~") and (
        is_union(annotation) and type(None) in typing.get_args(annotation)
    ):
        return None
    origin = typing.get_origin(annotation)
    wants_list = origin in (list, tuple) or (
        is_union(annotation)
        and any(typing.get_origin(a) in (list, tuple) for a in typing.get_args(annotation))
    )
    if not raw.strip() and not wants_list:  # `--output-dir ''` would silently be the default
        raise PairoptError(
            f"{flag} is empty: give a value, or leave the flag out for the default"
            + (
                " (null for none)"
                if is_union(annotation) and type(None) in typing.get_args(annotation)
                else ""
            )
            + "."
        )
    if _wants_string(annotation):
        return raw
    if wants_list and not raw.lstrip().startswith("["):
        return [part.strip() for part in raw.split(",") if part.strip()]
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw


def _all_keys(loss_fields: dict[str, Any]) -> list[str]:
    keys = [f"loss.{name}" for name in loss_fields] + ["loss.name", "loss.module"]

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, field in model.model_fields.items():
            if model is LossSection:
                continue
            sub = model_in(field.annotation)
            if sub is None:
                keys.append(prefix + name)
            else:
                walk(sub, f"{prefix}{name}.")

    walk(TrainConfig, "")
    return keys


def _unknown_flag(flag: str, loss_fields: dict[str, Any]) -> str:
    candidates = [f"--{key}" for key in _all_keys(loss_fields)] + [*SHORTCUTS, "--config"]
    close = difflib.get_close_matches(flag, candidates, n=3, cutoff=0.6)
    hint = f" Did you mean {' or '.join(close)}?" if close else ""
    return f"unknown option {flag}.{hint} See pairopt train --help for every option."


def help_text() -> str:
    """`pairopt train --help`: every option, generated from the field descriptions."""
    lines = [
        "usage: pairopt train --loss NAME [--config f.yaml] [--model ID_OR_PATH] [--dataset ID_OR_PATH]",
        "                     [--output-dir DIR] [--max-steps N] [--resume [DIR]] [--loss-module M]",
        "                     [--SECTION.FIELD VALUE ...]",
        "",
        "Train a causal LM on preference pairs. Values come from the defaults, then --config, then flags.",
        "Loss parameters are --loss.PARAM VALUE (see `pairopt losses` for each loss's parameters).",
        "",
        "shortcuts:",
        "  --config FILE        YAML file with any of the sections below",
    ]
    lines += [f"  {flag:<20} = --{key}" for flag, key in SHORTCUTS.items()]

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, field in model.model_fields.items():
            if model is LossSection and name == "params":
                continue
            sub = model_in(field.annotation)
            if sub is not None and model is not TrainConfig:
                walk(sub, f"{prefix}{name}.")
                continue
            if sub is not None:
                lines.extend(["", f"{name}: {field.description or sub.__doc__ or ''}".rstrip()])
                walk(sub, f"{prefix}{name}.")
                continue
            default = (
                "(required)"
                if field.is_required()
                else repr(field.get_default(call_default_factory=True))
            )
            lines.append(f"  --{prefix}{name} [{_type_name(field.annotation)}, default {default}]")
            lines.extend(
                textwrap.wrap(
                    field.description or "",
                    width=96,
                    initial_indent="      ",
                    subsequent_indent="      ",
                )
            )

    walk(TrainConfig, "")
    return "\n".join(lines)


def _type_name(annotation: Any) -> str:
    if typing.get_origin(annotation) is Literal:
        return "|".join(str(arg) for arg in typing.get_args(annotation))
    if is_union(annotation):
        return " or ".join(_type_name(arg) for arg in typing.get_args(annotation))
    if annotation is type(None):
        return "null"
    if isinstance(annotation, type) and not typing.get_args(annotation):
        return annotation.__name__
    return str(annotation).replace("typing.", "")


def config_reference_markdown() -> str:
    """The option tables of docs/configuration.md, made from the field descriptions."""
    lines: list[str] = []

    def rows(model: type[BaseModel], prefix: str) -> None:
        for name, field in model.model_fields.items():
            if model is LossSection and name == "params":
                continue
            sub = model_in(field.annotation)
            if sub is not None:
                rows(sub, f"{prefix}{name}.")
                continue
            default = (
                "required"
                if field.is_required()
                else f"`{_yaml_value(field.get_default(call_default_factory=True))}`"
            )
            kind = _type_name(field.annotation).replace("|", " \\| ")
            description = (field.description or "").replace("|", "\\|")
            lines.append(f"| `{prefix}{name}` | {kind} | {default} | {description} |")

    for name, field in TrainConfig.model_fields.items():
        section = model_in(field.annotation)
        assert section is not None
        lines += ["", f"### `{name}`: {field.description or section.__doc__}", ""]
        lines += ["| option | type | default | description |", "|---|---|---|---|"]
        rows(section, f"{name}.")
    preset = yaml.safe_dump(TINY_RUN_PRESET, sort_keys=False).strip()
    lines += [
        "",
        f"### The out-of-the-box preset (only with `model.name_or_path: {TINY_MODEL}`)",
        "",
        "Starting values for the shipped tiny model, below any --config file and flags:",
        "",
        "```yaml",
        preset,
        "```",
    ]
    return "\n".join(lines).strip() + "\n"


def _yaml_value(value: Any) -> str:
    """A default as it is written in YAML (null, true, [0.9, 0.999], builtin:tiny-llama)."""
    if isinstance(value, str):
        return value
    return json.dumps(list(value) if isinstance(value, tuple) else value)


if __name__ == "__main__":
    print(config_reference_markdown(), end="")
