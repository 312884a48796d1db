"""The loss contract: what a loss plugin is, what it receives and what it returns.

A loss plugin is a `Loss` of one of two kinds: a `PairLoss` (here) or a listwise `ListLoss`
(pairopt/loss/listwise.py), registered by name in pairopt.loss.registry. A `PairLoss` turns
the policy's (and, when it declares `requires_reference`, the reference's) per-pair
log-probabilities into per-pair losses and a few detached scalar metrics. It never sees a model,
a tokenizer or a mask, so every plugin gets the prefix-shared forward for free, and nothing
outside a plugin branches on its name: the trainer reads the declared class attributes instead.

Losses on the policy/reference log-ratios (DPO and most of its family) subclass
`ReferencePairLoss` and implement `compute_ratios(ratios)`: they receive a `LogRatios` with
s = S − S^ref for chosen and rejected and the margin Δ = s_c − s_r, and write only their formula.
Those whose Config subclasses `DivergenceConfig` accept f-DPO's divergences: their margin is then
f'(π/π_ref) of chosen minus that of rejected (`divergence_score`).

Symbols (docs/losses.md): S summed log-probs of a response, n its token count, A = S / n,
c chosen, r rejected, s = S − S^ref, Δ = s_c − s_r, β a temperature.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from pairopt.errors import PairoptError
from pairopt.pairs import PairLogps

# What a plugin's `compute` receives: "pair" PairLogps (N,) (PairLoss), "list" ListLogps (G, K)
# (pairopt.loss.listwise.ListLoss).
LOSS_KINDS = ("pair", "list")

# The metric keys every loss reports (TRL's names, so existing dashboards keep working).
STANDARD_METRICS = (
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
)


class LossConfig(BaseModel):
    """Base of every plugin's `Config`: frozen, unknown keys rejected.

    Every field needs a `description` (it is the CLI help and the docs) and bounds.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    @classmethod
    def ordered_fields(cls) -> dict[str, Any]:
        """The fields with the plugin's own first, then those of the option mixins it takes
        (DivergenceConfig, LengthDesensitizedConfig, WeightedConfig): the order `pairopt
        losses`, the docs and config.yaml show (pydantic puts inherited fields first)."""
        options = [
            name
            for mixin in (DivergenceConfig, LengthDesensitizedConfig, WeightedConfig)
            for name in mixin.model_fields
            if name in cls.model_fields
        ]
        order = [name for name in cls.model_fields if name not in options] + options
        return {name: cls.model_fields[name] for name in order}


@dataclass
class LossOutput:
    """What a loss returns.

    `losses`: per-pair losses, shape (N,); the trainer optimises `losses.mean()`, so a loss that
    couples the batch (kto_pair) still returns values whose mean is its batch loss.
    `metrics`: detached scalar tensors (batch means) under STANDARD_METRICS plus loss-specific keys.
    """

    losses: torch.Tensor
    metrics: dict[str, torch.Tensor]


class Loss(torch.nn.Module):
    """What every loss plugin is, whatever it receives: a name, a kind, a need, a Config.

    An `nn.Module` so that a loss with state (bco_pair's running reward mean) keeps it in buffers
    that move with `.to(device)` and are saved with `state_dict()`; stateless losses pay nothing.
    Plugins subclass one of the two kinds: `PairLoss` (per-pair log-probs) or
    `pairopt.loss.listwise.ListLoss` (every response of a group with its score).

    Class attributes a plugin declares (read by the trainer before anything is loaded):
      name                set by `@register_loss`
      kind                "pair" or "list": what `compute` receives (set by the base class)
      summary             one line, shown by `pairopt losses`
      requires_reference  whether `compute` needs the reference model's log-probs
      token_statistics    per-token values the policy's forward must also give
                          (pairopt.engine.logps.TOKEN_STATISTICS; in PairLogps.token_values)
      reference_token_statistics  the same, of the reference's forward
      Config              the pydantic model of its parameters (frozen, bounded, described)
    """

    name: ClassVar[str] = ""
    kind: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    # Not ClassVars: a combination decides per instance (its terms), see losses/combined.py,
    # and LD-DPO / WPO options need token statistics only when they are on.
    requires_reference: bool = False
    token_statistics: frozenset[str] = frozenset()
    reference_token_statistics: frozenset[str] = frozenset()
    Config: ClassVar[type[LossConfig]] = LossConfig

    def __init__(self, config: LossConfig | None = None) -> None:
        super().__init__()
        if config is None:
            config = self.Config()
        elif not isinstance(config, self.Config):
            raise TypeError(
                f"{type(self).__name__} takes a {self.Config.__name__}, got {type(config).__name__}"
            )
        self.config: Any = config

    def extra_repr(self) -> str:
        return ", ".join(f"{key}={value!r}" for key, value in self.config.model_dump().items())


