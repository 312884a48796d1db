"""The policy: loading (model, tokenizer), dropout off, LoRA, and `PolicyLogps`.

`PolicyLogps` is the policy as one module whose forward *is* `compute_logps`. DDP, FSDP and
DeepSpeed wrap that module, so they see the forward they need for gradient sync and sharding;
the engine itself calls the backbone and the LM head separately, which a wrapped model would
not see.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

from torch import nn

from pairopt.config import TrainConfig
from pairopt.engine.compat import disable_dropout
from pairopt.engine.forward import compute_logps
from pairopt.errors import PairoptError
from pairopt.models import load_causal_lm, resolve_path
from pairopt.pairs import PairLogps, PreferencePair


class Pairs:
    """Hides the pairs from DDP's input traversal (it would walk every token id in Python)."""

    def __init__(self, pairs: Sequence[PreferencePair]) -> None:
        self.pairs = pairs


class PolicyLogps(nn.Module):
    """The policy as one module whose forward is `compute_logps` (see the module docstring)."""

    def __init__(self, model: nn.Module, engine_kwargs: dict[str, Any]) -> None:
        super().__init__()
        self.model = model
        self.engine_kwargs = engine_kwargs
        # FSDP's auto-wrap policy reads the transformer block classes from here.
        self._no_split_modules = getattr(self.hf_model(), "_no_split_modules", None)

    def hf_model(self) -> nn.Module:
        """The transformers model (under PEFT: the base model with the LoRA layers injected)."""
        get_base = getattr(self.model, "get_base_model", None)
        return get_base() if callable(get_base) else self.model

    def forward(self, batch: Pairs) -> PairLogps:
        return compute_logps(self.hf_model(), batch.pairs, **self.engine_kwargs)


def load_tokenizer(cfg: TrainConfig) -> Any:
    """The policy's tokenizer (a pad token is set to EOS when the tokenizer has none)."""
    from transformers import AutoTokenizer

    path = resolve_path(cfg.model.name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            path, revision=cfg.model.revision, trust_remote_code=cfg.model.trust_remote_code
        )
    except (OSError, ValueError) as err:
        raise PairoptError(
            f"could not load the tokenizer of model.name_or_path {cfg.model.name_or_path!r}: {err}"
        ) from None
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(name_or_path: str, cfg: TrainConfig, *, seed: int) -> nn.Module:
    """A causal LM from the hub, a directory, or a config without weights (built under `seed`)."""
    return load_causal_lm(
        name_or_path,
        dtype=cfg.model.dtype,
        seed=seed,
        revision=cfg.model.revision,
        trust_remote_code=cfg.model.trust_remote_code,
        attn_implementation=cfg.model.attn_implementation,
    )


def hf_model(model: nn.Module) -> nn.Module:
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def switch_off_dropout(model: nn.Module) -> str:
    """Switch dropout off (the shared forward is exact only without it) and say what changed."""
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        changed = disable_dropout(model)
    if changed:
        return f"switched off in {changed} places (the prefix-shared forward is exact only without dropout)"
    return "none active (the prefix-shared forward is exact only without dropout)"


def apply_lora(model: nn.Module, cfg: TrainConfig) -> nn.Module:
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:  # the config check found peft; a broken install still deserves a message
        raise PairoptError(
            "model.lora needs the peft package: pip install 'pairopt[lora]'"
        ) from None
    lora = cfg.model.lora
    assert lora is not None
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
