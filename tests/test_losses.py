"""The built-in losses: a hand-worked value each, gradients against float64 references, edge values,
and the registry-wide contract (parametrised over `available_losses()`, so a new plugin is tested
the moment it is registered). Pair losses here; the listwise kind in tests/test_listwise_losses.py.

Shared hand example (one pair) unless a test says otherwise:

    policy:    S_c = −10 (n_c = 4),  S_r = −14 (n_r = 2)
    reference: S_c^ref = −12,        S_r^ref = −13
    ⇒ s_c = 2, s_r = −1, Δ = s_c − s_r = 3;  A_c = −2.5, A_r = −7;
      with β = 0.1: r_c = 0.2, r_r = −0.1, βΔ = 0.3
"""

from __future__ import annotations

import math
import typing
from collections.abc import Callable
from typing import Any

import annotated_types
import pytest
import torch

import pairopt
from pairopt import PairLogps, build_loss
from pairopt.errors import PairoptError
from pairopt.loss import STANDARD_METRICS, available_losses, get_loss_class

# Parameters for losses that have required ones (everything else builds with its defaults).
EXAMPLE_PARAMS: dict[str, dict[str, Any]] = {
    "combined": {"terms": [{"name": "dpo"}, {"name": "sft", "weight": 0.5}]},
}


def make(name: str, **params: Any) -> pairopt.PairLoss:
    return build_loss(name, **{**EXAMPLE_PARAMS.get(name, {}), **params})


def logps(
    chosen, rejected, chosen_tokens, rejected_tokens, dtype=torch.float32, grad=False
) -> PairLogps:
    return PairLogps(
        torch.tensor(chosen, dtype=dtype, requires_grad=grad),
        torch.tensor(rejected, dtype=dtype, requires_grad=grad),
        torch.tensor(chosen_tokens),
        torch.tensor(rejected_tokens),
    )


POLICY = logps([-10.0], [-14.0], [4], [2])
REFERENCE = logps([-12.0], [-13.0], [4], [2])


def value(
    name: str, policy: PairLogps = POLICY, reference: PairLogps = REFERENCE, **params: Any
) -> float:
    loss = make(name, **params)
    out = loss(policy, reference if loss.requires_reference else None)
    assert out.losses.shape == (len(policy),)
    return float(out.losses.mean())


def ls(x: float) -> float:
    """log σ(x), written out for the hand computations."""
    return -math.log1p(math.exp(-x))


def close(actual: float, expected: float) -> None:
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# One hand-worked example per built-in
# ---------------------------------------------------------------------------------------------


def test_dpo_by_hand():
    """βΔ = 0.1·3 = 0.3: loss = −logσ(0.3) = log(1 + e^−0.3) = log(1.740818) = 0.554355.
    cDPO, ε = 0.1: 0.9·0.554355 + 0.1·(−logσ(−0.3) = 0.854355) = 0.498920 + 0.085436 = 0.584355."""
    close(value("dpo"), 0.554355)
    close(value("dpo", label_smoothing=0.1), 0.584355)


def test_ipo_by_hand():
    """Per-token log-ratios: s_c/n_c = 2/4 = 0.5, s_r/n_r = −1/2 = −0.5, margin 1.0;
    target 1/(2β) = 5: loss = (1.0 − 5)² = 16. (Summed log-ratios would give (3 − 5)² = 4.)"""
    close(value("ipo"), 16.0)


def test_hinge_by_hand():
    """max(0, 1 − βΔ) = max(0, 1 − 0.3) = 0.7; with β = 1: max(0, 1 − 3) = 0."""
    close(value("hinge"), 0.7)
    close(value("hinge", beta=1.0), 0.0)


def test_robust_by_hand():
    """ε = 0.1: [0.9·(−logσ(0.3)) + 0.1·logσ(−0.3)] / 0.8 = (0.498920 − 0.085436) / 0.8 = 0.516855."""
    close(value("robust"), 0.516855)


def test_exo_pair_by_hand():
    """ε = 1e-3, x = βΔ = 0.3: σ(x) = 0.574443, logσ(x) = −0.554355, log(1−ε) = −0.0010005,
    σ(−x) = 0.425557, logσ(−x) = −0.854355, log ε = −6.907755:
    0.574443·(−0.553355) + 0.425557·6.053400 = −0.317872 + 2.576067 = 2.258195."""
    close(value("exo_pair"), 2.258195)


def test_exo_pair_is_zero_at_its_optimum():
    """KL(q ‖ p) = 0 when q = p: βΔ = log((1 − ε)/ε); with ε = 0.25, β = 1: Δ = log 3 = 1.098612."""
    delta = math.log(3.0)
    policy = logps([-10.0 + delta], [-10.0], [4], [4])
    reference = logps([-10.0], [-10.0], [4], [4])
    close(value("exo_pair", policy, reference, beta=1.0, label_smoothing=0.25), 0.0)


