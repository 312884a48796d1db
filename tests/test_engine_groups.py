"""Groups of k responses under one prompt, k = 2..8 and mixed sizes in one packed row: the
flat per-response log-probs, and a pair loss on every pair of every group, equal the unshared
per-pair computation (each pair's responses run again for that pair), values and gradients,
on the families of tests/tiny_models.py.

Tolerances as in tests/test_engine_exact.py (fp32 rounding only).
"""

from __future__ import annotations

from itertools import combinations

import pytest
import torch
from tiny_models import FAMILIES, make_model, naive_logps, param_grads, random_groups

import pairopt
from pairopt.engine.forward import compute_group_logps
from pairopt.engine.layout import build_layout
from pairopt.errors import PairoptError
from pairopt.pairs import GroupLogps, ResponseGroup, offsets_of

LOGP_TOL = dict(atol=1e-5, rtol=1e-6)
GRAD_TOL = dict(atol=1e-4, rtol=0)
CPU_BACKEND = {"gemma2": "eager"}
# (P, n_1, ..., n_k) for k = 2..8: seven groups of different sizes, 176 tokens shared
MIXED = [
    (3, 2, 4),
    (6, 1, 3, 2),
    (1, 4, 2, 5, 1),
    (5, 3, 3, 1, 2, 4),
    (2, 1, 5, 2, 3, 1, 2),
    (4, 2, 1, 4, 3, 2, 1, 3),
    (6, 3, 2, 1, 5, 2, 4, 1, 2),
]


