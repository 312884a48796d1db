"""Listwise losses (kind "list"): the registry-wide contract, parametrised over every registered
listwise loss, and plackett_luce by hand and against a float64 rewrite.

Hand example (one group, K = 3), used below:

    policy:    S = (−10, −14, −11),  reference: S^ref = (−12, −13, −11),  β = 0.1
    ⇒ r = β·(S − S^ref) = (0.2, −0.1, 0.0);  scores (3, 1, 2): ranking a (0.2), c (0.0), b (−0.1)
    loss = −[0.2 − log(e^0.2 + e^0 + e^−0.1)] − [0 − log(e^0 + e^−0.1)] − 0
         = −(0.2 − log 3.126240) − (0 − log 1.904837)
         = 0.939831 + 0.644397 = 1.584228
"""

from __future__ import annotations

import math

import pytest
import torch

from pairopt import PairLogps, build_loss
from pairopt.errors import PairoptError
from pairopt.loss import STANDARD_METRICS, ListLogps, available_losses, get_loss_class
from pairopt.pairs import GroupLogps, offsets_of

LIST_LOSSES = [name for name in available_losses() if get_loss_class(name).kind == "list"]


def lists(logps, scores, tokens=None, mask=None, dtype=torch.float32, grad=False) -> ListLogps:
    logps_t = torch.tensor(logps, dtype=dtype, requires_grad=grad)
    return ListLogps(
        logps_t,
        torch.tensor(tokens) if tokens is not None else torch.full(logps_t.shape, 5),
        torch.tensor(scores, dtype=torch.float64),
        torch.tensor(mask) if mask is not None else torch.ones(logps_t.shape, dtype=torch.bool),
    )


def random_lists(seed: int, G: int = 5, K: int = 6, dtype=torch.float32):
    """Groups of 2..K responses (mask), integer scores 0..4 (ties happen), summed log-probs in
    [−60, −2], the reference within ±3; padding holds junk that must not matter."""
    g = torch.Generator().manual_seed(seed)
    sizes = torch.randint(2, K + 1, (G,), generator=g)
    sizes[0] = K  # one full group, so K is the real width
    mask = torch.arange(K)[None, :] < sizes[:, None]
    scores = torch.randint(0, 5, (G, K), generator=g).double()
    tokens = torch.randint(1, 21, (G, K), generator=g)
    policy = -(torch.rand(G, K, generator=g, dtype=torch.float64) * 58 + 2)
    reference = policy + (torch.rand(G, K, generator=g, dtype=torch.float64) * 6 - 3)
    junk = torch.full((G, K), 123.0, dtype=torch.float64)
    policy, reference = torch.where(mask, policy, junk), torch.where(mask, reference, -junk)
    return (
        ListLogps(policy.to(dtype), tokens, scores, mask),
        ListLogps(reference.to(dtype), tokens, scores, mask),
    )


def with_grad(x: ListLogps) -> ListLogps:
    return ListLogps(x.logps.clone().requires_grad_(True), x.tokens, x.scores, x.mask)


def call(name: str, policy: ListLogps, reference: ListLogps):
    loss = build_loss(name)
    return loss(policy, reference if loss.requires_reference else None)


# ---------------------------------------------------------------------------------------------
# The contract, for every registered listwise loss
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", LIST_LOSSES)
def test_list_contract(name):
    """One finite loss per group (G,); gradients reach the policy's real responses only, never
    the reference or the padding; standard metrics present, scalar, detached, finite."""
    policy, reference = random_lists(seed=1)
    policy, reference = with_grad(policy), with_grad(reference)
    out = call(name, policy, reference)
    assert out.losses.shape == (len(policy),)
    assert torch.isfinite(out.losses).all()
    out.losses.mean().backward()
    grad = policy.logps.grad
    assert grad is not None and torch.isfinite(grad).all() and grad[policy.mask].abs().sum() > 0
    assert not grad[~policy.mask].any()
    assert reference.logps.grad is None
    assert set(STANDARD_METRICS) <= set(out.metrics)
    for key, metric in out.metrics.items():
        assert metric.shape == () and not metric.requires_grad and torch.isfinite(metric), key


@pytest.mark.parametrize("name", LIST_LOSSES)
def test_padding_does_not_change_the_loss(name):
    """Other junk in the masked entries, or one more column of padding: the same losses."""
    policy, reference = random_lists(seed=2)
    base = call(name, policy, reference).losses

    def changed(x: ListLogps, value: float) -> ListLogps:
        pad = lambda t, v: torch.cat([t, torch.full_like(t[:, :1], v)], 1)  # noqa: E731
        logps = torch.where(x.mask, x.logps, torch.full_like(x.logps, value))
        return ListLogps(
            pad(logps, value), pad(x.tokens, 0), pad(x.scores, 99.0), pad(x.mask, False)
        )

    torch.testing.assert_close(
        call(name, changed(policy, -7.0), changed(reference, 3.0)).losses, base
    )


