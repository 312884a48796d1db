"""Refusals: models the shared forward cannot be exact for, dropout, empty or oversize input."""

from __future__ import annotations

import warnings

import pytest
import torch
import transformers
from tiny_models import FAMILIES, make_model, naive_logps, random_groups

import pairopt
from pairopt.engine import attention
from pairopt.engine.compat import active_dropout
from pairopt.engine.forward import compute_response_logps
from pairopt.errors import PairoptError, UnsupportedModelError

PAIRS = [pairopt.PreferencePair([1, 2, 3], [4, 5], [6])]


def bloom():
    config = transformers.BloomConfig(vocab_size=50, hidden_size=16, n_layer=1, n_head=2)
    return transformers.BloomForCausalLM(config).eval()


def test_alibi_model_refused_before_any_work():
    model = bloom()
    with pytest.raises(
        UnsupportedModelError, match=r"BloomForCausalLM \(model_type 'bloom'\).*share_prefix=False"
    ):
        pairopt.compute_logps(model, PAIRS)
    with pytest.raises(UnsupportedModelError, match="ALiBi"):
        pairopt.compute_logps(model, PAIRS, share_prefix=False)  # packing needs the mask too


def test_refused_model_still_runs_the_classic_computation():
    model = bloom()
    groups = [p.as_group() for p in PAIRS] + random_groups([(4, 2, 5)], vocab=50)
    pairs = [pairopt.PreferencePair(g.prompt, *g.responses) for g in groups]
    got = pairopt.compute_logps(model, pairs, share_prefix=False, packing=False)
    expected = naive_logps(model, groups)
    torch.testing.assert_close(got.chosen_logps, expected[:, 0], atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(got.rejected_logps, expected[:, 1], atol=1e-5, rtol=1e-6)


def test_unknown_layer_types_refused():
    model = make_model.__wrapped__("qwen2")
    model.config.layer_types = ["full_attention", "linear_attention"]
    with pytest.raises(UnsupportedModelError, match="linear_attention"):
        pairopt.compute_logps(model, PAIRS)


def test_dropout_refused_then_disabled_with_warning():
    model = make_model.__wrapped__("gpt2").train()  # GPT-2 has attention/residual dropout 0.1
    assert active_dropout(model)
    with pytest.raises(PairoptError, match=r"dropout active.*disable_dropout"):
        pairopt.compute_logps(model, PAIRS)
    with pytest.warns(UserWarning, match="switched off dropout"):
        changed = pairopt.disable_dropout(model)
    assert changed > 0 and not active_dropout(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert pairopt.disable_dropout(model) == 0  # nothing left, no warning
    out = pairopt.compute_logps(model, PAIRS)  # train mode, dropout off: allowed
    assert torch.isfinite(out.chosen_logps).all()


@pytest.mark.parametrize(
    ("pair", "message"),
    [
        (pairopt.PreferencePair([1, 2], [], [3]), "pair 0 has an empty chosen response"),
        (pairopt.PreferencePair([1, 2], [3], []), "pair 0 has an empty rejected response"),
        (pairopt.PreferencePair([], [3], [4]), "pair 0 has an empty prompt"),
    ],
)
def test_empty_inputs_refused(pair, message):
    with pytest.raises(PairoptError, match=message):
        pairopt.compute_logps(make_model("llama"), [pair])


def test_pair_over_row_budget_refused():
    pairs = [pairopt.PreferencePair(list(range(1, 30)), [5] * 10, [6] * 10)]
    with pytest.raises(PairoptError, match=r"needs 49 tokens.*max_tokens_per_row=32"):
        pairopt.compute_logps(make_model("llama"), pairs, max_tokens_per_row=32)


def test_flex_backward_on_cpu_refused_clearly():
    with pytest.raises(PairoptError, match="no backward on the CPU"):
        pairopt.compute_logps(make_model.__wrapped__("llama"), PAIRS, backend="flex")


def test_unknown_backend():
    with pytest.raises(PairoptError, match="unknown backend 'fast'"):
        pairopt.compute_logps(make_model("llama"), PAIRS, backend="fast")


def softcapped_gemma2() -> torch.nn.Module:
    """A Gemma2 whose q/k weights are large enough that attention scores pass the softcap
    (5.0): there dropping the softcap changes the log-probs."""
    config, kwargs, _ = FAMILIES["gemma2"]
    model = transformers.AutoModelForCausalLM.from_config(
        getattr(transformers, config)(**kwargs), attn_implementation="eager"
    )
    torch.manual_seed(0)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(60.0)
            layer.self_attn.k_proj.weight.mul_(60.0)
    return model.eval()


def test_softcapped_gemma2_never_runs_sdpa_even_when_it_claims_support() -> None:
    """transformers 5.0-5.20.2 declared Gemma2 `_supports_sdpa = True` while its sdpa path drops
    the attention softcap; the backend is decided from the config instead."""
    model = softcapped_gemma2()
    model._supports_sdpa = True  # as in transformers 5.0-5.20.2
    groups = random_groups([(9, 6, 7), (5, 8, 3)], seed=4)
    expected = naive_logps(model, groups)  # eager: softcap applied
    layers = [layer.self_attn for layer in model.model.layers]
    for attn in layers:  # what those versions' sdpa path computed: no softcap
        attn.attn_logit_softcapping = None
    dropped = naive_logps(model, groups)
    for attn in layers:
        attn.attn_logit_softcapping = model.config.attn_logit_softcapping
    assert (dropped - expected).abs().max() > 0.05  # the softcap matters for these weights
    assert attention.auto_backend(model) == "eager"
    got = compute_response_logps(model, groups)  # backend auto
    torch.testing.assert_close(got.logps, expected, atol=1e-5, rtol=1e-6)
    with pytest.raises(PairoptError, match=r"softcap 5 .*sdpa kernel cannot apply"):
        compute_response_logps(model, groups, backend="sdpa")
