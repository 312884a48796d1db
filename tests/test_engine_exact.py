"""The shared forward equals the plain unshared computation, family by family.

Tolerances (fp32 tiny random models): summed log-probs 1e-5 absolute plus 1e-6 relative (a sum
of ~40 in fp32 has an ulp of 4e-6, so reordered sums differ by that much), parameter gradients
1e-4 absolute. `test_float64_is_exact_to_rounding` shows the differences are rounding only.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tiny_models import FAMILIES, make_model, naive_logps, param_grads, random_groups

import pairopt
from pairopt.engine.forward import compute_response_logps, forward_layout
from pairopt.engine.layout import build_layout

LOGP_TOL = dict(atol=1e-5, rtol=1e-6)
GRAD_TOL = dict(atol=1e-4, rtol=0)
CPU_BACKEND = {"gemma2": "eager"}  # Gemma2 has no sdpa path (softcap)


def weighted(logps: torch.Tensor) -> torch.Tensor:
    """A loss that weights every response differently, so a swapped response shows."""
    w = torch.linspace(0.5, 1.5, logps.numel()).view_as(logps)
    return (w * logps).sum()


def check_exact(family: str, lengths, *, packing: bool, max_tokens_per_row=None, bucket=16):
    model = make_model(family)
    groups = random_groups(lengths, seed=len(lengths))
    expected = naive_logps(model, groups)
    grads_expected = param_grads(model, weighted(expected))
    got = compute_response_logps(
        model,
        groups,
        share_prefix=True,
        packing=packing,
        backend=CPU_BACKEND.get(family, "sdpa"),
        max_tokens_per_row=max_tokens_per_row,
        bucket_size=bucket,
    )
    torch.testing.assert_close(got.logps, expected, **LOGP_TOL)
    assert got.tokens.tolist() == [list(ns) for _, *ns in lengths]
    grads = param_grads(model, weighted(got.logps))
    assert grads.keys() == grads_expected.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, grads_expected[name], **GRAD_TOL, msg=name)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_single_pairs(family):
    # windows are 5-6 positions, so these lengths cross them in prompt and responses
    check_exact(family, [(7, 4, 9)], packing=False)
    check_exact(family, [(1, 1, 1), (12, 3, 2)], packing=False)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_k3_responses(family):
    check_exact(family, [(6, 3, 8, 2), (4, 5, 1, 7)], packing=True, max_tokens_per_row=64)


@pytest.mark.parametrize("family", sorted(FAMILIES))
@settings(
    max_examples=4, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
@given(
    lengths=st.lists(
        st.tuples(st.integers(1, 14), st.integers(1, 9), st.integers(1, 9)),
        min_size=1,
        max_size=5,
    ),
    budget=st.integers(32, 64),
)
def test_packed_rows_random_lengths(family, lengths, budget):
    check_exact(family, lengths, packing=True, max_tokens_per_row=budget)


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma2"])
def test_unshared_layouts_match_naive(family):
    model = make_model(family)
    groups = random_groups([(5, 3, 6), (9, 2, 2), (2, 7, 1)], seed=3)
    expected = naive_logps(model, groups)
    for packing in (False, True):
        got = compute_response_logps(
            model,
            groups,
            share_prefix=False,
            packing=packing,
            backend=CPU_BACKEND.get(family, "sdpa"),
            max_tokens_per_row=32,
            bucket_size=8,
        )
        torch.testing.assert_close(got.logps, expected, **LOGP_TOL)


def test_compute_logps_pairs_api():
    model = make_model("llama")
    pairs = [
        pairopt.PreferencePair([5, 6, 7], [8, 9], [10]),
        pairopt.PreferencePair([4], [3], [2, 1]),
    ]
    out = pairopt.compute_logps(model, pairs)
    expected = naive_logps(model, [p.as_group() for p in pairs])
    torch.testing.assert_close(out.chosen_logps, expected[:, 0], **LOGP_TOL)
    torch.testing.assert_close(out.rejected_logps, expected[:, 1], **LOGP_TOL)
    assert out.chosen_tokens.tolist() == [2, 1] and out.rejected_tokens.tolist() == [1, 2]
    assert out.chosen_logps.requires_grad


def test_padding_never_nan():
    # one long and one short row: the short row is mostly padding
    model = make_model("llama")
    groups = random_groups([(40, 10, 10), (1, 1, 1)], seed=5)
    got = compute_response_logps(model, groups, packing=False, bucket_size=64)
    assert torch.isfinite(got.logps).all()
    param_grads(model, got.logps.sum())
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


# Tolerance in float64, per family: what the classic computation itself can deliver.
# transformers' Gemma2 eager attention takes its softmax in float32 even for a float64 model
# (`softmax(..., dtype=torch.float32)`), so both the naive forward and the engine round every
# attention probability at float32's eps (1.2e-7); whether two differently shaped computations
# land on the same side of a rounding boundary depends on the CPU's kernels (2.6e-8 was seen on
# another machine, 7e-15 here). A mask or position error moves the sums by >= 1e-2
# (`test_float64_tolerance_catches_mask_errors`), four orders of magnitude above.
FLOAT64_ATOL = {"gemma2": 1e-6}
FLOAT64_CASE = [(7, 8, 6), (8, 8, 9), (1, 1, 1)]


def float64_run(family, corrupt=None):
    """(engine, naive) log-probs in float64; `corrupt(layout)` may break the layout first."""
    model = make_model(family, dtype=torch.float64)
    groups = random_groups(FLOAT64_CASE, seed=11)
    expected = naive_logps(model, groups)
    layout = build_layout(groups, max_tokens_per_row=40, bucket_size=8)
    if corrupt is not None:
        layout = corrupt(layout)
    got = forward_layout(model, layout, backend=CPU_BACKEND.get(family, "sdpa"))
    return got.logps.double(), expected


@pytest.mark.parametrize("family", ["gemma2", "mistral", "gpt2"])
def test_float64_is_exact_to_rounding(family):
    got, expected = float64_run(family)
    torch.testing.assert_close(got, expected, atol=FLOAT64_ATOL.get(family, 1e-10), rtol=0)


def _rejected_sees_chosen(layout):
    branch = layout.branch_ids.clone()
    branch[branch == 2] = 1
    return dataclasses.replace(layout, branch_ids=branch)


def _rejected_positions_shifted(layout):
    positions = layout.position_ids.clone()
    positions[layout.branch_ids == 2] += 1
    return dataclasses.replace(layout, position_ids=positions)


@pytest.mark.parametrize("corrupt", [_rejected_sees_chosen, _rejected_positions_shifted])
@pytest.mark.parametrize("family", ["gemma2", "mistral", "gpt2"])
def test_float64_tolerance_catches_mask_errors(family, corrupt):
    """The float64 tolerance is loose only where the reference rounds: a wrong mask (rejected
    attends to chosen) or wrong positions (rejected not restarting after the prompt) is caught
    with a thousandfold margin."""
    got, expected = float64_run(family, corrupt)
    assert (got - expected).abs().max().item() > 1000 * FLOAT64_ATOL.get(family, 1e-10)
