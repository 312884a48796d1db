"""Shared test setup: deterministic, CPU-only, one torch thread per test process.

pytest runs with `-n 2` (two processes on two cores), so one intra-op thread each avoids
oversubscription, which made tiny-model tests an order of magnitude slower.
"""

from __future__ import annotations

import os

import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
torch.set_num_threads(1)