def all_pairs(sizes: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Every (i, j), i < j, of every group, as flat response indices (chosen = i)."""
    chosen, rejected, first = [], [], 0
    for k in sizes:
        for i, j in combinations(range(k), 2):
            chosen.append(first + i)
            rejected.append(first + j)
        first += k
    return torch.tensor(chosen), torch.tensor(rejected)


def pair_loss(chosen_N: torch.Tensor, rejected_N: torch.Tensor) -> torch.Tensor:
    """DPO-like, each pair weighted differently, so a swapped or dropped pair shows."""
    w = torch.linspace(0.5, 1.5, chosen_N.numel(), dtype=chosen_N.dtype)
    return -(w * torch.nn.functional.logsigmoid(0.1 * (chosen_N - rejected_N))).sum()


def naive_pairs(model, groups: list[ResponseGroup]) -> tuple[torch.Tensor, torch.Tensor]:
    """The unshared per-pair computation: for every pair, both responses run again."""
    chosen, rejected = [], []
    for group in groups:
        for i, j in combinations(range(len(group.responses)), 2):
            pair = [ResponseGroup(group.prompt, [group.responses[i], group.responses[j]])]
            out = naive_logps(model, pair)[0]  # (2,): one plain forward per response
            chosen.append(out[0])
            rejected.append(out[1])
    return torch.stack(chosen), torch.stack(rejected)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_mixed_group_sizes_in_one_row_equal_the_per_pair_computation(family):
    model = make_model(family)
    groups = random_groups(MIXED, seed=13)
    sizes = [len(g.responses) for g in groups]
    layout = build_layout(groups, max_tokens_per_row=256, bucket_size=16)
    assert layout.shape[0] == 1 and layout.sizes == sizes  # all seven groups share one row

    expected_R = naive_logps_flat(model, groups)
    naive_c, naive_r = naive_pairs(model, groups)
    grads_expected = param_grads(model, pair_loss(naive_c, naive_r))

    got = compute_group_logps(
        model,
        groups,
        backend=CPU_BACKEND.get(family, "sdpa"),
        max_tokens_per_row=256,
        bucket_size=16,
    )
    torch.testing.assert_close(got.logps, expected_R, **LOGP_TOL)
    assert got.tokens.tolist() == [n for _, *ns in MIXED for n in ns]
    assert got.offsets.tolist() == offsets_of(sizes).tolist()
    pairs = got.pairs(*all_pairs(sizes))
    assert len(pairs) == sum(k * (k - 1) // 2 for k in sizes) == 84
    torch.testing.assert_close(pairs.chosen_logps, naive_c.detach(), **LOGP_TOL)
    torch.testing.assert_close(pairs.rejected_logps, naive_r.detach(), **LOGP_TOL)
    grads = param_grads(model, pair_loss(pairs.chosen_logps, pairs.rejected_logps))
    assert grads.keys() == grads_expected.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, grads_expected[name], **GRAD_TOL, msg=name)


def naive_logps_flat(model, groups: list[ResponseGroup]) -> torch.Tensor:
    """(R,) summed log-probs, one plain forward per response, groups one after another."""
    return torch.cat([naive_logps(model, [g])[0] for g in groups]).detach()


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma2"])
def test_unshared_and_unpacked_layouts_of_mixed_groups(family):
    model = make_model(family)
    groups = random_groups(MIXED[:4], seed=5)
    expected = naive_logps_flat(model, groups)
    for share_prefix, packing in ((False, True), (False, False), (True, False)):
        got = compute_group_logps(
            model,
            groups,
            share_prefix=share_prefix,
            packing=packing,
            backend=CPU_BACKEND.get(family, "sdpa"),
            max_tokens_per_row=64,
            bucket_size=8,
        )
        torch.testing.assert_close(got.logps, expected, **LOGP_TOL)


def test_a_group_over_the_row_budget_is_refused_naming_it():
    """A group is one segment (its responses share the prompt): 3 + 2 + 4 + 5 = 14 tokens do
    not fit a row of 12, and the error names the group."""
    groups = random_groups([(2, 1, 1), (3, 2, 4, 5)], seed=1)
    with pytest.raises(PairoptError, match=r"group 1 needs 14 tokens in one row.*budget"):
        build_layout(groups, max_tokens_per_row=12)


def test_response_logps_needs_equal_sizes():
    model = make_model("llama")
    groups = random_groups([(2, 1, 1), (3, 2, 4, 5)], seed=1)
    with pytest.raises(PairoptError, match="compute_group_logps"):
        pairopt.compute_response_logps(model, groups)
    out = pairopt.compute_response_logps(model, random_groups([(2, 1, 1, 2), (3, 2, 4, 5)]))
    assert out.logps.shape == (2, 3)


def test_group_logps_indexing_padding_and_selection():
    """Groups of 2 and 3: logps (−1, −2 | −3, −4, −5)."""
    flat = GroupLogps(
        torch.tensor([-1.0, -2.0, -3.0, -4.0, -5.0], requires_grad=True),
        torch.tensor([1, 2, 3, 4, 5]),
        offsets_of([2, 3]),
    )
    assert flat.sizes == [2, 3] and flat.num_groups == 2
    pairs = flat.pairs(torch.tensor([0, 2, 2]), torch.tensor([1, 3, 4]))
    assert pairs.chosen_logps.tolist() == [-1.0, -3.0, -3.0]
    assert pairs.rejected_tokens.tolist() == [2, 4, 5]
    # response 2 is in two pairs: its gradient is the sum of both (1 + 1)
    (pairs.chosen_logps.sum() - pairs.rejected_logps.sum()).backward()
    assert flat.logps.grad is not None
    assert flat.logps.grad.tolist() == [1.0, -1.0, 2.0, -1.0, -1.0]
    logps, tokens, mask = flat.padded()
    assert logps.tolist() == [[-1.0, -2.0, 0.0], [-3.0, -4.0, -5.0]]
    assert tokens.tolist() == [[1, 2, 0], [3, 4, 5]]
    assert mask.tolist() == [[True, True, False], [True, True, True]]
    picked = flat.take([1, 0])
    assert picked.logps.tolist() == [-3.0, -4.0, -5.0, -1.0, -2.0] and picked.sizes == [3, 2]
    both = GroupLogps.cat([flat, picked])
    assert both.sizes == [2, 3, 3, 2] and both.offsets.tolist() == [0, 2, 5, 8, 10]
    with pytest.raises(ValueError, match="different sizes"):
        flat.as_matrix()
