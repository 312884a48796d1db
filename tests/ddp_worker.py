"""One process of tests/test_trainer.py's two-process run (started by torchrun, gloo on CPU).

Trains the tiny test config and saves this replica's parameters as rank<R>.pt for the test to
compare; not a test module itself.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
from train_fixtures import params, tiny_config

from pairopt.training.trainer import train

if __name__ == "__main__":
    torch.set_num_threads(1)
    model_dir, out = Path(sys.argv[1]), Path(sys.argv[2])
    result = train(tiny_config(model_dir, out / "ddp"))
    torch.save(params(result.policy), out / f"rank{os.environ['RANK']}.pt")
