"""Per-token statistics from the shared forward (what WPO and LD-DPO need) against a naive
computation: one plain forward per response, full logits, log_softmax."""

from __future__ import annotations

import pytest
import torch
from tiny_models import make_model, random_groups

import pairopt
from pairopt.engine.forward import compute_group_logps
from pairopt.pairs import ResponseGroup

TOL = dict(atol=1e-5, rtol=1e-5)


def naive_per_token(model: torch.nn.Module, group: ResponseGroup, response: list[int]):
    """(log p(y_t), log Σ_v p_v²) at each token of `response`, from the full logits."""
    P = len(group.prompt)
    ids = torch.tensor([list(group.prompt) + list(response)])
    logps_LV = model(input_ids=ids).logits[0].float().log_softmax(-1)[P - 1 : P - 1 + len(response)]
    picked = logps_LV.gather(-1, torch.tensor(response)[:, None]).squeeze(-1)
    return picked, (2 * logps_LV).logsumexp(-1)


@pytest.mark.parametrize("family", ["llama", "gemma2", "qwen2"])
def test_per_token_values_equal_the_naive_computation(family: str) -> None:
    """Groups of 2, 3 and 4 responses packed into one row: each response's per-token log-probs
    and log squared mass equal the plain forward's; the log-probs sum to the response's total."""
    model = make_model(family)
    groups = random_groups([(6, 3, 5), (4, 7, 2, 4), (3, 1, 6, 2, 5)], seed=7)
    backend = "eager" if family == "gemma2" else "sdpa"
    out = compute_group_logps(
        model,
        groups,
        backend=backend,
        max_tokens_per_row=64,
        bucket_size=16,
        statistics={"logps", "log_sq_mass"},
    )
    offsets = out.token_offsets().tolist()
    r = 0
    for group in groups:
        for response in group.responses:
            span = slice(offsets[r], offsets[r + 1])
            logps, squares = naive_per_token(model, group, list(response))
            torch.testing.assert_close(out.token_values["logps"][span], logps, **TOL)
            torch.testing.assert_close(out.token_values["log_sq_mass"][span], squares, **TOL)
            torch.testing.assert_close(out.token_values["logps"][span].sum(), out.logps[r], **TOL)
            r += 1
    assert not out.token_values["log_sq_mass"].requires_grad
    assert out.token_values["logps"].requires_grad


def test_pairs_carry_padded_per_token_values_and_their_gradient() -> None:
    """compute_logps with statistics: (N, L) right-padded per-token log-probs whose row sums are
    the summed log-probs; a loss on them back-propagates as one on the sums would."""
    model = make_model("llama")
    pairs = [
        pairopt.PreferencePair([5, 6, 7], [8, 9], [10, 11, 12, 13]),
        pairopt.PreferencePair([4], [3, 2, 1], [2]),
    ]
    out = pairopt.compute_logps(model, pairs, statistics={"logps"})
    chosen, rejected = out.token_values["logps"]
    assert chosen.shape == (2, 3) and rejected.shape == (2, 4)
    assert chosen[0, 2] == 0 and rejected[1, 1:].eq(0).all()  # padding past each count
    torch.testing.assert_close(chosen.sum(-1), out.chosen_logps, **TOL)
    torch.testing.assert_close(rejected.sum(-1), out.rejected_logps, **TOL)
    model.zero_grad(set_to_none=True)
    (chosen.sum() - rejected.sum()).backward()
    via_tokens = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    again = pairopt.compute_logps(model, pairs)
    (again.chosen_logps.sum() - again.rejected_logps.sum()).backward()
    for name, param in model.named_parameters():
        if param.grad is not None:
            torch.testing.assert_close(via_tokens[name], param.grad, atol=1e-5, rtol=1e-4)


def test_unknown_statistic_is_refused() -> None:
    model = make_model("llama")
    with pytest.raises(ValueError, match="unknown token statistics"):
        pairopt.compute_logps(model, [pairopt.PreferencePair([1], [2], [3])], statistics={"nope"})


def test_taking_and_concatenating_groups_keeps_each_responses_tokens() -> None:
    model = make_model("llama")
    groups = random_groups([(3, 2, 4), (5, 1, 3, 2)], seed=3)
    with torch.no_grad():
        out = compute_group_logps(model, groups, statistics={"logps"})
    second = out.take([1])
    torch.testing.assert_close(
        second.token_values["logps"], out.token_values["logps"][6:]
    )  # group 0 holds 2 + 4 = 6 tokens
    both = type(out).cat([out.take([0]), second])
    torch.testing.assert_close(both.token_values["logps"], out.token_values["logps"])
