"""A GPT-2 block's decode step as one autograd node, with its backward written out.

Why: on a GPU, GRADE's relaxed rollout is bound by the count of operations, not by arithmetic (README, GRADE's
cost: the same step time at batch 16 and 64 on an H200), and most of its operations are in the backward through
the T decode steps. Under autograd a GPT-2 block's decode step is about 28 autograd nodes (two layer norms, four
projections, the activation, the attention, two residual additions, and the views and transposes that split the
heads), whose backward makes about 240 aten calls (40 of them launch a kernel; the rest is shape bookkeeping), each
with its dispatch (and Python, for the rollout's own Functions), at every layer and step: 24 x 48 times a step for
gpt2-medium.

What: `gpt2_decode_blocks(model, store)` gives, for every `GPT2Block` of a plain GPT-2 (its four projections
GPT-2's `Conv1D` with trainable weights and biases, trainable layer norms, no cross-attention, no dropout, a GELU
activation), a forward that runs a decode step (one new position per row, under the rollout's chunked cache and
deferred weight gradients, the sdpa attention implementation, no autocast) as `_GPT2DecodeStep`: the block's own
operations in the same order (forward values bit for bit the same as the module's), and one backward that writes
the chain rule out:

    h = LN1(x);  [q k v] = h W_attn + b_attn;  o = sdpa(q, K, V);  x1 = x + o W_proj + b_proj
    c = LN2(x1); f = c W_fc + b_fc;  g = gelu(f);  x2 = x1 + g W_out + b_out

    dg = dx2 W_out^T;  df = gelu'(f) dg;  dc = df W_fc^T;  dx1 = dx2 + LN2'(dc)
    do = dx1 W_proj^T;  (dq, dK, dV) = sdpa'(do);  dh = [dq dk dv] W_attn^T;  dx = dx1 + LN1'(dh)

Every parameter's gradient is recorded for `core/deferred_grads.py` and computed once at the end of backward: the
projections' weights and biases as the per-module path records them, and the layer norms' weights and biases too
(the sum over all B x T uses of the output gradient times the normalised input, and of the output gradient), which
per module would be two reductions per norm and four accumulations into `.grad` per layer and step (an autograd
Function of their own for the norms cost more Python than that saved: `deferred_grads`' docstring). The attention's
keys and values are the cache's (`chunked_cache`: this step's own rows get their gradient from the later steps through
the layer's gradient buffer). In all, one node and 20 launching aten calls per layer and step in backward,
against about 28 nodes and 40 calls per module. Exact up to float summation order: `tests/test_soft_rollout.py`
compares the rollout's tokens, loss and every parameter's gradient with the per-module path's in float64.

Measured (`benchmarks/attention_grad_buffer.py --compare decode_block`, docs/grade_cost_log.md): on the per-operation-bound proxy (24
layers, 64 wide, batch 4, T = 48) one GRADE-STE forward + backward took 0.81x the per-module path's time; on the
gpt2-small shape on CPU, bound by arithmetic, 1.00x in one process (GRADE-STE's whole step in separate processes with
the one-node step on and off: 0.84-0.88x, for reasons not found; the same log). Memory: the norms' records keep each step's two norm inputs and
their output gradients until the end of backward (4 B H numbers per layer and step, next to the projections' 16 B H);
the step's peak did not move (630 / 1062 MiB at T = 24 / 48 on gpt2-small, batch 8).

Every other call (the prompt's forward, several positions, autocast, a LoRA or quantised projection, another
attention implementation, a block whose forward something else replaced) runs the block's own forward.

Legend: B batch, H hidden, n heads, d head size (H = n d), t cached positions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable
from torch import nn
from torch.nn.modules import module as module_hooks
from transformers.activations import FastGELUActivation, GELUActivation, NewGELUActivation
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.gpt2.modeling_gpt2 import GPT2MLP, GPT2Attention, GPT2Block
from transformers.pytorch_utils import Conv1D

try:  # transformers' output recorders (`output_attentions=True`, ...): forward hooks that stay on the modules once installed
    from transformers.utils.output_capturing import _active_collector
except ImportError:  # another transformers: such hooks count as hooks
    _active_collector = None
_CAPTURING_HOOK = "install_output_capuring_hook.<locals>.output_capturing_hook"  # (sic) transformers' spelling

from .chunked_cache import PREFIX, _ACTIVE_CACHE, SdpaDecode, _sdpa_decode_grads, begin_step_backward, finish_step_backward
from .deferred_grads import DeferredWeightGrads

GELU_APPROXIMATION = {NewGELUActivation: "tanh", FastGELUActivation: "tanh", GELUActivation: "none"}
"""transformers' GPT-2 activations the step computes, by the approximation of torch's `F.gelu` that computes them (the
tanh ones as the rollout runs them anyway: `soft_rollout.tanh_gelu_in_one_kernel`)."""


_OWN_FORWARDS = {cls: cls.forward for cls in (GPT2Block, GPT2Attention, GPT2MLP, Conv1D, nn.LayerNorm, nn.Dropout, nn.Identity,
                                               NewGELUActivation, FastGELUActivation, GELUActivation)}
"""The classes a plain block is made of, with the `forward` each had when this module was imported (a class patched
since is not plain)."""


def _plain(block: nn.Module) -> bool:
    """A GPT-2 block whose every part the written-out step computes exactly as the module would: the classes and their
    forwards transformers and torch define (no subclass, no patched class, no forward replaced on an instance), trainable
    projections and norms, a GELU, no dropout, no cross-attention, and no hook on any module inside (the block's own
    hooks are kept: its `__call__` runs them)."""
    if type(block) is not GPT2Block or type(getattr(block, "attn", None)) is not GPT2Attention or type(getattr(block, "mlp", None)) is not GPT2MLP:
        return False
    attn, mlp = block.attn, block.mlp
    inner = [m for m in block.modules() if m is not block]
    if not all(type(m) in _OWN_FORWARDS and type(m).forward is _OWN_FORWARDS[type(m)] and "forward" not in vars(m) for m in inner):
        return False
    projections = (attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj)
    return (
        GPT2Block.forward is _OWN_FORWARDS[GPT2Block] and "forward" not in vars(block)
        and not hasattr(block, "crossattention") and not attn.is_cross_attention
        and all(type(p) is Conv1D and p.weight.requires_grad and p.bias is not None and p.bias.requires_grad for p in projections)
        and all(type(n) is nn.LayerNorm and n.elementwise_affine and n.bias is not None and n.weight.requires_grad and n.bias.requires_grad
                for n in (block.ln_1, block.ln_2))
        and (type(mlp.act) in (NewGELUActivation, FastGELUActivation) or (type(mlp.act) is GELUActivation and mlp.act.act is F.gelu))
        and all(type(d) is nn.Identity or d.p == 0 for d in (attn.attn_dropout, attn.resid_dropout, mlp.dropout))
        and not any(_hooked(m) for m in inner)
        and not (module_hooks._global_forward_hooks or module_hooks._global_forward_pre_hooks or module_hooks._global_backward_hooks
                 or module_hooks._global_backward_pre_hooks)
    )


def _hooked(module: nn.Module) -> bool:
    """Whether `module` has hooks of its own, which a step that never calls it would skip. transformers' output
    recorders are not counted: installed for good by the first `output_attentions=True` call, they do nothing unless a
    call asks for what they record, and such a call runs per module (`_recording_inside`)."""
    forward_hooks = [hook for hook in module._forward_hooks.values()
                     if _active_collector is None or getattr(hook, "__qualname__", None) != _CAPTURING_HOOK]
    return bool(forward_hooks or module._forward_pre_hooks or module._backward_hooks or module._backward_pre_hooks)


def _recording_inside() -> bool:
    """Whether the running model call asks transformers' recorders for an output from inside a block (the attention
    weights, say; the hidden states are the blocks' own outputs, which their `__call__` hooks record)."""
    collected = _active_collector.get() if _active_collector is not None else None
    return bool(collected) and any(key != "hidden_states" and not key.startswith("_") for key in collected)


