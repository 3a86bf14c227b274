"""What the rollouts need to stay correct when the policy's parameters are sharded: FSDP2 (`fully_shard`) or
DeepSpeed ZeRO-3.

Under FSDP2 every managed parameter is, outside its module's forward, this process's shard: a DTensor with a
`Shard(0)` placement. Under ZeRO-3 it is an empty tensor (`ds_id` set, the shard kept in `ds_tensor`), gathered by
hooks around each module's forward and again before its backward. Two things of a rollout then need care, and
both are no-ops for an unsharded model (one process, DDP, ZeRO-1/2), so those runs are unchanged bit for bit:
  * GRADE reads the input-embedding matrix E outside the model's forward (a relaxed step enters the next forward
    as y @ E, or E[token] for a straight-through step): `input_embedding_matrix` gathers the full E.
  * every process must call the sharded model the same number of times (each call of a sharded block is a
    collective: an all-gather in forward, a reduce-scatter in backward), so a decode loop may stop early only
    when every process's rows have finished: `all_finished`.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor, Partial


def is_sharded(module: torch.nn.Module) -> bool:
    """Whether any parameter of `module` is a DTensor (FSDP2, or tensor parallelism) or a ZeRO-3 partitioned one."""
    return any(isinstance(p, DTensor) or _is_zero3(p) for p in module.parameters())


def is_fsdp2(module: torch.nn.Module) -> bool:
    """Whether `module` is sharded by FSDP2 alone: its root `fully_shard`-ed (as Accelerate's `fsdp2_prepare_model` and
    tests/sharded_worker.py do), no ZeRO-3 partitioned parameter. Then each parameter is whole, a plain tensor, from its
    unit's pre-forward (and pre-backward) hook until the unit reshards: in the unit's forward and in its backward."""
    return isinstance(module, FSDPModule) and not is_zero3(module)


def is_zero3(module: torch.nn.Module) -> bool:
    """Whether any parameter of `module` is partitioned by DeepSpeed ZeRO-3."""
    return any(_is_zero3(p) for p in module.parameters())


def _is_zero3(parameter: torch.Tensor) -> bool:
    return hasattr(parameter, "ds_id")  # set by deepspeed.zero.Init on the parameters it partitions (ZeRO-3 only)


def local_data(parameter: torch.Tensor) -> torch.Tensor:
    """The values of `parameter` this process holds, to snapshot and write back in place (the evaluation's best
    checkpoint): ZeRO-3's partition (`ds_tensor`; the parameter itself is empty outside its module's forward), else the
    parameter (FSDP2's DTensor copies shard to shard)."""
    return parameter.ds_tensor if _is_zero3(parameter) else parameter


def input_embedding_matrix(module: torch.nn.Module) -> torch.Tensor:
    """E (V, H), the input-embedding matrix of `module`, whole and differentiable, for use outside its forward.

    Unsharded: the parameter itself, in place (no copy). Sharded (a DTensor): `full_tensor()`, an all-gather once
    per rollout that keeps autograd. Why this and not a call through a module that FSDP unshards: the embedding
    is not an FSDP unit of its own (the auto-wrap units are the transformer blocks; with tied weights E is also
    the LM head, so it must stay in the root unit), and the root unit's parameters are gathered only inside the
    root's forward. A soft step's embedding would have to be computed inside that forward, which a Hugging Face
    model's forward does not offer; reading the root's unsharded parameter between forwards instead relies on
    when FSDP reshards and reduces (its gradient would arrive after the reduce-scatter of the call that produced
    it). The explicit gather is correct by construction; it costs one all-gather of E per rollout and one
    reduce-scatter of its gradient, and one extra full copy of E per process while the rollout lives.

    The gradient: each process's gradient of E is a partial term of the global one, so it is declared
    `Partial("avg")`; the backward of the gather then reduce-scatters the average over processes into this
    process's shard, the same average FSDP applies to every other gradient (and to the gradient of E's other uses,
    the prompt's token embeddings and the tied LM head, which FSDP adds to the same shard).

    ZeRO-3: a partitioned parameter has no gather that keeps autograd (`GatheredParameters` frees the full tensor
    on exit, before the backward that needs it), but every module is gathered by DeepSpeed's hooks around its
    forward, and its outputs carry a hook that gathers it again before their backward and hands its gradient to
    ZeRO's reduce-scatter. So the embedding module is called once, with a forward that returns a copy of its
    weight: E arrives whole, and its gradient reaches the shards the way every module's does.
    """
    embedding = module.get_input_embeddings()
    reshard_embedding(module)
    weight = embedding.weight
    if isinstance(weight, DTensor):
        return _DenseGradient.apply(weight.full_tensor(grad_placements=[Partial("avg")] * weight.device_mesh.ndim))
    if _is_zero3(weight):
        embedding.forward = lambda *_: embedding.weight.clone()  # the hooks live in Module.__call__, not forward
        try:
            return embedding(None)
        finally:
            del embedding.forward
    return weight


class _DenseGradient(torch.autograd.Function):
    """Identity whose backward makes the gradient dense: the straight-through embeddings give E a sparse gradient
    (the rows of the sampled tokens, core/soft_tokens.py), which the gather's backward (a reduce-scatter of a DTensor)
    cannot take."""

    @staticmethod
    def forward(ctx, tensor):
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad):
        return grad.to_dense() if grad.is_sparse else grad