def test_nca_pair_by_hand():
    """r_c = 0.2, r_r = −0.1: −logσ(0.2) − ½logσ(−0.2) − ½logσ(0.1)
    = 0.598139 + ½·0.798139 + ½·0.644397 = 0.598139 + 0.399069 + 0.322198 = 1.319406."""
    close(value("nca_pair"), 1.319406)


def test_bco_pair_by_hand_and_running_shift():
    """First training step: δ = mean(r_c, r_r) = (0.2 − 0.1)/2 = 0.05;
    loss = −logσ(0.2 − 0.05) − logσ(−(−0.1 − 0.05)) = 2·(−logσ(0.15)) = 2·0.620957 = 1.241914.
    A second batch with rewards r_c = 0.4, r_r = 0.2 (batch mean 0.3) moves δ to the mean of the
    batch means, (0.05 + 0.3)/2 = 0.175. In eval mode δ is used but not updated."""
    loss = make("bco_pair")
    out = loss(POLICY, REFERENCE)
    close(float(out.losses), 1.241914)
    close(float(out.metrics["delta"]), 0.05)
    loss(logps([-8.0], [-11.0], [4], [2]), REFERENCE)  # r_c = 0.1·4 = 0.4, r_r = 0.1·2 = 0.2
    close(float(loss.reward_shift), 0.175)
    loss.eval()
    out = loss(POLICY, REFERENCE)
    close(float(out.metrics["delta"]), 0.175)
    close(float(loss.reward_shift), 0.175)
    assert int(loss.num_batches) == 2
    state = loss.state_dict()  # the shift is checkpointed with the loss
    assert set(state) == {"reward_shift", "num_batches"}


def test_aot_couples_the_batch_by_sorting():
    """Two pairs: policy margins S_c − S_r = [4, −2], reference margins [1, 2].
    aot: sorted [−2, 4] − sorted [1, 2] = δ [−3, 2]; β = 0.1:
      −logσ(−0.3) = 0.854355, −logσ(0.2) = 0.598139 (per rank, not per pair).
    aot_unpaired: s_c = [2, 1], s_r = [−1, 5]; sorted [1, 2] − sorted [−1, 5] = δ [2, −3]:
      [0.598139, 0.854355]. One pair alone is DPO: δ = Δ = 3 → 0.554355."""
    policy = logps([-10.0, -8.0], [-14.0, -6.0], [4, 3], [2, 3])
    reference = logps([-12.0, -9.0], [-13.0, -11.0], [4, 3], [2, 3])
    aot = make("aot")(policy, reference).losses
    torch.testing.assert_close(aot, torch.tensor([0.854355, 0.598139]), rtol=1e-5, atol=1e-6)
    unpaired = make("aot_unpaired")(policy, reference).losses
    torch.testing.assert_close(unpaired, torch.tensor([0.598139, 0.854355]), rtol=1e-5, atol=1e-6)
    close(value("aot"), 0.554355)
    close(value("aot_unpaired"), 0.554355)


def test_discopop_by_hand():
    """z = βΔ = 0.3, τ = 0.05: m = σ(6) = 0.997527; (1 − m)·(−logσ(0.3)) + m·e^(−0.3)
    = 0.002473·0.554355 + 0.997527·0.740818 = 0.740357. Very negative z: the logistic term
    alone (m·e^(−z) → 0, never 0·∞)."""
    close(value("discopop"), 0.740357)
    policy = logps([-2000.0], [-10.0], [4], [2])
    reference = logps([-10.0], [-10.0], [4], [2])  # z = 0.1·(−1990) = −199
    close(value("discopop", policy, reference), 199.0)


def test_f_divergences_by_hand():
    """s_c = 2, s_r = −1 (β = 0.1), margin f(s_c) − f(s_r):
    forward_kl f = 1 − e^(−s): 0.864665 + 1.718282 = 2.582947 → −logσ(0.258295) = 0.572316;
    js_divergence f = log 2 + logσ(s): 0.566219 + 0.620115 = 1.186334 → 0.635589;
    alpha_divergence, α = 0.5: f = 2(1 − e^(−s/2)): 1.264241 + 1.297443 = 2.561684 → 0.573243;
    α = 1 and reverse_kl: plain DPO, 0.554355. IPO with forward_kl divides each score by its
    count: 0.864665/4 + 1.718282/2 = 1.075307 → (1.075307 − 5)² = 15.403214."""
    close(value("dpo", f_divergence="forward_kl"), 0.572316)
    close(value("dpo", f_divergence="js_divergence"), 0.635589)
    close(value("dpo", f_divergence="alpha_divergence", f_alpha=0.5), 0.573243)
    close(value("dpo", f_divergence="alpha_divergence", f_alpha=1.0), 0.554355)
    close(value("dpo", f_divergence="reverse_kl"), value("dpo"))
    close(value("ipo", f_divergence="forward_kl"), 15.403214)


