"""One process of tests/test_sharded.py's two-process runs, started by `accelerate launch` with
one of the example configs (examples/accelerate_{fsdp2,deepspeed_zero3,deepspeed_zero2}.yaml),
on gloo, with accelerate's FSDP2 / DeepSpeed forced on for the CPU (tests/sharded_cpu.py).
Not a test module: it writes what it measured as JSON (and the runs' files) for the test.

    sharded_worker.py engine OUT             compute_logps sharded vs whole, in this process
    sharded_worker.py train MODEL_DIR OUT    trainer runs; the last one is killed at step 3
    sharded_worker.py resume MODEL_DIR OUT   resumes the killed run
"""

from __future__ import annotations

import copy
import json
import os
import signal
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import torch

os.environ.setdefault("DS_ACCELERATOR", "cpu")
torch.set_num_threads(1)

import sharded_cpu  # noqa: E402
from tiny_models import make_model, random_groups  # noqa: E402
from train_fixtures import sharded_runs, tiny_config  # noqa: E402

import pairopt  # noqa: E402
import pairopt.engine.logps as engine_logps  # noqa: E402
from pairopt.engine.forward import compute_group_logps  # noqa: E402
from pairopt.training.config import OptimConfig  # noqa: E402
from pairopt.training.policy import Groups, PolicyLogps  # noqa: E402
from pairopt.training.sharding import (  # noqa: E402
    built_whole,
    configure_deepspeed,
    shard_frozen,
    sharding_of,
    unwrap,
)
from pairopt.training.trainer import end_process_group  # noqa: E402

RANK = int(os.environ.get("RANK", "0"))
WORLD = int(os.environ.get("WORLD_SIZE", "1"))
# per rank: groups of 2 to 4 responses; ~40 scored tokens, so chunks of 4 rows are ~10 chunks
LENGTHS = [[(5, 4, 3), (3, 6, 2, 5), (4, 2, 7)], [(6, 3, 3, 2), (2, 5, 4), (4, 4, 6)]]
CHUNK = 4
DEFAULT_ROWS = 6  # the default chunk under a LOGITS_BUDGET patched to 6 * vocab


# ------------------------------------------------------------------------------ engine


def groups_of(rank: int) -> list:
    return random_groups(LENGTHS[rank], seed=rank)


def weights_of(out: Any, rank: int) -> torch.Tensor:
    """A loss that weights every response differently, so each log-prob's gradient counts."""
    g = torch.Generator().manual_seed(100 + rank)
    return torch.rand(out.logps.shape[0], generator=g)


