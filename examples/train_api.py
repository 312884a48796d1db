"""Training from Python: `pairopt.train(config)` with a dict, quietly, and what it returns.

Run it:  python examples/train_api.py      (the shipped tiny model and data, about a minute)

`pairopt.train` takes a `pairopt.TrainConfig`, a dict of sections, or a YAML file, read exactly
as `pairopt train --config` reads it (so `{"loss": "dpo"}` alone is the out-of-the-box run).
"""

from __future__ import annotations

import tempfile

import pairopt


def main(steps: int = 100, output_dir: str | None = None) -> pairopt.TrainResult:
    config = {
        "loss": {"name": "dpo", "beta": 0.1},
        "optim": {"max_steps": steps},
        "output": {"dir": output_dir or tempfile.mkdtemp(prefix="pairopt-api-")},
    }
    result = pairopt.train(config, quiet=True)  # quiet: no console lines, no progress bars
    first, last = result.history[0], result.history[-1]
    print(f"loss {first['loss']:.4f} -> {last['loss']:.4f} over {result.steps} steps")
    if result.final_eval is not None:
        accuracy = result.final_eval["rewards/accuracies"]
        print(f"held-out preference accuracy {accuracy:.1%} of {result.final_eval['pairs']:.0f}")
    print(f"model saved in {result.output_dir}")
    return result


if __name__ == "__main__":
    main()