class PairLoss(Loss):
    """Base class of the pair losses (kind "pair"); subclasses implement `compute`.

    It receives per-pair log-probs (`PairLogps`, (N,)); on data with k responses per prompt
    those index into the group's response log-probs, so every pair loss trains on the pairs of
    a group unchanged.
    """

    kind: ClassVar[str] = "pair"

    def compute(self, policy: PairLogps, reference: PairLogps | None) -> LossOutput:
        """Per-pair losses (N,) and metrics. `reference` is None iff not `requires_reference`."""
        raise NotImplementedError(
            f"{type(self).__name__} must implement compute(policy, reference)"
        )

    def forward(self, policy: PairLogps, reference: PairLogps | None = None) -> LossOutput:
        """Check the inputs, cut the reference out of the graph, and call `compute`.

        Half-precision log-probs are upcast to float32: sigmoids and squares of summed log-probs
        lose too much in bf16 (sums reach -1e3 and bf16 keeps ~3 significant digits).
        """
        _check_logps(policy, "policy")
        _check_statistics(self, policy.token_values, self.token_statistics, "policy")
        if self.requires_reference:
            if reference is None:
                raise missing_reference(self)
            _check_logps(reference, "reference")
            _check_statistics(
                self, reference.token_values, self.reference_token_statistics, "reference"
            )
            if len(reference) != len(policy):
                raise ValueError(
                    f"policy has {len(policy)} pairs but reference has {len(reference)}"
                )
            reference = _upcast(reference.detach())
        else:
            reference = None
        out = self.compute(_upcast(policy), reference)
        inputs = [policy.chosen_logps, policy.rejected_logps]
        if reference is not None:
            inputs += [reference.chosen_logps, reference.rejected_logps]
        check_output(self.name or type(self).__name__, out, inputs, len(policy))
        return out


def missing_reference(loss: Loss) -> PairoptError:
    return PairoptError(
        f"loss {loss.name or type(loss).__name__!r} needs the reference model's log-probs, "
        "but none were given: configure a reference model (or precomputed reference log-probs)."
    )


def check_output(
    name: str, out: Any, inputs: Sequence[torch.Tensor], n: int, unit: str = "pair"
) -> None:
    """One PairoptError naming the loss and what it returned, for output the trainer cannot use:
    not a LossOutput, losses not of shape (n,) (one per `unit`), losses cut off from the
    gradient of the log-probs `inputs` (policy first, then reference), non-finite losses, or
    metrics that are not scalar tensors."""
    where = f"loss {name!r} returned"
    if not isinstance(out, LossOutput) or not isinstance(out.losses, torch.Tensor):
        got = type(out.losses if isinstance(out, LossOutput) else out).__name__
        raise PairoptError(
            f"{where} {got}; compute must return LossOutput(losses, metrics), losses a tensor (N,)"
        )
    if out.losses.shape != (n,):
        raise PairoptError(
            f"{where} losses of shape {tuple(out.losses.shape)} for {n} {unit}s; a loss returns "
            f"one value per {unit}, shape ({n},) (a batch loss: per-{unit} values whose mean is it)"
        )
    if inputs[0].requires_grad and not out.losses.requires_grad:
        raise PairoptError(
            f"{where} losses without a gradient (detached, computed under no_grad, or built from "
            "Python numbers), so training would not change the model: compute them with torch "
            "operations on the log-probs it is given"
        )
    for key, value in out.metrics.items():
        if not isinstance(value, torch.Tensor) or value.numel() != 1:
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise PairoptError(f"{where} metric {key!r} as {shape}; metrics are scalar tensors")
    finite = torch.isfinite(out.losses.detach())
    if not bool(finite.all()):  # one host sync per micro-batch; the step's metrics sync anyway
        bad = (~finite).nonzero().flatten().tolist()
        first = out.losses[bad[0]].item()
        if all(bool(torch.isfinite(t.detach()).all()) for t in inputs):
            why = (
                f"{where} {first} for {len(bad)} of {n} {unit}s (first: {unit} {bad[0]}) "
                "although the log-probs it was given are finite: check its formula and parameters"
            )
        else:
            why = (
                f"the log-probs given to loss {name!r} are not finite, so the weights have diverged"
            )
        raise PairoptError(f"the loss is {first} (not finite): {why}.")


