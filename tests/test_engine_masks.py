"""Every mask encoding is the one rule: sdpa == eager == flex create_mask == varlen plan."""

from __future__ import annotations

import pytest
import torch
from tiny_models import make_model, naive_logps, param_grads, random_groups

from pairopt.engine.forward import compute_response_logps
from pairopt.engine.layout import build_layout
from pairopt.engine.masks import (
    dense_mask,
    eager_mask,
    flex_mask_mod,
    layer_masks,
    sdpa_mask,
    varlen_plan,
    varlen_plan_dense,
)

LENGTHS = [(5, 3, 4), (2, 6, 1), (7, 2, 2), (1, 1, 3)]


def layout(share_prefix=True, packing=True, k3=False):
    lengths = [(4, 2, 3, 5), (3, 1, 1, 2)] if k3 else LENGTHS
    return build_layout(
        random_groups(lengths),
        share_prefix=share_prefix,
        packing=packing,
        max_tokens_per_row=24,
        bucket_size=8,
    )


def rule_by_hand(lay, window=None):
    """The rule written as four nested loops: the slowest, plainest statement of the rule in docs/engine.md."""
    B, L = lay.shape
    out = torch.zeros(B, L, L, dtype=torch.bool)
    doc, br, pos = lay.doc_ids.tolist(), lay.branch_ids.tolist(), lay.position_ids.tolist()
    for b in range(B):
        for q in range(L):
            for k in range(L):
                ok = doc[b][q] == doc[b][k] and k <= q and br[b][k] in (0, br[b][q])
                if window is not None:
                    ok = ok and pos[b][q] - pos[b][k] < window
                out[b, q, k] = ok
    return out


LAYOUTS = {
    "shared-packed": dict(),
    "shared-padded": dict(packing=False),
    "unshared-packed": dict(share_prefix=False),
    "k3": dict(k3=True),
}


@pytest.mark.parametrize("name", sorted(LAYOUTS))
@pytest.mark.parametrize("window", [None, 3])
def test_dense_mask_is_the_rule(name, window):
    lay = layout(**LAYOUTS[name])
    assert torch.equal(dense_mask(lay, window), rule_by_hand(lay, window))


def test_shared_row_by_eye():
    """One pair P=2, C=2, R=1 in an 8-token row: the rejected token sees the prompt and itself."""
    lay = build_layout(random_groups([(2, 2, 1)]), bucket_size=8)
    assert lay.position_ids[0].tolist() == [0, 1, 2, 3, 2, 0, 1, 2]  # padding counts on its own
    assert lay.branch_ids[0, :5].tolist() == [0, 0, 1, 1, 2]
    expected = torch.tensor(
        [
            [1, 0, 0, 0, 0],
            [1, 1, 0, 0, 0],
            [1, 1, 1, 0, 0],
            [1, 1, 1, 1, 0],
            [1, 1, 0, 0, 1],  # rejected: prompt + itself, never the chosen tokens
        ],
        dtype=torch.bool,
    )
    mask = dense_mask(lay)[0]
    assert torch.equal(mask[:5, :5], expected)
    assert not mask[:5, 5:].any() and not mask[5:, :5].any()  # padding is cut off both ways
    assert mask[5:, 5:].diagonal().all()  # and sees itself, so its softmax is never empty
    # scoring: chosen tokens from positions 1 (last prompt) and 2; rejected from 1 as well
    assert lay.score_src.tolist() == [1, 2, 1]


@pytest.mark.parametrize("window", [None, 3])
def test_sdpa_and_eager_encode_the_same(window):
    lay = layout()
    allowed = sdpa_mask(lay, window)
    additive = eager_mask(lay, torch.float32, window)
    assert allowed.shape == additive.shape == (lay.shape[0], 1, lay.shape[1], lay.shape[1])
    assert torch.equal(additive == 0, allowed)
    assert (additive[~allowed] == torch.finfo(torch.float32).min).all()


@pytest.mark.parametrize("name", sorted(LAYOUTS))
@pytest.mark.parametrize("window", [None, 3])
def test_flex_mask_mod_equals_dense(name, window):
    from torch.nn.attention.flex_attention import create_mask

    lay = layout(**LAYOUTS[name])
    B, L = lay.shape
    flex = create_mask(flex_mask_mod(lay, window), B, 1, L, L, device="cpu")
    assert torch.equal(flex[:, 0], dense_mask(lay, window))


@pytest.mark.parametrize("name", sorted(LAYOUTS))
@pytest.mark.parametrize("window", [None, 3])
def test_varlen_plan_equals_dense(name, window):
    lay = layout(**LAYOUTS[name])
    plan = varlen_plan(lay)
    B, L = lay.shape
    assert sorted(plan.q_index.tolist()) == list(range(B * L))  # a permutation: no gaps
    assert torch.equal(varlen_plan_dense(plan, B, L, window), dense_mask(lay, window))


def test_layer_masks_dict_for_hybrid_models():
    masks = layer_masks(
        ["full_attention", "sliding_attention", "full_attention"], 4, lambda w: ("mask", w)
    )
    assert masks == {"full_attention": ("mask", None), "sliding_attention": ("mask", 4)}
    assert layer_masks(None, 7, lambda w: ("mask", w)) == ("mask", 7)


@pytest.mark.parametrize(
    ("family", "backends"),
    [
        ("llama", ["sdpa", "eager", "varlen"]),
        ("mistral", ["sdpa", "eager", "varlen"]),
        ("qwen2", ["sdpa", "eager", "varlen"]),
        ("gemma2", ["eager", "varlen"]),
        ("gpt2", ["sdpa", "eager", "varlen"]),
    ],
)
def test_backends_agree_through_the_model(family, backends):
    """Values and gradients of every CPU backend match the naive forward (varlen = emulation)."""
    model = make_model.__wrapped__(family)  # a private copy: backends switch implementations
    groups = random_groups([(7, 4, 9), (3, 6, 2), (9, 1, 1)], seed=2)
    expected = naive_logps(model, groups)
    grads_expected = param_grads(model, expected.sum())
    for backend in backends:
        got = compute_response_logps(model, groups, backend=backend, max_tokens_per_row=40)
        torch.testing.assert_close(got.logps, expected, atol=1e-5, rtol=1e-6, msg=backend)
        grads = param_grads(model, got.logps.sum())
        for name, grad in grads.items():
            torch.testing.assert_close(grad, grads_expected[name], atol=1e-4, rtol=0, msg=name)
        model.set_attn_implementation("eager" if family == "gemma2" else "sdpa")
