"""End-to-end training on CPU with a 2-layer, 32-wide Llama and 48 shipped preference pairs.

Each run takes about a second; the tolerances below are for float32 on CPU, where the shared and
the unshared forward compute the same sums in a different order (differences ~1e-7 per step
that AdamW can amplify a little over a few steps).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from train_fixtures import make_tiny_model_dir, params, tiny_config
from transformers import AutoModelForCausalLM

from pairopt.loss import available_losses, get_loss_class
from pairopt.training.checkpoint import changed_settings
from pairopt.training.policy import load_model
from pairopt.training.schedule import BatchPlan
from pairopt.training.trainer import TrainResult, train

# Losses whose Config has required fields, and a valid value for them (a new plugin with
# required parameters must add itself here, or its test fails loudly).
REQUIRED_PARAMS = {"combined": {"terms": [{"name": "dpo"}, {"name": "sft", "weight": 0.2}]}}

# Trajectories of the same run computed two ways (shared/unshared, packed/unpacked, live/precomputed
# reference, accumulated/not) agree to this (float32, 4 steps of AdamW at lr 1e-2).
TRAJECTORY_TOL = {"rtol": 1e-4, "atol": 1e-5}
# Weights after those steps: Adam divides by sqrt(v), so an embedding row with a near-zero
# gradient turns a 1e-9 difference into up to ~1e-5; 1e-4 is 1% of one step at lr 1e-2.
WEIGHTS_TOL = {"rtol": 0.0, "atol": 1e-4}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.set_num_threads(1)  # two xdist workers on two cores: more threads only thrash
    return make_tiny_model_dir(tmp_path_factory.mktemp("models"))


def losses_of(result: TrainResult) -> torch.Tensor:
    return torch.tensor([step["loss"] for step in result.history], dtype=torch.float64)


def initial_params(model_dir: Path, tmp_path: Path) -> dict[str, torch.Tensor]:
    """The weights a run starts from: the config built under the run's seed (0)."""
    cfg = tiny_config(model_dir, tmp_path / "unused")
    return params(load_model(cfg.model, seed=cfg.optim.seed))


@pytest.mark.parametrize("loss", available_losses())
def test_every_builtin_loss_trains_and_changes_every_parameter(
    loss: str, model_dir: Path, tmp_path: Path
) -> None:
    params_given = REQUIRED_PARAMS.get(loss, {})
    get_loss_class(loss).Config(**params_given)  # the table above is complete for this loss
    listwise = get_loss_class(loss).kind == "list"  # needs ranked data: 16 eval prompts
    data = {"dataset": "builtin:tiny-prefs-groups"} if listwise else {}
    result = train(
        tiny_config(model_dir, tmp_path / "out", loss={"name": loss, **params_given}, data=data)
    )
    assert result.steps == 3 and len(result.history) == 3
    assert all(math.isfinite(step["loss"]) for step in result.history)
    assert result.final_eval is not None
    assert result.final_eval["groups" if listwise else "pairs"] == 16
    assert math.isfinite(result.final_eval["loss"])
    before = initial_params(model_dir, tmp_path)
    after = params(result.policy)
    unchanged = [name for name in before if torch.equal(before[name], after[name])]
    assert not unchanged, f"{loss}: parameters not updated by training: {unchanged}"


def test_shared_and_unshared_give_the_same_trajectory(model_dir: Path, tmp_path: Path) -> None:
    shared = train(tiny_config(model_dir, tmp_path / "a", optim={"max_steps": 4}))
    unshared = train(
        tiny_config(
            model_dir, tmp_path / "b", optim={"max_steps": 4}, engine={"share_prefix": False}
        )
    )
    assert losses_of(shared)[0] == pytest.approx(
        math.log(2), abs=1e-6
    )  # policy == reference at step 1
    torch.testing.assert_close(losses_of(shared), losses_of(unshared), **TRAJECTORY_TOL)
    assert losses_of(shared)[-1] < losses_of(shared)[0]  # it is learning, not standing still


def test_packed_and_unpacked_give_the_same_trajectory(model_dir: Path, tmp_path: Path) -> None:
    packed = train(tiny_config(model_dir, tmp_path / "a", optim={"max_steps": 4}))
    unpacked = train(
        tiny_config(model_dir, tmp_path / "b", optim={"max_steps": 4}, engine={"packing": False})
    )
    torch.testing.assert_close(losses_of(packed), losses_of(unpacked), **TRAJECTORY_TOL)


