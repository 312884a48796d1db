"""`bco_pair`: Binary Classifier Optimisation on pairs, with a running reward shift."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from pydantic import Field

from pairopt.loss import (
    LengthDesensitizedConfig,
    LogRatios,
    LossConfig,
    LossOutput,
    ReferencePairLoss,
    WeightedConfig,
    register_loss,
    reward_metrics,
)


@register_loss("bco_pair")
class BCOPair(ReferencePairLoss):
    """BCO for pairs: classify chosen as +1 and rejected as −1, around a running reward shift δ.

    Paper: Jung et al. 2024, "Binary Classifier Optimization for Large Language Model Alignment",
    https://arxiv.org/abs/2404.04656

    Formula (per pair):

        loss = −logσ(r_c − δ) − logσ(−(r_r − δ))
        r    = β·(S − S^ref)
        δ    = mean over training steps so far (this one included) of the batch mean of
               {r_c, r_r}, detached

    Symbols: S summed policy log-probs, S^ref the reference's, c chosen, r rejected; β temperature;
    σ the logistic sigmoid; δ the reward shift that centres the classifier.

    Options: `ld_alpha` (LD-DPO) weighs the tokens past the shorter response by α in every sum;
    `use_weighting` (WPO) multiplies each pair's loss by w_c·w_r (pairopt.loss.base).

    Shapes: policy and reference PairLogps fields (N,) → losses (N,).

    State: δ lives in buffers (`reward_shift`, `num_batches`), so it follows `.to(device)` and is
    saved in `state_dict()`. It is updated only in training mode with gradients enabled (not
    during evaluation); under torch.distributed the batch means are averaged over processes first,
    so every process uses the same δ.

    Metrics: rewards = β·(S − S^ref), detached; `delta` = δ used for this batch.

    Defaults: β = 0.1 (TRL DPOConfig.beta).

    Deviations: this is TRL's historic `bco_pair` (a running mean of batch-mean rewards, each
    step weighted equally, the paper's reward shift). Current TRL dropped the shift (δ = 0).
    """

    summary = (
        "Binary Classifier Optimisation: logistic loss on each reward around a running shift δ"
    )

    class Config(LengthDesensitizedConfig, WeightedConfig):
        beta: float = Field(0.1, gt=0, description="β: scales the implicit rewards")

    config: Config

    def __init__(self, config: LossConfig | None = None) -> None:
        super().__init__(config)
        self.reward_shift: torch.Tensor
        self.num_batches: torch.Tensor
        self.register_buffer("reward_shift", torch.zeros((), dtype=torch.float32))
        self.register_buffer("num_batches", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def _update_shift(self, batch_mean: torch.Tensor) -> None:
        batch_mean = batch_mean.detach().float().to(self.reward_shift.device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(batch_mean, op=dist.ReduceOp.SUM)
            batch_mean /= dist.get_world_size()
        self.num_batches += 1
        self.reward_shift += (batch_mean - self.reward_shift) / self.num_batches

    def compute_ratios(self, ratios: LogRatios) -> LossOutput:
        chosen_N, rejected_N = ratios.rewards(self.config.beta)
        if self.training and torch.is_grad_enabled():
            self._update_shift(torch.cat([chosen_N, rejected_N]).mean())  # (2N,) -> ()
        delta = self.reward_shift.to(chosen_N)
        losses_N = -F.logsigmoid(chosen_N - delta) - F.logsigmoid(-(rejected_N - delta))
        metrics = reward_metrics(ratios.policy, chosen_N, rejected_N)
        metrics["delta"] = delta.detach().clone()
        return LossOutput(losses_N, metrics)
