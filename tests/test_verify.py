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


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--device", "tpu"], "--device 'tpu': not a device torch knows"),
        (["--atol", "-1"], "--atol must be >= 0, got -1.0"),
        (["--rtol", "-0.5"], "--rtol must be >= 0, got -0.5"),
        (["--rtol", "nan"], "--rtol must be >= 0, got nan"),
        (["--device", "cpu", "--backends", "flex"], "--backends flex: backend='flex' needs a CUDA"),
        (["--device", "cpu", "--backends", "sdpa,flex"], "use sdpa, eager or varlen on the CPU"),
    ],
)
def test_verify_refuses_bad_options_before_loading(capsys, monkeypatch, argv, expected):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded for bad input")

    monkeypatch.setattr("pairopt.verify.load_causal_lm", refuse)
    assert main(["verify", "--model", "builtin:none", *argv]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and expected in " ".join(err.split())


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_verify_cuda_without_a_gpu(capsys):
    assert main(["verify", "--model", "builtin:none", "--device", "cuda"]) == 2
    assert "--device cuda: no CUDA device here" in capsys.readouterr().err