def test_gradient_accumulation_matches_one_big_batch(model_dir: Path, tmp_path: Path) -> None:
    """4 pairs x 2 micro-batches = 8 pairs x 1: the step loss is the mean over the step's pairs."""
    big = train(tiny_config(model_dir, tmp_path / "a", optim={"batch_size": 8}))
    accumulated = train(
        tiny_config(model_dir, tmp_path / "b", optim={"batch_size": 4, "grad_accum": 2})
    )
    # Same pairs per step? BatchPlan cuts the same permutation into 4s, and 2 consecutive 4s are one 8.
    torch.testing.assert_close(losses_of(big), losses_of(accumulated), **TRAJECTORY_TOL)
    torch.testing.assert_close(params(big.policy), params(accumulated.policy), **WEIGHTS_TOL)


def test_gradient_checkpointing_gives_the_same_trajectory(model_dir: Path, tmp_path: Path) -> None:
    plain = train(tiny_config(model_dir, tmp_path / "a"))
    checkpointed = train(
        tiny_config(model_dir, tmp_path / "b", model={"gradient_checkpointing": True})
    )
    torch.testing.assert_close(losses_of(plain), losses_of(checkpointed), **TRAJECTORY_TOL)


def test_resume_continues_exactly(model_dir: Path, tmp_path: Path, capsys) -> None:
    """N steps straight == N/2 steps, stop, resume, N/2 steps (same data order, same weights)."""
    common = {"optim": {"max_steps": 4, "schedule": "linear", "warmup_steps": 1}}
    straight = train(
        tiny_config(
            model_dir, tmp_path / "straight", **common, checkpoint={"every": 2, "keep_last": None}
        )
    )
    checkpoint = tmp_path / "straight" / "checkpoints" / "step-000002"
    assert (checkpoint / "trainer_state.json").is_file()
    resumed = train(
        tiny_config(
            model_dir, tmp_path / "resumed", **common, checkpoint={"resume": str(checkpoint)}
        )
    )
    assert [h["loss"] for h in resumed.history] == pytest.approx(
        [h["loss"] for h in straight.history[2:]], rel=1e-6
    )
    torch.testing.assert_close(
        params(resumed.policy), params(straight.policy), rtol=1e-6, atol=1e-7
    )
    # The resumed run's metrics.jsonl starts where the checkpoint stopped.
    steps = [
        json.loads(line)["step"]
        for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()
    ]
    assert steps[0] == 3
    assert "settings changed" not in capsys.readouterr().out
    # Resuming with another length says what changed (the LR schedule follows the new one).
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    longer = tiny_config(model_dir, tmp_path / "longer", optim={**common["optim"], "max_steps": 6})
    assert changed_settings(state, longer.flat()) == ["optim.max_steps: 4 -> 6"]
    assert changed_settings({"step": 2}, longer.flat()) == []  # a checkpoint without a saved config
    resume = {"resume": str(checkpoint)}
    train(
        tiny_config(
            model_dir, tmp_path / "longer", optim=longer.optim.model_dump(), checkpoint=resume
        )
    )
    assert "settings changed since this checkpoint" in capsys.readouterr().out


def test_precomputed_reference_matches_live_and_is_cached(model_dir: Path, tmp_path: Path) -> None:
    cache = {"cache_dir": str(tmp_path / "cache")}
    live = train(tiny_config(model_dir, tmp_path / "live", reference={"strategy": "copy"}))
    first = train(
        tiny_config(model_dir, tmp_path / "pre1", reference={"strategy": "precompute", **cache})
    )
    second = train(
        tiny_config(model_dir, tmp_path / "pre2", reference={"strategy": "precompute", **cache})
    )
    assert live.reference_cache_hit is None
    assert first.reference_cache_hit is False and second.reference_cache_hit is True
    assert len(list((tmp_path / "cache").glob("ref-logps-*.pt"))) == 1
    torch.testing.assert_close(losses_of(first), losses_of(live), **TRAJECTORY_TOL)
    torch.testing.assert_close(losses_of(second), losses_of(first), rtol=0, atol=0)
    assert live.final_eval is not None and first.final_eval is not None
    assert first.final_eval["loss"] == pytest.approx(live.final_eval["loss"], rel=1e-4)
    # Other data -> another key -> a miss, not a stale hit.
    other = train(
        tiny_config(
            model_dir,
            tmp_path / "pre3",
            data={"max_samples": 40},
            reference={"strategy": "precompute", **cache},
        )
    )
    assert other.reference_cache_hit is False


