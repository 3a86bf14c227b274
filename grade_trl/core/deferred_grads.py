"""Weight gradients of a decode loop, computed once at the end of backward instead of once per generated position.

Why: a differentiable rollout runs every weight matrix once per generated position. In backward, autograd then
builds a dense weight gradient per position and adds it into the parameter's gradient: T outer products of
(B, in) x (B, out) and T accumulations of a full weight-sized tensor, for every matrix of the model, the LM
head and the embedding (V x H: 147 MB for GPT-2's 50,257 x 768) included. At small batches that streams the
weights 2T extra times for a B-row worth of arithmetic: memory-bound, it dominated the rollout's backward.

How: within `deferred_weight_grads(model, store)`, every F.linear / torch.addmm / F.embedding of the model with a
trainable weight (a TorchFunctionMode), and the embedding lookups of the relaxed steps (`embed_step`), read their weight
through an alias (`_Deferred`) whose backward runs after every use of it (autograd runs a node once all its
consumers are done). Each use's backward returns the input's gradient as before but no weight gradient; it
records (input, output gradient), or (rows, gradient) for a lookup, and the alias's backward computes the
weight's gradient in one (N, in)^T @ (N, out) product (float32) and one index_add over all N = B x T uses.
Exact up to float summation order (tests/test_soft_rollout.py compares it with the per-step gradients).

Memory: the recorded output gradients (B x T x out per matrix, the LM head's B x T x V the largest) live until
the end of the rollout's backward; the inputs are the ones autograd keeps anyway.
"""

from __future__ import annotations

from collections import defaultdict
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from .precision import at_least_float32
from torch import nn
from torch.overrides import TorchFunctionMode


class DeferredWeightGrads:
    """The records of one rollout's backward: per weight, dense (input, output-gradient) pairs and sparse (rows, gradient) pairs."""

    def __init__(self):
        self._aliases: dict[int, torch.Tensor] = {}
        self._dense: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = defaultdict(list)
        self._rows: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = defaultdict(list)
        self._backward_pass: int | None = None

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
            inputs = at_least_float32(torch.cat([x for _, x, _ in dense]))  # (N, in)
            grads = at_least_float32(torch.cat([g for _, _, g in dense]))  # (N, out)
            # One product over all N uses, in float32 (float64 in a float64 run): (out, in) for a Linear's weight, (in, out) for an addmm weight.
            product = (grads.t() @ inputs if layout == "linear" else inputs.t() @ grads).to(ctx.weight_dtype)
            out = product if out is None else out + product
        if rows:
            index, values = torch.cat([r for r, _ in rows]), torch.cat([g for _, g in rows])
            if out is None:
                out = torch.zeros(ctx.weight_shape, dtype=ctx.weight_dtype, device=values.device)
            out.index_add_(0, index, values.to(out.dtype))
        return out, None, None


class _DeferredLinear(torch.autograd.Function):
    """y = x @ W^T + b (`layout="linear"`, W (out, in)) or y = b + x @ W (`layout="addmm"`, W (in, out), GPT-2's Conv1D),
    whose backward returns x's (and b's) gradient and records (x, grad) for the alias's deferred W gradient."""

    @staticmethod
    def forward(ctx, x, weight_alias, bias, store, key, layout):
        ctx.store, ctx.key, ctx.layout, ctx.has_bias = store, key, layout, bias is not None
        ctx.save_for_backward(x, weight_alias)
        if layout == "linear":
            return F.linear(x, weight_alias, bias)
        return torch.addmm(bias, x, weight_alias) if bias is not None else x @ weight_alias

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad_x = None
        if ctx.needs_input_grad[0]:
            weight = weight.to(grad.dtype)
            grad_x = grad @ weight if ctx.layout == "linear" else grad @ weight.t()
        ctx.store.dense[ctx.key].append((ctx.layout, x.reshape(-1, x.shape[-1]), grad.reshape(-1, grad.shape[-1])))
        grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, None, grad_bias, None, None, None


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


class _DeferLinearWeights(TorchFunctionMode):
    """Routes F.linear / torch.addmm / F.embedding calls whose weight is one of `parameters` through the deferred Functions."""

    def __init__(self, store: DeferredWeightGrads, parameters: set[int]):
        super().__init__()
        self.store, self.parameters = store, parameters

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if torch.is_grad_enabled():
            if func is F.linear:
                x = args[0] if args else kwargs["input"]
                weight = args[1] if len(args) > 1 else kwargs["weight"]
                bias = args[2] if len(args) > 2 else kwargs.get("bias")
                if id(weight) in self.parameters:
                    return _DeferredLinear.apply(x, self.store.alias(weight), bias, self.store, id(weight), "linear")
            elif func is F.embedding:
                ids, weight = args[0], (args[1] if len(args) > 1 else kwargs["weight"])
                padding_idx = args[2] if len(args) > 2 else kwargs.get("padding_idx")
                plain = all(v in (None, False, 2.0) for v in list(args[3:]) + [kwargs.get(k) for k in ("max_norm", "scale_grad_by_freq", "sparse")])
                if id(weight) in self.parameters and plain:
                    return _DeferredEmbedding.apply(ids, self.store.alias(weight), self.store, id(weight), padding_idx)
            elif func is torch.addmm and len(args) == 3 and not kwargs:
                bias, x, weight = args
                if id(weight) in self.parameters and x.dim() == 2:
                    return _DeferredLinear.apply(x, self.store.alias(weight), bias, self.store, id(weight), "addmm")
        return func(*args, **kwargs)


@contextmanager
def deferred_weight_grads(model: nn.Module, store: DeferredWeightGrads):
    """Within the block, every F.linear / torch.addmm of `model` with a trainable weight (the LM head, attention and MLP
    projections, LoRA matrices) records into `store` instead of building its weight's gradient per call. The embedding
    lookups of relaxed steps use `store.alias(E)` themselves (`embed_step`)."""
    parameters = {id(p) for p in model.parameters() if p.requires_grad and p.dim() == 2}
    with _DeferLinearWeights(store, parameters):
        yield store
