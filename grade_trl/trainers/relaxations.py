"""Relaxations of token sampling (GRADE's gradient estimators) and temperature schedules.

Each estimator maps next-token logits (B, K) and a temperature tau to a `Relaxed` step: the values that are
embedded and scored (or only differentiated, for straight-through estimators, whose forward value is the
one-hot token) and the hard token it stands for, argmax over the K columns, which for Gumbel noise is an
exact sample of softmax(logits) (the Gumbel-max trick). Add an estimator: subclass `Relaxation`, register
it in `RELAXATIONS`, test it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..core.soft_tokens import Relaxed


def sample_gumbel(shape: torch.Size, device, dtype=torch.float32) -> torch.Tensor:
    """Standard Gumbel noise: if E ~ Exp(1) then -log E ~ Gumbel(0, 1)."""
    return -torch.empty(shape, device=device, dtype=dtype).exponential_().log()


def straight_through(hard: torch.Tensor, soft: torch.Tensor) -> torch.Tensor:
    """Forward value `hard`, gradient of `soft`: (hard - soft).detach() + soft (Bengio et al. 2013)."""
    return (hard - soft).detach() + soft


class Relaxation:
    name: str = ""

    def __call__(self, logits: torch.Tensor, tau: float) -> Relaxed:
        raise NotImplementedError

    def dense(self, logits: torch.Tensor, tau: float) -> torch.Tensor:
        """The (B, K) forward value with its gradient path (one-hot + (soft - soft.detach()) for straight-through)."""
        relaxed = self(logits, tau)
        if not relaxed.straight_through:
            return relaxed.values
        return straight_through(F.one_hot(relaxed.hard, logits.shape[-1]).to(relaxed.values.dtype), relaxed.values)


class GumbelSoftmax(Relaxation):
    """y = softmax((logits + g) / tau), g ~ Gumbel(0, 1) (Jang et al. 2017, arXiv:1611.01144;
    Maddison et al. 2017, arXiv:1611.00712). Biased for tau > 0, variance grows as tau -> 0."""

    name = "soft"

    def __call__(self, logits: torch.Tensor, tau: float) -> Relaxed:
        noise = sample_gumbel(logits.shape, logits.device, logits.dtype)
        soft = F.softmax((logits + noise) / tau, dim=-1)
        return Relaxed(soft, soft.argmax(-1))


class StraightThroughGumbel(Relaxation):
    """Forward: the one-hot Gumbel-max sample; backward: the Gumbel-softmax gradient
    (Jang et al. 2017, section 2.2). The reward sees real tokens, the gradient is biased."""

    name = "ste"

    def __call__(self, logits: torch.Tensor, tau: float) -> Relaxed:
        relaxed = GumbelSoftmax()(logits, tau)
        return Relaxed(relaxed.values, relaxed.hard, straight_through=True)


RELAXATIONS: dict[str, type[Relaxation]] = {cls.name: cls for cls in (GumbelSoftmax, StraightThroughGumbel)}


def tau_at(step: int, tau_start: float, tau_end: float, anneal_steps: int, schedule: str = "linear") -> float:
    """Relaxation temperature at an optimizer step.

    linear: tau_start -> tau_end over `anneal_steps`, then constant at tau_end (the GRADE
    experiment's 2.0 -> 0.5 over 1,000 steps); constant: always tau_start.
    """
    if schedule == "constant" or anneal_steps <= 0:
        return tau_start
    if schedule != "linear":
        raise ValueError(f"tau_schedule must be 'linear' or 'constant', got {schedule!r}")
    frac = min(step / anneal_steps, 1.0)
    return tau_start + frac * (tau_end - tau_start)