def test_divergences_stay_finite_far_from_the_reference():
    """forward_kl's e^(−s) at s = −5000 would overflow; the exponent is capped (at 80)."""
    policy = logps([-6000.0], [-10.0], [4], [2], grad=True)
    reference = logps([-1000.0], [-10.0], [4], [2])
    for divergence in ("forward_kl", "alpha_divergence"):
        out = make("dpo", f_divergence=divergence)(policy, reference)
        out.losses.sum().backward()
        assert torch.isfinite(out.losses).all() and torch.isfinite(policy.chosen_logps.grad).all()


def test_sppo_hard_by_hand():
    """Targets ±1/(2β) = ±5: (s_c − 5)² + (s_r + 5)² = (2 − 5)² + (−1 + 5)² = 9 + 16 = 25."""
    close(value("sppo_hard"), 25.0)


def test_apo_zero_by_hand():
    """(1 − σ(r_c)) + σ(r_r) = (1 − σ(0.2)) + σ(−0.1) = 0.450166 + 0.475021 = 0.925187."""
    close(value("apo_zero"), 0.925187)


def test_apo_down_by_hand():
    """σ(r_c) + 1 − σ(r_c − r_r) = σ(0.2) + 1 − σ(0.3) = 0.549834 + 0.425557 = 0.975391."""
    close(value("apo_down"), 0.975391)


def test_sigmoid_norm_by_hand():
    """Per-token margin (2/4) − (−1/2) = 1.0; default β = 5: −logσ(5) = log(1 + e^−5) = 0.006715.
    With β = 0.1: −logσ(0.1) = 0.644397."""
    close(value("sigmoid_norm"), 0.006715)
    close(value("sigmoid_norm", beta=0.1), 0.644397)


def test_rpo_by_hand():
    """DPO 0.554355 + α·(−S_c/n_c) = 0.554355 + 1.0·(10/4) = 3.054355; α = 0 is plain DPO."""
    close(value("rpo"), 3.054355)
    close(value("rpo", alpha=0.0), value("dpo"))


def test_kto_pair_by_hand_couples_the_batch():
    """Two pairs: s = (2, −1) and (0, 3). KL_c = max(0, mean(2, 0)) = 1, KL_r = max(0, mean(−1, 3)) = 1.
    Pair 1: ½[(1 − σ(0.1·(2 − 1))) + (1 − σ(0.1·(1 − (−1))))] = ½[0.475021 + 0.450166] = 0.462594.
    Pair 2: ½[(1 − σ(0.1·(0 − 1))) + (1 − σ(0.1·(1 − 3)))] = ½[0.524979 + 0.549834] = 0.537406.
    Alone, pair 1 has KL_c = 2, KL_r = 0: ½[(1 − σ(0.2)) + (1 − σ(0.3))] = 0.437862."""
    policy = logps([-10.0, -10.0], [-14.0, -10.0], [4, 4], [2, 2])
    reference = logps([-12.0, -10.0], [-13.0, -13.0], [4, 4], [2, 2])
    out = make("kto_pair")(policy, reference)
    torch.testing.assert_close(out.losses, torch.tensor([0.462594, 0.537406]), rtol=1e-5, atol=1e-6)
    close(float(out.metrics["kl"]), 1.0)
    close(value("kto_pair"), 0.437862)


def test_orpo_by_hand():
    """A_c = −2.5, A_r = −7. log_odds(A) = A − log(1 − e^A):
    log_odds(−2.5) = −2.5 − log(0.917915) = −2.414349; log_odds(−7) = −7 − log(0.999088) = −6.999088;
    difference 4.584739, logσ(4.584739) = −0.010154. loss = 2.5 + 0.1·0.010154 = 2.501015."""
    loss = make("orpo")
    out = loss(POLICY, None)
    close(float(out.losses), 2.501015)
    close(float(out.metrics["nll_loss"]), 2.5)
    close(float(out.metrics["log_odds_chosen"]), 4.584739)
    close(float(out.metrics["log_odds_ratio"]), -0.010154)
    close(float(out.metrics["rewards/chosen"]), -0.25)  # λ·A_c