@dataclass
class _Step:
    """What one block's decode step needs besides its tensors."""

    block: nn.Module
    layer: object  # the chunked cache's ChunkedLayer of this block
    store: DeferredWeightGrads
    keys: tuple  # id of the weight and bias of ln_1, ln_2, c_attn, attn.c_proj, c_fc, mlp.c_proj, as called: where their records go
    attention_mask: torch.Tensor | None
    kwargs: dict  # the attention call's other keyword arguments, as the model passes them
    approximate: str


class _GPT2DecodeStep(torch.autograd.Function):
    """x (B, 1, H) -> the block's output (B, 1, H) for one decode step (module docstring)."""

    @staticmethod
    def forward(ctx, x, ln1_w, ln1_b, ln2_w, ln2_b, w_attn, b_attn, w_proj, b_proj, w_fc, b_fc, w_out, b_out, step: _Step):
        block, attn = step.block, step.block.attn
        batch, hidden = x.shape[0], x.shape[-1]
        heads, size = attn.num_heads, attn.head_dim
        x = x.reshape(batch, hidden)  # one position per row: (B, H) throughout, the same values as the module's (B, 1, H)
        h, mean1, rstd1 = torch.native_layer_norm(x, (hidden,), ln1_w, ln1_b, block.ln_1.eps)
        query, key, value = torch.addmm(b_attn, h, w_attn).split(hidden, dim=1)  # GPT2Attention's split, heads as its views
        query = query.view(batch, heads, 1, size)  # (B, n, 1, d): the module's view(B, 1, n, d).transpose(1, 2), one position
        # the cache's update, under no grad here: the keys and values so far, this step's rows included (views of the buffers)
        keys, values = step.layer.update(key.view(batch, heads, 1, size), value.view(batch, heads, 1, size))
        ctx.index = len(step.layer.key_chunks) - 1
        out, _ = sdpa_attention_forward(attn, query, keys, values, step.attention_mask, dropout=0.0, scaling=attn.scaling, **step.kwargs)
        o = out.reshape(batch, hidden)  # (B, 1, n, d) -> (B, H), as the module's reshape
        x1 = torch.addmm(b_proj, o, w_proj) + x
        c, mean2, rstd2 = torch.native_layer_norm(x1, (hidden,), ln2_w, ln2_b, block.ln_2.eps)
        f = torch.addmm(b_fc, c, w_fc)
        g = F.gelu(f, approximate=step.approximate)
        x2 = x1 + torch.addmm(b_out, g, w_out)
        ctx.step = step
        ctx.save_for_backward(x, h, mean1, rstd1, query, o, x1, c, mean2, rstd2, f, g, ln1_w, ln1_b, ln2_w, ln2_b, w_attn, w_proj, w_fc, w_out)
        return x2.view(batch, 1, hidden)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        (x, h, mean1, rstd1, query, o, x1, c, mean2, rstd2, f, g, ln1_w, ln1_b, ln2_w, ln2_b, w_attn, w_proj, w_fc, w_out) = ctx.saved_tensors
        step, layer, index = ctx.step, ctx.step.layer, ctx.index
        batch, hidden = x.shape
        dense, (k_ln1, kb_ln1, k_ln2, kb_ln2, k_attn, kb_attn, k_proj, kb_proj, k_fc, kb_fc, k_out, kb_out) = step.store.dense, step.keys
        begin_step_backward(layer, index)

        def record(weight_key, bias_key, layout, inputs, grad_output):  # a weight's and its bias's deferred records
            dense[weight_key].append((layout, inputs, grad_output))
            dense[bias_key].append(("bias", None, grad_output))

        grad_x2 = grad.reshape(batch, hidden)
        # MLP: x2 = x1 + gelu(c W_fc + b_fc) W_out + b_out. An input's gradient, grad W^T, is F.linear(grad, W) for
        # Conv1D's (in, out) weight: one call.
        record(k_out, kb_out, "addmm", g, grad_x2)
        grad_f = torch.ops.aten.gelu_backward(F.linear(grad_x2, w_out), f, approximate=step.approximate)
        record(k_fc, kb_fc, "addmm", c, grad_f)
        grad_c = F.linear(grad_f, w_fc)
        grad_x1 = grad_x2 + torch.ops.aten.native_layer_norm_backward(grad_c, x1, (hidden,), mean2, rstd2, ln2_w, ln2_b, (True, False, False))[0]
        record(k_ln2, kb_ln2, "norm", (x1, mean2, rstd2), grad_c)
        # attention: x1 = x + sdpa(q, K, V) W_proj + b_proj
        record(k_proj, kb_proj, "addmm", o, grad_x1)
        attn = step.block.attn
        grad_out = F.linear(grad_x1, w_proj).view(batch, 1, attn.num_heads, attn.head_dim)  # sdpa's output layout
        keys, values = layer.keys_and_values(index + 1)
        grad_query, grad_keys, grad_values = _sdpa_decode_grads(SdpaDecode(step.attention_mask, attn.scaling), query, keys, values, grad_out)
        grad_key, grad_value = finish_step_backward(layer, index, keys.shape[-2], grad_keys, grad_values)  # (B, n, 1, d) each: this step's rows
        # (B, 3n, 1, d), laid out as GPT-2's fused [q k v] projection's output (B, 3H): one cat straight from the strided
        # views of the buffers' rows (reshaping them to (B, H) first would copy each)
        grad_qkv = torch.cat([grad_query, grad_key, grad_value], dim=1).view(batch, 3 * hidden)
        record(k_attn, kb_attn, "addmm", h, grad_qkv)
        grad_h = F.linear(grad_qkv, w_attn)
        grad_x = grad_x1 + torch.ops.aten.native_layer_norm_backward(grad_h, x, (hidden,), mean1, rstd1, ln1_w, ln1_b, (True, False, False))[0]
        record(k_ln1, kb_ln1, "norm", (x, mean1, rstd1), grad_h)
        return (grad_x.view(batch, 1, hidden),) + (None,) * 13


