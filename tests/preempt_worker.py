"""One process of tests/test_preemption.py's two-process run (started by torchrun, gloo on CPU).

A DPO loss that sends SIGTERM to rank 1 only, inside step 2; then the run is resumed to its
end. Writes rank<R>.json (the step it stopped after, the checkpoint, the steps resumed) and
rank<R>.pt (the final weights) for the test to compare. Not a test module itself.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from train_fixtures import params, tiny_config

import pairopt
from pairopt.training.preemption import RunStopped
from pairopt.training.trainer import train


@pairopt.register_loss("test_sigterm_rank1")
class SigtermOnRank1(pairopt.ReferencePairLoss):
    calls = 0

    def compute_ratios(self, ratios):
        type(self).calls += 1
        if type(self).calls == 2 and os.environ["RANK"] == "1":
            os.kill(os.getpid(), signal.SIGTERM)
        return pairopt.LossOutput(-F.logsigmoid(0.1 * ratios.margin), ratios.metrics(0.1))


if __name__ == "__main__":
    torch.set_num_threads(1)
    model_dir, out = Path(sys.argv[1]), Path(sys.argv[2])
    cfg = tiny_config(model_dir, out / "ddp", loss={"name": "test_sigterm_rank1"})
    try:
        train(cfg)
        result = {"step": None, "checkpoint": None}
    except RunStopped as stopped:
        result = {"step": stopped.step, "checkpoint": str(stopped.checkpoint)}
    # then resume on both processes (the checkpoint is found and checked on rank 0 only)
    resumed = train(tiny_config(model_dir, out / "ddp", loss={"name": "test_sigterm_rank1"},
                                checkpoint={"resume": str(out / "ddp")}))  # fmt: skip
    result["resumed_steps"] = len(resumed.history)
    torch.save(params(resumed.policy), out / f"rank{os.environ['RANK']}.pt")
    (out / f"rank{os.environ['RANK']}.json").write_text(json.dumps(result))