def test_simpo_by_hand():
    """Here A_c = −4/4 = −1, A_r = −3/2 = −1.5; β = 2, γ = 0.5:
    β(A_c − A_r) − γ = 2·0.5 − 0.5 = 0.5, loss = −logσ(0.5) = log(1.606531) = 0.474077."""
    close(value("simpo", logps([-4.0], [-3.0], [4], [2])), 0.474077)


def test_cpo_by_hand():
    """β(S_c − S_r) = 0.1·4 = 0.4: −logσ(0.4) = log(1.670320) = 0.513015; + α·2.5 = 3.013015."""
    close(value("cpo"), 3.013015)
    close(value("cpo", alpha=0.0), 0.513015)


def test_sft_by_hand():
    """−S_c/n_c = 10/4 = 2.5 (the rejected response plays no part)."""
    close(value("sft"), 2.5)
    close(value("sft", logps([-10.0], [-99.0], [4], [9])), 2.5)


def test_combined_by_hand():
    """dpo (0.554355) + 0.5 · sft (2.5) = 1.804355; each term is reported unweighted."""
    loss = make("combined")
    out = loss(POLICY, REFERENCE)
    close(float(out.losses), 1.804355)
    close(float(out.metrics["loss/dpo"]), 0.554355)
    close(float(out.metrics["loss/sft"]), 2.5)
    close(float(out.metrics["rewards/chosen"]), 0.2)  # first term's (dpo's) rewards


def test_combined_needs_a_reference_only_if_a_term_does():
    assert make("combined").requires_reference
    free = build_loss("combined", terms=[{"name": "simpo"}, {"name": "sft", "weight": 0.1}])
    assert not free.requires_reference
    close(float(free(logps([-4.0], [-3.0], [4], [2])).losses), 0.474077 + 0.1 * 1.0)


def test_combined_refuses_a_listwise_term_before_any_model_loads():
    with pytest.raises(PairoptError, match="listwise loss; combined adds pair losses only"):
        build_loss("combined", terms=[{"name": "dpo"}, {"name": "plackett_luce"}])


def test_per_token_values_a_loss_declared_must_come_with_the_logps():
    """LD-DPO and WPO need per-token values; log-probs computed without them (the Python API
    without `statistics=`) are one error saying how to compute them, not a KeyError."""
    summed = logps([-4.0], [-3.0], [4], [2])  # summed log-probs only
    for params in ({"ld_alpha": 0.5}, {"use_weighting": True}):
        with pytest.raises(PairoptError, match=r"statistics=loss\.token_statistics"):
            build_loss("dpo", **params)(summed, summed)


def test_combined_normalises_each_term_on_its_own():
    """A long chosen response changes sft's per-token average, not dpo's sum: the combination is
    exactly w_dpo·dpo + w_sft·sft per pair, whatever the token counts."""
    policy = logps([-10.0, -300.0], [-14.0, -20.0], [4, 100], [2, 5])
    reference = logps([-12.0, -301.0], [-13.0, -19.0], [4, 100], [2, 5])
    combined = build_loss(
        "combined", terms=[{"name": "dpo", "weight": 2.0}, {"name": "sft", "weight": 0.5}]
    )
    expected = 2.0 * make("dpo")(policy, reference).losses + 0.5 * make("sft")(policy).losses
    torch.testing.assert_close(combined(policy, reference).losses, expected)


def test_combined_rejects_bad_terms_before_building():
    with pytest.raises(PairoptError, match=r"term 1 \('dpx'\).*unknown loss 'dpx'"):
        build_loss("combined", terms=[{"name": "dpo"}, {"name": "dpx"}])
    with pytest.raises(PairoptError, match=r"term 0 \('dpo'\).*beta=-1"):
        build_loss("combined", terms=[{"name": "dpo", "params": {"beta": -1}}])
    with pytest.raises(PairoptError, match=r"terms\.0\.weight=0"):
        build_loss("combined", terms=[{"name": "dpo", "weight": 0}])
    with pytest.raises(PairoptError, match=r"terms=\[\].*at least 1"):
        build_loss("combined", terms=[])


# ---------------------------------------------------------------------------------------------
# Gradients against float64 references written out naively, independently of the plugins
# ---------------------------------------------------------------------------------------------


def _sig(x):
    return 1 / (1 + torch.exp(-x))


def _logsig(x):
    return torch.log(_sig(x))


