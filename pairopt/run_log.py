"""What a run reports: step metrics (global means), metrics.jsonl, trackers, console, summary."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from pairopt.config import TrainConfig


def add_metric(sums: dict[str, torch.Tensor], key: str, value: torch.Tensor) -> None:
    sums[key] = sums[key] + value if key in sums else value


def global_means(
    sums: dict[str, torch.Tensor], accelerator: Any, pairs_in_step: int
) -> dict[str, float]:
    """Pair-weighted means over every micro-batch of the step on every process."""
    keys = sorted(sums)
    stacked = torch.stack([sums[k].float().reshape(()) for k in keys]).to(accelerator.device)
    if accelerator.num_processes > 1:
        stacked = accelerator.reduce(stacked, "sum")
    return {
        key: float(value) / pairs_in_step for key, value in zip(keys, stacked.tolist(), strict=True)
    }


class Printer:
    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled

    def __call__(self, message: str) -> None:
        if self.enabled:
            from tqdm.auto import tqdm

            tqdm.write(message)


class MetricsLog:
    """metrics.jsonl (one JSON object per line), accelerate trackers, and console lines."""

    def __init__(self, path: Path, is_main: bool, accelerator: Any, *, truncate_after: int) -> None:
        self.accelerator = accelerator
        self.is_main = is_main
        self.file = None
        if is_main:
            kept = []
            if truncate_after > 0 and path.is_file():  # a resumed run replaces what came after
                kept = [
                    line
                    for line in path.read_text().splitlines()
                    if line and json.loads(line)["step"] <= truncate_after
                ]
            path.write_text("".join(line + "\n" for line in kept))
            self.file = path.open("a")

    def write(self, step: int, split: str, metrics: dict[str, float], *, console: bool) -> None:
        if self.file is not None:
            self.file.write(json.dumps({"step": step, "split": split, **metrics}) + "\n")
            self.file.flush()
        self.accelerator.log({f"{split}/{key}": value for key, value in metrics.items()}, step=step)
        if console and self.is_main:
            keys = ("loss", "rewards/accuracies", "rewards/margins", "lr", "tokens_per_s")
            shown = " | ".join(f"{_short(k)} {metrics[k]:.4g}" for k in keys if k in metrics)
            Printer(True)(f"[{split} step {step}] {shown}")

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


def _short(key: str) -> str:
    return {"rewards/accuracies": "acc", "rewards/margins": "margin", "tokens_per_s": "tok/s"}.get(
        key, key
    )


def progress_bar(cfg: TrainConfig, is_main: bool, total: int, initial: int) -> Any:
    if not (is_main and cfg.logging.progress_bar):
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True)


def work_bar(enabled: bool, total: int, desc: str) -> Any:
    """A transient progress bar for a pass over the data (reference precompute, evaluation)."""
    from tqdm.auto import tqdm

    return tqdm(
        total=total, desc=desc, unit="batch", leave=False, dynamic_ncols=True, disable=not enabled
    )


def print_summary(
    say: Printer,
    cfg: TrainConfig,
    evals: list[dict[str, float]],
    steps: int,
    wall_s: float,
    pairs_per_s: float,
    output: Path,
) -> None:
    lines = [f"done: {steps} steps in {wall_s:.0f} s wall time, {pairs_per_s:.1f} train pairs/s"]
    if evals:
        final = evals[-1]
        accuracy = final.get("rewards/accuracies")
        if accuracy is not None:
            lines.append(
                f"held-out preference accuracy: {accuracy:.1%} of {int(final['pairs'])} eval pairs "
                f"(chosen ranked above rejected by the {cfg.loss.name} implicit reward)"
            )
        lines.append(f"eval loss: {final['loss']:.4f}")
    if cfg.output.save_final:
        lines.append(
            f"model and tokenizer saved to {output} (AutoModelForCausalLM.from_pretrained loads it)"
        )
    for line in lines:
        say(line)


def flat_config(cfg: TrainConfig) -> dict[str, Any]:
    """Tracker hyper-parameters must be scalars: dotted keys, lists and None as strings."""
    out: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(value, f"{prefix}{key}.")
        else:
            out[prefix[:-1]] = node if isinstance(node, bool | int | float | str) else str(node)

    walk(cfg.to_yaml_dict(), "")
    return out
