"""`pairopt verify` passes on a saved model directory and fails on a broken engine or model."""

from __future__ import annotations

import pytest
import torch
import transformers
from tiny_models import make_model

import pairopt.engine.masks as masks
from pairopt.cli import main


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-qwen2")
    make_model.__wrapped__("qwen2").save_pretrained(path)  # hybrid sliding-window layers
    return str(path)


def test_verify_passes_on_a_saved_model(saved_model, capsys):
    assert main(["verify", "--model", saved_model, "--pairs", "3"]) == 0
    out = capsys.readouterr().out
    for backend in ("sdpa", "eager", "varlen"):
        assert f"{backend:<8} shared+packed" in out
    assert "MISMATCH" not in out and "exact here" in out


def test_verify_fails_when_the_rule_is_broken(saved_model, capsys, monkeypatch):
    rule = masks.visible

    def leaky(doc_q, doc_k, branch_q, branch_k, *args, **kwargs):
        # the classic bug: the rejected branch may read the chosen branch
        return rule(doc_q, doc_k, branch_q, branch_q, *args, **kwargs)

    monkeypatch.setattr(masks, "visible", leaky)
    assert main(["verify", "--model", saved_model, "--backends", "sdpa"]) == 1
    out = capsys.readouterr().out
    lines = {line[:25].strip(): line for line in out.splitlines()}
    assert lines["sdpa     shared+packed"].endswith("MISMATCH")
    # one response per document has no other branch to leak into: still exact
    assert lines["sdpa     unshared+packed"].endswith("ok")


def test_verify_refuses_an_alibi_model(tmp_path, capsys):
    config = transformers.BloomConfig(vocab_size=50, hidden_size=16, n_layer=1, n_head=2)
    torch.manual_seed(0)
    transformers.BloomForCausalLM(config).save_pretrained(tmp_path)
    assert main(["verify", "--model", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "model_type 'bloom'" in err and "share_prefix=False" in err and "Traceback" not in err


def test_verify_bad_arguments(capsys):
    assert main(["verify", "--model", "/no/such/dir", "--backends", "cuda-magic"]) == 2
    assert "unknown ['cuda-magic']" in capsys.readouterr().err