def _naive(name: str) -> Callable[..., torch.Tensor]:
    """Per-pair losses from the docs/losses.md / TRL formulas with default parameters, plain ops."""

    def parts(p: PairLogps, r: PairLogps | None):
        s_c = p.chosen_logps - (r.chosen_logps if r is not None else 0)
        s_r = p.rejected_logps - (r.rejected_logps if r is not None else 0)
        n_c, n_r = p.chosen_tokens.double(), p.rejected_tokens.double()
        return s_c, s_r, n_c, n_r

    def dpo(p, r, beta=0.1, eps=0.0):
        s_c, s_r, _, _ = parts(p, r)
        return -(1 - eps) * _logsig(beta * (s_c - s_r)) - eps * _logsig(-beta * (s_c - s_r))

    def sft(p, r):
        return -p.chosen_logps / p.chosen_tokens.double()

    def simpo(p, r):
        a_c, a_r = (
            p.chosen_logps / p.chosen_tokens.double(),
            p.rejected_logps / p.rejected_tokens.double(),
        )
        return -_logsig(2.0 * (a_c - a_r) - 0.5)

    def orpo(p, r):
        a_c, a_r = (
            p.chosen_logps / p.chosen_tokens.double(),
            p.rejected_logps / p.rejected_tokens.double(),
        )

        def odds(a):
            return a - torch.log(1 - torch.exp(a))

        return -a_c - 0.1 * _logsig(odds(a_c) - odds(a_r))

    def kto_pair(p, r):
        s_c, s_r, _, _ = parts(p, r)
        kl_c, kl_r = torch.clamp(s_c.mean(), min=0), torch.clamp(s_r.mean(), min=0)
        return 0.5 * ((1 - _sig(0.1 * (s_c - kl_r))) + (1 - _sig(0.1 * (kl_c - s_r))))

    def robust(p, r):
        s_c, s_r, _, _ = parts(p, r)
        x = 0.1 * (s_c - s_r)
        return (-(0.9) * _logsig(x) + 0.1 * _logsig(-x)) / 0.8

    def exo_pair(p, r):
        s_c, s_r, _, _ = parts(p, r)
        x, eps = 0.1 * (s_c - s_r), 1e-3
        return _sig(x) * (_logsig(x) - math.log(1 - eps)) + _sig(-x) * (_logsig(-x) - math.log(eps))

    def ipo(p, r):
        s_c, s_r, n_c, n_r = parts(p, r)
        return (s_c / n_c - s_r / n_r - 5.0) ** 2

    def sigmoid_norm(p, r):
        s_c, s_r, n_c, n_r = parts(p, r)
        return -_logsig(5.0 * (s_c / n_c - s_r / n_r))

    def aot(p, r, paired=True):  # TRL 1.16 dpo_trainer.py: sort over the batch, then sigmoid
        if paired:
            a = torch.sort(p.chosen_logps - p.rejected_logps).values
            b = torch.sort(r.chosen_logps - r.rejected_logps).values
        else:
            s_c, s_r, _, _ = parts(p, r)
            a, b = torch.sort(s_c).values, torch.sort(s_r).values
        return -_logsig(0.1 * (a - b))

    def discopop(p, r):  # TRL: (1 − σ(z/τ))·(−logσ(z)) + σ(z/τ)·exp(−z)
        s_c, s_r, _, _ = parts(p, r)
        z = 0.1 * (s_c - s_r)
        m = _sig(z / 0.05)
        return (1 - m) * (-_logsig(z)) + m * torch.exp(-z)

    def bco_pair(p, r):  # eval mode with a fresh loss: δ = 0
        s_c, s_r, _, _ = parts(p, r)
        return -_logsig(0.1 * s_c) - _logsig(-0.1 * s_r)

    table: dict[str, Callable[..., torch.Tensor]] = {
        "dpo": dpo,
        "ipo": ipo,
        "hinge": lambda p, r: torch.clamp(1 - 0.1 * (parts(p, r)[0] - parts(p, r)[1]), min=0),
        "robust": robust,
        "exo_pair": exo_pair,
        "nca_pair": lambda p, r: (
            -_logsig(0.1 * parts(p, r)[0])
            - 0.5 * _logsig(-0.1 * parts(p, r)[0])
            - 0.5 * _logsig(-0.1 * parts(p, r)[1])
        ),
        "bco_pair": bco_pair,
        "sppo_hard": lambda p, r: (parts(p, r)[0] - 5.0) ** 2 + (parts(p, r)[1] + 5.0) ** 2,
        "apo_zero": lambda p, r: (1 - _sig(0.1 * parts(p, r)[0])) + _sig(0.1 * parts(p, r)[1]),
        "apo_down": lambda p, r: (
            _sig(0.1 * parts(p, r)[0]) + 1 - _sig(0.1 * (parts(p, r)[0] - parts(p, r)[1]))
        ),
        "sigmoid_norm": sigmoid_norm,
        "rpo": lambda p, r: dpo(p, r) + sft(p, r),
        "kto_pair": kto_pair,
        "aot": aot,
        "aot_unpaired": lambda p, r: aot(p, r, paired=False),
        "discopop": discopop,
        "orpo": orpo,
        "simpo": simpo,
        "cpo": lambda p, r: -_logsig(0.1 * (p.chosen_logps - p.rejected_logps)) + sft(p, r),
        "sft": sft,
        "combined": lambda p, r: dpo(p, r) + 0.5 * sft(p, r),
    }
    return table[name]


