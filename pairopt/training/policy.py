"""The policy: loading (model, tokenizer), dropout off, LoRA, and `PolicyLogps`.

`PolicyLogps` is the policy as one module whose forward *is* `compute_logps`. DDP, FSDP and
DeepSpeed wrap that module, so they see the forward they need for gradient sync and sharding;
the engine itself calls the backbone and the LM head separately, which a wrapped model would
not see. Every model call of a run goes through such a forward: the policy's, the LoRA
reference's (`base=True`: the same module with the adapter disabled) and a frozen reference
copy's (a PolicyLogps of its own, sharded like the policy: pairopt.training.sharding). FSDP2
gathers the root group (embeddings, final norm, LM head) only in the root's forward; the engine
called on the inner model outside it fails ("mixed torch.Tensor and DTensor").
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterable, Sequence
from typing import Any

from torch import nn

from pairopt.engine.compat import disable_dropout
from pairopt.engine.forward import compute_group_logps, compute_logps
from pairopt.errors import PairoptError
from pairopt.pairs import GroupLogps, PairLogps, PreferencePair, ResponseGroup
from pairopt.sources import resolve_path
from pairopt.training.config import LoraSection, ModelConfig
from pairopt.training.models import load_causal_lm


class Pairs:
    """Hides the pairs from DDP's input traversal (it would walk every token id in Python)."""

    def __init__(self, pairs: Sequence[PreferencePair]) -> None:
        self.pairs = pairs


class Groups:
    """Groups of k responses, hidden from DDP's input traversal like `Pairs`."""

    def __init__(self, groups: Sequence[ResponseGroup]) -> None:
        self.groups = groups


class PolicyLogps(nn.Module):
    """The policy as one module whose forward is `compute_logps` (see the module docstring):
    `Pairs` -> PairLogps (N,), `Groups` -> GroupLogps (R,), every response once.

    `base=True` runs the PEFT model with its LoRA adapter disabled: the base model, which is
    the reference of strategy `adapter`, computed inside this forward like the policy.
    `statistics` replaces the engine's per-token statistics for this call (a reference's)."""

    def __init__(self, model: nn.Module, engine_kwargs: dict[str, Any]) -> None:
        super().__init__()
        self.model = model
        self.engine_kwargs = engine_kwargs
        # FSDP's auto-wrap policy reads the transformer block classes from here.
        self._no_split_modules = getattr(hf_model(model), "_no_split_modules", None)
        # accelerate fills DeepSpeed's "auto" bucket sizes from config.hidden_size.
        self.config = getattr(hf_model(model), "config", None)

    def forward(
        self,
        batch: Pairs | Groups,
        *,
        base: bool = False,
        statistics: Iterable[str] | None = None,
    ) -> PairLogps | GroupLogps:
        kwargs = self.engine_kwargs
        if statistics is not None:  # the per-token values asked of this call (a reference's)
            kwargs = {**kwargs, "statistics": statistics}
        peft: Any = self.model  # a PeftModel when base is asked for (strategy adapter)
        with peft.disable_adapter() if base else contextlib.nullcontext():
            if isinstance(batch, Groups):
                return compute_group_logps(hf_model(self.model), batch.groups, **kwargs)
            return compute_logps(hf_model(self.model), batch.pairs, **kwargs)


def load_tokenizer(cfg: ModelConfig) -> Any:
    """The policy's tokenizer (a pad token is set to EOS when the tokenizer has none)."""
    from transformers import AutoTokenizer

    path = resolve_path(cfg.name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            path, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code
        )
    except (OSError, ValueError) as err:
        raise PairoptError(
            f"could not load the tokenizer of model.name_or_path {cfg.name_or_path!r}: {err}"
        ) from None
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(cfg: ModelConfig, *, seed: int, name_or_path: str | None = None) -> nn.Module:
    """A causal LM from the hub, a directory, or a config without weights (built under `seed`),
    loaded as the model section says; `name_or_path` replaces the section's (a reference model)."""
    return load_causal_lm(
        name_or_path or cfg.name_or_path,
        dtype=cfg.dtype,
        seed=seed,
        revision=cfg.revision,
        trust_remote_code=cfg.trust_remote_code,
        attn_implementation=cfg.attn_implementation,
    )


def context_length(cfg: ModelConfig) -> int | None:
    """The most positions the model takes (max_position_embeddings in its config), read from
    the config without loading weights. None when the config does not say, or cannot be read
    (loading the model then reports why)."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(
            resolve_path(cfg.name_or_path),
            revision=cfg.revision,
            trust_remote_code=cfg.trust_remote_code,
        )
    except Exception:  # any failure here is load_model's to report, with its own message
        return None
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(text, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def hf_model(model: nn.Module) -> nn.Module:
    """The transformers model (under PEFT: the base model with the LoRA layers injected)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def enable_checkpointing(model: nn.Module) -> None:
    """Non-reentrant activation checkpointing (transformers' name for it changed in 5.2x)."""
    hf: Any = hf_model(model)
    no_reentrant = {"use_reentrant": False}
    if hasattr(hf, "activation_checkpointing_enable"):
        hf.activation_checkpointing_enable(activation_checkpointing_kwargs=no_reentrant)
    else:
        hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs=no_reentrant)
    hf.config.use_cache = False


def switch_off_dropout(model: nn.Module) -> str:
    """Switch dropout off (the shared forward is exact only without it) and say what changed."""
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        changed = disable_dropout(model)
    if changed:
        return f"switched off in {changed} places (the prefix-shared forward is exact only without dropout)"
    return "none active (the prefix-shared forward is exact only without dropout)"


def apply_lora(model: nn.Module, lora: LoraSection) -> nn.Module:
    """Wrap `model` in a PEFT LoRA adapter as the section says (no adapter dropout)."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:  # the config check found peft; a broken install still deserves a message
        raise PairoptError(
            "model.lora needs the peft package: pip install 'pairopt[lora]'"
        ) from None
    peft_config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        target_modules=lora.target_modules or "all-linear",
        lora_dropout=0.0,
        task_type="CAUSAL_LM",
    )
    try:
        return get_peft_model(model, peft_config)
    except ValueError as err:  # e.g. target modules that the model does not have
        linear = sorted(
            {
                name.rsplit(".", 1)[-1]
                for name, m in model.named_modules()
                if isinstance(m, nn.Linear)
            }
        )
        raise PairoptError(
            f"model.lora.target_modules {lora.target_modules}: {str(err).rstrip('.')}. This "
            f"model's linear layers are named: {', '.join(linear)} (or leave target_modules "
            "empty for all of them)."
        ) from None
