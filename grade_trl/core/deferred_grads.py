"""Weight gradients of a decode loop, computed once at the end of backward instead of once per generated position.

Why: a differentiable rollout runs every weight matrix once per generated position. In backward, autograd then
builds a dense weight gradient per position and adds it into the parameter's gradient: T outer products of
(B, in) x (B, out) and T accumulations of a full weight-sized tensor, for every matrix of the model, the LM
head and the embedding (V x H: 147 MB for GPT-2's 50,257 x 768) included. At small batches that streams the
weights 2T extra times for a B-row worth of arithmetic: memory-bound, it dominated the rollout's backward.

How: within `deferred_weight_grads(model, store)`, every Linear / Conv1D / Embedding module of the model with a
trainable weight (its forward replaced for the block), and the embedding lookups of the relaxed steps (`embed_step`),
read their weight (and bias) through an alias (`_Deferred`) whose backward runs after every use of it (autograd runs
a node once all its consumers are done). Each use's backward returns the input's gradient as before but no weight
gradient; it records (input, output gradient), or (rows, gradient) for a lookup, and the alias's backward computes
the weight's gradient in one (N, in)^T @ (N, out) product (float32) and one index_add over all N = B x T uses, and a
bias's in one sum over the N output gradients. Exact up to float summation order (tests/test_soft_rollout.py
compares it with the per-step gradients).

Why the biases too: on a GPU the decode loop is bound by per-operation costs, not by arithmetic, and each per-step
bias gradient is a reduction plus an accumulation into `.grad`: 8 of the 38 launching operations of a GPT-2 block's
backward at each step, for the 4 biases, which the deferral removes at no Python cost (the bias rides with its
weight's Function). The LayerNorms were tried too: an autograd Function of their own cost more in Python than the
launches it saved, on the per-operation-bound proxy; GPT-2's decode step as one node (`core/gpt2_decode_block.py`)
records them at no Python cost of their own (the "norm" layout: the weight's gradient is the sum of the output
gradients times the normalised inputs, recomputed at the end from the recorded inputs, means and reciprocal deviations).

Memory: the recorded output gradients (B x T x out per matrix, the LM head's B x T x V the largest) live until
the end of the rollout's backward; the inputs are the ones autograd keeps anyway.
"""

from __future__ import annotations

from collections import defaultdict
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from .few_rows import times_transposed
from .precision import at_least_float32
from torch import nn
from transformers.pytorch_utils import Conv1D


class DeferredWeightGrads:
    """The records of one rollout's backward: per weight, dense (input, output-gradient) pairs and sparse (rows, gradient) pairs."""

    def __init__(self):
        self._aliases: dict[int, torch.Tensor] = {}
        self._dense: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = defaultdict(list)
        self._rows: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = defaultdict(list)
        self._backward_pass: int | None = None
        self._patches: dict[int, list[tuple[nn.Module, object]]] = {}

    def patches(self, model: nn.Module) -> list[tuple[nn.Module, object]]:
        """(module, deferred forward) of every module of `model` that `deferred_weight_grads` routes, found once per model."""
        if id(model) not in self._patches:
            found = ((module, _deferred_forward(module, self)) for module in model.modules())
            self._patches[id(model)] = [(module, forward) for module, forward in found if forward is not None]
        return self._patches[id(model)]

    def _this_pass(self) -> None:
        """Records belong to one backward pass: a pass that never reached the aliases (autograd.grad to an inner
        tensor) leaves its records behind, and the next pass must not add them into its weight gradients."""
        backward_pass = torch._C._current_graph_task_id()  # autograd's id of the running backward call
        if backward_pass != self._backward_pass:
            self._dense.clear()
            self._rows.clear()
            self._backward_pass = backward_pass

    @property
    def dense(self) -> dict[int, list[tuple[torch.Tensor, torch.Tensor]]]:
        self._this_pass()
        return self._dense

    @property
    def rows(self) -> dict[int, list[tuple[torch.Tensor, torch.Tensor]]]:
        self._this_pass()
        return self._rows

    def alias(self, weight: torch.Tensor) -> torch.Tensor:
        """The weight as the rollout's ops should read it: an alias whose backward computes its deferred gradient."""
        if not (weight.requires_grad and torch.is_grad_enabled()):
            return weight
        key = id(weight)
        if key not in self._aliases:
            self._aliases[key] = _Deferred.apply(weight, self, key)
        return self._aliases[key]