BUILTINS = [
    name for name in available_losses() if get_loss_class(name).__module__.startswith("losses.")
]
PAIR_LOSSES = [name for name in available_losses() if get_loss_class(name).kind == "pair"]
PAIR_BUILTINS = [name for name in BUILTINS if name in PAIR_LOSSES]


def random_pairs(n: int, seed: int, dtype=torch.float32) -> tuple[PairLogps, PairLogps]:
    """Realistic values: summed log-probs in [−60, −2], token counts 1..20, reference within ±3."""
    g = torch.Generator().manual_seed(seed)
    tokens_c, tokens_r = (
        torch.randint(1, 21, (n,), generator=g),
        torch.randint(1, 21, (n,), generator=g),
    )
    chosen = -(torch.rand(n, generator=g, dtype=torch.float64) * 58 + 2)
    rejected = -(torch.rand(n, generator=g, dtype=torch.float64) * 58 + 2)
    ref_c = chosen + (torch.rand(n, generator=g, dtype=torch.float64) * 6 - 3)
    ref_r = rejected + (torch.rand(n, generator=g, dtype=torch.float64) * 6 - 3)
    policy = PairLogps(chosen.to(dtype), rejected.to(dtype), tokens_c, tokens_r)
    reference = PairLogps(ref_c.to(dtype), ref_r.to(dtype), tokens_c, tokens_r)
    return policy, reference


def with_grad(p: PairLogps) -> PairLogps:
    return PairLogps(
        p.chosen_logps.clone().requires_grad_(True),
        p.rejected_logps.clone().requires_grad_(True),
        p.chosen_tokens,
        p.rejected_tokens,
    )


@pytest.mark.parametrize("name", PAIR_BUILTINS)
def test_gradient_matches_float64_reference(name):
    """Float32 plugin gradients of mean(losses) equal the autograd gradients of a naive float64
    rewrite of the formula (7 pairs, an odd size)."""
    policy32, reference32 = random_pairs(7, seed=1)
    policy64, reference64 = random_pairs(7, seed=1, dtype=torch.float64)
    loss = make(name).eval()  # eval: bco_pair keeps δ = 0, matching the naive formula
    p32, p64 = with_grad(policy32), with_grad(policy64)
    out = loss(p32, reference32 if loss.requires_reference else None)
    out.losses.mean().backward()
    expected = _naive(name)(p64, reference64 if loss.requires_reference else None)
    expected.mean().backward()
    torch.testing.assert_close(out.losses.double(), expected.detach(), rtol=1e-5, atol=1e-5)
    for got, want in (
        (p32.chosen_logps.grad, p64.chosen_logps.grad),
        (p32.rejected_logps.grad, p64.rejected_logps.grad),
    ):
        if want is None:  # the formula ignores this input (sft: the rejected response)
            assert got is None or not got.any()
            continue
        assert got is not None
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-6)


def _f(s: torch.Tensor, divergence: str) -> torch.Tensor:
    """TRL 1.16's scores (dpo_trainer.py, f_divergence_type), plain float64 ops."""
    if divergence == "forward_kl":
        return 1 - torch.exp(-s)
    if divergence == "js_divergence":
        return math.log(2) + _logsig(s)
    return (torch.exp(-0.5 * s) - 1) / -0.5  # alpha_divergence, α = 0.5


