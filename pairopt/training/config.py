"""The training configuration: one pydantic section per component, and `TrainConfig` of them all.

`TrainConfig` is composed of one section per concern (model, data, loss, engine, reference,
optim, eval, logging, checkpoint, output); each component takes its own section (the data layer
a `DataConfig`, checkpointing a `CheckpointConfig`, ...) and only the trainer reads across them.
Every field is frozen, bounded and described; the descriptions are the `pairopt train --help`
text and docs/configuration.md (written once).

Dicts and YAML files become a config in `config_load.py`, command-line flags in `flags.py`.
Loss parameters live flat in the loss section, beside its name (`loss: {name: dpo, beta:
0.2}`), and are validated by the plugin's own `Config`. Everything is checked here, before a
model or dataset is loaded.
"""

from __future__ import annotations

import importlib.util
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from pairopt.data.config import DataConfig
from pairopt.errors import PairoptError
from pairopt.loss.registry import get_loss_class, load_loss_module, validate_params
from pairopt.sources import looks_like_data_file
from pairopt.training.models import check_model_source

_SECTION = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)
# The last line of a config.yaml a run writes (a YAML comment): its absence means the file was cut.
CONFIG_END = "# end of config"

# The trackers accelerate can log to (accelerate.utils.LoggerType).
Tracker = Literal[
    "tensorboard", "wandb", "mlflow", "comet_ml", "aim", "clearml", "dvclive", "trackio"
]
TRACKERS: tuple[str, ...] = typing.get_args(Tracker)


class LoraSection(BaseModel):
    """A PEFT LoRA adapter on the policy (needs the `lora` extra: pip install 'pairopt[lora]')."""

    model_config = _SECTION

    r: int = Field(default=16, gt=0, le=4096, description="LoRA rank.")
    alpha: int = Field(default=32, gt=0, description="LoRA scaling numerator (scale = alpha / r).")
    target_modules: list[str] | None = Field(
        default=None,
        description="Module names to adapt, e.g. [q_proj, v_proj]; null = every linear layer "
        "except the LM head (PEFT's 'all-linear').",
    )
    # No lora_dropout field on purpose: dropout must be off for the shared forward to be exact.


class ModelConfig(BaseModel):
    """The policy model."""

    model_config = _SECTION

    name_or_path: str = Field(
        default="builtin:tiny-llama",
        min_length=1,
        description="Hub ID, local directory, or builtin:NAME (a model shipped with pairopt). "
        "A directory with a config but no weights is built from the config under the run seed.",
    )
    revision: str | None = Field(default=None, description="Hub revision (branch, tag or commit).")
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = Field(
        default="float32",
        description="dtype the weights are loaded in (mixed precision is optim.precision).",
    )
    attn_implementation: Literal["sdpa", "eager", "flex_attention"] | None = Field(
        default=None,
        description="Attention implementation the model is loaded with; null = transformers' "
        "default. The engine switches it to what engine.backend needs when it runs.",
    )
    gradient_checkpointing: bool = Field(
        default=False,
        description="Recompute activations in the backward pass (less memory, ~30% slower).",
    )
    trust_remote_code: bool = Field(
        default=False, description="Allow model code from the hub repository."
    )
    lora: LoraSection | None = Field(
        default=None,
        description="Train a LoRA adapter instead of the full model (null = full fine-tuning).",
    )

    @field_validator("name_or_path")
    @classmethod
    def _known_model(cls, value: str) -> str:
        return _checked_model_source(value, tokenizer=True)


class LossSection(BaseModel):
    """The loss: a registered name and its parameters (validated by the plugin's Config)."""

    model_config = _SECTION

    name: str = Field(
        description="Registered loss name (see `pairopt losses`), e.g. dpo, ipo, orpo, simpo, kto_pair."
    )
    module: str | None = Field(
        default=None,
        description="Module name or .py file imported first, so the losses it registers can be "
        "named (--loss-module).",
    )
    params: dict[str, Any] = Field(
        default_factory=dict,
        description="The loss's parameters; written flat beside `name` (loss.beta, not "
        "loss.params.beta). Defaults filled in from the plugin.",
    )

    @model_validator(mode="before")
    @classmethod
    def _gather_params(cls, data: Any) -> Any:
        """`{name, module, beta, ...}` -> `{name, module, params: {beta, ...}}`."""
        if not isinstance(data, dict):
            return data
        own = {key: data[key] for key in ("name", "module") if key in data}
        params = dict(data.get("params") or {})
        params.update(
            {key: value for key, value in data.items() if key not in ("name", "module", "params")}
        )
        return {**own, "params": params}

    @model_validator(mode="after")
    def _validate_params(self) -> LossSection:
        try:
            if self.module:
                load_loss_module(self.module)
            loss_cls = get_loss_class(self.name)
            validated = validate_params(loss_cls, self.params)
        except PairoptError as err:
            raise ValueError(str(err)) from None
        # The resolved config shows every parameter, defaults included.
        dumped = validated.model_dump(mode="json")
        ordered = {name: dumped[name] for name in validated.ordered_fields()}
        object.__setattr__(self, "params", ordered)
        return self

    def flat(self) -> dict[str, Any]:
        """The YAML form: name, module and the parameters side by side."""
        out: dict[str, Any] = {"name": self.name}
        if self.module:
            out["module"] = self.module
        return {**out, **self.params}


