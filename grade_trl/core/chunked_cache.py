"""A KV cache for differentiable decoding whose memory grows linearly, not quadratically, with the length.

Why: decoding with transformers' `DynamicCache` concatenates each step's keys and values onto the cache, a
new (B, heads, t, d) tensor per layer and step. Attention's backward needs the keys and values it attended
over, so autograd keeps every step's full copy alive: sum_t t = O(T^2) saved memory over a T-token
differentiable rollout (GRADE), about 1.6 GB for gpt2-small at batch 8 and 32 + 48 tokens. Sampling under
no_grad never sees this: nothing is saved there.

How: `ChunkedCache` keeps each forward's keys and values as a separate chunk (the cache itself, nothing
copied), and attention becomes `_ChunkedAttention`, an autograd Function that saves the query and references
to the chunks and, in backward, concatenates them again and recomputes the attention to differentiate it.
Same values and gradients, O(T) memory; the price is one more attention forward per step in backward, with a
single query row at decode time (cheap next to the MLP and the LM head). The concatenation that the model's
own code sees (the full keys returned by `update`) is a temporary that nothing keeps.

Few operations per step: if each step's attention handed autograd one gradient per cached chunk, the backward
would run sum_t t = O(T^2) gradient edges per layer (a slice and an add each: on a GPU, where GRADE's decode
loop is bound by the count of operations, not by arithmetic, that is most of the step). Instead each step's
backward adds its gradient for all the keys and values it read into one per-layer buffer (one add), and hands
autograd only the gradient of its own new chunk, read from that buffer: complete, because every later step,
which read this chunk too, is downstream of this step in the rollout's graph and so has run its backward
first. The order is checked, not assumed: a backward that reaches a step before a later one raises.

No copying per step: concatenating t single-position chunks at every step and layer, in forward and again in
backward, is O(T^2) copies and O(T) allocations per step (on 2 CPU cores, 56 chunks of gpt2-small's shape: 1.3 ms
against 0.07 ms for the attention itself, and 7.7 ms against 0.24 ms at 300 chunks). So each layer also
writes every chunk's rows once into a contiguous buffer (B, h, capacity, d), allocated at the prompt + new tokens that
`soft_rollout` expects (grown by doubling past that), and attention reads a
view of its first rows: the same values, bit for bit. Rows once written never change, so backward reads the same view.
Memory: one more copy of the keys and values (2 x layers x B x h x t x d elements; 47 MB for gpt2-small at batch 8
and 32 + 48 tokens, against a step peak of about 1 GB), outside autograd's saved tensors (the chunks are what it saves).

Few operations per step, again: a decode step's attention (one query position) under transformers' `sdpa` is
differentiated by its written-out gradient (`_sdpa_decode_grads`: the scores and softmax recomputed, then four
products and a softmax backward), not by running sdpa again under autograd and differentiating that (a nested
`autograd.grad` per step and layer: about 130 aten calls, against about 30). The forward is sdpa itself, unchanged;
other implementations (flash, flex), the prompt's forward (several query positions, causal), dropout and position
biases keep the recomputation.

Which models: any whose attention layers call `cache.update(...)` and then an attention function of
transformers' `AttentionInterface` (GPT-2, Llama, Qwen2, Mistral, ... in transformers 5) and that run with a
registered implementation (sdpa, flash, flex). `supports_chunked_attention` tells; `soft_rollout` falls back
to the DynamicCache otherwise. The underlying attention function is called unchanged, forward and backward,
so masks, scaling, GQA and sliding windows are the model's own.

Legend: B batch, h heads, t cached positions, q new positions, d head size.
"""

from __future__ import annotations

import contextvars
from contextlib import contextmanager
from functools import partial
from typing import NamedTuple

import torch
from transformers.cache_utils import Cache, CacheLayerMixin
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

_ACTIVE_CACHE: contextvars.ContextVar[ChunkedCache | None] = contextvars.ContextVar("grade_trl_chunked_cache", default=None)
PREFIX = "grade_chunked:"  # registered attention implementations: PREFIX + the model's own implementation