@pytest.mark.parametrize("divergence", ["forward_kl", "js_divergence", "alpha_divergence"])
@pytest.mark.parametrize("name", ["dpo", "ipo", "discopop"])
def test_divergence_gradients_match_float64_rewrite(name, divergence):
    """The margin f(s_c) − f(s_r) (per token for ipo: f(s_c)/n_c − f(s_r)/n_r) against a
    float64 rewrite of TRL's definitions; values and gradients."""
    policy32, reference32 = random_pairs(7, seed=4)
    policy64, reference64 = random_pairs(7, seed=4, dtype=torch.float64)
    p32, p64 = with_grad(policy32), with_grad(policy64)
    out = make(name, f_divergence=divergence)(p32, reference32)
    out.losses.mean().backward()
    f_c = _f(p64.chosen_logps - reference64.chosen_logps, divergence)
    f_r = _f(p64.rejected_logps - reference64.rejected_logps, divergence)
    if name == "ipo":
        n_c, n_r = p64.chosen_tokens.double(), p64.rejected_tokens.double()
        expected = (f_c / n_c - f_r / n_r - 5.0) ** 2
    elif name == "dpo":
        expected = -_logsig(0.1 * (f_c - f_r))
    else:
        z = 0.1 * (f_c - f_r)
        m = _sig(z / 0.05)
        expected = (1 - m) * (-_logsig(z)) + m * torch.exp(-z)
    expected.mean().backward()
    torch.testing.assert_close(out.losses.double(), expected.detach(), rtol=1e-5, atol=1e-5)
    for got, want in (
        (p32.chosen_logps.grad, p64.chosen_logps.grad),
        (p32.rejected_logps.grad, p64.rejected_logps.grad),
    ):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", PAIR_BUILTINS)
def test_gradcheck_float64(name):
    """Autograd through the plugin against finite differences, in float64."""
    policy, reference = random_pairs(3, seed=2, dtype=torch.float64)
    loss = make(name).eval()
    ref = reference if loss.requires_reference else None

    def f(chosen, rejected):
        return loss(
            PairLogps(chosen, rejected, policy.chosen_tokens, policy.rejected_tokens), ref
        ).losses

    inputs = (
        policy.chosen_logps.clone().requires_grad_(True),
        policy.rejected_logps.clone().requires_grad_(True),
    )
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Edge values: no NaN or inf in losses, metrics or gradients
# ---------------------------------------------------------------------------------------------

EDGE_CASES = {
    # policy (S_c, S_r), reference (S_c, S_r), tokens (n_c, n_r)
    "equal log-probs": ((-20.0, -20.0), (-20.0, -20.0), (10, 10)),
    "margin +1e4": ((-1.0, -1.0e4), (-5.0e3, -5.0e3), (1, 1)),
    "margin -1e4": ((-1.0e4, -1.0), (-5.0e3, -5.0e3), (1, 1)),
    "chosen certain (S_c = 0)": ((0.0, -30.0), (-3.0, -30.0), (5, 5)),
    "both certain": ((0.0, 0.0), (0.0, 0.0), (3, 3)),
    "empty responses (n = 0)": ((0.0, 0.0), (0.0, 0.0), (0, 0)),
    "long, very unlikely": ((-1.0e4, -1.0e4), (-1.0e4, -1.0e4), (4096, 4096)),
}


@pytest.mark.parametrize("case", list(EDGE_CASES))
@pytest.mark.parametrize("name", PAIR_LOSSES)
def test_edge_values_stay_finite(name, case):
    (pc, pr), (rc, rr), (nc, nr) = EDGE_CASES[case]
    policy = logps(
        [pc, pc], [pr, pr], [nc, nc], [nr, nr], grad=True
    )  # N = 2: kto_pair's batch mean
    reference = logps([rc, rc], [rr, rr], [nc, nc], [nr, nr])
    loss = make(name)
    out = loss(policy, reference if loss.requires_reference else None)
    assert torch.isfinite(out.losses).all(), out.losses
    assert all(torch.isfinite(v).all() for v in out.metrics.values()), out.metrics
    out.losses.mean().backward()
    grads = [g for g in (policy.chosen_logps.grad, policy.rejected_logps.grad) if g is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("name", PAIR_LOSSES)
def test_half_precision_inputs_are_upcast(name):
    """bf16 log-probs give float32 losses equal to the float32 computation on the same values."""
    policy, reference = random_pairs(5, seed=3, dtype=torch.bfloat16)
    as32 = (
        PairLogps(
            policy.chosen_logps.float(),
            policy.rejected_logps.float(),
            policy.chosen_tokens,
            policy.rejected_tokens,
        ),
        PairLogps(
            reference.chosen_logps.float(),
            reference.rejected_logps.float(),
            reference.chosen_tokens,
            reference.rejected_tokens,
        ),
    )
    loss = make(name).eval()
    got = loss(policy, reference if loss.requires_reference else None).losses
    want = loss(as32[0], as32[1] if loss.requires_reference else None).losses
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want)


