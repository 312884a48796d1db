"""The chunked LM head equals log_softmax(...).gather(...) and never holds (T, V) logits."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pairopt.engine.logps import token_logps


def naive(head, hidden, target):
    return head(hidden).log_softmax(-1).gather(-1, target[:, None]).squeeze(-1)


@pytest.mark.parametrize(("T", "chunk"), [(1, 4), (37, 8), (64, 64), (65, 1024)])
def test_chunked_equals_naive_in_value_and_gradient(T, chunk):
    torch.manual_seed(0)
    head = nn.Linear(16, 53, bias=True)
    hidden = torch.randn(T, 16, requires_grad=True)
    target = torch.randint(0, 53, (T,))
    weight = torch.randn(T)  # a loss that weighs tokens differently

    expected = naive(head, hidden, target)
    (weight * expected).sum().backward()
    grads_expected = [t.grad.clone() for t in (hidden, head.weight, head.bias)]
    for t in (hidden, head.weight, head.bias):
        t.grad = None

    got = token_logps(head, hidden, target, chunk_size=chunk)
    (weight * got).sum().backward()
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    for grad, grad_expected in zip(
        (hidden.grad, head.weight.grad, head.bias.grad), grads_expected, strict=True
    ):
        torch.testing.assert_close(grad, grad_expected, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("vocab", [1_000, 8_000, 32_000])
def test_no_full_logits_in_forward_or_backward(vocab):
    """Largest head output and largest tensor autograd keeps stay at chunk x V, for any T."""
    T, D, chunk = 512, 8, 32
    head = nn.Linear(D, vocab, bias=False)
    largest_output = []
    head.register_forward_hook(lambda m, i, o: largest_output.append(o.numel()))
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    hidden = torch.randn(T, D, requires_grad=True)
    target = torch.randint(0, vocab, (T,))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logps = token_logps(head, hidden, target, chunk_size=chunk)
    logps.sum().backward()  # recomputes chunk by chunk
    assert max(largest_output) == chunk * vocab  # the head never ran on more than one chunk
    assert max(saved) < T * vocab / 8  # autograd kept no (T, V) tensor across the forward
    assert len(largest_output) == 2 * T // chunk  # once in forward, once in backward


def test_no_grad_path_skips_checkpointing():
    head = nn.Linear(4, 11)
    hidden, target = torch.randn(10, 4), torch.randint(0, 11, (10,))
    with torch.no_grad():
        got = token_logps(head, hidden, target, chunk_size=3)
    torch.testing.assert_close(got, naive(head, hidden, target))


def test_the_head_is_one_module_call_whatever_the_chunks():
    """head_values runs every chunk inside one call of the LM-head module (in_one_call): a hook
    on the module (where ZeRO-3 gathers the weight) fires once for the forward and once for the
    backward, with 37 rows in chunks of 8 (5 chunks), and the numbers are those of one call
    per chunk. A forward set on the instance (as a test or a wrapper may) is put back."""
    from pairopt.engine.logps import head_values, make_head, token_values

    torch.manual_seed(0)
    model = nn.Module()
    model.lm_head = nn.Linear(16, 53, bias=False)
    model.get_output_embeddings = lambda: model.lm_head
    model.config = None
    hidden = torch.randn(37, 16, requires_grad=True)
    target = torch.randint(0, 53, (37,))
    calls = {"forward": 0, "backward": 0, "rows": 0}
    model.lm_head.register_forward_pre_hook(lambda m, a: calls.update(forward=calls["forward"] + 1))
    model.lm_head.register_full_backward_pre_hook(
        lambda m, g: calls.update(backward=calls["backward"] + 1)
    )
    plain = model.lm_head.forward

    def counted(x):  # an instance-level forward: sees each chunk's rows
        calls["rows"] = max(calls["rows"], x.shape[0])
        return plain(x)

    model.lm_head.forward = counted
    got = head_values(model, hidden, target, chunk_size=8)["logps"]
    got.sum().backward()
    assert calls == {"forward": 1, "backward": 1, "rows": 8}
    assert model.lm_head.forward is counted
    grad = hidden.grad.clone()
    hidden.grad = None
    want = token_values(make_head(model), hidden, target, chunk_size=8)["logps"]
    want.sum().backward()
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(grad, hidden.grad, rtol=0, atol=0)
    del model.lm_head.forward
    head_values(model, hidden, target, chunk_size=8)
    assert "forward" not in model.lm_head.__dict__
