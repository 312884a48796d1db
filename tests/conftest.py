"""Shared test setup: deterministic, CPU-only, one torch thread per test process.

pytest runs with `-n 2` (two processes on two cores), so one intra-op thread each avoids
oversubscription, which made tiny-model tests an order of magnitude slower.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
torch.set_num_threads(1)


@pytest.fixture
def registry():
    """Whatever a test registers is gone afterwards, so tests do not leak losses into each other."""
    import pairopt.loss.registry as loss_registry

    loss_registry.available_losses()  # built-ins loaded before the snapshot
    saved = dict(loss_registry._REGISTRY)
    yield loss_registry._REGISTRY
    loss_registry._REGISTRY.clear()
    loss_registry._REGISTRY.update(saved)
    # a loss module imported during the test would otherwise stay imported with its losses
    # gone from the registry, and the next import of it would register nothing
    for name in [m for m in sys.modules if m.startswith("pairopt_loss_module_")]:
        del sys.modules[name]


@pytest.fixture(scope="module")
def tok() -> Any:
    """The shipped tiny-llama tokenizer (the data tests)."""
    from transformers import AutoTokenizer

    from pairopt.sources import resolve_builtin

    return AutoTokenizer.from_pretrained(resolve_builtin("builtin:tiny-llama"))


@pytest.fixture
def quiet_datasets() -> None:
    """No datasets progress bars in the test's output (modules opt in with usefixtures)."""
    import datasets

    datasets.disable_progress_bars()
