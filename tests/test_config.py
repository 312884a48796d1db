"""Configuration: YAML + flags precedence, coercion of flag values, loss parameters through the
plugin, the resolved config round trip, and docs/configuration.md kept in step with the fields."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pairopt.errors import PairoptError
from pairopt.training.config import TrainConfig
from pairopt.training.config_load import load_config, validate_config
from pairopt.training.flags import config_reference_markdown, help_text, parse_train_args

REPO = Path(__file__).resolve().parents[1]


def test_defaults_need_only_a_loss() -> None:
    cfg = parse_train_args(["--loss", "dpo"])
    assert (
        cfg.loss.name == "dpo" and cfg.loss.params["beta"] == 0.1
    )  # the plugin's default, filled in
    assert (
        cfg.model.name_or_path == "builtin:tiny-llama" and cfg.data.dataset == "builtin:tiny-prefs"
    )
    assert cfg.engine.share_prefix and cfg.engine.packing


def test_flags_override_yaml_override_defaults(tmp_path: Path) -> None:
    config = tmp_path / "run.yaml"
    config.write_text(
        "loss: {name: ipo, beta: 0.3}\n"
        "optim: {lr: 1.0e-4, batch_size: 4, warmup_steps: 5}\n"
        "engine: {share_prefix: false}\n"
    )
    cfg = parse_train_args(["--config", str(config), "--optim.lr", "5e-4", "--loss.beta", "0.2"])
    assert cfg.loss.name == "ipo" and cfg.loss.params["beta"] == 0.2  # flag beats file
    assert cfg.optim.lr == 5e-4 and cfg.optim.batch_size == 4 and cfg.optim.warmup_steps == 5
    assert cfg.engine.share_prefix is False  # from the file, untouched by flags
    assert cfg.optim.grad_accum == 1  # default
    switched = parse_train_args(["--config", str(config), "--loss", "dpo"])
    assert switched.loss.name == "dpo" and switched.loss.params["beta"] == 0.1  # dpo's default


@pytest.mark.parametrize(
    ("flag", "raw", "path", "expected"),
    [
        ("--optim.lr", "5e-4", ("optim", "lr"), 5e-4),  # YAML 1.1 reads 5e-4 as a string
        ("--engine.share_prefix", "false", ("engine", "share_prefix"), False),
        ("--engine.packing", "no", ("engine", "packing"), False),
        ("--optim.max_grad_norm", "null", ("optim", "max_grad_norm"), None),
        ("--optim.max_grad_norm", "none", ("optim", "max_grad_norm"), None),
        ("--engine.max_tokens_per_row", "2048", ("engine", "max_tokens_per_row"), 2048),
        ("--optim.betas", "[0.9, 0.95]", ("optim", "betas"), (0.9, 0.95)),
        ("--optim.betas", "0.9,0.95", ("optim", "betas"), (0.9, 0.95)),
        ("--logging.report_to", "tensorboard", ("logging", "report_to"), ["tensorboard"]),
        ("--logging.report_to", "[]", ("logging", "report_to"), []),
        (
            "--output.run_name",
            "123",
            ("output", "run_name"),
            "123",
        ),  # a str field keeps digits as text
        ("--output.run_name", "true", ("output", "run_name"), "true"),
        (
            "--model.lora.target_modules",
            "q_proj,v_proj",
            ("model", "lora", "target_modules"),
            ["q_proj", "v_proj"],
        ),
    ],
)
def test_flag_values_are_coerced_by_field_type(
    flag: str, raw: str, path: tuple[str, ...], expected: object
) -> None:
    pytest.importorskip("peft") if "lora" in flag else None
    cfg = parse_train_args(["--loss", "dpo", flag, raw])
    value: object = cfg
    for part in path:
        value = getattr(value, part)
    assert value == expected


def test_bare_boolean_flag_means_true() -> None:
    cfg = parse_train_args(["--loss", "dpo", "--model.gradient_checkpointing", "--optim.lr=1e-3"])
    assert cfg.model.gradient_checkpointing is True and cfg.optim.lr == 1e-3


def test_loss_params_are_coerced_by_the_plugin_config() -> None:
    cfg = parse_train_args(
        [
            "--loss",
            "dpo",
            "--loss.beta",
            "0.25",
            "--loss.label_smoothing",
            "0.1",
            "--loss.f_divergence",
            "js_divergence",
        ]
    )
    assert cfg.loss.params == {
        "beta": 0.25,
        "label_smoothing": 0.1,
        "f_divergence": "js_divergence",
        "f_alpha": 0.5,
        "ld_alpha": None,
        "use_weighting": False,
    }
    assert list(cfg.loss.params)[:2] == ["beta", "label_smoothing"]  # the loss's own first
    combined = parse_train_args(
        ["--loss", "combined", "--loss.terms", "[{name: dpo}, {name: sft, weight: 0.2}]"]
    )
    assert [term["name"] for term in combined.loss.params["terms"]] == ["dpo", "sft"]


def test_loss_module_registers_before_validation(registry, tmp_path: Path) -> None:
    module = tmp_path / "my_losses.py"
    module.write_text(
        "from pydantic import Field\n"
        "from pairopt.loss import LossConfig, LossOutput, PairLoss, register_loss\n"
        "@register_loss('cfg_test_margin')\n"
        "class Margin(PairLoss):\n"
        "    '''Test loss.'''\n"
        "    class Config(LossConfig):\n"
        "        scale: float = Field(1.0, gt=0, description='scale')\n"
        "    def compute(self, policy, reference):\n"
        "        d = policy.chosen_logps - policy.rejected_logps\n"
        "        return LossOutput(-self.config.scale * d, {})\n"
    )
    cfg = parse_train_args(
        ["--loss-module", str(module), "--loss", "cfg_test_margin", "--loss.scale", "3"]
    )
    assert cfg.loss.module == str(module) and cfg.loss.params == {"scale": 3.0}


def test_resolved_config_round_trips_through_yaml(tmp_path: Path) -> None:
    cfg = parse_train_args(
        ["--loss", "simpo", "--optim.batch_tokens", "4096", "--engine.share_prefix", "false"]
    )
    saved = tmp_path / "config.yaml"
    saved.write_text(cfg.to_yaml())
    again = load_config(saved)
    assert again == cfg
    assert (
        yaml.safe_load(saved.read_text())["loss"]["name"] == "simpo"
    )  # params flat beside the name
    assert "params" not in yaml.safe_load(saved.read_text())["loss"]


def test_resume_reads_the_runs_saved_config(tmp_path: Path) -> None:
    run = tmp_path / "run"
    (run / "checkpoints" / "step-000010").mkdir(parents=True)
    (run / "config.yaml").write_text(
        parse_train_args(["--loss", "ipo", "--optim.lr", "3e-4"]).to_yaml()
    )
    cfg = parse_train_args(
        ["--resume", str(run / "checkpoints" / "step-000010"), "--max-steps", "20"]
    )
    assert cfg.loss.name == "ipo" and cfg.optim.lr == 3e-4 and cfg.optim.max_steps == 20
    assert cfg.output.dir == str(run) and cfg.checkpoint.resume == str(
        run / "checkpoints" / "step-000010"
    )
    # A bare --resume means the newest checkpoint of --output-dir, whose config.yaml applies.
    bare = parse_train_args(["--output-dir", str(run), "--resume"])
    assert bare.checkpoint.resume == "latest"
    assert bare.loss.name == "ipo" and bare.optim.lr == 3e-4 and bare.output.dir == str(run)
    in_file = tmp_path / "out.yaml"
    in_file.write_text(f"output: {{dir: {run}}}\n")
    assert parse_train_args(["--config", str(in_file), "--resume"]).loss.name == "ipo"


def test_choosing_another_loss_drops_the_configured_losss_parameters(tmp_path: Path) -> None:
    """`--loss simpo` over a file written for dpo runs SimPO with its own defaults, not dpo's beta."""
    config = tmp_path / "dpo.yaml"
    config.write_text("loss: {name: dpo, beta: 0.3}\noptim: {lr: 1.0e-4}\n")
    same = parse_train_args(["--config", str(config), "--loss", "dpo"])
    assert same.loss.params["beta"] == 0.3
    simpo = parse_train_args(["--config", str(config), "--loss", "simpo"])
    assert simpo.loss.params == {"beta": 2.0, "gamma": 0.5} and simpo.optim.lr == 1e-4
    tuned = parse_train_args(["--config", str(config), "--loss", "simpo", "--loss.beta", "3"])
    assert tuned.loss.params["beta"] == 3.0
    # sft has no beta at all: the file's dpo beta must not make it an unknown parameter
    assert parse_train_args(["--config", str(config), "--loss", "sft"]).loss.params == {}