class EngineConfig(BaseModel):
    """How log-probs are computed (pairopt.compute_logps)."""

    model_config = _SECTION

    share_prefix: bool = Field(
        default=True,
        description="Compute each prompt once for both responses (prefix-shared forward); false = "
        "the classic unshared forward (same numbers, more work).",
    )
    packing: bool = Field(
        default=True, description="Pack several pairs into one row (no padding between them)."
    )
    backend: Literal["auto", "sdpa", "eager", "flex", "varlen"] = Field(
        default="auto",
        description="How the mask reaches attention; auto picks the fastest that fits the device.",
    )
    max_tokens_per_row: int | None = Field(
        default=None,
        gt=0,
        description="Token budget of one packed row; null = the engine's default.",
    )
    bucket_size: int = Field(
        default=64,
        gt=0,
        le=8192,
        description="Rows are padded to a multiple of this many tokens.",
    )
    chunk_size: int | None = Field(
        default=None,
        gt=0,
        description="Scored positions per LM-head chunk (bounds the logits' memory); null = "
        "2**25 // vocab rows, a 128 MiB fp32 logits budget whatever the vocabulary.",
    )

    def kwargs(self) -> dict[str, Any]:
        return self.model_dump()


class ReferenceConfig(BaseModel):
    """The reference model (only for losses that declare requires_reference)."""

    model_config = _SECTION

    strategy: Literal["auto", "copy", "precompute", "adapter"] = Field(
        default="auto",
        description="copy: a frozen copy run live under no_grad; precompute: one pass before "
        "training, cached on disk; adapter: the LoRA policy with its adapter disabled; "
        "auto: adapter with LoRA, else copy.",
    )
    name_or_path: str | None = Field(
        default=None,
        description="A different reference model; null = the policy's initial weights.",
    )

    @field_validator("name_or_path")
    @classmethod
    def _known_model(cls, value: str | None) -> str | None:
        return None if value is None else _checked_model_source(value, tokenizer=False)

    cache_dir: str | None = Field(
        default=None,
        description="Where precomputed reference log-probs are cached; null = $PAIROPT_CACHE/reference "
        "or ~/.cache/pairopt/reference.",
    )
    sync_steps: int | None = Field(
        default=None,
        gt=0,
        description="TR-DPO: every this many optimiser steps, move the reference towards the "
        "policy (TRL's sync_ref_model + ref_model_sync_steps); null = a fixed reference. Live "
        "references only (copy), not precompute or adapter, and not with model.lora (the "
        "mixing is by parameter name; a LoRA policy trains its adapter).",
    )
    sync_alpha: float = Field(
        default=0.6,
        gt=0,
        le=1,
        description="TR-DPO mixing weight α: reference <- (1 - α)·reference + α·policy at each "
        "sync; 1 copies the policy (TRL's ref_model_mixup_alpha).",
    )