# ---------------------------------------------------------------------------------------------
# The contract, for every registered loss
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 7])
@pytest.mark.parametrize("name", PAIR_LOSSES)
def test_contract(name, n):
    """Per-pair finite losses (N,); gradients reach the policy, never the reference; standard
    metrics present, scalar and detached."""
    policy, reference = random_pairs(n, seed=4)
    policy = with_grad(policy)
    reference = with_grad(reference)  # a reference that *could* take gradients must not get any
    loss = make(name)
    out = loss(policy, reference if loss.requires_reference else None)
    assert out.losses.shape == (n,)
    assert torch.isfinite(out.losses).all()
    out.losses.mean().backward()
    # (sft ignores the rejected response: its gradient may be None)
    grads = [g for g in (policy.chosen_logps.grad, policy.rejected_logps.grad) if g is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert any(bool(g.abs().sum() > 0) for g in grads)
    assert reference.chosen_logps.grad is None and reference.rejected_logps.grad is None
    assert set(STANDARD_METRICS) <= set(out.metrics)
    for key, metric in out.metrics.items():
        assert metric.shape == (), key
        assert not metric.requires_grad, key
        assert torch.isfinite(metric), key


@pytest.mark.parametrize("name", available_losses())
def test_contract_declarations(name):
    """Name set by the decorator, a one-line summary, a kind, a boolean need, a frozen strict
    Config whose every field is described; an unknown parameter is refused."""
    cls = get_loss_class(name)
    assert cls.name == name
    assert cls.kind in pairopt.loss.LOSS_KINDS
    assert cls.summary and "\n" not in cls.summary
    assert isinstance(cls.requires_reference, bool)
    assert cls.Config.model_config.get("extra") == "forbid"
    assert cls.Config.model_config.get("frozen") is True
    for field_name, field in cls.Config.model_fields.items():
        assert field.description, f"{name}.{field_name} has no description"
    with pytest.raises(PairoptError, match=r"unknown parameter 'not_a_param'"):
        make(name, not_a_param=1)


@pytest.mark.parametrize("name", BUILTINS)
def test_builtin_docstrings_follow_style(name):
    """Docstring order: paper, formula, symbols, shapes, defaults (with source), deviations, in order."""
    doc = get_loss_class(name).__doc__ or ""
    headings = ["Paper:", "Formula", "Symbols:", "Shapes:", "Defaults:", "Deviations:"]
    positions = [doc.find(h) for h in headings]
    assert all(p >= 0 for p in positions), dict(zip(headings, positions, strict=True))
    assert positions == sorted(positions)


def _out_of_range(field) -> list[Any]:
    values: list[Any] = []
    if typing.get_origin(field.annotation) is typing.Literal:  # bounded by its choices
        values.append("not_one_of_the_choices")
    if field.annotation is bool:  # bounded by true / false
        values.append("sometimes")
    for item in field.metadata:
        if isinstance(item, annotated_types.Gt):
            values.append(item.gt)
        elif isinstance(item, annotated_types.Ge):
            values.append(item.ge - 1)
        elif isinstance(item, annotated_types.Lt):
            values.append(item.lt)
        elif isinstance(item, annotated_types.Le):
            values.append(item.le + 1)
        elif isinstance(item, annotated_types.MinLen):
            values.append([])
    return values


BOUNDED = [
    (name, field_name, bad)
    for name in available_losses()
    for field_name, field in get_loss_class(name).Config.model_fields.items()
    for bad in _out_of_range(field)
]


@pytest.mark.parametrize(("name", "field_name", "bad"), BOUNDED)
def test_config_rejects_out_of_range(name, field_name, bad):
    """The error names the field, the value and the bound."""
    with pytest.raises(PairoptError) as info:
        make(name, **{field_name: bad})
    message = str(info.value)
    assert f"{field_name}={bad!r}" in message
    assert any(word in message for word in ("greater", "less", "at least", "should be")), message


def test_every_builtin_parameter_is_bounded():
    """Bounds on every field (sft has no parameters)."""
    for name in BUILTINS:
        for field_name, field in get_loss_class(name).Config.model_fields.items():
            assert _out_of_range(field), f"{name}.{field_name} has no bound"


def test_config_is_frozen():
    loss = make("dpo")
    with pytest.raises(Exception, match="frozen"):
        loss.config.beta = 0.5


def test_reference_is_required_when_declared():
    with pytest.raises(PairoptError, match="'dpo' needs the reference model's log-probs"):
        make("dpo")(POLICY, None)


def test_reference_free_losses_ignore_a_given_reference():
    close(float(make("simpo")(POLICY, REFERENCE).losses), float(make("simpo")(POLICY, None).losses))


def test_mismatched_shapes_are_refused():
    with pytest.raises(ValueError, match="shape"):
        make("dpo")(
            PairLogps(torch.zeros(2), torch.zeros(3), torch.ones(2), torch.ones(3)), REFERENCE
        )
    with pytest.raises(ValueError, match="2 pairs but reference has 1"):
        make("dpo")(logps([-1.0, -2.0], [-1.0, -2.0], [1, 1], [1, 1]), REFERENCE)
