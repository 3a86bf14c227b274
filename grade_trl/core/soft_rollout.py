"""The differentiable (relaxed) rollout behind GRADE.

At each step the policy's next-token logits are relaxed (Gumbel-softmax, straight-through, ...) into a
`Relaxed` step, whose embedding is the next input, so the reward's gradient flows back through every
generated position into the policy. A KV cache keeps each step at O(1) new positions.

Memory, for T generated tokens (what each part keeps for backward):
  * the KV cache: `cache="chunked"` (default) keeps each step's keys and values once and lets attention
    recompute over them in backward (core/chunked_cache.py): O(T). `cache="dynamic"` is transformers'
    DynamicCache, whose per-step concatenations autograd keeps alive: O(T^2);
  * each step's activations (MLP, norms, attention inputs): O(T); `checkpoint_steps=True` keeps only each
    step's inputs and outputs and recomputes its forward in backward (exact; about one more rollout forward);
  * the (B, V) tensors of each step: the logits (kept once, stacked, for the exact KL) and what the relaxation
    needs for its backward; `top_k=k` relaxes over the k largest logits only, so both become (B, k).

Operations per step (a GPU's decode loop is bound by their count, not by arithmetic): GPT-2's activation, `gelu_new`,
is the tanh approximation of GELU written as eight tensor operations, whose backward is about thirty more; the
rollout runs it as torch's one-kernel `F.gelu(approximate="tanh")` instead, the same function (transformers calls it
"equivalent to NewGELU and FastGELU but much faster", equal up to rounding) with a one-kernel backward
(`tanh_gelu_in_one_kernel`). A plain GPT-2 block's decode step runs as one autograd node with its backward written out
and its layer norms' gradients deferred too (core/gpt2_decode_block.py): one node per layer and step instead of about 28.

Legend: B batch, P prompt length (left-padded), T generated positions, V vocabulary, K logits kept per
position (V, or k with top-k), H hidden.
"""

from __future__ import annotations

import sys
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass
from functools import partial
from typing import Callable, Literal

import torch
import torch.nn.functional as F
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper
from torch.utils.checkpoint import checkpoint
from transformers import DynamicCache
from transformers.activations import FastGELUActivation, NewGELUActivation

from .chunked_cache import ChunkedCache, ChunkedLayer, chunked_attention, supports_chunked_attention
from .deferred_grads import DeferredWeightGrads, deferred_weight_grads, replaced_forwards
from .few_rows import few_row_output_head
from .gpt2_decode_block import gpt2_decode_blocks
from .masks import completion_mask
from .sharding import all_finished, input_embedding_matrix, is_sharded
from .soft_tokens import Relaxed, SoftTokens, embed_step

Relax = Callable[[torch.Tensor, int], Relaxed]
"""relax(logits (B, K), step) -> Relaxed over those K columns (`hard` a column index): what is embedded and scored."""

CACHES = ("chunked", "dynamic")


@dataclass
class SoftRollout:
    prompt_ids: torch.Tensor  # (B, P) left-padded
    prompt_mask: torch.Tensor  # (B, P) 1 for real prompt tokens
    logits: torch.Tensor  # (B, T, K) processed policy logits each relaxed token was drawn from (K = V, or the top-k)
    logit_indices: torch.Tensor | None  # (B, T, k) vocabulary ids of `logits`' columns with top-k; None: all V
    soft_tokens: SoftTokens  # the relaxed tokens y_t (carry the gradient)
    tokens: torch.Tensor  # (B, T) hard tokens: the text the rollout stands for
    mask: torch.Tensor  # (B, T) 1 up to and including the first hard EOS, 0 after

    @property
    def lengths(self) -> torch.Tensor:  # (B,)
        return self.mask.sum(-1)


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that count only real tokens, so left padding does not shift the prompt."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def last_positions(count: int, length: int, device) -> torch.Tensor:
    """`logits_to_keep` for the last `count` of `length` positions as an index tensor: the model gathers a contiguous
    (B, count, H) copy before its LM head, which then runs as one 2-D product (an int gives a strided view, which a
    3-D matmul turns into a batched product with the (V, H) weight expanded per row: several times slower)."""
    return torch.arange(length - count, length, device=device)