class ChunkedLayer(CacheLayerMixin):
    """One layer's cache as a list of chunks (B, h, q, d), one per forward call."""

    is_sliding = False
    is_croppable = False

    def __init__(self, capacity: int = 0, **kwargs):
        super().__init__(**kwargs)
        self.capacity = capacity  # the positions expected in all (0: unknown): the buffers' first size, so no regrowth
        self.key_chunks: list[torch.Tensor] = []
        self.value_chunks: list[torch.Tensor] = []
        self.chunk_ends: list[int] = []  # positions up to and including each chunk, kept by `append` (`positions`)
        # Every chunk's rows once more, contiguous along the positions (B, h, capacity, d), written once as each chunk
        # arrives (no gradient: autograd's edges go to the chunks): what attention reads, as a view of the first rows,
        # instead of concatenating t chunks at every step (O(t) copies and allocations per layer and step).
        self.key_buffer: torch.Tensor | None = None
        self.value_buffer: torch.Tensor | None = None
        self.buffered = 0  # rows of the buffers written; 0 with no buffer (chunks of mixed dtype or shape: concatenated)
        # _AccumulatedAttention's backward state: the gradient of every cached position so far (None between
        # backward passes), the chunk whose backward is due next, and which backward pass this is. Off for a
        # checkpointed step's throwaway layer (soft_rollout._checkpointed_step), which exists for one step only:
        # explicit edges there.
        self.accumulate_grads = True
        self.grad_keys: torch.Tensor | None = None
        self.grad_values: torch.Tensor | None = None
        self.next_backward: int | None = None
        self.backward_pass: int | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device, self.is_initialized = key_states.device, True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.append(key_states, value_states)
        if self.reads_chunks():  # `_chunked_attention` will read the chunks: the model only passes these on to it
            return key_states, value_states
        # The full keys and values for any other reader: plain attention. With gradient on, a concatenation (a
        # temporary nothing keeps): it has the chunks' gradient edges, and autograd may save it, which a view of the
        # buffers, written in place by the next step, would not allow. Without gradient, views of the buffers.
        if torch.is_grad_enabled():
            return torch.cat(self.key_chunks, dim=-2), torch.cat(self.value_chunks, dim=-2)
        return self.keys_and_values(len(self.key_chunks))

    def append(self, key_states: torch.Tensor, value_states: torch.Tensor, buffered: bool = True) -> None:
        """Add one chunk (B, h, q, d) of keys and values, and copy its rows into the buffers, grown by doubling
        (amortised O(1) copies per row). buffered=False (checkpointed steps, which read the chunks themselves) gives
        the buffers up: concatenation from then on. Chunks set otherwise (a checkpointed step's throwaway layer) get
        no buffers either."""
        self.key_chunks.append(key_states)
        self.value_chunks.append(value_states)
        if len(self.chunk_ends) == len(self.key_chunks) - 1:
            self.chunk_ends.append((self.chunk_ends[-1] if self.chunk_ends else 0) + key_states.shape[-2])
        if not buffered:
            self.key_buffer = self.value_buffer = None
            self.buffered = 0
        if self.key_buffer is None and len(self.key_chunks) > 1:
            return  # no buffers (given up, or chunks set directly): concatenation
        length = self.buffered + key_states.shape[-2]
        if self.key_buffer is not None and not all(
            chunk.dtype == buffer.dtype and chunk.device == buffer.device and chunk.shape[:-2] == buffer.shape[:-2] and chunk.shape[-1] == buffer.shape[-1]
            for chunk, buffer in ((key_states, self.key_buffer), (value_states, self.value_buffer))
        ):  # a chunk the buffers cannot hold (another dtype, say): give them up
            self.key_buffer = self.value_buffer = None
            self.buffered = 0
            return
        if self.key_buffer is None or length > self.key_buffer.shape[-2]:
            capacity = max(length, 2 * self.key_buffer.shape[-2]) if self.key_buffer is not None else max(length, self.capacity)
            grown = []
            for chunk, buffer in ((key_states, self.key_buffer), (value_states, self.value_buffer)):
                fresh = chunk.new_empty(*chunk.shape[:-2], capacity, chunk.shape[-1])
                if buffer is not None:
                    fresh[..., : self.buffered, :].copy_(buffer[..., : self.buffered, :])
                grown.append(fresh)
            self.key_buffer, self.value_buffer = grown
        with torch.no_grad():
            self.key_buffer[..., self.buffered : length, :].copy_(key_states)
            self.value_buffer[..., self.buffered : length, :].copy_(value_states)
        self.buffered = length

    def keys_and_values(self, chunks: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The keys and values of the first `chunks` chunks, (B, h, t, d) each, for readers that need no gradient edges
        to the chunks (`_AccumulatedAttention`, whose edges are its own): views of the buffers' first rows (rows once
        written never change), or the chunks' concatenation where there are no buffers."""
        if self.key_buffer is not None:
            length = self.positions(chunks)
            if length <= self.buffered:
                return self.key_buffer[..., :length, :], self.value_buffer[..., :length, :]
        return torch.cat(self.key_chunks[:chunks], dim=-2), torch.cat(self.value_chunks[:chunks], dim=-2)

    def drop_gradient_edges(self) -> None:
        """Once the rollout's forward is done: the chunks as plain values (the same storage, no grad_fn). Their edges
        were taken at each step (by the attention's Functions, a checkpointed step's inputs, a concatenation); kept
        here, a chunk's grad_fn leads through the step's graph to the attention nodes whose context holds this layer,
        a cycle through autograd's graph that Python's collector did not free: every step's cache, deferred-gradient
        store and graph stayed alive (`tests/test_soft_rollout.py`). Backward reads only the chunks' values and shapes."""
        self.key_chunks = [chunk.detach() for chunk in self.key_chunks]
        self.value_chunks = [chunk.detach() for chunk in self.value_chunks]

    def reads_chunks(self) -> bool:
        cache = _ACTIVE_CACHE.get()
        return cache is not None and torch.is_grad_enabled() and any(layer is self for layer in cache.layers)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def positions(self, chunks: int) -> int:
        """The positions in the first `chunks` chunks: the running sum `append` keeps (O(1); summing the chunks' lengths
        was O(t) per layer and decode step, read forward and backward), or the sum where the chunks were set directly (a
        checkpointed step's throwaway layer)."""
        if len(self.chunk_ends) == len(self.key_chunks):
            return self.chunk_ends[chunks - 1] if chunks > 0 else 0
        return sum(chunk.shape[-2] for chunk in self.key_chunks[:chunks])

    def get_seq_length(self) -> int:
        return self.positions(len(self.key_chunks))

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.key_chunks, self.value_chunks, self.chunk_ends = [], [], []
        self.key_buffer = self.value_buffer = None
        self.buffered = 0
        self.grad_keys = self.grad_values = self.next_backward = self.backward_pass = None


