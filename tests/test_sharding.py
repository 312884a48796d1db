"""What pairopt checks and fills in around accelerate's sharding, without launching processes
(pairopt.training.sharding; the two-process runs are tests/test_sharded.py): a config that
accelerate would not apply, unsupported combinations, the DeepSpeed settings that follow
pairopt's own, and the pieces of the trainer that must agree across processes."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from accelerate.utils import DistributedType

from pairopt.errors import PairoptError
from pairopt.training.config import OptimConfig
from pairopt.training.run_log import fail_together
from pairopt.training.sharding import (
    _layer_classes_of,
    check_lora_head,
    check_sharding,
    configure_deepspeed,
    describe_launch,
    launch_of,
    sharding_of,
)


def fake(kind: DistributedType, processes: int = 2, **state) -> SimpleNamespace:
    """An accelerator as far as sharding.py reads it."""
    return SimpleNamespace(
        distributed_type=kind,
        num_processes=processes,
        is_fsdp2=state.pop("is_fsdp2", True),
        state=SimpleNamespace(**state),
    )


def deepspeed(stage: int, processes: int = 2, **config) -> SimpleNamespace:
    plugin = SimpleNamespace(
        deepspeed_config={"zero_optimization": {"stage": stage}, **config},
        zero3_init_flag=False,
    )
    return fake(DistributedType.DEEPSPEED, processes, deepspeed_plugin=plugin)


@pytest.mark.parametrize(("variable", "name"), [("ACCELERATE_USE_FSDP", "FSDP"),
                                                ("ACCELERATE_USE_DEEPSPEED", "DeepSpeed")])  # fmt: skip
def test_a_sharding_config_accelerate_does_not_apply_is_refused(monkeypatch, variable, name):
    """accelerate launch with an FSDP or DeepSpeed config on a machine without GPUs: accelerate
    sets up DDP (MULTI_CPU) instead, silently; pairopt stops with one message. One process
    (nothing to shard) and a config accelerate applied pass."""
    monkeypatch.setenv(variable, "true")
    with pytest.raises(PairoptError, match=f"asks for {name}, but accelerate does not apply"):
        check_sharding(fake(DistributedType.MULTI_CPU), optimizer="adamw", tr_dpo=False)
    check_sharding(fake(DistributedType.NO, processes=1), optimizer="adamw", tr_dpo=False)
    check_sharding(deepspeed(3), optimizer="adamw", tr_dpo=False)


def test_unsupported_sharded_setups_are_refused_by_name():
    plugin = SimpleNamespace(state_dict_type="StateDictType.SHARDED_STATE_DICT")
    fsdp2 = fake(DistributedType.FSDP, fsdp_plugin=plugin)
    assert sharding_of(fsdp2) == "fsdp2"
    check_sharding(fsdp2, optimizer="sgd", tr_dpo=False)
    with pytest.raises(PairoptError, match="fsdp_version: 2"):
        check_sharding(fake(DistributedType.FSDP, is_fsdp2=False), optimizer="sgd", tr_dpo=False)
    with pytest.raises(PairoptError, match=r"reference\.sync_steps .* under zero3"):
        check_sharding(deepspeed(3), optimizer="adamw", tr_dpo=True)
    full = fake(
        DistributedType.FSDP, fsdp_plugin=SimpleNamespace(state_dict_type="FULL_STATE_DICT")
    )
    check_sharding(full, optimizer="adamw", tr_dpo=False)
    with pytest.raises(PairoptError, match=r"SHARDED_STATE_DICT, or optim\.optimizer adamw"):
        check_sharding(full, optimizer="sgd", tr_dpo=False)
    zero3_init = deepspeed(3)
    zero3_init.state.deepspeed_plugin.zero3_init_flag = True
    with pytest.raises(PairoptError, match="zero3_init_flag: false"):
        check_sharding(zero3_init, optimizer="adamw", tr_dpo=False)


def test_deepspeed_settings_follow_pairopts_own():
    """ "auto" (or absent) keys take pairopt's values: micro-batch = optim.batch_size,
    accumulation = optim.grad_accum, clipping = optim.max_grad_norm (null: 0.0, since DeepSpeed
    clips at 1.0 by default and accelerate's clip_grad_norm_ only reads its norm); ZeRO-3
    gathers the full weights for the final save. A value the config sets must agree."""
    accelerator = deepspeed(3, train_micro_batch_size_per_gpu="auto", gradient_clipping="auto")
    configure_deepspeed(accelerator, OptimConfig(batch_size=6, grad_accum=2, max_grad_norm=None))
    assert accelerator.state.deepspeed_plugin.deepspeed_config == {
        "train_micro_batch_size_per_gpu": 6,
        "gradient_accumulation_steps": 2,
        "gradient_clipping": 0.0,
        "zero_optimization": {"stage": 3, "stage3_gather_16bit_weights_on_model_save": True},
    }
    zero2 = deepspeed(2, gradient_clipping=1.0, gradient_accumulation_steps=1)
    configure_deepspeed(zero2, OptimConfig(max_grad_norm=1.0))
    assert zero2.state.deepspeed_plugin.deepspeed_config["zero_optimization"] == {"stage": 2}
    with pytest.raises(
        PairoptError, match=r"gradient_clipping=1\.0 but optim\.max_grad_norm is 0\.5"
    ):
        configure_deepspeed(deepspeed(2, gradient_clipping=1.0), OptimConfig(max_grad_norm=0.5))
    with pytest.raises(PairoptError, match=r"gradient_accumulation_steps=4 but optim\.grad_accum"):
        configure_deepspeed(deepspeed(3, gradient_accumulation_steps=4), OptimConfig())


def test_fail_together_raises_one_error_or_returns():
    """Every process calls it once with its own error or None (one process here: the flag needs
    no collective)."""
    one = SimpleNamespace(num_processes=1)
    fail_together(one, None)
    with pytest.raises(PairoptError, match=r"^the loss is nan"):
        fail_together(one, PairoptError("the loss is nan"))


def test_compute_tables_runs_the_same_batches_on_every_process(monkeypatch):
    """5 groups on 2 processes in batches of 2: process 0 takes rows 0, 2, 4 and process 1 rows
    1, 3 and row 0 again as padding (dropped), so both run 2 forwards, a collective under FSDP
    and ZeRO-3; each process's share holds its rows once, in order, the padding dropped.
    (gather_object is the identity here: the gathering itself runs in tests/test_sharded.py.)"""
    import accelerate.utils

    from pairopt.pairs import GroupLogps, offsets_of
    from pairopt.training.reference_cache import compute_tables

    dataset = [[10.0 * row] for row in range(5)]  # row -> its one response's log-prob

    def logps(batch):
        values = [v for group in batch for v in group]
        return GroupLogps(torch.tensor(values), torch.ones(len(values), dtype=torch.long),
                          offsets_of([1] * len(values)))  # fmt: skip

    class Rows(list):
        def __getitem__(self, rows):
            return (
                [list.__getitem__(self, i) for i in rows]
                if isinstance(rows, list)
                else super().__getitem__(rows)
            )

    shares, batches = [], []
    monkeypatch.setattr(accelerate.utils, "gather_object", lambda rows: rows)  # this share only
    for rank in (0, 1):
        accelerator = SimpleNamespace(
            process_index=rank, num_processes=2, is_main_process=rank == 0
        )
        calls_before = len(batches)
        tables = compute_tables(
            lambda batch: (batches.append(batch), logps(batch))[1],
            {"train": Rows(dataset)},
            rows_to_batch=lambda rows: rows,
            batch_size=2,
            accelerator=accelerator,
        )
        shares.append(tables["train"].logps.tolist())
        assert len(batches) - calls_before == 2
    assert shares == [[0.0, 20.0, 40.0], [10.0, 30.0]]


def test_a_lora_adapter_on_the_lm_head_is_refused_under_zero3_only():
    """Its base layer would run (and be gathered by ZeRO-3) once per logits chunk."""
    from peft import LoraConfig, get_peft_model
    from tiny_models import make_model

    def lora(targets):  # on a copy: make_model's models are shared by the tests of a process
        model = copy.deepcopy(make_model("llama"))
        return get_peft_model(model, LoraConfig(r=2, target_modules=targets))

    on_head, all_linear = lora(["q_proj", "lm_head"]), lora("all-linear")
    with pytest.raises(PairoptError, match=r"adapter on the LM head.*leave the output layer out"):
        check_lora_head(on_head, "zero3")
    for kind in (None, "fsdp2", "zero2"):
        check_lora_head(on_head, kind)
    check_lora_head(all_linear, "zero3")


def test_a_reference_of_another_architecture_gets_its_own_fsdp2_layer_groups():
    """Preparing the policy leaves its decoder layer class in the plugin; accelerate's wrap
    policy refuses a module without it. While the frozen module is sharded its own layer
    classes are used, and the plugin's are put back after."""
    fsdp_utils = pytest.importorskip("accelerate.utils.fsdp_utils")
    if not hasattr(fsdp_utils, "fsdp2_prepare_auto_wrap_policy"):
        pytest.skip("this accelerate has no FSDP2 (added in 1.6); pairopt refuses FSDP there")
    fsdp2_prepare_auto_wrap_policy = fsdp_utils.fsdp2_prepare_auto_wrap_policy
    from tiny_models import make_model
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

    from pairopt.training.policy import PolicyLogps

    plugin = SimpleNamespace(auto_wrap_policy=transformer_auto_wrap_policy,
                             transformer_cls_names_to_wrap=["LlamaDecoderLayer"])  # fmt: skip
    other = PolicyLogps(make_model("qwen2"), {})
    with pytest.raises(ValueError, match="LlamaDecoderLayer"):
        fsdp2_prepare_auto_wrap_policy(plugin, other)
    with _layer_classes_of(plugin, other):
        wrap = fsdp2_prepare_auto_wrap_policy(plugin, other)
    layers = [m for m in other.modules() if wrap(m)]
    assert layers and {type(m).__name__ for m in layers} == {"Qwen2DecoderLayer"}
    assert plugin.transformer_cls_names_to_wrap == ["LlamaDecoderLayer"]
    same = PolicyLogps(make_model("llama"), {})  # the policy's own architecture: unchanged
    with _layer_classes_of(plugin, same):
        assert plugin.transformer_cls_names_to_wrap == ["LlamaDecoderLayer"]


def test_the_launch_a_checkpoint_records():
    assert launch_of(fake(DistributedType.NO, 1)) == {"processes": 1, "sharding": "none"}
    assert launch_of(deepspeed(3, 8)) == {"processes": 8, "sharding": "zero3"}
    said = [describe_launch(launch_of(a)) for a in (fake(DistributedType.NO, 1),
            fake(DistributedType.MULTI_GPU, 4), deepspeed(3, 8))]  # fmt: skip
    assert said == ["1 process", "4 processes (DDP)", "8 processes under zero3"]
