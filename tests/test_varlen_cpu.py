"""The CPU varlen schedule computes exactly the plan's attention; the auto rule; plain calls.

`cpu_blocks_attention` (merged square blocks, the two-part PromptOwnAttention, and the
fallbacks: square blocks keeping their last rows, explicit masks) is checked against
`varlen_emulation` (one explicit bottom-right mask per plan block), values and gradients, on
shared and unshared layouts, packed and padded, k = 2 and 3, prompts shorter and longer than
the responses; with and without the fused CPU ops (the fallbacks).
"""

from __future__ import annotations

import random

import pytest
import torch
from transformers import Gemma2Config, Gemma2ForCausalLM, LlamaConfig, LlamaForCausalLM

from pairopt.engine.attention import auto_backend
from pairopt.engine.forward import compute_logps
from pairopt.engine.layout import build_layout
from pairopt.engine.masks import varlen_plan
from pairopt.engine.varlen import varlen_emulation
from pairopt.engine.varlen_cpu import cpu_blocks_attention, cpu_schedule
from pairopt.pairs import PreferencePair, ResponseGroup

# the emulation computes scores in fp32 whatever the input dtype: fp32-level agreement
TOL = {"atol": 1e-5, "rtol": 1e-5}


def _llama(**kw):
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        vocab_size=97,
        **kw,
    )
    return LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("share", [True, False])
@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("packing", [True, False])
@pytest.mark.parametrize("fused", [True, False])
def test_schedule_equals_emulation(share, k, packing, fused, monkeypatch):
    if not fused:
        from pairopt.engine import varlen_cpu

        monkeypatch.setattr(varlen_cpu, "_flash_cpu_ops", lambda: None)
    rng = random.Random(k * 10 + share * 2 + packing)
    groups = [
        ResponseGroup([1] * rng.randint(1, 14), [[2] * rng.randint(1, 14) for _ in range(k)])
        for _ in range(6)
    ]
    layout = build_layout(
        groups, share_prefix=share, packing=packing, max_tokens_per_row=80, bucket_size=16
    )
    plan, sched = varlen_plan(layout), None
    sched = cpu_schedule(plan)
    B, L = layout.shape
    q, kk, v = (torch.randn(B * L, 2, 8, dtype=torch.float64, requires_grad=True) for _ in "qkv")
    ref = varlen_emulation(
        q[plan.q_index],
        kk[plan.kv_index],
        v[plan.kv_index],
        plan.cu_seqlens_q,
        plan.cu_seqlens_k,
        0.3,
        None,
        None,
    )
    got = cpu_blocks_attention(q[sched.q_src], kk[sched.k_src], v[sched.k_src], sched, 0.3)
    torch.testing.assert_close(got, ref, **TOL)
    weight = torch.randn_like(ref)
    expected = torch.autograd.grad((ref * weight).sum(), (q, kk, v))
    for g, e in zip(torch.autograd.grad((got * weight).sum(), (q, kk, v)), expected, strict=True):
        torch.testing.assert_close(g, e, **TOL)
    # fewer blocks than the plan: each prompt merges with its first response
    assert len(sched.keep) < len(plan.cu_seqlens_q) - 1


def test_schedule_choices(monkeypatch):
    """Prompt + chosen always merge into one square block. The rejected response runs as the
    two-part PromptOwnAttention; without torch's fused CPU ops it falls back to a square block
    keeping its own rows when the prompt is shorter (P=2, C=6: waste P^2/2 = 2 < Q^2/2 = 18),
    else to the explicit mask (P=9, C=2: waste Q^2/2 = 2 < P^2/2 = 40.5)."""
    from pairopt.engine import varlen_cpu

    short = varlen_plan(build_layout([ResponseGroup([1, 1], [[2] * 6, [3] * 6])], bucket_size=1))
    long = varlen_plan(build_layout([ResponseGroup([1] * 9, [[2] * 2, [3] * 2])], bucket_size=1))
    s1, s2 = cpu_schedule(short), cpu_schedule(long)
    assert (s1.q_sizes, s1.k_sizes, s1.kind) == ([8, 6], [8, 8], ["causal", "split"])
    assert (s2.q_sizes, s2.k_sizes, s2.kind) == ([11, 2], [11, 11], ["causal", "split"])
    monkeypatch.setattr(varlen_cpu, "_flash_cpu_ops", lambda: None)
    s1, s2 = cpu_schedule(short), cpu_schedule(long)
    assert (s1.q_sizes, s1.keep, s1.kind) == ([8, 8], [8, 6], ["causal", "causal"])
    assert (s2.q_sizes, s2.kind) == ([11, 2], ["causal", "masked"])


def test_auto_rule_on_cpu():
    assert auto_backend(_llama()) == "varlen"
    assert auto_backend(_llama(sliding_window=8, layer_types=["sliding_attention"] * 2)) == "sdpa"
    gemma = Gemma2ForCausalLM(
        Gemma2Config(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=16,
            intermediate_size=64,
            vocab_size=64,
        )
    )
    assert auto_backend(gemma) == "eager"  # softcap: no sdpa path, emulation would be slow


def test_auto_matches_sdpa_and_leaves_model_usable():
    """compute_logps with auto (varlen on the CPU) equals sdpa; afterwards the model, left on the
    varlen implementation, still answers a plain padded call exactly as sdpa does."""
    model = _llama()
    pairs = [PreferencePair([5, 6, 7], [8, 9], [10]), PreferencePair([4] * 9, [3], [2, 1, 7])]
    ref = compute_logps(model, pairs, backend="sdpa")
    ids = torch.tensor([[5, 6, 7, 8], [4, 3, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    with torch.no_grad():
        plain_sdpa = model(input_ids=ids, attention_mask=mask).logits
    got = compute_logps(model, pairs, backend="auto")
    assert model.config._attn_implementation == "pairopt_varlen"
    torch.testing.assert_close(got.chosen_logps, ref.chosen_logps, **TOL)
    torch.testing.assert_close(got.rejected_logps, ref.rejected_logps, **TOL)
    with torch.no_grad():
        plain = model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(plain[mask.bool()], plain_sdpa[mask.bool()], **TOL)


@pytest.mark.parametrize("share", [True, False])
@pytest.mark.parametrize("window", [None, 7])
def test_chunked_block_mask_equals_create_block_mask(share, window):
    """The BlockMask built query-chunk by chunk lists the same partial and full blocks as
    create_block_mask over the whole grid; rows of 704 tokens end inside a 128-block."""
    from pairopt.engine.attention import flex_block_mask_chunked
    from pairopt.engine.masks import flex_block_mask

    rng = random.Random(int(share) * 2 + (window is None))
    groups = [
        ResponseGroup([1] * rng.randint(1, 150), [[2] * rng.randint(1, 100) for _ in range(2)])
        for _ in range(9)
    ]
    layout = build_layout(groups, share_prefix=share, max_tokens_per_row=700, bucket_size=64)
    ref = flex_block_mask(layout, window)
    got = flex_block_mask_chunked(layout, window, rows=256)
    assert torch.equal(got.to_dense(), ref.to_dense())
    assert torch.equal(got.kv_num_blocks, ref.kv_num_blocks)
    assert torch.equal(got.full_kv_num_blocks, ref.full_kv_num_blocks)