def _check_statistics(loss: Loss, given: dict[str, Any], wanted: frozenset[str], what: str) -> None:
    """The per-token values a loss declared (LD-DPO, WPO) came with its log-probs."""
    missing = sorted(wanted - set(given))
    if missing:
        attribute = "token_statistics" if what == "policy" else "reference_token_statistics"
        raise PairoptError(
            f"loss {loss.name or type(loss).__name__!r} needs the per-token {missing} of the "
            f"{what}'s forward, which its log-probs do not carry: compute them with "
            f"compute_logps(..., statistics=loss.{attribute}) (the trainer does this itself)."
        )


def _check_logps(logps: PairLogps, what: str) -> None:
    shapes = {
        tuple(t.shape)
        for t in (
            logps.chosen_logps,
            logps.rejected_logps,
            logps.chosen_tokens,
            logps.rejected_tokens,
        )
    }
    if len(shapes) != 1 or len(next(iter(shapes))) != 1:
        raise ValueError(f"{what} PairLogps fields must all have shape (N,), got {sorted(shapes)}")


def _upcast(logps: PairLogps) -> PairLogps:
    if logps.chosen_logps.dtype in (torch.float16, torch.bfloat16):
        return logps._map(lambda t: t.float())
    return logps


# Helpers plugins share (kept here so every plugin reports the same metrics the same way)


def average_logps(logps: PairLogps) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token averages A = S / n for chosen and rejected, each (N,); n clamped to >= 1."""
    chosen_N = logps.chosen_logps / logps.chosen_tokens.clamp(min=1).to(logps.chosen_logps.dtype)
    rejected_N = logps.rejected_logps / logps.rejected_tokens.clamp(min=1).to(
        logps.rejected_logps.dtype
    )
    return chosen_N, rejected_N


def reward_metrics(
    policy: PairLogps, chosen_rewards_N: torch.Tensor, rejected_rewards_N: torch.Tensor
) -> dict[str, torch.Tensor]:
    """The six standard metrics as detached batch means.

    `logps/*` are the mean *summed* log-probs for every loss (reference-free losses included),
    so charts of different losses are comparable.
    """
    chosen_N, rejected_N = chosen_rewards_N.detach(), rejected_rewards_N.detach()
    return {
        "rewards/chosen": chosen_N.mean(),
        "rewards/rejected": rejected_N.mean(),
        "rewards/accuracies": (chosen_N > rejected_N).to(chosen_N.dtype).mean(),
        "rewards/margins": (chosen_N - rejected_N).mean(),
        "logps/chosen": policy.chosen_logps.detach().mean(),
        "logps/rejected": policy.rejected_logps.detach().mean(),
    }


Divergence = Literal["reverse_kl", "forward_kl", "js_divergence", "alpha_divergence"]
# exp() of the alpha-divergence score is capped here (TRL 1.16 caps (α−1)·s at 80 for fp32 too)
_EXP_CAP = 80.0


def divergence_score(ratio: torch.Tensor, divergence: str, alpha: float) -> torch.Tensor:
    """f'(t) at t = π/π_ref = e^s, the score f-DPO compares instead of the log-ratio s, (N,).

        reverse_kl        s                          (plain DPO)
        forward_kl        1 − e^(−s)                 f'(t) = 1 − 1/t
        js_divergence     log 2 + logσ(s)            f'(t) = log(2t / (1 + t))
        alpha_divergence  (e^((α−1)·s) − 1)/(α−1)    f'(t) = (t^(α−1) − 1)/(α−1); α → 1: s

    Wang et al. 2023, https://arxiv.org/abs/2309.16240 , in TRL 1.16's parameterisation of α
    (TRL's f_alpha_divergence_coef; the paper's α is 1 − this one: the two agree at 0.5).
    The exponent is capped at 80 (TRL caps the α-divergence's; its forward_kl overflows to inf
    when the policy falls far below the reference, which here stays finite).
    """
    if divergence == "reverse_kl":
        return ratio
    if divergence == "js_divergence":
        return math.log(2.0) + F.logsigmoid(ratio)
    if divergence == "forward_kl":
        alpha = 0.0  # (t^(−1) − 1)/(−1) = 1 − 1/t
    elif abs(alpha - 1.0) < 1e-6:
        return ratio
    exponent = ((alpha - 1.0) * ratio).clamp(max=_EXP_CAP)
    return torch.expm1(exponent) / (alpha - 1.0)


class DivergenceConfig(LossConfig):
    """Config fields of the losses that accept f-DPO's choice of divergence (the DPO family
    written on the margin Δ): the margin becomes f'(π/π_ref) of chosen minus that of rejected."""

    f_divergence: Divergence = Field(
        "reverse_kl",
        description="f-divergence of the policy from the reference (f-DPO): reverse_kl is the "
        "usual log-ratio; forward_kl, js_divergence, alpha_divergence (TRL's f_divergence_type)",
    )
    f_alpha: float = Field(
        0.5,
        ge=0,
        le=1,
        description="α of alpha_divergence in TRL's form (e^((α−1)s) − 1)/(α−1) (TRL's "
        "f_alpha_divergence_coef; the f-DPO paper's α is 1 − this); 1 gives reverse_kl",
    )