class ChunkedCache(Cache):
    """A `transformers.Cache` of `ChunkedLayer`s (one per attention layer, created on first use). capacity: the
    positions it will hold in all, when known (prompt + new tokens): the layers' buffers are allocated at that size."""

    def __init__(self, capacity: int = 0):
        super().__init__(layer_class_to_replicate=partial(ChunkedLayer, capacity=capacity))


def _attend(ctx, call, query, keys, values) -> torch.Tensor:
    """The forward's attention, remembering for backward what `_attend_again` needs (the call, the autocast state)."""
    output, _ = call(query, keys, values)
    ctx.call, ctx.device_type = call, query.device.type
    ctx.autocast = torch.is_autocast_enabled(ctx.device_type), torch.get_autocast_dtype(ctx.device_type)
    return output


def _attend_again(ctx, query, keys, values) -> torch.Tensor:
    """The attention of `_attend` recomputed in backward, with gradient and under the forward's autocast state."""
    enabled, dtype = ctx.autocast
    with torch.enable_grad(), torch.autocast(ctx.device_type, dtype=dtype, enabled=enabled):
        output, _ = ctx.call(query, keys, values)
    return output


class SdpaDecode(NamedTuple):
    """What `_sdpa_decode_grads` needs of one sdpa call with a single query position: its mask (bool: True attends;
    float: added to the scores; None) and its scale (None: 1 / sqrt(head size), sdpa's default)."""

    attention_mask: torch.Tensor | None
    scaling: float | None