def resharded(module: torch.nn.Module) -> torch.nn.Module:
    """`module` with every FSDP2 unit inside put back to its shards, for code that reads or writes its parameters in
    place between forwards (the evaluation's best checkpoint: `local_data`). A unit sharded with
    `reshard_after_forward=False` (Accelerate's unit of the tied E, final norm and LM head: `reshard_embedding`) holds
    its gathered parameters after a forward, plain tensors registered in place of the shards: a snapshot taken there
    does not match one taken from the shards, and a copy written there is lost at the unit's next reshard, which frees
    them. Found under fsdp2.yaml on 2 CPU processes, a resumed run's swap to its best checkpoint ("mixed torch.Tensor
    and DTensor"). `FSDPModule.reshard` is not recursive, hence every unit. A no-op for an unsharded model."""
    for unit in module.modules():
        if isinstance(unit, FSDPModule):
            unit.reshard()
    return module


@contextmanager
def resharded_on_exit(module: torch.nn.Module):
    """Within the block, `module` as it is; on exit, every FSDP2 unit in it back to its shards (`resharded`), unless the
    block ran inside a backward. For a frozen sharded model (the reference): FSDP2 keeps a root unit gathered after its
    forward, for a backward that a no-grad scoring never runs.

    After a forward with a gradient (GRADE's reference on the soft tokens, which carries the exact KL's gradient into
    the rollout) the reshard is safe: FSDP2 gathers each unit again, into the buffer its saved views read, when the
    gradient reaches the unit's outputs. Inside a backward (that forward recomputed by a non-reentrant checkpoint,
    `recompute_reference_and_reward`) it is not: the root's pre-backward hook, which gathered E and the final norm
    before the recomputation, has already fired, so a reshard there frees the weights the recomputed graph's backward
    reads next ("out of bounds for storage of size 0", 2 CPU processes, 2026-12-07). There every unit stays as it
    is, and FSDP2 reshards them all at the end of that backward (its root's post-backward callback)."""
    try:
        yield module
    finally:
        if torch._C._current_graph_task_id() == -1:  # -1: not inside a backward
            resharded(module)


def reshard_embedding(module: torch.nn.Module) -> None:
    """Put the FSDP2 unit that holds E back to its shards, so that `input_embedding_matrix` gathers a copy of its own.

    Between forwards, E can be the unit's unsharded parameter, a view of the unit's all-gather buffer: after a
    forward without backward (a validation before a training step) and, always, under Accelerate's FSDP2 layout,
    where with tied weights E sits in a unit of its own with the final norm and the LM head, sharded with
    `reshard_after_forward=False` (accelerate/utils/fsdp_utils.py, `fsdp2_prepare_model`), so it stays unsharded after
    every forward. Read as it is, E's storage is freed by that unit's reshard in the backward of the rollout's last
    decode step, before the earlier steps' embeddings read E ("out of bounds for storage of size 0", seen under
    fsdp2.yaml on an H200). `FSDPModule.reshard` is not recursive, so this reshards the unit that owns E: the
    embedding's own unit if it has one, else the root. Safe mid-step: FSDP gathers a unit again before its backward,
    into the same buffer its saved views read. A no-op when E is already a shard, and for an unsharded model."""
    embedding = module.get_input_embeddings()
    if isinstance(embedding.weight, DTensor):
        return
    if isinstance(embedding, FSDPModule):
        embedding.reshard()
    elif isinstance(module, FSDPModule):
        module.reshard()


def all_finished(finished: torch.Tensor, sharded: bool) -> bool:
    """Whether every row has finished: this process's rows, or, when the model is sharded, every process's rows
    (one all-reduce per decode step, so that every process runs the same number of sharded forwards)."""
    done = bool(finished.all())
    if not sharded or not dist.is_initialized() or dist.get_world_size() == 1:
        return done
    flag = torch.tensor([int(done)], device=finished.device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


@contextmanager
def gathered(module: torch.nn.Module):
    """Within the block, an FSDP2 unit's own parameters are whole (unsharded), for calls that bypass its forward:
    PPO samples from `.policy` and applies `.value_head` outside the wrapper's forward, where FSDP would otherwise
    leave the wrapper's own parameters (the embeddings, the final norm, the value head) as shards. The blocks inside
    are units of their own and gather themselves when called. Meant for no-grad code (sampling, evaluation): a
    gradient taken in here would bypass FSDP's reduce-scatter. A no-op for an unsharded module."""
    if not isinstance(module, FSDPModule):
        yield module
        return
    module.unshard()
    try:
        yield module
    finally:
        module.reshard()
