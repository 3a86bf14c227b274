"""Relaxed tokens: what a relaxation of sampling produces at each generated position, and how it is consumed.

A relaxation (trainers/relaxations.py) maps next-token logits to a `Relaxed` step:
  * `values` (B, K): the differentiable relaxed distribution over K columns, the whole vocabulary (K = V) or the
    k largest logits (`indices` (B, k), top-k relaxation);
  * `hard` (B,): the token the step stands for (the argmax: a Gumbel-max sample);
  * `straight_through`: the forward value is exactly one-hot(hard); `values` only carries the gradient
    (straight-through, ReinMax, ...). Otherwise the forward value is `values` itself (Gumbel-softmax).

`SoftTokens` is the sequence of steps (plus an optional prefix of real token ids, the prompt). Every consumer
(the policy's next input, the reference, a reward's `score_soft`) reads it through `embed(E)`, `probability(id)`
or `dense()`, never through a stacked (B, T, V) copy:
  * `embed(E)` (B, T, H): one-hot steps gather their rows of E (`_OneHotEmbedding`: forward E[hard], backward
    the straight-through gradient grad @ E^T into `values`, saving no (B, V) tensor and skipping the (B, V) @ (V, H)
    product of the forward); dense steps are values @ E; top-k steps a weighted gather of k rows;
  * `probability(id)` (B, T): the forward value of one vocabulary entry (the EOS mass), with its gradient;
  * `dense()` (B, T, V): the materialised distributions, for rewards that need them (costs B x T x V).

Legend: B batch, T generated positions, V vocabulary, K columns of a step (V, or k), H hidden, P prefix length.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .few_rows import times_transposed
from .precision import at_least_float32


@dataclass
class Relaxed:
    """One relaxed step (module docstring)."""

    values: torch.Tensor  # (B, K) differentiable
    hard: torch.Tensor  # (B,) vocabulary ids
    straight_through: bool = False
    indices: torch.Tensor | None = None  # (B, k) vocabulary ids of `values`' columns; None: all V

    def forward_value(self, vocab_size: int) -> torch.Tensor:
        """The (B, V) value that stands for the token in the forward pass, with the step's gradient path."""
        values = self.values if self.indices is None else torch.zeros(self.values.shape[0], vocab_size, dtype=self.values.dtype, device=self.values.device).scatter(1, self.indices, self.values)
        if not self.straight_through:
            return values
        return F.one_hot(self.hard, vocab_size).to(values.dtype) + (values - values.detach())


class _OneHotEmbedding(torch.autograd.Function):
    """Forward E[hard] (exactly the embedding of the real token); backward the straight-through gradient:
    d/d values = grad @ E^T (as if the forward had been values @ E), d/dE = the rows of `hard` (the real forward).
    With top-k `indices`, d/d values = the k columns of grad @ E^T."""

    @staticmethod
    def forward(ctx, values, hard, weight, indices, deferred, key):
        ctx.save_for_backward(hard, weight, indices if indices is not None else torch.empty(0, dtype=torch.long, device=hard.device))
        ctx.sparse, ctx.values_dtype, ctx.deferred, ctx.key = indices is not None, values.dtype, deferred, key
        return weight[hard]  # (B, H)

    @staticmethod
    def backward(ctx, grad):
        hard, weight, indices = ctx.saved_tensors
        grad_values = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad = grad.to(weight.dtype)  # backward runs outside autocast: the weight's dtype
            if ctx.sparse:
                grad_values = torch.einsum("bh,bkh->bk", grad, weight[indices])  # (B, k)
            else:
                grad_values = times_transposed(grad, weight)  # (B, V) = grad @ E^T, in the faster layout on CPU
            grad_values = grad_values.to(ctx.values_dtype)
        if ctx.needs_input_grad[2]:
            if ctx.deferred is not None:  # `weight` is a deferred alias: its backward adds these rows once for all steps
                ctx.deferred.rows[ctx.key].append((hard, grad))
            else:  # B sparse rows, added into the weight's dense gradient (instead of a dense (V, H) tensor per step)
                grad_weight = torch.sparse_coo_tensor(hard.unsqueeze(0), grad.to(weight.dtype), weight.shape, check_invariants=False)
        return grad_values, None, grad_weight, None, None, None


