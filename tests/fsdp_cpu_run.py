"""`python -m grade_trl.run` under Accelerate's FSDP2 on CPU processes (gloo), for tests/test_sharded.py only.

Accelerate turns FSDP on only for GPU-type processes: in `AcceleratorState.__init__` the FSDP branch sits under
`distributed_type in [MULTI_GPU, ...]`, and a CPU launch is MULTI_CPU, so `accelerate launch` with fsdp2.yaml on a
CPU would train plain data parallel (which is why `grade_trl.run` refuses that launch, `recipe.check_launch`). The
rest of Accelerate's FSDP2 path does not need a GPU: `fully_shard` over a CPU mesh with gloo, the optimizer over
DTensor shards, clipping, and the full state dict gathered for saving. This entry point takes the branch a GPU
launch takes, and only that: after `AcceleratorState` has set itself up as MULTI_CPU with an FSDP plugin from the
launch environment (`ACCELERATE_USE_FSDP` and the `FSDP_*` variables of the config), it records FSDP and the plugin
exactly as the GPU branch does; and the runner's refusal of a CPU launch with a sharding config is lifted. Everything
else is the user's `grade_trl.run`: the recipe, the trainers, Accelerate's `fsdp2_prepare_model`, saving.

Run by torchrun with the environment `accelerate launch --config_file accelerate_configs/fsdp2.yaml` gives each
process (`test_sharded.launch_env`): `torchrun --standalone --nproc_per_node 2 tests/fsdp_cpu_run.py RECIPE.yaml ...`.
"""

from __future__ import annotations

import importlib
import json
import os
import sys

import accelerate.accelerator
from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedType

from grade_trl import recipe as recipe_module
from grade_trl.cli import exit_process
from grade_trl.run import main

_init = AcceleratorState.__init__


def _init_with_fsdp_on_cpu(self, *args, fsdp_plugin=None, **kwargs):
    _init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
    if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
        self.distributed_type = DistributedType.FSDP  # what the GPU branch of AcceleratorState.__init__ sets
        self.fsdp_plugin = fsdp_plugin
        PartialState._shared_state["distributed_type"] = self.distributed_type


_check_launch = recipe_module.check_launch


def _check_launch_as_on_gpus(use_cpu: bool, relaxed: bool = False) -> None:
    _check_launch(False, relaxed)  # the refusals a GPU launch gets, GRADE's of FSDP activation checkpointing included


_fsdp2_prepare_model = accelerate.accelerator.fsdp2_prepare_model


def _fsdp2_prepare_model_and_record(accelerator, model):
    """Accelerate's own `fsdp2_prepare_model`, then a record of what it made of the model (appended, one JSON line
    per call, to $FSDP_CPU_RECORD with the rank in its name): whether it is an FSDP module and how many of the
    parameters' elements this process holds and which transformer blocks are units of their own, so the test can tell
    that the policy (the last record) and the frozen reference (the one before it, where the method has one: prepared
    first, in the trainer's `__init__`) were sharded, not replicated."""
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    prepared = _fsdp2_prepare_model(accelerator, model)
    path = os.environ.get("FSDP_CPU_RECORD")
    if path:
        parameters = list(prepared.parameters())
        local = sum((p.to_local() if isinstance(p, DTensor) else p).numel() for p in parameters)
        blocks = [m for m in prepared.modules() if type(m).__name__.endswith("Block")]  # GPT2Block (FSDPGPT2Block once a unit)
        record = {"fsdp_module": isinstance(prepared, FSDPModule), "distributed_type": str(accelerator.distributed_type),
                  "blocks": len(blocks), "block_units": sum(isinstance(m, FSDPModule) for m in blocks),
                  "dtensor_parameters": sum(isinstance(p, DTensor) for p in parameters), "parameters": len(parameters),
                  "local_elements": local, "elements": sum(p.numel() for p in parameters)}
        with open(f"{path}.rank{accelerator.process_index}", "a") as f:
            f.write(json.dumps(record) + "\n")
    return prepared


def _blocks_recomputed_and_recorded(blocks_recomputed):
    """GRADE's reference forward recomputed block by block (`core.soft_rollout.blocks_recomputed`), each entry also
    recorded (one JSON line a call, to $FSDP_CPU_RECORD.blocks_recomputed with the rank in its name): how many blocks
    it checkpointed, and whether the model was an FSDP2 unit, so the test can tell that the trainer took that way."""
    from contextlib import contextmanager

    from torch.distributed.fsdp import FSDPModule

    @contextmanager
    def recorded(model):
        with blocks_recomputed(model) as entered:
            path = os.environ.get("FSDP_CPU_RECORD")
            if path:
                blocks = [m for m in model.modules() if "forward" in vars(m)]  # the checkpointed forward: an instance attribute
                with open(f"{path}.blocks_recomputed.rank{os.environ.get('RANK', '0')}", "a") as f:
                    f.write(json.dumps({"blocks": len(blocks), "fsdp_module": isinstance(model, FSDPModule)}) + "\n")
            yield entered

    return recorded


if __name__ == "__main__":
    soft_rollout_module = importlib.import_module("grade_trl.core.soft_rollout")  # the module: the package rebinds the name to the function
    soft_rollout_module.blocks_recomputed = _blocks_recomputed_and_recorded(soft_rollout_module.blocks_recomputed)
    if os.environ.get("FSDP_CPU_CHUNK_ELEMENTS"):  # REINFORCE's and PPO's head scoring in several chunks on the tiny model
        from grade_trl.core import head_scoring

        head_scoring.CHUNK_ELEMENTS = int(os.environ["FSDP_CPU_CHUNK_ELEMENTS"])
    accelerate.accelerator.fsdp2_prepare_model = _fsdp2_prepare_model_and_record
    accelerate.utils.fsdp_utils.fsdp2_prepare_model = _fsdp2_prepare_model_and_record  # the frozen reference's (trainers.base)
    AcceleratorState.__init__ = _init_with_fsdp_on_cpu
    recipe_module.check_launch = _check_launch_as_on_gpus
    exit_process(lambda: main(sys.argv[1:]))