def test_precompute_of_another_reference_model_keeps_only_its_numbers(
    model_dir: Path, tmp_path: Path
) -> None:
    """reference.name_or_path with precompute: the named model (here the same weights, loaded
    again) runs the pass and is then let go: the same numbers as the policy's own initial
    weights, and no second model in the checkpoints (accelerate's save_state writes every
    model it prepared: model_1.safetensors)."""

    def run(name: str, **reference: str) -> TrainResult:
        reference = {"strategy": "precompute", "cache_dir": str(tmp_path / name / "cache"),
                     **reference}  # fmt: skip
        return train(tiny_config(model_dir, tmp_path / name, reference=reference,
                                 checkpoint={"every": 2}))  # fmt: skip

    own = run("own")
    other = run("other", name_or_path=str(model_dir))
    torch.testing.assert_close(losses_of(other), losses_of(own), rtol=0, atol=0)
    saved = sorted(path.name for path in (tmp_path / "other/checkpoints/step-000002").iterdir())
    assert "model.safetensors" in saved and not [n for n in saved if n.startswith("model_")]


def test_reference_free_loss_has_no_reference(model_dir: Path, tmp_path: Path) -> None:
    result = train(
        tiny_config(
            model_dir,
            tmp_path / "out",
            loss={"name": "simpo"},
            reference={"strategy": "precompute", "cache_dir": str(tmp_path / "cache")},
        )
    )
    assert result.reference_cache_hit is None and not (tmp_path / "cache").exists()