class _EmbedSteps(torch.autograd.Function):
    """The embeddings (B, T, H) of T relaxed steps at once (a reference's or a reward's input): one gather (straight-
    through steps) or one (B*T, V) @ (V, H) product, and in backward one (B*T, H) @ (H, V) product for the steps'
    values, instead of T separate products that each stream the (V, H) matrix. It saves references to the steps'
    values (no stacked copy); the stack it multiplies is a temporary."""

    @staticmethod
    def forward(ctx, weight, hard, indices, straight_through, *values):
        ctx.straight_through, ctx.sparse, ctx.vocab_size = straight_through, indices is not None, weight.shape[0]
        ctx.save_for_backward(weight, hard, indices if indices is not None else hard.new_empty(0), *values)
        if straight_through:
            return weight[hard]  # (B, T, H)
        return _stacked(values, indices, weight.shape[0]).to(weight.dtype) @ weight  # (B, T, V) @ (V, H)

    @staticmethod
    def backward(ctx, grad):
        weight, hard, indices, *values = ctx.saved_tensors
        grad_weight, grad_values = None, [None] * len(values)
        if any(ctx.needs_input_grad[4:]):
            # Backward runs outside autocast: the product in the weight's dtype (float32 master weights under bf16).
            vocab_grad = (grad.reshape(-1, grad.shape[-1]).to(weight.dtype) @ weight.t()).view(*grad.shape[:-1], -1)  # (B, T, V), one 2-D product
            if ctx.sparse:
                vocab_grad = vocab_grad.gather(-1, indices)  # (B, T, k)
            grad_values = [vocab_grad[:, t].to(v.dtype) for t, v in enumerate(values)]
        if ctx.needs_input_grad[0]:
            if ctx.straight_through:  # the forward read the rows of `hard`: a sparse gradient of B * T rows
                grad_weight = torch.sparse_coo_tensor(hard.reshape(1, -1), grad.reshape(-1, grad.shape[-1]).to(weight.dtype), weight.shape, check_invariants=False)
            else:
                stacked = _stacked(values, indices if ctx.sparse else None, ctx.vocab_size).to(weight.dtype)
                grad_weight = stacked.reshape(-1, ctx.vocab_size).t() @ grad.reshape(-1, grad.shape[-1]).to(weight.dtype)
        return grad_weight, None, None, None, *grad_values


def _stacked(values, indices, vocab_size: int) -> torch.Tensor:
    """(B, T, V) from per-step (B, V) values, or (B, k) values at `indices` (B, T, k)."""
    stacked = torch.stack(values, dim=1)
    if indices is None:
        return stacked
    return torch.zeros(*stacked.shape[:2], vocab_size, dtype=stacked.dtype, device=stacked.device).scatter(-1, indices, stacked)


def embed_step(step: Relaxed, weight: torch.Tensor, deferred=None) -> torch.Tensor:
    """The input embedding (B, H) of one relaxed step under the embedding matrix `weight` (V, H).

    deferred: a `DeferredWeightGrads` of the decode loop; a straight-through step then records its rows for the
    weight's gradient, computed once for all steps (core/deferred_grads.py)."""
    if step.straight_through:
        if deferred is not None and weight.requires_grad and torch.is_grad_enabled():
            return _OneHotEmbedding.apply(step.values, step.hard, deferred.alias(weight), step.indices, deferred, id(weight))
        return _OneHotEmbedding.apply(step.values, step.hard, weight, step.indices, None, None)
    values = step.values.to(weight.dtype)
    if step.indices is None:
        return values @ weight  # (B, V) @ (V, H)
    return torch.einsum("bk,bkh->bh", values, weight[step.indices])  # k rows, weighted