class LengthDesensitizedConfig(LossConfig):
    """Config field of the losses that take LD-DPO's length desensitisation."""

    ld_alpha: float | None = Field(
        None,
        ge=0,
        le=1,
        description="LD-DPO α: the log-probs of a response's tokens past the shorter response's "
        "length count α times, for policy and reference (TRL's ld_alpha); null = plain sums",
    )


class WeightedConfig(LossConfig):
    """Config field of the losses that take WPO's per-pair weights."""

    use_weighting: bool = Field(
        False,
        description="WPO: weigh each pair's loss by w_c·w_r, w = exp(mean over the response's "
        "tokens of log p(y_t) − log Σ_v p_v²), detached (TRL's use_weighting)",
    )


def length_desensitized(logps: PairLogps, alpha: float) -> PairLogps:
    """LD-DPO: each response's summed log-prob with its tokens past l_p = min(n_c, n_r) counted
    α times: S_public + α·S_verbose (only the longer response of a pair has a verbose part).
    Liu et al. 2024, https://arxiv.org/abs/2409.06411 ; needs the "logps" token statistic."""
    chosen_NL, rejected_NL = logps.token_values["logps"]
    shorter_N = torch.minimum(logps.chosen_tokens, logps.rejected_tokens)

    def weighted(tokens_NL: torch.Tensor) -> torch.Tensor:
        steps_L = torch.arange(tokens_NL.shape[1], device=tokens_NL.device)
        verbose_NL = steps_L[None, :] >= shorter_N[:, None]  # padding holds 0s: no matter
        return (tokens_NL * torch.where(verbose_NL, alpha, 1.0).to(tokens_NL.dtype)).sum(-1)

    return PairLogps(
        weighted(chosen_NL),
        weighted(rejected_NL),
        logps.chosen_tokens,
        logps.rejected_tokens,
        logps.token_values,
    )


def wpo_weights(policy: PairLogps) -> torch.Tensor:
    """WPO: w_c·w_r per pair, (N,), detached; w = exp(mean_t [log p(y_t) − log Σ_v p_v²]) over
    a response's tokens (TRL 1.16; no clamp). Zhou et al. 2024, https://arxiv.org/abs/2406.11827 ;
    needs the "logps" and "log_sq_mass" token statistics of the policy."""
    with torch.no_grad():
        (chosen, rejected), (chosen_sq, rejected_sq) = (
            policy.token_values["logps"],
            policy.token_values["log_sq_mass"],
        )

        def weight(values_NL: torch.Tensor, sq_NL: torch.Tensor, n_N: torch.Tensor) -> torch.Tensor:
            # padding: both values are 0 there, so the sum runs over the response's tokens
            n = n_N.clamp(min=1).to(values_NL.dtype)
            return torch.exp((values_NL - sq_NL).sum(-1) / n)

        return weight(chosen, chosen_sq, policy.chosen_tokens) * weight(
            rejected, rejected_sq, policy.rejected_tokens
        )