@pytest.mark.parametrize("name", LIST_LOSSES)
def test_order_of_responses_does_not_matter(name):
    """Permuting each group's responses (with their scores and counts) leaves its loss as is."""
    policy, reference = random_lists(seed=3)
    perm = torch.tensor([3, 0, 5, 1, 4, 2])

    def permuted(x: ListLogps) -> ListLogps:  # padding moves too: the mask goes with it
        return ListLogps(x.logps[:, perm], x.tokens[:, perm], x.scores[:, perm], x.mask[:, perm])

    torch.testing.assert_close(
        call(name, permuted(policy), permuted(reference)).losses,
        call(name, policy, reference).losses,
    )


LIST_EDGE_CASES = {
    # policy S, reference S^ref, scores (one group of three)
    "equal log-probs": ([-20.0, -20.0, -20.0], [-20.0, -20.0, -20.0], [3, 2, 1]),
    "margins ±1e4": ([-1.0, -1.0e4, -5.0e3], [-5.0e3, -5.0e3, -5.0e3], [1, 3, 2]),
    "all scores tied": ([-3.0, -9.0, -5.0], [-4.0, -4.0, -4.0], [2, 2, 2]),
    "certain responses": ([0.0, 0.0, -30.0], [-3.0, 0.0, -30.0], [1, 2, 0]),
}


@pytest.mark.parametrize("case", list(LIST_EDGE_CASES))
@pytest.mark.parametrize("name", LIST_LOSSES)
def test_list_edge_values_stay_finite(name, case):
    p, r, s = LIST_EDGE_CASES[case]
    policy = lists([p, p], [s, s], grad=True)  # G = 2
    reference = lists([r, r], [s, s])
    out = call(name, policy, reference)
    assert torch.isfinite(out.losses).all(), out.losses
    assert all(torch.isfinite(v).all() for v in out.metrics.values()), out.metrics
    out.losses.mean().backward()
    assert policy.logps.grad is not None and torch.isfinite(policy.logps.grad).all()


@pytest.mark.parametrize("name", LIST_LOSSES)
def test_list_half_precision_is_upcast(name):
    policy, reference = random_lists(seed=4, dtype=torch.bfloat16)
    as32 = [ListLogps(x.logps.float(), x.tokens, x.scores, x.mask) for x in (policy, reference)]
    got = call(name, policy, reference).losses
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, call(name, *as32).losses)


@pytest.mark.parametrize("name", LIST_LOSSES)
def test_list_loss_refuses_pairs_and_a_missing_reference(name):
    loss = build_loss(name)
    pairs = PairLogps(torch.zeros(2), torch.zeros(2), torch.ones(2), torch.ones(2))
    with pytest.raises((ValueError, AttributeError)):
        loss(pairs, pairs)  # type: ignore[arg-type]
    if loss.requires_reference:
        policy, _ = random_lists(seed=5)
        with pytest.raises(PairoptError, match="needs the reference model's log-probs"):
            loss(policy, None)


def test_from_groups_pads_the_flat_responses():
    """Two groups of 2 and 3 responses, flat (R = 5) -> (2, 3) with a mask."""
    flat = GroupLogps(
        torch.tensor([-1.0, -2.0, -3.0, -4.0, -5.0]),
        torch.tensor([1, 2, 3, 4, 5]),
        offsets_of([2, 3]),
    )
    scores = torch.tensor([[1.0, 0.0, 0.0], [2.0, 3.0, 1.0]])
    out = ListLogps.from_groups(flat, scores)
    assert out.logps.tolist() == [[-1.0, -2.0, 0.0], [-3.0, -4.0, -5.0]]
    assert out.tokens.tolist() == [[1, 2, 0], [3, 4, 5]]
    assert out.mask.tolist() == [[True, True, False], [True, True, True]]


# ---------------------------------------------------------------------------------------------
# plackett_luce
# ---------------------------------------------------------------------------------------------

POLICY3 = lists([[-10.0, -14.0, -11.0]], [[3, 1, 2]])
REFERENCE3 = lists([[-12.0, -13.0, -11.0]], [[3, 1, 2]])


