"""`combined`: a weighted sum of registered losses, each computed (and normalised) on its own."""

from __future__ import annotations

from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from pairopt.errors import PairoptError
from pairopt.loss import (
    Loss,
    LossConfig,
    LossOutput,
    PairLoss,
    build_loss,
    get_loss_class,
    register_loss,
    validate_params,
)
from pairopt.pairs import PairLogps


class Term(BaseModel):
    """One term of a combination: a registered loss, its weight and its parameters."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    name: str = Field(description="name of a registered loss (see `pairopt losses`)")
    weight: float = Field(1.0, gt=0, description="multiplies the term's per-pair loss")
    params: dict[str, Any] = Field(
        default_factory=dict, description="the term's own parameters, checked by its Config"
    )


@register_loss("combined")
class Combined(PairLoss):
    """A weighted sum of losses, e.g. DPO + SFT; each term is normalised on its own.

    Paper: none. TRL's `loss_type=[...]` with `loss_weights=[...]` (e.g. MPO: sigmoid + bco_pair
    + sft) is the same idea.

    Formula (per pair):

        loss = Σ_k w_k · loss_k

    Symbols: loss_k the per-pair loss of term k, computed by that loss with its own parameters and
    its own normalisation (a per-token average stays a per-token average, a summed-log-prob loss
    stays summed); w_k > 0 its weight. Since each loss_k is already a per-pair quantity, the batch
    loss is Σ_k w_k · mean(loss_k): no term is re-weighted by another's token counts.

    Shapes: policy (and, if any term needs it, reference) PairLogps fields (N,) → losses (N,).

    Example: build_loss("combined", terms=[{"name": "dpo", "params": {"beta": 0.1}},
    {"name": "sft", "weight": 0.2}]); in a config file:
    `loss: {name: combined, terms: [{name: dpo}, {name: sft, weight: 0.2}]}`.

    Reference: needed iff some term needs it. The class attribute says True (the safe answer
    before the terms are known); a built instance's `requires_reference` is exact.

    Metrics: each term's metrics (for a key reported by several terms, the first term's value),
    plus `loss/<name>` = the mean of each term's unweighted per-pair loss.

    Defaults: `terms` is required.

    Deviations: none; TRL also sums weighted batch means of per-sequence losses.
    """

    summary = "Weighted sum of losses, each normalised on its own (DPO + SFT); reference iff a term needs one"
    requires_reference = True  # per instance: True iff some term needs it (set in __init__)

    class Config(LossConfig):
        terms: list[Term] = Field(
            min_length=1,
            description='the losses to add, e.g. [{"name": "dpo"}, {"name": "sft", "weight": 0.2}]',
        )

        @field_validator("terms")
        @classmethod
        def _terms_are_valid(cls, terms: list[Term]) -> list[Term]:
            # Check every term's name and parameters now, so a bad term fails before any model loads.
            for index, term in enumerate(terms):
                try:
                    loss_class = get_loss_class(term.name)
                    validate_params(loss_class, term.params)
                except PairoptError as err:
                    raise ValueError(f"term {index} ({term.name!r}): {err}") from None
                if loss_class.kind != "pair":
                    raise ValueError(
                        f"term {index} ({term.name!r}) is a {loss_class.kind}wise loss; combined "
                        "adds pair losses only (each term gets the pairs' log-probs): use "
                        f"--loss {term.name} on its own, or a pair loss as this term"
                    )
            return terms

    config: Config

    def __init__(self, config: LossConfig | None = None) -> None:
        super().__init__(config)
        # ModuleList so that stateful terms (bco_pair's running shift) move and checkpoint with us.
        self.terms = torch.nn.ModuleList(build_loss(t.name, **t.params) for t in self.config.terms)
        self.weights = [t.weight for t in self.config.terms]
        self.requires_reference = any(term.requires_reference for term in self.terms)
        built: list[Loss] = list(self.terms)  # type: ignore[arg-type]  # ModuleList of Loss
        self.token_statistics = frozenset().union(*(t.token_statistics for t in built))
        self.reference_token_statistics = frozenset().union(
            *(t.reference_token_statistics for t in built)
        )
        names = [t.name for t in self.config.terms]
        self._metric_names = [
            f"loss/{name}" if names.count(name) == 1 else f"loss/{name}_{i}"
            for i, name in enumerate(names)
        ]

    def compute(self, policy: PairLogps, reference: PairLogps | None) -> LossOutput:
        losses_N = torch.zeros_like(policy.chosen_logps)
        metrics: dict[str, torch.Tensor] = {}
        for term, weight, metric_name in zip(
            self.terms, self.weights, self._metric_names, strict=True
        ):
            out = term(policy, reference if term.requires_reference else None)
            losses_N = losses_N + weight * out.losses
            for key, value in out.metrics.items():
                metrics.setdefault(key, value)
            metrics[metric_name] = out.losses.detach().mean()
        return LossOutput(losses_N, metrics)