@dataclass
class SoftTokens:
    """A relaxed sequence: optional real prefix ids (B, P), then one `Relaxed` per generated position."""

    steps: list[Relaxed]
    vocab_size: int
    prefix_ids: torch.Tensor | None = None  # (B, P)

    @classmethod
    def from_dense(cls, distributions: torch.Tensor) -> SoftTokens:
        """From (B, T, V) distributions (one-hot rows included): each position a step whose forward value is its row."""
        return cls([Relaxed(distributions[:, t], distributions[:, t].argmax(-1)) for t in range(distributions.shape[1])], distributions.shape[-1])

    def __len__(self) -> int:
        return (0 if self.prefix_ids is None else self.prefix_ids.shape[1]) + len(self.steps)

    @property
    def hard(self) -> torch.Tensor:  # (B, T) the tokens the steps stand for (prefix excluded)
        return torch.stack([step.hard for step in self.steps], dim=1)

    def with_prefix(self, prefix_ids: torch.Tensor) -> SoftTokens:
        return SoftTokens(self.steps, self.vocab_size, prefix_ids)

    def drop_last(self) -> SoftTokens:
        """Without the last generated position (the inputs that predict positions 1..T)."""
        return SoftTokens(self.steps[:-1], self.vocab_size, self.prefix_ids)

    def embed(self, weight: torch.Tensor) -> torch.Tensor:
        """(B, len, H): the prefix's rows of `weight` (V, H), then the steps' embeddings (`embed_step`'s values, computed
        for all steps at once by `_EmbedSteps`)."""
        parts = [] if self.prefix_ids is None else [F.embedding(self.prefix_ids, weight)]
        if self.steps:
            straight_through = self.steps[0].straight_through
            if any(step.straight_through != straight_through or (step.indices is None) != (self.steps[0].indices is None) for step in self.steps):
                raise ValueError("SoftTokens.embed needs steps of one relaxation (all straight-through or none, all top-k or none)")
            indices = None if self.steps[0].indices is None else torch.stack([step.indices for step in self.steps], dim=1)
            parts.append(_EmbedSteps.apply(weight, self.hard, indices, straight_through, *[step.values for step in self.steps]))
        return torch.cat(parts, dim=1)

    def probability(self, token_id: int) -> torch.Tensor:
        """(B, len): the forward value of vocabulary entry `token_id` at every position, with its gradient."""
        parts = []
        for step in self.steps:
            if step.indices is None:
                column = step.values[:, token_id]
            else:
                column = (step.values * (step.indices == token_id)).sum(-1)
            if step.straight_through:
                column = (step.hard == token_id).to(column.dtype) + (column - column.detach())
            parts.append(at_least_float32(column).unsqueeze(1))
        if self.prefix_ids is not None:
            dtype = parts[0].dtype if parts else torch.float32
            parts.insert(0, (self.prefix_ids == token_id).to(dtype))
        return torch.cat(parts, dim=1)

    def dense(self) -> torch.Tensor:
        """(B, len, V): every position's forward value as a distribution over the vocabulary (materialised)."""
        parts = []
        if self.steps:
            parts.append(at_least_float32(torch.stack([step.forward_value(self.vocab_size) for step in self.steps], dim=1)))
        if self.prefix_ids is not None:
            dtype = parts[0].dtype if parts else torch.float32
            parts.insert(0, F.one_hot(self.prefix_ids, self.vocab_size).to(dtype))
        return torch.cat(parts, dim=1)


def as_soft_tokens(soft_tokens: SoftTokens | torch.Tensor) -> SoftTokens:
    """A reward's `score_soft` input as SoftTokens; a (B, T, V) tensor of distributions is wrapped (`from_dense`)."""
    return soft_tokens if isinstance(soft_tokens, SoftTokens) else SoftTokens.from_dense(soft_tokens)