class _Deferred(torch.autograd.Function):
    """An alias of a weight; its backward runs after every use of the alias and computes the recorded gradients."""

    @staticmethod
    def forward(ctx, weight, store, key):
        ctx.store, ctx.key, ctx.weight_shape, ctx.weight_dtype = store, key, weight.shape, weight.dtype
        ctx.set_materialize_grads(False)
        return weight.view_as(weight)

    @staticmethod
    def backward(ctx, grad):
        dense, rows = ctx.store.dense.pop(ctx.key, []), ctx.store.rows.pop(ctx.key, [])
        out = None if grad is None else grad.clone()
        if dense:
            layout = dense[0][0]
            grads = at_least_float32(torch.cat([g for _, _, g in dense]))  # (N, out)
            if layout == "bias":  # a Linear's bias: the sum of its output gradients
                product = grads.sum(0)
            elif layout == "norm":  # a LayerNorm's weight: the sum of its output gradients times the normalised inputs
                x, mean, rstd = (at_least_float32(torch.cat([inputs[i] for _, inputs, _ in dense])) for i in range(3))  # (N, H), (N, 1), (N, 1)
                product = (grads * ((x - mean) * rstd)).sum(0)
            else:
                inputs = at_least_float32(torch.cat([x for _, x, _ in dense]))  # (N, in)
                # One product over all N uses, in float32 (float64 in a float64 run): (out, in) for a Linear's weight, (in, out) for an addmm weight.
                product = grads.t() @ inputs if layout == "linear" else inputs.t() @ grads
            product = product.to(ctx.weight_dtype)
            out = product if out is None else out + product
        if rows:
            index, values = torch.cat([r for r, _ in rows]), torch.cat([g for _, g in rows])
            if out is None:
                out = torch.zeros(ctx.weight_shape, dtype=ctx.weight_dtype, device=values.device)
            out.index_add_(0, index, values.to(out.dtype))
        return out, None, None


class _DeferredLinear(torch.autograd.Function):
    """y = x @ W^T + b (`layout="linear"`, W (out, in)) or y = b + x @ W (`layout="addmm"`, W (in, out), GPT-2's Conv1D),
    x (..., in) -> y (..., out),
    whose backward returns x's gradient and records (x, grad) for the alias's deferred W gradient, and grad for the
    deferred b gradient when `bias_key` is set (b is then its alias); otherwise b's gradient, if it needs one."""

    @staticmethod
    def forward(ctx, x, weight_alias, bias, store, key, layout, bias_key=None):
        ctx.store, ctx.key, ctx.layout, ctx.has_bias, ctx.bias_key = store, key, layout, bias is not None, bias_key
        ctx.save_for_backward(x, weight_alias)
        if layout == "linear":
            return times_transposed(x, weight_alias, bias)  # F.linear, in the faster layout for a decode step's rows on CPU
        # Conv1D's (..., in) -> (..., out) through a 2-D addmm, flattened here where autograd does not record: the
        # module's own reshape and view would be two more autograd nodes per call (views launch nothing on a GPU, but
        # each costs its dispatch and its node's backward, per matrix, layer and decode step).
        flat = x.reshape(-1, x.shape[-1])
        out = torch.addmm(bias, flat, weight_alias) if bias is not None else flat @ weight_alias
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad_x = None
        flat_grad = grad.reshape(-1, grad.shape[-1])  # (N, out)
        if ctx.needs_input_grad[0]:
            weight = weight if weight.dtype == grad.dtype else weight.to(grad.dtype)
            grad_x = grad @ weight if ctx.layout == "linear" else (flat_grad @ weight.t()).view(x.shape)
        ctx.store.dense[ctx.key].append((ctx.layout, x.reshape(-1, x.shape[-1]), flat_grad))
        grad_bias = None
        if ctx.bias_key is not None:
            ctx.store.dense[ctx.bias_key].append(("bias", None, flat_grad))  # the same tensor: no memory of its own
        elif ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = flat_grad.sum(0)
        return grad_x, None, grad_bias, None, None, None, None