def sdpa_decode(base, query: torch.Tensor, attention_mask: torch.Tensor | None, kwargs: dict) -> SdpaDecode | None:
    """The written-out gradient applies: transformers' `sdpa_attention_forward` with one query position (never causal
    then), no dropout and no position bias, whose other keyword arguments it ignores. None otherwise."""
    if base is not sdpa_attention_forward or query.shape[2] != 1:
        return None
    if kwargs.get("dropout") or kwargs.get("position_bias") is not None or kwargs.get("softcap") is not None:
        return None
    return SdpaDecode(attention_mask, kwargs.get("scaling"))


def _sdpa_decode_grads(decode: SdpaDecode, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, grad_output: torch.Tensor):
    """The gradients of `sdpa_attention_forward(query, keys, values)` for one query position, written out.

    query (B, h, 1, d); keys, values (B, h_kv, t, d) with h = g * h_kv (grouped-query attention: query head i reads
    key head i // g); grad_output (B, 1, h, d), the gradient of sdpa's output in transformers' layout. With
    s = scale * q k^T (+ mask), p = softmax(s), o = p v:
        dv = p^T do,   dp = do v^T,   ds = p * (dp - sum(p * dp)),   dq = scale * ds k,   dk = scale * ds^T q.
    Computed in at least float32 (sdpa's kernels accumulate in float32 too). Returns (dq, dk, dv) in the inputs' dtypes.
    Why: differentiating a recomputed sdpa under autograd costs a nested `autograd.grad` per step and layer.
    """
    batch, heads, _, size = query.shape
    kv_heads, length = keys.shape[1], keys.shape[2]
    groups, rows = heads // kv_heads, batch * keys.shape[1]
    work = torch.promote_types(query.dtype, torch.float32)
    scale = decode.scaling if decode.scaling is not None else size**-0.5
    unused = query.new_empty((), dtype=work)  # baddbmm's input with beta=0: ignored; alpha=scale folds the scale into the product
    # B * h_kv batched products; the g query heads that read one key head are its rows (views, no copies)
    q = _as(query, work).reshape(rows, groups, size)
    k, v = _as(keys, work).reshape(rows, length, size), _as(values, work).reshape(rows, length, size)
    grad_out = _as(grad_output, work).transpose(1, 2).reshape(rows, groups, size)
    scores = torch.baddbmm(unused, q, k.transpose(1, 2), beta=0, alpha=scale).view(batch, kv_heads, groups, length)
    mask = decode.attention_mask
    if mask is not None:
        if mask.shape[1] != 1:  # a mask per query head: grouped as the query
            mask = mask.reshape(mask.shape[0], kv_heads, groups, length)
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask.to(work)
    probs = scores.softmax(-1).view(rows, groups, length)
    grad_values = torch.bmm(probs.transpose(1, 2), grad_out)  # (B h_kv, t, d)
    grad_scores = torch._softmax_backward_data(torch.bmm(grad_out, v.transpose(1, 2)), probs, -1, work)  # p * (dp - sum(p * dp)), one kernel
    grad_query = torch.baddbmm(unused, grad_scores, k, beta=0, alpha=scale).view(batch, heads, 1, size)
    grad_keys = torch.baddbmm(unused, grad_scores.transpose(1, 2), q, beta=0, alpha=scale).view(batch, kv_heads, length, size)
    grad_values = grad_values.view(batch, kv_heads, length, size)
    return _as(grad_query, query.dtype), _as(grad_keys, keys.dtype), _as(grad_values, values.dtype)