def test_lora_policy_with_adapter_disabled_reference(model_dir: Path, tmp_path: Path) -> None:
    pytest.importorskip("peft")
    result = train(
        tiny_config(
            model_dir,
            tmp_path / "out",
            model={"lora": {"r": 4, "target_modules": ["q_proj", "v_proj"]}},
        )
    )
    # LoRA starts as the identity (B = 0), so the policy equals the adapter-disabled reference.
    assert result.history[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert result.history[-1]["loss"] < result.history[0]["loss"]
    assert (tmp_path / "out" / "adapter" / "adapter_config.json").is_file()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    torch.testing.assert_close(params(merged), params(result.policy))


def test_saved_model_loads_with_transformers(model_dir: Path, tmp_path: Path) -> None:
    result = train(tiny_config(model_dir, tmp_path / "out"))
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    torch.testing.assert_close(params(loaded), params(result.policy), rtol=0, atol=0)
    for name in ("config.yaml", "metrics.jsonl", "tokenizer.json", "config.json"):
        assert (tmp_path / "out" / name).is_file(), name
    records = [
        json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()
    ]
    assert [r["step"] for r in records if r["split"] == "train"] == [1, 2, 3]
    assert [r["split"] for r in records][-1] == "eval" and "rewards/accuracies" in records[-1]


def test_tensorboard_and_bf16(model_dir: Path, tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    result = train(
        tiny_config(
            model_dir,
            tmp_path / "out",
            optim={"precision": "bf16"},
            logging={"report_to": ["tensorboard"]},
        )
    )
    assert all(math.isfinite(step["loss"]) for step in result.history)
    assert list((tmp_path / "out" / "trackers").rglob("events.out.tfevents.*"))


def test_batch_plan_is_deterministic_and_respects_budgets() -> None:
    lengths = [10, 30, 20, 50, 40, 10, 60, 5, 25, 35]
    plan = BatchPlan(lengths, batch_size=3, batch_tokens=80, group=2, seed=7)
    again = BatchPlan(lengths, batch_size=3, batch_tokens=80, group=2, seed=7)
    assert plan.epoch(0) == again.epoch(0) and plan.epoch(1) == again.epoch(1)
    assert plan.epoch(0) != plan.epoch(1)  # reshuffled every epoch
    for step in plan.epoch(0):
        assert len(step) == 2
        for micro in step:
            assert len(micro) <= 3
            assert sum(lengths[i] for i in micro) <= 80 or len(micro) == 1
    # iterate() resumes mid-way through the second epoch with the same batches.
    full = list(plan.iterate(0, 7))
    assert list(plan.iterate(4, 7)) == full[4:]
    assert [epoch for _, epoch, _ in full] == sorted(epoch for _, epoch, _ in full)


@pytest.mark.slow
def test_two_processes_on_cpu_agree_and_match_one_process(model_dir: Path, tmp_path: Path) -> None:
    """torchrun, 2 processes, gloo: DDP replicas agree after training and equal one process with
    grad_accum 2 (process r takes micro-batches r, r+2, ... of the same step)."""
    worker = Path(__file__).with_name("ddp_worker.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parent)}
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        str(worker), str(model_dir), str(tmp_path),
    ]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    rank0 = torch.load(tmp_path / "rank0.pt")
    rank1 = torch.load(tmp_path / "rank1.pt")
    torch.testing.assert_close(rank0, rank1, rtol=0, atol=0)
    single = train(tiny_config(model_dir, tmp_path / "single", optim={"grad_accum": 2}))
    torch.testing.assert_close(rank0, params(single.policy), **WEIGHTS_TOL)


def test_a_non_finite_loss_stops_the_run_without_saving_a_model(
    registry, model_dir: Path, tmp_path: Path
) -> None:
    """A loss that turns NaN at step 2 stops the run there, naming the step; no NaN model is saved."""
    import pairopt
    from pairopt.errors import PairoptError

    @pairopt.register_loss("test_nan_at_step_2")
    class NanAtStep2(pairopt.PairLoss):
        """DPO-like margin that becomes NaN on its second call."""

        requires_reference = False
        calls = 0

        def compute(self, policy, reference):
            type(self).calls += 1
            margin = policy.chosen_logps - policy.rejected_logps
            if type(self).calls >= 2:
                margin = margin * float("nan")
            return pairopt.LossOutput(-torch.nn.functional.logsigmoid(margin), {})

    with pytest.raises(PairoptError, match=r"step 2: the loss is nan .* without saving a model"):
        train(tiny_config(model_dir, tmp_path / "nan", loss={"name": "test_nan_at_step_2"}))
    assert not (tmp_path / "nan" / "config.json").exists()


def test_resume_with_other_data_fails_before_writing_anything(
    model_dir: Path, tmp_path: Path
) -> None:
    from pairopt.errors import PairoptError

    run_dir = tmp_path / "run"
    train(tiny_config(model_dir, run_dir, optim={"max_steps": 2}, checkpoint={"every": 2}))
    saved = (run_dir / "config.yaml").read_text()
    other = tiny_config(
        model_dir,
        run_dir,
        data={"max_samples": 40, "max_eval_samples": 16},
        optim={"max_steps": 2},
        checkpoint={"resume": str(run_dir)},
    )
    with pytest.raises(PairoptError, match=r"training data differs.*data.max_samples: 48 -> 40"):
        train(other)
    assert (run_dir / "config.yaml").read_text() == saved  # the run can still be resumed as it was


def test_unusable_model_files_and_lora_targets_are_clear_errors(
    model_dir: Path, tmp_path: Path
) -> None:
    import shutil

    from pairopt.errors import PairoptError

    broken = tmp_path / "broken-weights"
    shutil.copytree(model_dir, broken)
    (broken / "model.safetensors").write_text("garbage")
    with pytest.raises(PairoptError, match=r"could not load model .*broken-weights.*Safetensor"):
        train(tiny_config(broken, tmp_path / "a"))
    lora = {"lora": {"r": 4, "target_modules": ["no_such_proj"]}}
    with pytest.raises(PairoptError, match=r"no_such_proj.*linear layers are named: .*q_proj"):
        train(tiny_config(model_dir, tmp_path / "b", model=lora))


def test_an_unwritable_reference_cache_only_warns(model_dir: Path, tmp_path: Path) -> None:
    blocked = tmp_path / "a_file"
    blocked.write_text("")
    cfg = tiny_config(
        model_dir,
        tmp_path / "run",
        reference={"strategy": "precompute", "cache_dir": str(blocked / "cache")},
        optim={"max_steps": 1},
    )
    with pytest.warns(UserWarning, match="could not write the reference log-prob cache"):
        result = train(cfg)
    assert len(result.history) == 1


def test_long_passes_show_progress(model_dir: Path, tmp_path: Path, capsys) -> None:
    """The reference precompute and the evaluation passes have progress bars, like training."""
    train(
        tiny_config(
            model_dir,
            tmp_path / "run",
            reference={"strategy": "precompute", "cache_dir": str(tmp_path / "cache")},
            logging={"progress_bar": True},
            optim={"max_steps": 1},
        )
    )
    err = capsys.readouterr().err
    assert "reference log-probs" in err and "eval at step 1" in err and "train" in err


def test_logged_records_average_their_window(model_dir: Path, tmp_path: Path) -> None:
    """logging.every 2 over 5 steps: records at steps 2, 4 and 5, each the pair-weighted mean of
    its steps' metrics (TRL's logging_steps), with the last step's lr; history keeps every step."""
    result = train(
        tiny_config(
            model_dir,
            tmp_path / "out",
            optim={"max_steps": 5, "schedule": "linear", "warmup_steps": 2},
            logging={"every": 2},
        )
    )
    assert len(result.history) == 5
    records = [
        json.loads(line)
        for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()
        if json.loads(line)["split"] == "train"
    ]
    assert [r["step"] for r in records] == [2, 4, 5]
    windows = [result.history[0:2], result.history[2:4], result.history[4:5]]
    for record, steps in zip(records, windows, strict=True):
        for key in ("loss", "rewards/accuracies", "rewards/margins", "logps/chosen"):
            mean = sum(s[key] for s in steps) / len(steps)  # equal pairs per step: plain mean
            assert record[key] == pytest.approx(mean, rel=1e-6, abs=1e-9), key
        assert record["lr"] == steps[-1]["lr"] and record["window_steps"] == len(steps)
    assert records[0]["lr"] != records[1]["lr"]  # warm-up then decay: the last step's rate


def test_a_logging_window_averages_over_examples_and_counts_pairs() -> None:
    """A listwise loss's step means are over groups: a step of one group of 6 responses (15
    pairs, loss 1.0) and one of a group of 2 (1 pair, loss 3.0) average to 2.0, not to the
    pair-weighted 1.125; pairs/s still counts the 16 pairs."""
    from pairopt.training.run_log import MetricsWindow

    window = MetricsWindow()
    step = {"lr": 0.1, "epoch": 0.0, "grad_norm": 1.0, "tokens_per_s": 100.0, "step_s": 2.0}
    window.add({**step, "loss": 1.0}, 1, 15)
    window.add({**step, "loss": 3.0, "lr": 0.2}, 1, 1)
    record = window.flush()
    assert record["loss"] == 2.0 and record["lr"] == 0.2
    assert record["pairs_per_s"] == 16 / 4.0 and record["window_steps"] == 2.0


def test_evaluation_and_checkpoints_every_epoch(model_dir: Path, tmp_path: Path) -> None:
    """48 pairs in steps of 4: 12 steps an epoch; two epochs evaluate after step 12 and at the
    end (24), and checkpoint after both."""
    result = train(
        tiny_config(
            model_dir,
            tmp_path / "out",
            optim={"max_steps": None, "epochs": 2},
            eval={"every_epoch": True},
            checkpoint={"every_epoch": True, "keep_last": None},
        )
    )
    assert result.steps == 24
    records = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").open()]
    assert [r["step"] for r in records if r["split"] == "eval"] == [12, 24]
    saved = sorted(p.name for p in (tmp_path / "out" / "checkpoints").iterdir())
    assert saved == ["step-000012", "step-000024"]


def test_tr_dpo_sync_moves_the_reference_to_the_policy(model_dir: Path, tmp_path: Path) -> None:
    """sync_alpha 1 copies the policy into the reference after steps 2 and 4: the step after a
    sync starts with policy == reference, so its implicit rewards are exactly 0, as at step 1.
    A checkpoint holds the synced reference: resuming after step 3 gives the same steps 4-6."""
    common = {
        "optim": {"max_steps": 6},
        "reference": {"strategy": "copy", "sync_steps": 2, "sync_alpha": 1.0},
    }
    straight = train(
        tiny_config(model_dir, tmp_path / "a", **common, checkpoint={"every": 3, "keep_last": None})
    )
    margins = [h["rewards/margins"] for h in straight.history]
    assert margins[0] == margins[2] == margins[4] == 0.0
    assert margins[1] != 0.0 and margins[3] != 0.0
    resumed = train(
        tiny_config(
            model_dir,
            tmp_path / "b",
            **common,
            checkpoint={"resume": str(tmp_path / "a" / "checkpoints" / "step-000003")},
        )
    )
    assert [h["loss"] for h in resumed.history] == pytest.approx(
        [h["loss"] for h in straight.history[3:]], rel=1e-6
    )


def test_tr_dpo_needs_a_live_reference(tmp_path: Path) -> None:
    from pairopt.errors import PairoptError
    from pairopt.training.config_load import validate_config

    with pytest.raises(PairoptError, match="precomputed log-probs would go stale"):
        validate_config(
            {"loss": {"name": "dpo"}, "reference": {"strategy": "precompute", "sync_steps": 8}}
        )
    with pytest.raises(PairoptError, match=r"train without model\.lora"):
        validate_config(
            {
                "loss": {"name": "dpo"},
                "model": {"lora": {"r": 4}},
                "reference": {"strategy": "copy", "sync_steps": 8},
            }
        )


def test_dpo_with_reverse_kl_is_plain_dpo_over_20_steps(
    model_dir: Path, tmp_path: Path, registry
) -> None:
    """`dpo` with f_divergence reverse_kl (the default: LogRatios gives the plain log-ratio
    margin, the divergence scores are not evaluated) against DPO written out by hand in a plain
    PairLoss (no LogRatios, no divergence code): the same 20-step trajectory, to the last bit.
    The other divergences are checked by value and gradient in tests/test_losses.py."""
    import torch.nn.functional as F

    from pairopt.loss import LossConfig, LossOutput, PairLoss, register_loss, reward_metrics

    @register_loss("hand_written_dpo")
    class HandWrittenDPO(PairLoss):
        requires_reference = True

        class Config(LossConfig):
            pass

        def compute(self, policy, reference):
            chosen = policy.chosen_logps - reference.chosen_logps
            rejected = policy.rejected_logps - reference.rejected_logps
            losses = -F.logsigmoid(0.1 * (chosen - rejected))
            return LossOutput(losses, reward_metrics(policy, 0.1 * chosen, 0.1 * rejected))

    common = {"optim": {"max_steps": 20, "lr": 1e-2}, "reference": {"strategy": "copy"}}
    divergence = train(
        tiny_config(
            model_dir,
            tmp_path / "a",
            loss={"name": "dpo", "f_divergence": "reverse_kl"},
            **common,
        )
    )
    by_hand = train(
        tiny_config(model_dir, tmp_path / "b", loss={"name": "hand_written_dpo"}, **common)
    )
    assert [h["loss"] for h in divergence.history] == [h["loss"] for h in by_hand.history]
    assert len(divergence.history) == 20


def test_tr_dpo_sync_mixes_parameters_by_hand() -> None:
    """α = 0.25: reference <- 0.75·reference + 0.25·policy, every parameter; buffers untouched."""
    from pairopt.training.policy import PolicyLogps
    from pairopt.training.reference import LiveReference

    policy = torch.nn.Linear(2, 1)
    reference = torch.nn.Linear(2, 1)
    with torch.no_grad():
        policy.weight.copy_(torch.tensor([[4.0, 8.0]]))
        policy.bias.fill_(2.0)
        reference.weight.copy_(torch.tensor([[0.0, 4.0]]))
        reference.bias.fill_(-2.0)
    LiveReference(PolicyLogps(reference, {})).sync(policy, 0.25)  # a copy as the trainer wraps it
    torch.testing.assert_close(reference.weight, torch.tensor([[1.0, 5.0]]))  # 0.75·0 + 0.25·4, ...
    torch.testing.assert_close(reference.bias, torch.tensor([-1.0]))  # 0.75·(−2) + 0.25·2