class _DeferredEmbedding(torch.autograd.Function):
    """weight[ids] whose backward records (ids, grad) rows for the alias's deferred gradient (no dense (V, H) per call)."""

    @staticmethod
    def forward(ctx, ids, weight_alias, store, key, padding_idx):
        ctx.store, ctx.key, ctx.padding_idx = store, key, padding_idx
        ctx.save_for_backward(ids)
        return F.embedding(ids, weight_alias, padding_idx)

    @staticmethod
    def backward(ctx, grad):
        (ids,) = ctx.saved_tensors
        rows, grads = ids.reshape(-1), grad.reshape(-1, grad.shape[-1])
        if ctx.padding_idx is not None:  # as F.embedding: the padding row gets no gradient
            grads = grads * (rows != ctx.padding_idx).unsqueeze(1).to(grads.dtype)
        ctx.store.rows[ctx.key].append((rows, grads))
        return None, None, None, None, None


def _trainable(parameter) -> bool:
    return parameter is not None and parameter.requires_grad


def _bias(store: DeferredWeightGrads, bias) -> tuple:
    """(what the op reads as its bias, the key its deferred gradient is recorded under, or None: not deferred)."""
    return (store.alias(bias), id(bias)) if _trainable(bias) else (bias, None)


def _deferred_forward(module: nn.Module, store: DeferredWeightGrads):
    """The forward that routes `module`'s op through the deferred Functions, or None: a Linear, GPT-2's Conv1D or a
    plain Embedding, with a trainable weight and the class's own forward (a subclass that overrides it, a quantised
    Linear say, or an instance whose forward something else replaced, is left alone). Outside grad mode the module's
    own forward runs."""
    own = type(module).forward
    if not _trainable(getattr(module, "weight", None)) or "forward" in vars(module):
        return None  # frozen, or its forward already replaced on the instance (Accelerate's hooks do that): left alone
    if isinstance(module, nn.Linear) and own is nn.Linear.forward and module.weight.dim() == 2:
        def forward(input):  # noqa: A002 - nn.Linear.forward's own argument name
            if not torch.is_grad_enabled():
                return own(module, input)
            bias, bias_key = _bias(store, module.bias)
            return _DeferredLinear.apply(input, store.alias(module.weight), bias, store, id(module.weight), "linear", bias_key)
    elif isinstance(module, Conv1D) and own is Conv1D.forward and module.weight.dim() == 2:
        def forward(x):
            if not torch.is_grad_enabled():
                return own(module, x)
            bias, bias_key = _bias(store, module.bias)
            return _DeferredLinear.apply(x, store.alias(module.weight), bias, store, id(module.weight), "addmm", bias_key)
    elif (isinstance(module, nn.Embedding) and own is nn.Embedding.forward and module.max_norm is None
          and not module.scale_grad_by_freq and not module.sparse):
        def forward(input):  # noqa: A002 - nn.Embedding.forward's own argument name
            if not torch.is_grad_enabled():
                return own(module, input)
            return _DeferredEmbedding.apply(input, store.alias(module.weight), store, id(module.weight), module.padding_idx)
    else:
        return None
    return forward


@contextmanager
def deferred_weight_grads(model: nn.Module, store: DeferredWeightGrads):
    """Within the block, every Linear / Conv1D (GPT-2's) of `model` with a trainable weight (the LM head, attention and
    MLP projections, LoRA matrices), with its trainable bias, and every Embedding with a trainable weight records into
    `store` instead of building those gradients per call. The embedding lookups of relaxed steps
    use `store.alias(E)` themselves (`embed_step`).

    How: each such module's `forward` is replaced, for the block, by one that calls the deferred Function (an
    instance attribute over the class's method; hooks, which live in `Module.__call__`, are untouched). Only those
    modules' calls pay a Python detour: a TorchFunctionMode, which this replaced, sent every torch call of the model
    through Python: on a model bound by per-operation costs (a GPU's decode loop, or benchmarks/step_cost.py's narrow
    proxy on CPU) that made deferral nearly double the relaxed rollout's forward (docs/grade_cost_log.md)."""
    with replaced_forwards(store.patches(model)):
        yield store


@contextmanager
def replaced_forwards(replacements):
    """Within the block, each (module, forward) of `replacements` runs `forward` as the module's `forward` (an instance
    attribute over the class's method; hooks, in `Module.__call__`, are untouched), removed again on exit. A module
    whose forward is already replaced on the instance (an outer block's, Accelerate's hooks) is left alone."""
    patched = [(module, forward) for module, forward in replacements if "forward" not in vars(module)]
    for module, forward in patched:
        module.forward = forward
    try:
        yield
    finally:
        for module, _ in patched:
            del module.forward