def test_configs_are_frozen_and_strict() -> None:
    cfg = parse_train_args(["--loss", "dpo"])
    with pytest.raises(Exception, match="frozen"):
        cfg.optim.lr = 1.0  # type: ignore[misc]
    with pytest.raises(PairoptError, match=r"unknown key 'engine\.shared'"):
        validate_config({"loss": {"name": "dpo"}, "engine": {"shared": True}})


def test_cross_field_rules() -> None:
    with pytest.raises(PairoptError, match="batch_size"):
        validate_config({"loss": {"name": "dpo"}, "optim": {"batch_size": None}})
    with pytest.raises(PairoptError, match="betas"):
        validate_config({"loss": {"name": "dpo"}, "optim": {"betas": [0.9, 1.5]}})


def _every_option(model: type, prefix: str = "") -> list[str]:
    from pydantic import BaseModel

    from pairopt.training.config import LossSection, model_in

    out = []
    for name, field in model.model_fields.items():  # type: ignore[attr-defined]
        if model is LossSection:
            continue
        sub = model_in(field.annotation)
        if sub is not None and issubclass(sub, BaseModel):
            out += _every_option(sub, f"{prefix}{name}.")
        else:
            out.append(prefix + name)
    return out


def test_help_and_docs_cover_every_field() -> None:
    """The descriptions are written once: --help and docs/configuration.md are made from them."""
    text = help_text()
    options = _every_option(TrainConfig)
    assert len(options) > 50
    for option in options:
        assert f"--{option} " in text, option
    docs = (REPO / "docs" / "configuration.md").read_text()
    generated = config_reference_markdown()
    assert generated in docs, (
        "docs/configuration.md is stale: python -m pairopt.training.flags > the reference part"
    )