def whole_gradients(model: torch.nn.Module, kwargs: dict[str, Any]) -> dict[str, torch.Tensor]:
    """∇ mean_r loss_r on the whole model in this process: what averaging over ranks gives."""
    model.zero_grad(set_to_none=True)
    for rank in range(WORLD):
        out = compute_group_logps(model, groups_of(rank), **kwargs)
        ((out.logps * weights_of(out, rank)).sum() / WORLD).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def sharded_gradients(acc: Any, wrapped: Any, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    """Backward through the sharded module; the full gradients, by the inner model's names."""
    if sharding_of(acc) == "fsdp2":
        loss.backward()
        grads = {
            n: p.grad.full_tensor() for n, p in wrapped.named_parameters() if p.grad is not None
        }
    else:  # the engine's own backward: accelerate's would also step and free the gradients
        from deepspeed.utils import safe_get_full_grad

        wrapped.backward(loss)
        grads = {
            n: safe_get_full_grad(p)
            for n, p in wrapped.module.named_parameters()
            if p.requires_grad
        }
    return {n.removeprefix("model."): g for n, g in grads.items() if g is not None}


class PeakRows:
    """The most logits rows the LM head computed at once (the chunk), seen in its forward: the
    engine calls that once per chunk inside one call of the module (engine.logps.in_one_call),
    so a forward hook would see the whole call instead."""

    def __init__(self, head: torch.nn.Module) -> None:
        self.rows = 0
        forward = head.forward

        def counted(hidden: torch.Tensor) -> torch.Tensor:
            logits = forward(hidden)
            self.rows = max(self.rows, logits.reshape(-1, logits.shape[-1]).shape[0])
            return logits

        head.forward = counted

    def take(self) -> int:
        rows, self.rows = self.rows, 0
        return rows


class Gathers:
    """Parameter all-gathers: FSDP2's collectives (dist.all_gather_single), and under ZeRO-3 the
    fetches of one parameter (DeepSpeed's coordinator, by ds_id)."""

    def __init__(self) -> None:
        self.counts: Counter = Counter()
        import torch.distributed as dist

        original = dist.all_gather_single

        def counted(*args: Any, **kwargs: Any) -> Any:
            self.counts["fsdp"] += 1
            return original(*args, **kwargs)

        dist.all_gather_single = counted

    def watch_zero3(self, param: Any) -> None:
        from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus
        from deepspeed.runtime.zero.partitioned_param_coordinator import (
            PartitionedParameterCoordinator as Coordinator,
        )

        name = "_PartitionedParameterCoordinator__all_gather_params_"
        original = getattr(Coordinator, name)
        counts = self.counts

        def counted(coordinator: Any, params: Any, *args: Any, **kwargs: Any) -> Any:
            for p in params:
                if p.ds_id == param.ds_id and p.ds_status == ZeroParamStatus.NOT_AVAILABLE:
                    counts["head"] += 1
            return original(coordinator, params, *args, **kwargs)

        setattr(Coordinator, name, counted)

    def take(self, key: str) -> int:
        value = self.counts[key]
        self.counts[key] = 0
        return value


def local_numel(param: Any) -> int:
    """The elements this process stores: an FSDP2 shard, a ZeRO-3 partition, or all."""
    if hasattr(param, "to_local"):
        return param.to_local().numel()
    if hasattr(param, "ds_tensor"):
        return param.ds_tensor.numel()
    return param.numel()


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def engine(out: Path) -> None:
    """compute_logps through sharded modules against the whole model in this process."""
    from accelerate import Accelerator

    acc = Accelerator(cpu=True)
    kind = sharding_of(acc)
    configure_deepspeed(acc, OptimConfig(batch_size=3, max_grad_norm=None))
    result: dict[str, Any] = {"sharding": kind}
    gathers = Gathers()
    with built_whole(acc):
        whole = make_model.__wrapped__("llama").train()
    kwargs = {"chunk_size": CHUNK}
    expected = whole_gradients(whole, kwargs)
    mine = groups_of(RANK)
    policy = copy.deepcopy(whole)
    heads = PeakRows(policy.get_output_embeddings())
    optimizer = torch.optim.SGD(policy.parameters(), lr=0.0)
    wrapped, optimizer = acc.prepare(PolicyLogps(policy, dict(kwargs)), optimizer)
    if kind == "zero3":
        gathers.watch_zero3(policy.get_output_embeddings().weight)
    for step in range(3):  # ZeRO-3 records its fetch trace in the first step
        got = wrapped(Groups(mine))
        want = compute_group_logps(whole, mine, **kwargs)
        result[f"values_{step}"] = float((got.logps - want.logps.detach()).abs().max())
        grads = sharded_gradients(acc, wrapped, (got.logps * weights_of(got, RANK)).sum())
        result[f"grads_{step}"] = max_diff(grads, expected)
        result[f"head_rows_{step}"] = heads.take()
        result[f"gathers_{step}"] = gathers.take("head" if kind == "zero3" else "fsdp")
        if kind != "fsdp2":
            wrapped.step()  # lr 0: only DeepSpeed's bookkeeping (gradients freed)
        optimizer.zero_grad()
    if kind == "fsdp2":  # one chunk for the whole head: the same all-gathers
        unwrap(wrapped).engine_kwargs["chunk_size"] = 10**6
        got = wrapped(Groups(mine))
        (got.logps.sum()).backward()
        result["gathers_one_chunk"] = gathers.take("fsdp")
        optimizer.zero_grad()
    result.update(reference_copy(acc, whole, mine))
    result.update(lora(acc, mine))
    (out / f"engine-rank{RANK}.json").write_text(json.dumps(result, indent=1))


def reference_copy(acc: Any, whole: torch.nn.Module, mine: list) -> dict[str, Any]:
    """The copy reference as the trainer places it (shard_frozen), at the default chunk size."""
    engine_logps.LOGITS_BUDGET = DEFAULT_ROWS * whole.config.vocab_size
    frozen = copy.deepcopy(whole).requires_grad_(False).eval()
    heads = PeakRows(frozen.get_output_embeddings())
    placed = shard_frozen(PolicyLogps(frozen, {}), acc)
    with torch.no_grad():
        got = placed(Groups(mine))
        want = compute_group_logps(whole, mine)
    return {
        "copy_values": float((got.logps - want.logps).abs().max()),
        "copy_rows": heads.take(),
        "copy_local_numel": sum(local_numel(p) for p in unwrap(placed).parameters()),
        "whole_numel": sum(p.numel() for p in whole.parameters()),
    }  # fmt: skip


def lora(acc: Any, mine: list) -> dict[str, Any]:
    """A LoRA policy (the LM head frozen, as "all-linear" leaves it) and its adapter-disabled
    reference through the same sharded module; chunks of CHUNK rows, checkpointed."""
    from peft import LoraConfig, get_peft_model

    def build() -> Any:
        torch.manual_seed(3)
        config = LoraConfig(
            r=4,
            lora_alpha=8,
            target_modules="all-linear",
            lora_dropout=0.0,
            init_lora_weights=False,
        )  # random B: the adapter changes the output
        with built_whole(acc):
            return get_peft_model(make_model.__wrapped__("llama"), config).train()  # fmt: skip

    kwargs = {"chunk_size": CHUNK}
    whole = build()
    expected = whole_gradients(whole.get_base_model(), kwargs)
    with torch.no_grad(), whole.disable_adapter():
        want_base = compute_group_logps(whole.get_base_model(), mine, **kwargs).logps
    peft_model = build()
    heads = PeakRows(peft_model.get_output_embeddings())
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    wrapped, _ = acc.prepare(PolicyLogps(peft_model, kwargs), torch.optim.SGD(trainable, lr=0.0))
    with torch.no_grad():
        base = wrapped(Groups(mine), base=True).logps
    base_rows = heads.take()
    got = wrapped(Groups(mine))
    grads = sharded_gradients(acc, wrapped, (got.logps * weights_of(got, RANK)).sum())
    grads = {k.removeprefix("base_model.model."): v for k, v in grads.items()}
    lora_expected = {k.removeprefix("base_model.model."): v for k, v in expected.items()
                     if "lora_" in k}  # fmt: skip
    return {
        "lora_base_values": float((base - want_base).abs().max()),
        "lora_base_rows": base_rows,
        "lora_grads": max_diff(grads, lora_expected),
        "lora_rows": heads.take(),
    }


# ------------------------------------------------------------------------------ trainer


@pairopt.register_loss("test_killed_at_step_3")
class KilledAtStep3(pairopt.ReferencePairLoss):
    """DPO (β 0.1) whose every process is killed (SIGKILL) in the third step when KILL is set:
    a job killed whole, as by the scheduler or the out-of-memory killer."""

    calls = 0

    def compute_ratios(self, ratios: Any) -> Any:
        type(self).calls += 1
        if type(self).calls == 3 and os.environ.get("KILL") == "1":
            os.kill(os.getpid(), signal.SIGKILL)
        losses = -torch.nn.functional.logsigmoid(0.1 * ratios.margin)
        return pairopt.LossOutput(losses, ratios.metrics(0.1))


@pairopt.register_loss("test_nan_on_rank_1")
class NanOnRank1(pairopt.ReferencePairLoss):
    """DPO whose losses are NaN on process 1 only (its own output check fails there alone)."""

    def compute_ratios(self, ratios: Any) -> Any:
        losses = -torch.nn.functional.logsigmoid(0.1 * ratios.margin)
        return pairopt.LossOutput(losses * (float("nan") if RANK == 1 else 1.0), {})


def nan_on_one_process(model_dir: Path, out: Path) -> None:
    """A loss that fails its check on process 1 only stops both, with process 1's message."""
    from pairopt.errors import PairoptError

    config = tiny_config(model_dir, out / "nan", loss={"name": "test_nan_on_rank_1"})
    try:
        pairopt.train(config, quiet=True)
        message = "trained"
    except PairoptError as err:
        message = str(err)
    (out / f"nan-rank{RANK}.txt").write_text(message)


def record(out: Path, name: str, result: Any) -> None:
    """Rank 0's losses and final evaluation, and every rank's reference-cache answer."""
    (out / f"{name}-hit-rank{RANK}.txt").write_text(str(result.reference_cache_hit))
    if RANK == 0:
        history = [step["loss"] for step in result.history]
        (out / f"{name}.json").write_text(json.dumps({"loss": history, "eval": result.final_eval}))


def refused_without_forcing(model_dir: Path, out: Path) -> None:
    """Before forcing: the config asks for sharding, accelerate would run DDP; pairopt says so."""
    from pairopt.errors import PairoptError

    try:
        pairopt.train(tiny_config(model_dir, out / "refused"), quiet=True)
        message = "trained"
    except PairoptError as err:
        message = str(err)
    if RANK == 0:
        (out / "refused.txt").write_text(message)


def train(model_dir: Path, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    refused_without_forcing(model_dir, out)
    sharded_cpu.force()
    os.environ["PAIROPT_CACHE"] = str(out / f"cache-rank{RANK}")  # as if on a disk of its own
    nan_on_one_process(model_dir, out)
    configs = sharded_runs(model_dir, out, killed=True, local=True)
    for name, cfg in configs.items():
        if name == "killed":
            os.environ["KILL"] = "1"
        record(out, name, pairopt.train(cfg, quiet=name != "copy"))
    raise AssertionError("the killed run went on")


def resume(model_dir: Path, out: Path) -> None:
    sharded_cpu.force()
    cfg = sharded_runs(model_dir, out, killed=True)["killed"]
    cfg = cfg.model_copy(
        update={"checkpoint": cfg.checkpoint.model_copy(update={"resume": str(out / "killed")})}
    )
    record(out, "resumed", pairopt.train(cfg))


if __name__ == "__main__":
    scenario, *paths = sys.argv[1:]
    if scenario == "engine":
        sharded_cpu.force()
        engine(Path(paths[0]))
    else:
        {"train": train, "resume": resume}[scenario](Path(paths[0]), Path(paths[1]))
    end_process_group()  # as `pairopt train` does: no process group left to the teardown