def test_plackett_luce_by_hand():
    """The module docstring's example: 0.939831 + 0.644397 = 1.584228. Metrics over the three
    ordered pairs (a>c, a>b, c>b): rewards of the better 0.2, 0.2, 0.0 (mean 0.133333), of the
    worse 0.0, −0.1, −0.1 (mean −0.066667), all three ranked right (accuracy 1)."""
    out = build_loss("plackett_luce")(POLICY3, REFERENCE3)
    torch.testing.assert_close(out.losses, torch.tensor([1.584228]), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(float(out.metrics["rewards/chosen"]), 0.133333, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(
        float(out.metrics["rewards/rejected"]), -0.066667, rtol=1e-5, atol=1e-6
    )
    assert float(out.metrics["rewards/accuracies"]) == 1.0


def test_plackett_luce_ties_are_not_compared():
    """Scores (2, 1, 2): a and c tie above b. Each tied response meets only b in its denominator:
    loss = −logσ(r_a − r_b) − logσ(r_c − r_b) = −logσ(0.3) − logσ(0.1) = 0.554355 + 0.644397
    = 1.198752; the order of a and c in the row does not matter; all three tied gives 0."""
    tied = lists([[-10.0, -14.0, -11.0]], [[2, 1, 2]])
    ref = lists([[-12.0, -13.0, -11.0]], [[2, 1, 2]])
    out = build_loss("plackett_luce")(tied, ref)
    torch.testing.assert_close(out.losses, torch.tensor([1.198752]), rtol=1e-5, atol=1e-6)
    all_tied = lists([[-10.0, -14.0, -11.0]], [[1, 1, 1]])
    assert float(build_loss("plackett_luce")(all_tied, ref).losses) == 0.0


def test_plackett_luce_with_two_responses_is_dpo():
    """K = 2: −[r_c − log(e^r_c + e^r_r)] = −logσ(r_c − r_r), DPO's loss, for every β."""
    policy = lists([[-10.0, -14.0], [-3.0, -2.0]], [[1, 0], [0, 1]])
    reference = lists([[-12.0, -13.0], [-2.5, -4.0]], [[1, 0], [0, 1]])
    pairs_policy = PairLogps(
        torch.tensor([-10.0, -2.0]), torch.tensor([-14.0, -3.0]), torch.ones(2), torch.ones(2)
    )
    pairs_reference = PairLogps(
        torch.tensor([-12.0, -4.0]), torch.tensor([-13.0, -2.5]), torch.ones(2), torch.ones(2)
    )
    for beta in (0.1, 0.7):
        pl = build_loss("plackett_luce", beta=beta)(policy, reference).losses
        dpo = build_loss("dpo", beta=beta)(pairs_policy, pairs_reference).losses
        torch.testing.assert_close(pl, dpo)


def naive_plackett_luce(policy: ListLogps, reference: ListLogps, beta: float = 0.1):
    """Per-group losses in float64, written from the docstring: sort by score, then for each
    response its reward against those at or below its rank, tied responses left out."""
    out = []
    for g in range(len(policy)):
        real = [i for i in range(policy.mask.shape[1]) if policy.mask[g, i]]
        r = {i: beta * (policy.logps[g, i] - reference.logps[g, i]) for i in real}
        s = {i: float(policy.scores[g, i]) for i in real}
        total = torch.zeros((), dtype=torch.float64)
        for i in sorted(real, key=lambda i: -s[i]):
            pool = [i] + [j for j in real if s[j] < s[i]]
            total = total - (r[i] - torch.logsumexp(torch.stack([r[j] for j in pool]), 0))
        out.append(total)
    return torch.stack(out)


def test_plackett_luce_gradient_matches_float64_rewrite():
    """Float32 plugin values and gradients of mean(losses) equal the float64 rewrite's."""
    p32, r32 = random_lists(seed=6)
    p64, r64 = random_lists(seed=6, dtype=torch.float64)
    p32, p64 = with_grad(p32), with_grad(p64)
    got = build_loss("plackett_luce")(p32, r32).losses
    got.mean().backward()
    want = naive_plackett_luce(p64, r64)
    want.mean().backward()
    torch.testing.assert_close(got.double(), want.detach(), rtol=1e-5, atol=1e-5)
    assert p32.logps.grad is not None and p64.logps.grad is not None
    torch.testing.assert_close(p32.logps.grad.double(), p64.logps.grad, rtol=1e-4, atol=1e-6)


def test_plackett_luce_gradcheck_float64():
    policy, reference = random_lists(seed=7, G=3, K=4, dtype=torch.float64)
    loss = build_loss("plackett_luce")

    def f(logps):
        return loss(ListLogps(logps, policy.tokens, policy.scores, policy.mask), reference).losses

    assert torch.autograd.gradcheck(f, (policy.logps.clone().requires_grad_(True),), eps=1e-6)


def test_plackett_luce_accuracy_counts_every_ordered_pair():
    """Scores (3, 1, 2) with rewards (0.2, −0.1, 0.3): pairs a>c (0.2 < 0.3: wrong), a>b, c>b
    (right): accuracy 2/3."""
    policy = lists([[-10.0, -14.0, -8.0]], [[3, 1, 2]])
    reference = lists([[-12.0, -13.0, -11.0]], [[3, 1, 2]])
    out = build_loss("plackett_luce")(policy, reference)
    assert math.isclose(float(out.metrics["rewards/accuracies"]), 2 / 3, rel_tol=1e-6)