@pytest.mark.parametrize(
    "example", sorted((REPO / "examples").glob("*.yaml")), ids=lambda p: p.name
)
def test_example_configs_validate(example: Path) -> None:
    """The shipped YAML files are valid configs (accelerate configs are checked for their keys)."""
    data = yaml.safe_load(example.read_text())
    if example.name.startswith("accelerate_"):
        assert data["distributed_type"] in ("FSDP", "DEEPSPEED") and data["num_processes"] >= 1
        return
    if data.get("model", {}).get("lora") is not None:
        pytest.importorskip("peft")
    cfg = load_config(example)
    assert cfg.model.name_or_path.startswith("Qwen/") and cfg.data.dataset in (
        "trl-lib/ultrafeedback_binarized",
        "princeton-nlp/llama3-ultrafeedback-armorm",  # qwen-onpolicy-groups.yaml: ranked
    )


def test_tiny_run_preset_applies_only_to_the_shipped_model(tmp_path: Path) -> None:
    from pairopt.training.config_load import TINY_RUN_PRESET

    tiny = parse_train_args(["--loss", "dpo"])
    assert (
        tiny.optim.lr == TINY_RUN_PRESET["optim"]["lr"] and tiny.reference.strategy == "precompute"
    )
    assert parse_train_args(["--loss", "dpo", "--optim.lr", "3e-3"]).optim.lr == 3e-3  # flags win
    hub_like = parse_train_args(["--loss", "dpo", "--model", "some-org/some-model"])
    assert hub_like.optim.lr == 5e-6 and hub_like.reference.strategy == "auto"  # field defaults


def test_yaml_shorthands_and_section_mistakes(tmp_path: Path) -> None:
    """`loss: dpo` is short for `loss: {name: dpo}`; `model: ID` says how to write the section."""
    short = tmp_path / "short.yaml"
    short.write_text("loss: simpo\n")
    assert parse_train_args(["--config", str(short)]).loss.name == "simpo"
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("loss: dpo\nmodel: builtin:tiny-llama\n")
    with pytest.raises(PairoptError, match=r"is not a section: write it as model: \{name_or_path"):
        parse_train_args(["--config", str(scalar)])
    with pytest.raises(PairoptError, match=r"unknown key 'optimm'.*Did you mean optim\?"):
        validate_config({"loss": {"name": "dpo"}, "optimm": {}})


@pytest.mark.parametrize(
    "flag", [["--loss.beta", "inf"], ["--loss.beta", "nan"], ["--optim.lr", "nan"]]
)
def test_non_finite_numbers_are_refused(flag: list[str]) -> None:
    with pytest.raises(PairoptError, match="finite number"):
        parse_train_args(["--loss", "dpo", *flag])


def test_local_model_paths_are_checked_before_anything_loads(tmp_path: Path) -> None:
    def model_error(path: str) -> str:
        with pytest.raises(PairoptError) as err:
            parse_train_args(["--loss", "dpo", "--model", path])
        return " ".join(str(err.value).split())

    assert "no such directory" in model_error(str(tmp_path / "nowhere"))
    assert "has no config.json" in model_error(str(tmp_path))
    assert "a dataset, not a model" in model_error("builtin:tiny-prefs")
    (tmp_path / "config.json").write_text("{}")
    assert "has no tokenizer" in model_error(str(tmp_path))
    with pytest.raises(PairoptError, match=r"reference\.name_or_path"):
        parse_train_args(["--loss", "dpo", "--reference.name_or_path", str(tmp_path / "nowhere")])