def forbid_eos(logits: torch.Tensor, eos_token_id: int | None) -> torch.Tensor:
    """Make EOS impossible (used before `min_new_tokens`). A large finite value, not -inf, keeps p*log p finite."""
    if eos_token_id is None:
        return logits
    logits = logits.clone()
    logits[..., eos_token_id] = torch.finfo(logits.dtype).min / 2
    return logits


def decode_step(model, cache, attention_mask: torch.Tensor, position_ids: torch.Tensor, **inputs) -> tuple:
    """One cached decoding step (one new position per row: `input_ids` or `inputs_embeds`).

    Returns (the updated cache, next-token logits (B, V)).
    """
    out = model(**inputs, attention_mask=attention_mask, position_ids=position_ids, cache=cache, use_cache=True)
    return out.cache, out.logits[:, -1]


def unwrapped(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside a DDP wrapper or a DeepSpeed engine (the Trainer hands the engine to the loss under DeepSpeed)."""
    engine = getattr(sys.modules.get("deepspeed"), "DeepSpeedEngine", None)  # never imports DeepSpeed itself
    wrappers = (torch.nn.parallel.DistributedDataParallel,) + ((engine,) if engine is not None else ())
    return model.module if isinstance(model, wrappers) else model


TANH_GELU_MODULES = (NewGELUActivation, FastGELUActivation)
"""transformers' activations that compute the tanh approximation of GELU in several tensor operations (gelu_new, gelu_fast)."""


def tanh_gelu_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules of `model` that `tanh_gelu_in_one_kernel` replaces (found once per rollout)."""
    return [module for module in model.modules() if type(module) in TANH_GELU_MODULES]


def _tanh_gelu(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


def tanh_gelu_in_one_kernel(modules: list[torch.nn.Module]):
    """Within the block, `modules` (from `tanh_gelu_modules`) compute 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
    as torch's fused `F.gelu(x, approximate="tanh")`: one operation forward and one backward instead of about 8 and 30
    (GPT-2's MLP, per layer and decode step). The same replacement of the instances' `forward` as
    `deferred_weight_grads` (`replaced_forwards`): a module whose forward is already replaced is left alone."""
    return replaced_forwards((module, _tanh_gelu) for module in modules)


def _checkpointed_step(inner, cache: ChunkedCache, deferred: DeferredWeightGrads | None, activations: list, inputs_embeds, attention_mask,
                       position_ids) -> torch.Tensor:
    """One decode step whose forward is recomputed in backward: it keeps only its inputs (the cache's chunks, which
    exist anyway, and the new input embedding) and outputs (the logits, the new chunks)."""
    counts = [len(layer.key_chunks) for layer in cache.layers]
    flat = [chunk for layer in cache.layers for chunk in (*layer.key_chunks, *layer.value_chunks)]

    def step(inputs_embeds, attention_mask, position_ids, *flat):
        local, start = ChunkedCache(), 0
        for n in counts:
            layer = ChunkedLayer()
            layer.accumulate_grads = False  # lives for this step only: explicit gradient edges to every chunk
            layer.key_chunks, layer.value_chunks = list(flat[start : start + n]), list(flat[start + n : start + 2 * n])
            layer.is_initialized, start = True, start + 2 * n
            local.layers.append(layer)
        with ExitStack() as stack:
            stack.enter_context(chunked_attention(inner, local))
            stack.enter_context(tanh_gelu_in_one_kernel(activations))  # as the forward it recomputes
            if deferred is not None:
                stack.enter_context(deferred_weight_grads(inner, deferred))
            out = inner(inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids, cache=local, use_cache=True)
        return (out.logits[:, -1], *[chunk for layer in local.layers for chunk in (layer.key_chunks[-1], layer.value_chunks[-1])])

    logits, *new = checkpoint(step, inputs_embeds, attention_mask, position_ids, *flat, use_reentrant=False)
    for i, layer in enumerate(cache.layers):
        layer.append(new[2 * i], new[2 * i + 1], buffered=False)  # the steps read their chunks themselves (`_ChunkedAttention`)
    return logits


def soft_rollout(
    model: torch.nn.Module,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    relax: Relax,
    max_new_tokens: int,
    min_new_tokens: int = 0,
    eos_token_id: int | None = None,
    *,
    top_k: int = 0,
    cache: str = "chunked",
    checkpoint_steps: bool = False,
    defer_weight_grads: bool = True,
) -> SoftRollout:
    """Generate `max_new_tokens` relaxed tokens (fewer if every row has emitted a hard EOS).

    The prompt goes in as token ids; every generated position goes in as the embedding of its relaxed step
    (`embed_step`: y_t @ E, or E[token] for a straight-through step), E read in place, never copied.
    top_k: relax over the k largest logits of each step (0: the whole vocabulary). cache, checkpoint_steps: the
    memory options of the module docstring (`checkpoint_steps` needs the chunked cache). The relaxation sees the
    logits in at least float32, whatever the model's (autocast) dtype. defer_weight_grads: compute the weight
    gradients of every matrix (the LM head and the input embedding included) once at the end of backward instead
    of once per step (core/deferred_grads.py; exact up to summation order).
    """
    if cache not in CACHES:
        raise ValueError(f"cache must be one of {CACHES}, got {cache!r}")
    # Forward calls go through `model` (a DDP wrapper syncs gradients, FSDP gathers each unit's parameters); the
    # embedding matrix is read from the wrapped module in place, never copied (gathered whole when it is sharded:
    # core/sharding.py).
    inner = unwrapped(model)
    sharded = is_sharded(inner)
    if sharded and checkpoint_steps:
        raise ValueError("rollout_checkpointing is not supported with a sharded (FSDP2 or ZeRO-3) policy; lower memory with relax_top_k or bf16 there")
    if any(isinstance(module, CheckpointWrapper) for module in inner.modules()):
        # FSDP's activation checkpointing (Accelerate's fsdp2_apply_ac) wraps each block: its recomputation in backward
        # calls the block's cache.update again, outside this rollout, and the keys and values no longer match.
        raise ValueError("the relaxed rollout cannot run under checkpointed decoder blocks (fsdp_activation_checkpointing: its "
                         "recomputation re-enters the KV cache); turn it off, and use rollout_checkpointing on an unsharded policy")
    checkpointing = "is_activation_checkpointing" if hasattr(type(inner), "is_activation_checkpointing") else "is_gradient_checkpointing"
    if getattr(inner, checkpointing, False) and inner.training:
        # transformers' activation (gradient) checkpointing hands the blocks no cache in train mode
        raise ValueError("the relaxed rollout cannot run with the model's activation checkpointing on in train mode (transformers then "
                         "drops the KV cache): call model.activation_checkpointing_disable() and use checkpoint_steps=True "
                         "(rollout_checkpointing: true), which checkpoints each decode step with its cache")
    embed_matrix = input_embedding_matrix(inner)  # (V, H)
    vocab_size = embed_matrix.shape[0]
    chunked = cache == "chunked" and supports_chunked_attention(inner)
    if checkpoint_steps and not chunked:
        raise ValueError("checkpointing the rollout's steps needs the chunked KV cache and a model with an sdpa/flash/flex attention implementation")
    # Buffers sized for prompt + fed-back steps (the last step is never fed back); checkpointed steps read their chunks
    # themselves, so the buffers hold the prompt only.
    kv = ChunkedCache(capacity=0 if checkpoint_steps else prompt_ids.shape[1] + max_new_tokens - 1) if chunked else None
    # Sharded: the gathered E always goes through a deferred alias, whose backward hands the gather's backward (a
    # reduce-scatter) one dense gradient instead of per-step sparse rows; the model's own weights are not deferred,
    # since a deferred gradient would reach a parameter after FSDP's reduce-scatter of the forward that used it.
    deferred = DeferredWeightGrads() if (defer_weight_grads or sharded) and torch.is_grad_enabled() else None
    defer_model_weights = deferred is not None and not sharded
    activations = tanh_gelu_modules(inner)
    output_head = few_row_output_head(inner)  # the LM head's product in the faster layout on CPU (core/few_rows.py)
    # GPT-2 blocks whose decode steps run as one autograd node with a written-out backward (core/gpt2_decode_block.py):
    # found before any forward is replaced, and only where every step records into the deferred weight gradients
    blocks = gpt2_decode_blocks(inner, deferred) if chunked and defer_model_weights and not checkpoint_steps else []

    def context() -> ExitStack:  # a fresh context per forward call (a generator context manager is single-use)
        stack = ExitStack()
        stack.enter_context(tanh_gelu_in_one_kernel(activations))
        if chunked:
            stack.enter_context(chunked_attention(inner, kv))
        if defer_model_weights:
            stack.enter_context(deferred_weight_grads(inner, deferred))
        stack.enter_context(replaced_forwards(output_head))  # an LM head that is not deferred (deferred ones take that layout anyway)
        stack.enter_context(replaced_forwards(blocks))
        return stack

    attention_mask = prompt_mask.long()
    positions = position_ids_from_mask(attention_mask)  # (B, P)
    with context():
        out = model(input_ids=prompt_ids, attention_mask=attention_mask, position_ids=positions, cache=kv, use_cache=True, logits_to_keep=1)
    kv, next_logits = out.cache, out.logits[:, -1]  # (B, V)
    next_position = positions[:, -1:] + 1  # (B, 1)

    step_logits, step_indices, steps = [], [], []
    finished = torch.zeros(prompt_ids.shape[0], dtype=torch.bool, device=prompt_ids.device)
    for step in range(max_new_tokens):
        logits = forbid_eos(next_logits, eos_token_id) if step < min_new_tokens else next_logits  # (B, V), the model's dtype
        if top_k:
            logits, indices = logits.topk(min(top_k, vocab_size), dim=-1)  # (B, k), (B, k)
            step_indices.append(indices)
        # Kept for the KL in the model's dtype (the KL computes in float32); relaxed in at least float32.
        relaxed = relax(logits.to(torch.promote_types(logits.dtype, torch.float32)), step)
        if top_k:
            relaxed = Relaxed(relaxed.values, indices.gather(1, relaxed.hard.unsqueeze(1)).squeeze(1), relaxed.straight_through, indices)
        step_logits.append(logits)
        steps.append(relaxed)
        if eos_token_id is not None:
            finished = finished | (relaxed.hard == eos_token_id)
        if step == max_new_tokens - 1 or all_finished(finished, sharded):
            break
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(attention_mask.shape[0], 1)], dim=1)
        inputs_embeds = embed_step(relaxed, embed_matrix, deferred).unsqueeze(1)  # (B, 1, H)
        if checkpoint_steps:
            next_logits = _checkpointed_step(inner, kv, deferred, activations, inputs_embeds, attention_mask, next_position)
        else:
            with context():
                kv, next_logits = decode_step(model, kv, attention_mask, next_position, inputs_embeds=inputs_embeds)
        next_position = next_position + 1

    if isinstance(kv, ChunkedCache):  # the forward is done: the cache keeps values, not the steps' graph (no cycle)
        for layer in kv.layers:
            layer.drop_gradient_edges()
    tokens = torch.stack([s.hard for s in steps], dim=1)  # (B, T)
    return SoftRollout(
        prompt_ids=prompt_ids,
        prompt_mask=prompt_mask,
        logits=torch.stack(step_logits, dim=1),
        logit_indices=torch.stack(step_indices, dim=1) if top_k else None,
        soft_tokens=SoftTokens(steps, vocab_size),
        tokens=tokens,
        mask=completion_mask(tokens, eos_token_id),
    )


def reference_logits(
    ref_model: torch.nn.Module,
    rollout: SoftRollout,
    min_new_tokens: int = 0,
    eos_token_id: int | None = None,
    recompute: bool | Literal["blocks"] = False,
    context: Callable = nullcontext,
) -> torch.Tensor:
    """The reference's logits at every generated position, on the same soft inputs the policy saw.

    The reference reads [prompt ids; y_1 .. y_{T-1}] embedded with its own E, in two forwards: the prompt once
    without gradient (its keys and values cached, and the logits at its last position, which predict y_1), then
    y_1 .. y_{T-1} in one parallel forward over that cache. The reference's parameters are frozen, but the gradient
    flows into the soft tokens (they are the policy's), so the KL's dependence on the generated prefix is part of
    the objective. Nothing at a prompt position depends on a soft token, so the split changes no value (up to float
    summation order) and no gradient, and saves what one forward over the whole sequence would cost in backward:
    the activations of the P prompt positions and their gradients (P / (P + T) of the reference's backward).
    The same EOS processing as the rollout is applied, so both distributions are comparable. recompute: keep only
    the input embeddings and the logits for backward and run the completion's forward again there (exact; one more
    forward over the T - 1 completion positions). recompute="blocks": the same, a transformer block at a time
    (`blocks_recomputed`), for a frozen reference sharded by FSDP2, whose units gather in a recomputation inside the
    backward and stay gathered until their gradient arrives: recomputed whole, the whole reference would be gathered at
    once; block by block, one block is. context: a factory of the context that makes `ref_model` the reference (a LoRA
    policy's `disable_adapter`), entered by every forward and by the whole recomputation alike (not by a block's: a
    block's recomputation is only for a frozen copy, which needs no context).
    Returns (B, T, V).
    """
    num_generated, prompt_length = rollout.tokens.shape[1], rollout.prompt_ids.shape[1]
    # Positions after a hard EOS are masked out of every statistic, but they stay visible here so the
    # reference conditions on exactly the prefix the policy conditioned on (the rollout did not mask them).
    attention_mask = torch.cat([rollout.prompt_mask.long(), rollout.prompt_mask.new_ones(rollout.prompt_mask.shape[0], num_generated - 1).long()], dim=1)
    position_ids = position_ids_from_mask(attention_mask)
    prompt_cache = PromptCache()
    with torch.no_grad(), context(), replaced_forwards(few_row_output_head(ref_model)):  # B rows: the decode step's layout
        out = ref_model(input_ids=rollout.prompt_ids, attention_mask=attention_mask[:, :prompt_length], position_ids=position_ids[:, :prompt_length],
                        cache=prompt_cache, use_cache=True, logits_to_keep=1)
    first = out.logits[:, -1:]  # (B, 1, V): predicts y_1 from the prompt alone
    prompt_cache.read_only = True  # no grad, never extended: constants of the objective, the same in every recomputation

    def forward(inputs_embeds):
        with context():
            return ref_model(inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids[:, prompt_length:],
                             cache=prompt_cache, use_cache=True).logits  # (B, T-1, V)

    if num_generated > 1:
        # E whole (a copy when the reference is a sharded LoRA policy: core/sharding.py), the parameter otherwise
        inputs_embeds = rollout.soft_tokens.drop_last().embed(input_embedding_matrix(ref_model))  # (B, T-1, H)
        if recompute == "blocks":
            with blocks_recomputed(ref_model):
                rest = forward(inputs_embeds)
        else:
            rest = checkpoint(forward, inputs_embeds, use_reentrant=False) if recompute else forward(inputs_embeds)
        logits = torch.cat([first.to(rest.dtype), rest], dim=1)
    else:
        logits = first
    return forbid_eos_before(logits, min_new_tokens, eos_token_id)


class PromptCache(DynamicCache):
    """A DynamicCache that, once `read_only`, a forward reads but does not extend: `update` then returns the cached
    (prompt) keys and values followed by the new ones, as DynamicCache's does, and leaves the layer as it was. The
    reference's forward over the soft tokens runs again in backward when it is recomputed (whole, or a block at a
    time), and each run must see the same P cached positions; DynamicCache's `update` would append the completion's
    keys and values at every run (a block's recomputation would attend over P + 2 (T - 1) positions)."""

    read_only = False  # filled by the prompt's forward first

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        if not self.read_only:
            return super().update(key_states, value_states, layer_idx, *args, **kwargs)
        layer = self.layers[layer_idx]
        state = dict(vars(layer))  # the layer's tensors and counters (a sliding-window layer's too), put back below
        try:
            return layer.update(key_states, value_states, *args, **kwargs)
        finally:
            vars(layer).update(state)


def transformer_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules of `model` whose class (or a base class) is named in the model's `_no_split_modules`: its transformer
    blocks, the unit Accelerate's FSDP2 wrap policy (`transformer_based_wrap`) shards. [] for a model naming none."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    return [m for m in model.modules() if names & {c.__name__ for c in type(m).__mro__}]


@contextmanager
def blocks_recomputed(model: torch.nn.Module):
    """Within: each transformer block of `model` (`transformer_blocks`) runs its forward under a non-reentrant
    checkpoint of its own, so it keeps only its inputs for backward and recomputes its forward there when its gradient
    arrives: after FSDP2's pre-backward hook has gathered that block, which its post-backward hook reshards before the
    next block is gathered. The recomputation runs after the context has exited (the checkpoint keeps the block's own
    forward). For a frozen model: no parameter gradient, so the blocks' inputs' gradients are all the recomputation
    serves. Exact (the same forward twice, in eval mode: no dropout)."""
    blocks = transformer_blocks(model)
    if not blocks:
        raise ValueError(f"{type(model).__name__} names no transformer block class (_no_split_modules) to recompute block by block")
    previous = [vars(block).get("forward") for block in blocks]  # an instance's own forward, if one was set: put back on exit
    for block in blocks:
        block.forward = partial(checkpoint, block.forward, use_reentrant=False)  # an instance attribute over the class's forward
    try:
        yield model
    finally:
        for block, forward in zip(blocks, previous):
            if forward is None:
                del block.forward
            else:
                block.forward = forward


def forbid_eos_before(logits: torch.Tensor, count: int, eos_token_id: int | None) -> torch.Tensor:
    """`forbid_eos` at the first `count` positions of logits (B, T, V): the same values (finfo.min / 2 written at
    EOS), as one out-of-place `index_put` whose backward hands the gradient through unchanged (`_WrittenThrough`),
    where autograd's would zero it at the written entries: the same gradient for the exact KL, since a banned entry's
    probability is exactly 0 in both distributions and its gradient there, q - p, is then 0. One (B, T, V) copy forward
    and none backward, against a clone, a write and a concatenation forward and two copies backward (gpt2-small's
    vocabulary, batch 8, T = 24, 23 banned positions, 2 CPU threads: 18 against 72 ms forward + backward)."""
    count = min(count, logits.shape[1])
    if eos_token_id is None or count <= 0:
        return logits
    rows = torch.arange(logits.shape[0], device=logits.device).unsqueeze(1)  # (B, 1)
    positions = torch.arange(count, device=logits.device).unsqueeze(0)  # (1, count)
    eos = torch.full((1, 1), eos_token_id, dtype=torch.long, device=logits.device)
    return _WrittenThrough.apply(logits, (rows, positions, eos), torch.finfo(logits.dtype).min / 2)


class _WrittenThrough(torch.autograd.Function):
    """tensor.index_put(indices, value) whose backward passes the gradient through whole (see `forbid_eos_before`)."""

    @staticmethod
    def forward(ctx, tensor, indices, value):
        return tensor.index_put(indices, torch.tensor(value, dtype=tensor.dtype, device=tensor.device))

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None