class OptimConfig(BaseModel):
    """Optimiser, schedule, batching, length of training, precision and seed."""

    model_config = _SECTION

    optimizer: Literal["adamw", "sgd"] = Field(
        default="adamw", description="torch.optim.AdamW or SGD."
    )
    lr: float = Field(default=5e-6, gt=0, le=1.0, description="Peak learning rate.")
    weight_decay: float = Field(
        default=0.0, ge=0, description="Decoupled weight decay (not on biases and norms)."
    )
    betas: tuple[float, float] = Field(default=(0.9, 0.999), description="AdamW betas.")
    eps: float = Field(default=1e-8, gt=0, description="AdamW epsilon.")
    schedule: Literal["constant", "linear", "cosine"] = Field(
        default="linear",
        description="Learning-rate decay after warm-up (to 0 for linear and cosine).",
    )
    warmup_steps: int = Field(
        default=0, ge=0, description="Linear warm-up steps (wins over warmup_ratio)."
    )
    warmup_ratio: float = Field(
        default=0.0, ge=0, lt=1, description="Warm-up as a fraction of the total steps."
    )
    batch_size: int | None = Field(
        default=8,
        gt=0,
        description="Pairs per micro-batch per process (a cap when batch_tokens is set); for a "
        "listwise loss, groups. A prompt's group is never split: it counts all its pairs, and "
        "goes alone when it has more.",
    )
    batch_tokens: int | None = Field(
        default=None,
        gt=0,
        description="Token budget per micro-batch per process (prompt + chosen + rejected; with k "
        "responses per prompt, the prompt once and every response once); null = batch by pairs "
        "only.",
    )
    grad_accum: int = Field(
        default=1, gt=0, description="Micro-batches accumulated per optimiser step."
    )
    epochs: int = Field(
        default=1,
        gt=0,
        description="Passes over the training split (ignored when max_steps is set).",
    )
    max_steps: int | None = Field(
        default=None, gt=0, description="Optimiser steps to run; null = epochs."
    )
    max_grad_norm: float | None = Field(
        default=1.0, gt=0, description="Gradient clipping norm; null = no clipping."
    )
    precision: Literal["no", "bf16", "fp16"] = Field(
        default="no",
        description="accelerate mixed precision (autocast); 'no' = the weights' dtype.",
    )
    cpu_threads: int | None = Field(
        default=None,
        gt=0,
        description="torch intra-op threads when training on the CPU; null = torch's default "
        "(one per core). 1 suits tiny models and shared cores (more threads only spin).",
    )
    seed: int = Field(
        default=42, ge=0, description="Seeds weights built from a config, data split and order."
    )

    @model_validator(mode="after")
    def _some_batch_size(self) -> OptimConfig:
        if self.batch_size is None and self.batch_tokens is None:
            raise ValueError("set optim.batch_size (pairs) or optim.batch_tokens (tokens), or both")
        if not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"optim.betas must both lie in [0, 1), got {list(self.betas)}")
        return self


class EvalConfig(BaseModel):
    """Periodic evaluation on the eval split."""

    model_config = _SECTION

    every: int = Field(
        default=0, ge=0, description="Evaluate every this many steps; 0 = only at the end."
    )
    every_epoch: bool = Field(
        default=False,
        description="Also evaluate at the end of every epoch (TRL's eval_strategy: epoch).",
    )
    batch_size: int = Field(
        default=32,
        gt=0,
        description="Groups (a prompt with its responses: a pair for pairwise rows) per "
        "evaluation forward and per reference precompute forward.",
    )
    at_end: bool = Field(
        default=True, description="Evaluate after the last step (the held-out accuracy printed)."
    )


class LoggingConfig(BaseModel):
    """Console, metrics.jsonl and accelerate trackers."""

    model_config = _SECTION

    every: int = Field(
        default=10,
        gt=0,
        description="Write one training record every this many steps (and at the last): the "
        "pair-weighted mean of those steps' metrics, the last step's lr and grad_norm (TRL's "
        "logging_steps). TrainResult.history keeps every step.",
    )
    report_to: list[Tracker] = Field(
        default_factory=list,
        description=f"accelerate trackers to log to, any of {', '.join(TRACKERS)} (tensorboard "
        "writes under <output>/trackers).",
    )
    progress_bar: bool = Field(
        default=True, description="Show a progress bar with loss, reward accuracy and tokens/s."
    )


class CheckpointConfig(BaseModel):
    """accelerate.save_state checkpoints and resuming."""

    model_config = _SECTION

    every: int = Field(
        default=0, ge=0, description="Save a checkpoint every this many steps; 0 = never."
    )
    every_epoch: bool = Field(
        default=False,
        description="Also save a checkpoint at the end of every epoch (TRL's save_strategy: epoch).",
    )
    keep_last: int | None = Field(
        default=2, gt=0, description="Keep only the newest this many checkpoints; null = keep all."
    )
    resume: str | None = Field(
        default=None,
        description="Resume from a checkpoint directory, a run directory (its newest checkpoint), "
        "or 'latest' (the newest in output.dir). --resume with no value = latest.",
    )


class OutputConfig(BaseModel):
    """Where the run writes: config.yaml, metrics.jsonl, checkpoints/, the final model."""

    model_config = _SECTION

    dir: str | None = Field(
        default=None, description="Output directory; null = ./pairopt-output/<run_name>."
    )
    run_name: str | None = Field(
        default=None, description="Run name; null = <loss>-<model>-<date>-<time>.", min_length=1
    )
    save_final: bool = Field(
        default=True,
        description="save_pretrained the trained model and the tokenizer into the output directory.",
    )
    merge_lora: bool = Field(
        default=True,
        description="With LoRA, save the merged full model (loads without peft); the adapter is "
        "saved under adapter/ as well.",
    )