def gpt2_decode_blocks(model: nn.Module, store: DeferredWeightGrads) -> list[tuple[nn.Module, object]]:
    """(block, forward) for every plain GPT-2 block of `model` (`_plain`), for `replaced_forwards` within the rollout:
    the forward runs a decode step as `_GPT2DecodeStep` where it applies and the block's own forward otherwise."""
    return [(block, _decode_forward(block, store)) for block in model.modules() if isinstance(block, GPT2Block) and _plain(block)]


def _decode_forward(block: nn.Module, store: DeferredWeightGrads):
    own = GPT2Block.forward
    attn, mlp = block.attn, block.mlp
    parts = (block.ln_1, block.ln_2, attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj)
    approximate = GELU_APPROXIMATION[type(mlp.act)]

    def forward(hidden_states, cache=None, attention_mask=None, encoder_hidden_states=None, encoder_attention_mask=None, use_cache=False, **kwargs):
        # the tensors the modules hold now (torch.func.functional_call swaps them in for the call): their records go under
        # their own ids, which their aliases' backward collects
        tensors = [t for p in parts for t in (p.weight, p.bias)]
        active = _ACTIVE_CACHE.get()
        layer = active.layers[attn.layer_idx] if active is not None and cache is active and attn.layer_idx < len(active.layers) else None
        if (layer is None or not layer.accumulate_grads or not layer.is_initialized or encoder_hidden_states is not None
                or not torch.is_grad_enabled() or hidden_states.dim() != 3 or hidden_states.shape[1] != 1
                or block.attn.config._attn_implementation != PREFIX + "sdpa" or ALL_ATTENTION_FUNCTIONS["sdpa"] is not sdpa_attention_forward
                or torch.is_autocast_enabled(hidden_states.device.type)
                or kwargs.get("position_bias") is not None or kwargs.get("softcap") is not None or kwargs.get("output_attentions")
                or _recording_inside() or any(t.dtype != hidden_states.dtype for t in tensors)):
            return own(block, hidden_states, cache, attention_mask, encoder_hidden_states, encoder_attention_mask=encoder_attention_mask,
                       use_cache=use_cache, **kwargs)
        step = _Step(block, layer, store, tuple(map(id, tensors)), attention_mask, kwargs, approximate)
        return _GPT2DecodeStep.apply(hidden_states, *[store.alias(t) for t in tensors], step)

    return forward
