"""LD-DPO (`ld_alpha`) and WPO (`use_weighting`): hand-worked values, the engine's per-token
statistics against TRL 1.16's definitions on plain forwards, and training with each reference
strategy."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from tiny_models import make_model, random_groups
from train_fixtures import make_tiny_model_dir, tiny_config

import pairopt
from pairopt import PairLogps, build_loss
from pairopt.training.trainer import train


def with_tokens(chosen, rejected, grad=False) -> PairLogps:
    """One pair from per-token log-probs (and log squared masses, when given as pairs); with
    `grad`, the chosen per-token log-probs are the leaf `.leaf` whose gradient a test reads."""

    def split(values):
        logps = [v[0] if isinstance(v, tuple) else v for v in values]
        squares = [v[1] if isinstance(v, tuple) else 0.0 for v in values]
        return torch.tensor([logps], requires_grad=grad), torch.tensor([squares])

    (c, c_sq), (r, r_sq) = split(chosen), split(rejected)
    width = max(c.shape[1], r.shape[1])
    pad = lambda t: torch.nn.functional.pad(t, (0, width - t.shape[1]))  # noqa: E731
    pair = PairLogps(
        c.sum(-1),
        r.sum(-1),
        torch.tensor([c.shape[1]]),
        torch.tensor([r.shape[1]]),
        {"logps": (pad(c), pad(r)), "log_sq_mass": (pad(c_sq), pad(r_sq))},
    )
    pair.leaf = c  # type: ignore[attr-defined]
    return pair


def test_ld_dpo_by_hand() -> None:
    """Chosen tokens [−1, −2, −3], rejected [−1, −1]: l_p = 2, so only chosen's third token is
    verbose. α = 0.5: policy chosen −1 − 2 + 0.5·(−3) = −4.5; reference chosen [−1, −1, −1]:
    −2.5; rejected sums stay (−2 and −4). s_c = −2, s_r = 2, Δ = −4, βΔ = −0.4:
    −logσ(−0.4) = log(1 + e^0.4) = 0.913015 (plain DPO: Δ = −5, 0.974077)."""
    policy = with_tokens([-1.0, -2.0, -3.0], [-1.0, -1.0])
    reference = with_tokens([-1.0, -1.0, -1.0], [-2.0, -2.0])
    loss = build_loss("dpo", ld_alpha=0.5)
    assert loss.token_statistics == {"logps"} and loss.reference_token_statistics == {"logps"}
    torch.testing.assert_close(
        float(loss(policy, reference).losses), 0.913015, rtol=1e-5, atol=1e-6
    )
    torch.testing.assert_close(
        float(build_loss("dpo")(policy, reference).losses), 0.974077, rtol=1e-5, atol=1e-6
    )
    ld_one = build_loss("dpo", ld_alpha=1.0)(policy, reference).losses
    torch.testing.assert_close(ld_one, build_loss("dpo")(policy, reference).losses)


def test_wpo_by_hand() -> None:
    """Chosen (log p, log Σp²) = (−1, −0.5), (−2, −1.0): mean(log p − log Σp²) = −0.75;
    rejected (−1, −2): 1. w = e^(−0.75)·e^1 = e^0.25 = 1.284025, times DPO's loss on
    Δ = (−3 − 0) − (−1 − 0) = −2: −logσ(−0.2) = 0.798139 → 1.024820. The weight carries no
    gradient: each chosen token's is w·∂DPO/∂S_c = w·(−β·σ(−βΔ)) = 1.284025·(−0.1·σ(0.2)) =
    1.284025·(−0.0549834) = −0.0706000 (a weight in the graph would add L·w/n_c to it)."""
    policy = with_tokens([(-1.0, -0.5), (-2.0, -1.0)], [(-1.0, -2.0)], grad=True)
    reference = with_tokens([0.0, 0.0], [0.0])
    loss = build_loss("dpo", use_weighting=True)
    assert loss.token_statistics == {"logps", "log_sq_mass"}
    assert loss.reference_token_statistics == frozenset()
    out = loss(policy, reference)
    torch.testing.assert_close(
        float(out.losses.detach()), 0.798139 * math.exp(0.25), rtol=1e-5, atol=1e-6
    )
    torch.testing.assert_close(float(out.metrics["wpo_weight"]), math.exp(0.25))
    out.losses.sum().backward()
    expected = math.exp(0.25) * -0.1 / (1 + math.exp(-0.2))  # w·(−β·σ(0.2))
    torch.testing.assert_close(policy.leaf.grad, torch.full((1, 2), expected), rtol=1e-5, atol=1e-7)


def test_aot_refuses_wpo_like_trl() -> None:
    with pytest.raises(pairopt.PairoptError, match="use_weighting"):
        build_loss("aot", use_weighting=True)


def _naive_pair(model, group, beta, alpha, weighting, reference_model):
    """TRL 1.16's sigmoid loss with ld_alpha / use_weighting for one pair, from plain forwards in
    float64 (dpo_trainer.py: LD masks over the completion, WPO weight from lss_t)."""

    def per_token(m, response):
        P = len(group.prompt)
        ids = torch.tensor([list(group.prompt) + list(response)])
        logps = m(input_ids=ids).logits[0].double().log_softmax(-1)[P - 1 : P - 1 + len(response)]
        picked = logps.gather(-1, torch.tensor(response)[:, None]).squeeze(-1)
        return picked, (2 * logps).logsumexp(-1).detach()

    chosen, rejected = group.responses
    l_p = min(len(chosen), len(rejected))

    def ld(tokens):
        steps = torch.arange(len(tokens))
        return (tokens * torch.where(steps < l_p, 1.0, alpha).double()).sum()

    (pc, pc_sq), (pr, pr_sq) = per_token(model, chosen), per_token(model, rejected)
    with torch.no_grad():
        (rc, _), (rr, _) = per_token(reference_model, chosen), per_token(reference_model, rejected)
    margin = (ld(pc) - ld(rc)) - (ld(pr) - ld(rr))
    loss = -torch.nn.functional.logsigmoid(beta * margin)
    if weighting:
        w = torch.exp((pc - pc_sq).mean()) * torch.exp((pr - pr_sq).mean())
        loss = loss * w.detach()
    return loss


@pytest.mark.parametrize(("alpha", "weighting"), [(0.5, False), (1.0, True), (0.3, True)])
def test_shared_forward_matches_trls_definition(alpha: float, weighting: bool) -> None:
    """The engine's statistics on the shared, packed forward give TRL's LD-DPO / WPO losses from
    plain per-response forwards, values and parameter gradients."""
    policy_model = make_model("llama")
    reference_model = make_model("llama", seed=1)
    groups = random_groups([(5, 3, 6), (7, 4, 2), (2, 5, 5)], seed=9)
    pairs = [pairopt.PreferencePair(g.prompt, *g.responses) for g in groups]
    loss = build_loss("dpo", beta=0.5, ld_alpha=alpha, use_weighting=weighting)
    policy = pairopt.compute_logps(policy_model, pairs, statistics=loss.token_statistics)
    with torch.no_grad():
        reference = pairopt.compute_logps(
            reference_model, pairs, statistics=loss.reference_token_statistics
        )
    policy_model.zero_grad(set_to_none=True)
    got = loss(policy, reference).losses
    got.sum().backward()
    grads = {n: p.grad.clone() for n, p in policy_model.named_parameters() if p.grad is not None}
    policy_model.zero_grad(set_to_none=True)
    expected = torch.stack(
        [_naive_pair(policy_model, g, 0.5, alpha, weighting, reference_model) for g in groups]
    )
    expected.sum().backward()
    torch.testing.assert_close(got.double(), expected.detach(), rtol=1e-5, atol=1e-5)
    for name, param in policy_model.named_parameters():
        if param.grad is not None:
            torch.testing.assert_close(
                grads[name].double(), param.grad.double(), rtol=1e-3, atol=1e-5
            )


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model_dir(tmp_path_factory.mktemp("models"))


def test_training_with_ld_and_wpo_live_or_precomputed(model_dir: Path, tmp_path: Path) -> None:
    """The precomputed reference keeps its per-token log-probs (LD-DPO needs them) in the cache:
    the same trajectory as the live copy; a second run reads them from the cache."""
    loss = {"name": "dpo", "ld_alpha": 0.5, "use_weighting": True}
    live = train(tiny_config(model_dir, tmp_path / "a", loss=loss, reference={"strategy": "copy"}))
    cache = {"strategy": "precompute", "cache_dir": str(tmp_path / "cache")}
    first = train(tiny_config(model_dir, tmp_path / "b", loss=loss, reference=cache))
    again = train(tiny_config(model_dir, tmp_path / "c", loss=loss, reference=cache))
    assert first.reference_cache_hit is False and again.reference_cache_hit is True
    for run in (first, again):
        assert [h["loss"] for h in run.history] == pytest.approx(
            [h["loss"] for h in live.history], rel=1e-5
        )
    assert all("wpo_weight" in h for h in live.history)
    assert live.final_eval is not None and "wpo_weight" in live.final_eval
