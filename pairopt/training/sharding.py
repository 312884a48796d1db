"""Sharded training as accelerate applies it: FSDP2 and DeepSpeed ZeRO-2 / ZeRO-3.

accelerate shards the policy (`accelerate.prepare(PolicyLogps(policy), optimizer)`); this module
holds what pairopt adds around it:

- `check_sharding`: an accelerate config that asks for FSDP or DeepSpeed gets it, or the run
  stops before anything loads. accelerate itself falls back to DDP without a word when it
  cannot apply them (on the CPU: accelerate/state.py applies FSDP only to accelerator devices
  and DeepSpeed only without `cpu=True`), and a run that believes it is sharded writes
  checkpoints of another layout and needs `world` times the memory.
- `configure_deepspeed`: the DeepSpeed settings pairopt owns (micro-batch size, gradient
  accumulation, clipping, the full-weights gather the final save needs).
- `shard_frozen`: a frozen module (the `copy` reference, or another reference model for
  `precompute`) sharded the way the policy is: FSDP2 groups per decoder layer and a root,
  ZeRO-3 partitions; never a whole replica per device when the policy is sharded. Every model
  call goes through such a module's forward (see pairopt.training.policy).

Under ZeRO-1/2 parameters are not partitioned (gradients and optimiser state are), so a frozen
module is whole on each process there, as the policy's weights are.
"""

from __future__ import annotations

import contextlib
import copy
import os
from collections.abc import Iterator
from typing import Any

from torch import nn

from pairopt.errors import PairoptError
from pairopt.training.config import OptimConfig