@dataclass(frozen=True)
class LogRatios:
    """The policy's log-ratios to the reference, per pair (each property is (N,)).

        chosen   = s_c = S_c − S_c^ref
        rejected = s_r = S_r − S_r^ref
        margin   = Δ   = f(s_c) − f(s_r), f the divergence score (`divergence_score`);
                   with the default reverse_kl f(s) = s and Δ = s_c − s_r, DPO's margin

    `reference` is already detached (PairLoss.forward cuts it out of the graph).
    """

    policy: PairLogps
    reference: PairLogps
    divergence: str = "reverse_kl"
    alpha: float = 0.5

    @property
    def chosen(self) -> torch.Tensor:
        return self.policy.chosen_logps - self.reference.chosen_logps

    @property
    def rejected(self) -> torch.Tensor:
        return self.policy.rejected_logps - self.reference.rejected_logps

    @property
    def margin(self) -> torch.Tensor:
        if self.divergence == "reverse_kl":
            return self.chosen - self.rejected
        return self._score(self.chosen) - self._score(self.rejected)

    def per_token_margin(self) -> torch.Tensor:
        """The margin of per-token values, (N,): (A_c − A_c^ref) − (A_r − A_r^ref) with
        reverse_kl (IPO, sigmoid_norm), else f(s_c)/n_c − f(s_r)/n_r as TRL has it.

        The reference's counts equal the policy's (the same response tokens)."""
        if self.divergence != "reverse_kl":
            n_c, n_r = _counts(self.policy)
            return self._score(self.chosen) / n_c - self._score(self.rejected) / n_r
        avg_chosen_N, avg_rejected_N = average_logps(self.policy)
        ref_chosen_N, ref_rejected_N = average_logps(self.reference)
        return (avg_chosen_N - ref_chosen_N) - (avg_rejected_N - ref_rejected_N)

    def rewards(self, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Implicit rewards β·s of chosen and rejected, each (N,), differentiable (whatever the
        divergence: the metrics stay comparable, as in TRL)."""
        return beta * self.chosen, beta * self.rejected

    def metrics(self, beta: float) -> dict[str, torch.Tensor]:
        """The standard metrics with DPO's implicit rewards β·s (detached)."""
        return reward_metrics(self.policy, *self.rewards(beta))

    def _score(self, ratio: torch.Tensor) -> torch.Tensor:
        return divergence_score(ratio, self.divergence, self.alpha)


def _counts(logps: PairLogps) -> tuple[torch.Tensor, torch.Tensor]:
    dtype = logps.chosen_logps.dtype
    return (
        logps.chosen_tokens.clamp(min=1).to(dtype),
        logps.rejected_tokens.clamp(min=1).to(dtype),
    )


class ReferencePairLoss(PairLoss):
    """Base of the losses written on the policy/reference log-ratios: implement `compute_ratios`.

    `requires_reference` is True, so the trainer supplies reference log-probs, and `forward`
    has already refused a missing reference before `compute` runs.
    """

    requires_reference = True

    def __init__(self, config: LossConfig | None = None) -> None:
        super().__init__(config)
        self.ld_alpha: float | None = getattr(self.config, "ld_alpha", None)
        self.use_weighting: bool = getattr(self.config, "use_weighting", False)
        policy_stats, reference_stats = set(), set()
        if self.ld_alpha is not None:
            policy_stats.add("logps")
            reference_stats.add("logps")
        if self.use_weighting:
            policy_stats |= {"logps", "log_sq_mass"}
        self.token_statistics = frozenset(policy_stats)
        self.reference_token_statistics = frozenset(reference_stats)

    def compute(self, policy: PairLogps, reference: PairLogps | None) -> LossOutput:
        if reference is None:  # forward() refuses this first; direct callers get the same message
            raise PairoptError(
                f"loss {self.name or type(self).__name__!r} needs the reference model's log-probs"
            )
        raw = policy
        if self.ld_alpha is not None:  # LD-DPO: every later quantity sees the weighted sums
            policy = length_desensitized(policy, self.ld_alpha)
            reference = length_desensitized(reference, self.ld_alpha)
        if isinstance(self.config, DivergenceConfig):
            ratios = LogRatios(policy, reference, self.config.f_divergence, self.config.f_alpha)
        else:
            ratios = LogRatios(policy, reference)
        out = self.compute_ratios(ratios)
        if self.use_weighting:  # WPO: on the raw per-token log-probs, as TRL
            weights_N = wpo_weights(raw).to(out.losses.dtype)
            out = LossOutput(
                out.losses * weights_N, {**out.metrics, "wpo_weight": weights_N.mean()}
            )
        return out

    def compute_ratios(self, ratios: LogRatios) -> LossOutput:
        """Per-pair losses (N,) and metrics from the log-ratios."""
        raise NotImplementedError(f"{type(self).__name__} must implement compute_ratios(ratios)")
