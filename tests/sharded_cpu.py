"""Test-only: make accelerate apply FSDP2 and DeepSpeed on this CPU machine.

accelerate 1.15 applies FSDP only on accelerator devices (accelerate/state.py: the FSDP branch
is taken for MULTI_GPU, MULTI_NPU, ... but not MULTI_CPU) and DeepSpeed only without
`cpu=True`, which pairopt passes for multi-process CPU runs; on this machine it silently falls
back to DDP (and pairopt refuses that: pairopt.training.sharding.check_sharding). `force()`
replaces `accelerate.Accelerator` by a subclass that, after accelerate's own set-up, writes the
distributed type the launch asked for (`accelerate launch` sets ACCELERATE_USE_FSDP or
ACCELERATE_USE_DEEPSPEED from the config file) into both of accelerate's shared states (every
AcceleratorState() accelerate makes later re-copies PartialState's), with the plugin built
from the same environment, as accelerate does on a GPU (the tests run in float32; mixed
precision settings beyond the plugin's are not replayed). From there on accelerate's real FSDP2
and DeepSpeed code runs: prepare, backward, clip_grad_norm_, get_state_dict, save_state,
load_state; and so does pairopt's trainer, unchanged (it imports `accelerate.Accelerator` at
call time).

DeepSpeed on the CPU also JIT-builds a shared-memory collective op (deepspeed_shm_comm_op, ~220 s
with g++ on a fresh 2-core machine) when its torch backend starts; the tests use gloo for the
collectives, so the build is skipped.
"""

from __future__ import annotations

import os
import sys


def skip_deepspeed_shm_build() -> None:
    """Before DeepSpeed's comm backend starts. Through sys.modules: `deepspeed.comm` re-exports
    the name `torch`, so `import deepspeed.comm.torch as m` binds the torch package instead."""
    import deepspeed.comm.torch  # noqa: F401

    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None


def force() -> None:
    import accelerate
    from accelerate.state import PartialState
    from accelerate.utils import DeepSpeedPlugin, DistributedType, FullyShardedDataParallelPlugin

    class ShardingOnCpu(accelerate.Accelerator):
        def __init__(self, *args, **kwargs) -> None:
            # a later run in the same process starts from the CPU set-up again (accelerate
            # builds the state of a second Accelerator from the first one's distributed type)
            if PartialState._shared_state:
                PartialState._shared_state["distributed_type"] = DistributedType.MULTI_CPU
            super().__init__(*args, **kwargs)
            precision = self.state.mixed_precision
            if os.environ.get("ACCELERATE_USE_FSDP") == "true":
                plugin = FullyShardedDataParallelPlugin()  # read from the launch's environment
                PartialState._shared_state["distributed_type"] = DistributedType.FSDP
                self.state.distributed_type = DistributedType.FSDP
                self.state.fsdp_plugin = plugin
                if precision != "no":
                    plugin.set_mixed_precision(precision)
            elif os.environ.get("ACCELERATE_USE_DEEPSPEED") == "true":
                plugin = DeepSpeedPlugin()
                PartialState._shared_state["distributed_type"] = DistributedType.DEEPSPEED
                self.state.distributed_type = DistributedType.DEEPSPEED
                self.state.deepspeed_plugins = plugin
                plugin.set_mixed_precision(precision)
                plugin.select(_from_accelerator_state=True)
                self.state._mixed_precision = "no"  # DeepSpeed's config holds it (state.py)
                zero = plugin.deepspeed_config["zero_optimization"]
                if zero.get("stage") == 3:
                    # partition every tensor of the tiny test model, as a real model's are (the
                    # default threshold, 1e5 elements, keeps all of its tensors whole)
                    zero["stage3_param_persistence_threshold"] = 0

    accelerate.Accelerator = ShardingOnCpu  # type: ignore[misc]
    if os.environ.get("ACCELERATE_USE_DEEPSPEED") == "true":
        skip_deepspeed_shm_build()