def sharding_of(accelerator: Any) -> str | None:
    """'fsdp2', 'fsdp1', 'zero0' ... 'zero3', or None (one process or DDP)."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.FSDP:
        return "fsdp2" if getattr(accelerator, "is_fsdp2", False) else "fsdp1"
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        stage = deepspeed_config(accelerator).get("zero_optimization", {}).get("stage", 0)
        return f"zero{stage}"
    return None


def partitions_parameters(accelerator: Any) -> bool:
    """Whether each process holds only a shard of every parameter (FSDP, ZeRO-3)."""
    kind = sharding_of(accelerator)
    return kind is not None and (kind.startswith("fsdp") or kind == "zero3")


def launch_of(accelerator: Any) -> dict[str, Any]:
    """What a checkpoint's optimiser state and batch plan depend on: the number of processes
    and the sharding ('none' for one process or DDP). A checkpoint records it; a resume under
    another launch is refused (checkpoint.check_resumable)."""
    return {
        "processes": int(accelerator.num_processes),
        "sharding": sharding_of(accelerator) or "none",
    }


def describe_launch(launch: dict[str, Any]) -> str:
    """'1 process', '4 processes (DDP)', '8 processes under zero3'."""
    n, kind = launch["processes"], launch["sharding"]
    if n == 1 and kind == "none":
        return "1 process"
    return f"{n} processes " + ("(DDP)" if kind == "none" else f"under {kind}")


def deepspeed_config(accelerator: Any) -> dict[str, Any]:
    """The DeepSpeed config accelerate will pass to deepspeed.initialize (filled in by prepare)."""
    return accelerator.state.deepspeed_plugin.deepspeed_config


def _requested() -> str | None:
    """What the accelerate launch asked for (`accelerate launch` sets these from the config)."""
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        return "DeepSpeed"
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        return "FSDP"
    return None


def check_sharding(accelerator: Any, *, optimizer: str, tr_dpo: bool) -> None:
    """Refuse, before anything loads, a sharded setup pairopt would not run as asked.

    `optimizer`: optim.optimizer; `tr_dpo`: reference.sync_steps is set."""
    requested, kind = _requested(), sharding_of(accelerator)
    if requested is not None and kind is None and accelerator.num_processes > 1:
        raise PairoptError(
            f"the accelerate config asks for {requested}, but accelerate does not apply it here "
            "(it shards only on GPUs and other accelerator devices, and this machine has none): "
            "it would run DDP, every process holding the whole model. Launch without the "
            f"{requested} config on this machine (torchrun, or accelerate launch with DDP), or "
            "run the config on GPUs."
        )
    if kind == "fsdp1":
        raise PairoptError(
            "the accelerate config asks for FSDP version 1; pairopt runs FSDP2 (fully_shard), "
            "the one it is tested with: set fsdp_version: 2 in fsdp_config "
            "(examples/accelerate_fsdp2.yaml; accelerate >= 1.6, tested with 1.15)."
        )
    if kind is None:
        return
    if tr_dpo:
        raise PairoptError(
            f"reference.sync_steps (TR-DPO) is not supported under {kind}: the mixing of the "
            "policy's weights into the reference's is written for whole parameters. Drop "
            "reference.sync_steps, or train with DDP."
        )
    if kind == "fsdp2":
        _check_fsdp2(accelerator, optimizer)
    elif kind == "zero3" and accelerator.state.deepspeed_plugin.zero3_init_flag:
        raise PairoptError(
            "the DeepSpeed config enables zero3_init_flag (deepspeed.zero.Init: the model is "
            "built partitioned), but pairopt copies the reference and fingerprints the weights "
            "from the whole model before sharding: set zero3_init_flag: false "
            "(examples/accelerate_deepspeed_zero3.yaml). Each process then loads the whole "
            "model into CPU memory (twice with a copy reference), and ZeRO-3 partitions it "
            "when training starts (built_whole)."
        )


def _check_fsdp2(accelerator: Any, optimizer: str) -> None:
    plugin = accelerator.state.fsdp_plugin
    full = "FULL" in str(getattr(plugin, "state_dict_type", ""))
    if full and optimizer == "sgd":
        # torch.distributed.checkpoint.state_dict.set_optimizer_state_dict with a full state
        # dict fails for an optimiser whose state holds no tensors ("Expected device to be
        # set", torch 2.13), so such a checkpoint could be written but never resumed.
        raise PairoptError(
            "FSDP with fsdp_state_dict_type FULL_STATE_DICT cannot resume an SGD optimiser "
            "(torch cannot load its tensor-less state into the sharded model): set "
            "fsdp_state_dict_type: SHARDED_STATE_DICT, or optim.optimizer adamw."
        )


@contextlib.contextmanager
def built_whole(accelerator: Any) -> Iterator[None]:
    """Models built inside are whole on each process, also under ZeRO-3.

    accelerate registers a ZeRO-3 config with transformers (HfDeepSpeedConfig) whatever its
    zero3_init_flag says (accelerate 1.15 DeepSpeedPlugin.set_deepspeed_weakref), and
    transformers then builds every model under deepspeed.zero.Init, partitioned as it is
    constructed. pairopt takes the reference copy, the cache fingerprint and the LoRA layers
    from the whole weights, and deepspeed.initialize partitions them afterwards, so the
    registration is lifted while models are built (and made again after)."""
    if sharding_of(accelerator) != "zero3":
        yield
        return
    from transformers.integrations import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        accelerator.state.deepspeed_plugin.set_deepspeed_weakref()


def configure_deepspeed(accelerator: Any, cfg: OptimConfig) -> None:
    """The DeepSpeed settings that follow pairopt's own: micro-batch size, gradient
    accumulation, clipping; and under ZeRO-3 the gather of the full weights for the final save.

    DeepSpeed clips gradients itself (accelerate's clip_grad_norm_ only reads the norm there),
    at 1.0 when the config leaves it to accelerate's "auto": optim.max_grad_norm is written
    into the config instead (null: 0.0, no clipping). A value the config sets must agree.
    """
    if not (sharding_of(accelerator) or "").startswith("zero"):
        return
    config = deepspeed_config(accelerator)
    if config.get("train_micro_batch_size_per_gpu", "auto") == "auto":
        # accelerate takes it from a dataloader pairopt does not use; it only sizes
        # DeepSpeed's own batch bookkeeping, the batches are pairopt's (optim.batch_size)
        config["train_micro_batch_size_per_gpu"] = cfg.batch_size or 1
    _agree(config, "gradient_accumulation_steps", cfg.grad_accum, "optim.grad_accum")
    _agree(config, "gradient_clipping", cfg.max_grad_norm or 0.0, "optim.max_grad_norm")
    zero = config.setdefault("zero_optimization", {})
    if zero.get("stage") == 3:
        # save_final needs the whole weights on the main process (accelerate's get_state_dict
        # refuses ZeRO-3 without this); it costs a gather at save time only
        zero["stage3_gather_16bit_weights_on_model_save"] = True


def _agree(config: dict[str, Any], key: str, ours: float, field: str) -> None:
    value = config.get(key, "auto")
    if value == "auto":
        config[key] = ours
    elif float(value) != float(ours):
        raise PairoptError(
            f"the DeepSpeed config sets {key}={value} but {field} is {ours or 'null'}: make them "
            f"equal, or set {key} to 'auto' (or leave it out) and pairopt fills it in."
        )


def shard_frozen(module: nn.Module, accelerator: Any) -> nn.Module:
    """`module` (a frozen PolicyLogps) placed like the policy, in eval mode; call it after
    `accelerator.prepare` of the policy (the DeepSpeed config is complete only then).

    FSDP2: accelerate's own sharding of the policy (fsdp2_prepare_model: the same groups,
    mixed precision and device mesh), without an optimiser, resharded after every forward. DeepSpeed: an engine of its own,
    ZeRO-3 partitioned under ZeRO-3, else stage 0 (whole, like the policy's weights). DDP or
    one process: moved to the device (no gradient sync is needed)."""
    kind = sharding_of(accelerator)
    if kind == "fsdp2":
        from accelerate.utils.fsdp_utils import fsdp2_prepare_model

        with _layer_classes_of(accelerator.state.fsdp_plugin, module):
            placed = fsdp2_prepare_model(accelerator, module)
        # FSDP2 keeps the root group (embeddings, final norm, LM head) whole from a forward to
        # its backward; a frozen module has no backward, so it would keep them whole for good
        placed.set_reshard_after_forward(True, recurse=False)
    elif kind is not None and kind.startswith("zero"):
        import deepspeed

        config = copy.deepcopy(deepspeed_config(accelerator))
        config.pop("optimizer", None)
        config.pop("scheduler", None)
        if kind != "zero3":
            config["zero_optimization"] = {"stage": 0}
        placed, *_ = deepspeed.initialize(model=module, config=config)
    else:
        placed = accelerator.prepare_model(module, evaluation_mode=True)
    placed.eval()  # (DeepSpeedEngine.eval returns None, not the engine)
    return placed


@contextlib.contextmanager
def _layer_classes_of(plugin: Any, module: nn.Module) -> Iterator[None]:
    """FSDP2's per-layer groups for `module`: preparing the policy wrote the policy's decoder
    layer classes into the plugin (accelerate's set_auto_wrap_policy), and accelerate refuses a
    module that has none of them ("Could not find the transformer layer class ..."): a
    reference of another architecture (reference.name_or_path). Its own `_no_split_modules`
    are used while it is sharded, then the plugin's names are put back."""
    names = getattr(plugin, "transformer_cls_names_to_wrap", None)
    present = {type(m).__name__ for m in module.modules()}
    if names is None or all(name in present for name in names):
        yield
        return
    plugin.transformer_cls_names_to_wrap = list(getattr(module, "_no_split_modules", None) or [])
    try:
        yield
    finally:
        plugin.transformer_cls_names_to_wrap = names


def release_frozen(module: nn.Module, accelerator: Any) -> None:
    """Forget a frozen module `shard_frozen` placed, once it is no longer used (the reference
    model of a precompute pass): accelerate's prepare_model keeps every model it prepares for
    its checkpoints (save_state would write it into each one, and keep it on the device)."""
    models = getattr(accelerator, "_models", [])
    for index, prepared in enumerate(models):
        if prepared is module:
            del models[index]
            return


def check_lora_head(model: nn.Module, kind: str | None) -> None:
    """Under ZeRO-3 a LoRA adapter on the LM head would call the head's base layer once per
    chunk, each call a gather of its weight: a different number of collectives on processes
    with different numbers of scored tokens, which hangs. `model` is the policy after LoRA."""
    head = model.get_output_embeddings()  # type: ignore[operator]
    if kind == "zero3" and head is not None and hasattr(head, "base_layer"):
        raise PairoptError(
            "model.lora.target_modules puts a LoRA adapter on the LM head, which pairopt does "
            "not run under DeepSpeed ZeRO-3 (the head's weight would be gathered once per "
            "logits chunk, differently often on each process): leave the output layer out of "
            'target_modules ("all-linear" already does), or train under FSDP2.'
        )


def full_numel(param: Any) -> int:
    """The elements of the whole parameter: ZeRO-3 leaves a (0,) placeholder outside a forward
    (its true size is `ds_numel`); an FSDP2 DTensor counts its global elements already."""
    return int(getattr(param, "ds_numel", param.numel()))


def unwrap(wrapped: nn.Module) -> nn.Module:
    """The module inside a DDP wrapper or DeepSpeed engine (their `module`), or itself (FSDP2
    shards in place). Not accelerate's unwrap_model, which imports deepspeed whenever it is
    installed (seconds, and a line on stdout) in runs that do not use it."""
    inner = getattr(wrapped, "module", None)
    return inner if isinstance(inner, nn.Module) else wrapped