def _as(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`tensor.to(dtype)` without the call when it is already that dtype (a no-op `to` still costs its dispatch, per
    layer and decode step)."""
    return tensor if tensor.dtype == dtype else tensor.to(dtype)


class _ChunkedAttention(torch.autograd.Function):
    """attention(query, cat(key chunks), cat(value chunks)) that saves the chunks, not their concatenation."""

    @staticmethod
    def forward(ctx, call, query, *chunks):
        ctx.n = len(chunks) // 2
        output = _attend(ctx, call, query, torch.cat(chunks[: ctx.n], dim=-2), torch.cat(chunks[ctx.n :], dim=-2))
        ctx.save_for_backward(query, *chunks)
        return output

    @staticmethod
    def backward(ctx, grad_output):
        query, *chunks = ctx.saved_tensors
        inputs = [t.detach().requires_grad_(needs) for t, needs in zip([query, *chunks], ctx.needs_input_grad[1:])]
        q, rest = inputs[0], inputs[1:]
        with torch.enable_grad():  # the concatenation is differentiated too: one gradient per chunk
            keys, values = torch.cat(rest[: ctx.n], dim=-2), torch.cat(rest[ctx.n :], dim=-2)
        output = _attend_again(ctx, q, keys, values)
        wanted = [t for t in inputs if t.requires_grad]
        grads = iter(torch.autograd.grad(output, wanted, grad_output, allow_unused=True)) if wanted else iter(())
        return (None, *[next(grads) if t.requires_grad else None for t in inputs])


class _AccumulatedAttention(torch.autograd.Function):
    """attention(query, cat(key chunks), cat(value chunks)) with autograd edges to the query and this step's own new
    chunk only; the gradient of the earlier chunks goes through the layer's buffer (module docstring)."""

    @staticmethod
    def forward(ctx, call, decode, layer, query, key, value):
        ctx.layer, ctx.index = layer, len(layer.key_chunks) - 1  # `update` has appended this step's chunk (`key`, `value`) already
        ctx.decode = decode  # an SdpaDecode: the backward writes the gradient out instead of recomputing the attention
        output = _attend(ctx, call, query, *layer.keys_and_values(ctx.index + 1))
        # Saved: the query and this step's own chunk. The earlier chunks were saved by their own steps (so the
        # saved-bytes account counts each once) and are read back from the layer in backward: O(1) per step, not O(t).
        ctx.save_for_backward(query, key, value)
        return output

    @staticmethod
    def backward(ctx, grad_output):
        query, _, _ = ctx.saved_tensors  # unpacked, so a freed graph (backward twice) raises as autograd does
        layer, index = ctx.layer, ctx.index
        begin_step_backward(layer, index)
        keys, values = layer.keys_and_values(index + 1)
        if ctx.decode is not None:
            grad_query, grad_keys, grad_values = _sdpa_decode_grads(ctx.decode, query, keys, values, grad_output)
            grads = (grad_keys, grad_values, grad_query if ctx.needs_input_grad[3] else None)
        else:
            q = query.detach().requires_grad_(ctx.needs_input_grad[3])
            keys, values = keys.detach().requires_grad_(True), values.detach().requires_grad_(True)
            output = _attend_again(ctx, q, keys, values)
            wanted = [keys, values] + ([q] if q.requires_grad else [])
            grads = torch.autograd.grad(output, wanted, grad_output, allow_unused=True)
        grad_key, grad_value = finish_step_backward(layer, index, keys.shape[-2], grads[0], grads[1])
        return None, None, None, (grads[2] if ctx.needs_input_grad[3] else None), grad_key, grad_value


def begin_step_backward(layer: ChunkedLayer, index: int) -> None:
    """Before chunk `index`'s step differentiates its attention: a new backward pass starts a fresh gradient buffer,
    and the steps must come last to first (module docstring)."""
    backward_pass = torch._C._current_graph_task_id()  # autograd's id of this backward call (as torch's checkpoint uses)
    if backward_pass != layer.backward_pass:  # a new pass: a fresh buffer (one that stopped early, say autograd.grad
        layer.grad_keys = layer.grad_values = None  # to an inner tensor, leaves a stale one), starting at this step
        layer.backward_pass, layer.next_backward = backward_pass, index
    if index != layer.next_backward:
        raise RuntimeError(f"chunked attention: backward reached step {index} while step {layer.next_backward} had not run "
                           "(the later steps must be downstream of the earlier ones); use rollout_cache: dynamic")


def finish_step_backward(layer: ChunkedLayer, index: int, length: int, grad_keys: torch.Tensor | None, grad_values: torch.Tensor | None):
    """Add the gradient of step `index`'s attention for all the `length` keys and values it read (B, h, length, d) into
    the layer's buffer, and return the gradient of the step's own chunk, which is complete now (only earlier steps
    remain, and they read positions before it), in the chunk's dtype."""
    key_chunk, value_chunk = layer.key_chunks[index], layer.value_chunks[index]
    width = key_chunk.shape[-2]
    if layer.grad_keys is None:  # the last step reads every position: the buffers' size
        layer.grad_keys = key_chunk.new_zeros(*key_chunk.shape[:-2], length, key_chunk.shape[-1])
        layer.grad_values = value_chunk.new_zeros(*value_chunk.shape[:-2], length, value_chunk.shape[-1])
    for buffer, grad in zip((layer.grad_keys, layer.grad_values), (grad_keys, grad_values)):
        if grad is not None:
            buffer[..., :length, :].add_(_as(grad, buffer.dtype))
    grad_key = _as(layer.grad_keys[..., length - width : length, :], key_chunk.dtype)
    grad_value = _as(layer.grad_values[..., length - width : length, :], value_chunk.dtype)
    layer.next_backward = index - 1
    if index == 0:  # the pass is over: free the buffers
        layer.grad_keys = layer.grad_values = layer.next_backward = layer.backward_pass = None
    return grad_key, grad_value


def _chunked_attention(module, query, key, value, attention_mask, **kwargs):
    """The AttentionInterface function registered as PREFIX + base: the model's own attention over the chunks."""
    base = ALL_ATTENTION_FUNCTIONS[module.config._attn_implementation.removeprefix(PREFIX)]
    cache = _ACTIVE_CACHE.get()
    if cache is None or not torch.is_grad_enabled():  # nothing to save: plain attention over the full keys
        return base(module, query, key, value, attention_mask, **kwargs)
    layer = cache.layers[module.layer_idx]

    def call(q, k, v):
        return base(module, q, k, v, attention_mask, **kwargs)

    if layer.accumulate_grads:
        return _AccumulatedAttention.apply(call, sdpa_decode(base, query, attention_mask, kwargs), layer, query, key, value), None
    return _ChunkedAttention.apply(call, query, *layer.key_chunks, *layer.value_chunks), None


def _register(base: str) -> str:
    name = PREFIX + base
    if name not in ALL_ATTENTION_FUNCTIONS:
        ALL_ATTENTION_FUNCTIONS.register(name, _chunked_attention)
        ALL_MASK_ATTENTION_FUNCTIONS.register(name, ALL_MASK_ATTENTION_FUNCTIONS[base])
    return name


def supports_chunked_attention(model: torch.nn.Module) -> bool:
    """Whether `model` runs a registered attention implementation (sdpa, flash, flex) that the chunked cache can wrap."""
    implementation = getattr(getattr(model, "config", None), "_attn_implementation", None)
    base = implementation.removeprefix(PREFIX) if isinstance(implementation, str) else None
    return base is not None and base in ALL_ATTENTION_FUNCTIONS and base in ALL_MASK_ATTENTION_FUNCTIONS


@contextmanager
def chunked_attention(model: torch.nn.Module, cache: ChunkedCache):
    """Within the block, `model`'s attention layers read `cache`'s chunks and save no concatenated keys or values."""
    config = model.config
    base = config._attn_implementation
    token = _ACTIVE_CACHE.set(cache)
    config._attn_implementation = _register(base.removeprefix(PREFIX))
    try:
        yield cache
    finally:
        config._attn_implementation = base
        _ACTIVE_CACHE.reset(token)