class TrainConfig(BaseModel):
    """Everything `pairopt train` needs."""

    model_config = _SECTION

    model: ModelConfig = Field(default=ModelConfig(), description=ModelConfig.__doc__)
    data: DataConfig = Field(
        default=DataConfig.model_validate({}), description="The preference dataset."
    )
    loss: LossSection = Field(description=LossSection.__doc__)
    engine: EngineConfig = Field(default=EngineConfig(), description=EngineConfig.__doc__)
    reference: ReferenceConfig = Field(
        default=ReferenceConfig(), description=ReferenceConfig.__doc__
    )
    optim: OptimConfig = Field(default=OptimConfig(), description=OptimConfig.__doc__)
    eval: EvalConfig = Field(default=EvalConfig(), description=EvalConfig.__doc__)
    logging: LoggingConfig = Field(default=LoggingConfig(), description=LoggingConfig.__doc__)
    checkpoint: CheckpointConfig = Field(
        default=CheckpointConfig(), description=CheckpointConfig.__doc__
    )
    output: OutputConfig = Field(default=OutputConfig(), description=OutputConfig.__doc__)

    @model_validator(mode="after")
    def _cross_section(self) -> TrainConfig:
        if self.reference.strategy == "adapter" and self.model.lora is None:
            raise ValueError(
                "reference.strategy 'adapter' needs a LoRA policy (set model.lora, e.g. --model.lora.r 16), "
                "or use copy / precompute"
            )
        if self.reference.sync_steps is not None:
            strategy = self.reference.strategy
            if strategy == "auto":
                strategy = "adapter" if self.model.lora is not None else "copy"
            if strategy != "copy":
                raise ValueError(
                    f"reference.sync_steps (TR-DPO) moves a live reference towards the policy; "
                    f"the {strategy} reference cannot be moved (precomputed log-probs would go "
                    "stale, a disabled adapter is the base model): set reference.strategy copy, "
                    "or drop reference.sync_steps"
                )
            if self.model.lora is not None:
                raise ValueError(
                    "reference.sync_steps (TR-DPO) mixes the policy's weights into the "
                    "reference's by name, and a LoRA policy's trainable weights are its adapter, "
                    "not the model's: train without model.lora, or drop reference.sync_steps"
                )
        if self.reference.strategy == "adapter" and self.reference.name_or_path is not None:
            raise ValueError(
                "reference.name_or_path cannot be used with reference.strategy 'adapter'"
            )
        if self.model.lora is not None and importlib.util.find_spec("peft") is None:
            raise ValueError("model.lora needs the peft package: pip install 'pairopt[lora]'")
        dataset = self.data.dataset
        if looks_like_data_file(dataset) and not Path(dataset).expanduser().exists():
            raise ValueError(
                f"data.dataset {dataset!r} does not exist (give an existing .json/.jsonl/.parquet/"
                ".csv file or folder, a hub dataset ID, or builtin:NAME)"
            )
        for tracker in self.logging.report_to:
            if not _tracker_available(tracker):
                raise ValueError(
                    f"logging.report_to names {tracker!r}, but its package is not installed "
                    f"(pip install {tracker.replace('_', '-')}), or drop it from logging.report_to"
                )
        return self

    def to_yaml_dict(self) -> dict[str, Any]:
        """The resolved config as saved in config.yaml (loss parameters flat)."""
        out = self.model_dump(mode="json")
        out["loss"] = self.loss.flat()
        return out

    def to_yaml(self) -> str:
        """config.yaml's text; its last line is CONFIG_END, so a reader tells a complete file
        from one cut short (config_load.read_yaml with saved_by_run)."""
        return yaml.safe_dump(self.to_yaml_dict(), sort_keys=False) + CONFIG_END + "\n"

    def flat(self) -> dict[str, Any]:
        """Dotted keys -> scalars (lists and None as text): tracker hyper-parameters, and the
        settings a checkpoint records to compare on resume."""
        out: dict[str, Any] = {}

        def walk(node: Any, prefix: str) -> None:
            if isinstance(node, dict):
                for key, value in node.items():
                    walk(value, f"{prefix}{key}.")
            else:
                out[prefix[:-1]] = node if isinstance(node, bool | int | float | str) else str(node)

        walk(self.to_yaml_dict(), "")
        return out


def _tracker_available(name: str) -> bool:
    module = {"comet_ml": "comet_ml", "tensorboard": "tensorboard"}.get(name, name)
    if name == "tensorboard":
        return (
            importlib.util.find_spec("tensorboard") is not None
            or importlib.util.find_spec("tensorboardX") is not None
        )
    return importlib.util.find_spec(module) is not None


def _checked_model_source(value: str, *, tokenizer: bool) -> str:
    try:
        check_model_source(value, tokenizer=tokenizer)
    except PairoptError as err:
        raise ValueError(str(err)) from None
    return value


def model_in(annotation: Any) -> type[BaseModel] | None:
    candidates = typing.get_args(annotation) if is_union(annotation) else (annotation,)
    for candidate in candidates:
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def is_union(annotation: Any) -> bool:
    return typing.get_origin(annotation) in (typing.Union, types.UnionType)
