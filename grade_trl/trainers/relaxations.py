"""Relaxations of token sampling (GRADE's gradient estimators) and temperature schedules.

Each estimator maps next-token logits theta (B, K) and a temperature tau to a `Relaxed` step: the values that are
embedded and scored, or only differentiated for the straight-through family, whose forward value is the one-hot
token, and the hard token the step stands for. Every estimator draws that token as an exact sample of
softmax(theta) (the Gumbel-max trick, argmax(theta + g), g ~ Gumbel(0, 1)); they differ only in the gradient.

| name      | forward            | gradient of                                                   | paper                          |
|-----------|--------------------|---------------------------------------------------------------|--------------------------------|
| `soft`    | softmax((theta+g)/tau) | the same                                                  | Jang et al. 2017, 1611.01144   |
| `ste`     | one-hot D          | softmax((theta+g)/tau)                                        | Jang et al. 2017, section 2.2  |
| `reinmax` | one-hot D          | 2 pi_1 - pi_0 / 2 (second-order accurate)                     | Liu et al. 2023, 2304.08612    |
| `rao`     | one-hot D          | mean over K draws of g given D of softmax((theta+g_k)/tau)    | Paulus et al. 2021, 2010.04838 |
| `gapped`  | one-hot D          | softmax((theta + m(theta, D))/tau), m deterministic given D   | Fan et al. 2022, 2206.07235    |

`tau_backward` (Shah et al. 2024, arXiv:2410.13331) decouples the temperature of the gradient from the forward's:
for `soft` the forward stays at tau and the gradient is that of the relaxation at tau_backward; the straight-through
family's forward is the one-hot sample at every temperature, so for them tau_backward is the temperature of the
backward, in place of tau. Each estimator composes with the top-k relaxation: it sees the k largest logits only.
Add an estimator: subclass `Relaxation`, register it in `RELAXATIONS`, test it against its paper.
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


def with_gradient_of(value: torch.Tensor, surrogate: torch.Tensor) -> torch.Tensor:
    """Forward `value` (no gradient of its own), gradient of `surrogate`."""
    return value.detach() + (surrogate - surrogate.detach())


def conditional_gumbel(logits: torch.Tensor, hard: torch.Tensor, samples: int) -> torch.Tensor:
    """`samples` draws of theta + g, g ~ Gumbel(0, 1) conditioned on argmax(theta + g) = hard. (samples, B, K), no gradient.

    Paulus et al. 2021 (arXiv:2010.04838, appendix A): with E_i ~ Exp(1) i.i.d. and log Z = logsumexp(theta), the
    maximum is Gumbel(log Z) and independent of the argmax, so
        (theta + g)_D = log Z - log E_D,     (theta + g)_i = -log(E_i exp(-theta_i) + E_D / Z)   (i != D),
    every other coordinate is a Gumbel(theta_i) truncated below the maximum. logaddexp keeps it finite for any theta.
    """
    with torch.no_grad():
        noise = torch.empty((samples, *logits.shape), device=logits.device, dtype=logits.dtype).exponential_()
        is_hard = F.one_hot(hard, logits.shape[-1]).bool()  # (B, K)
        log_z = torch.logsumexp(logits, dim=-1, keepdim=True)  # (B, 1)
        log_e_hard = noise.masked_fill(~is_hard, 0.0).sum(-1, keepdim=True).log()  # (samples, B, 1)
        top = log_z - log_e_hard
        others = -torch.logaddexp(noise.log() - logits, log_e_hard - log_z)
        return torch.where(is_hard, top, others)


class Relaxation:
    """Base: `__call__(logits (B, K), tau) -> Relaxed`. `tau_backward` > 0 replaces tau in the gradient (module docstring)."""

    name: str = ""

    def __init__(self, tau_backward: float = 0.0):
        self.tau_backward = tau_backward

    def backward_tau(self, tau: float) -> float:
        return self.tau_backward or tau

    def __call__(self, logits: torch.Tensor, tau: float) -> Relaxed:
        raise NotImplementedError

    def dense(self, logits: torch.Tensor, tau: float) -> torch.Tensor:
        """The (B, K) forward value with its gradient path (one-hot + (soft - soft.detach()) for straight-through)."""
        relaxed = self(logits, tau)
        if not relaxed.straight_through:
            return relaxed.values
        return straight_through(F.one_hot(relaxed.hard, logits.shape[-1]).to(relaxed.values.dtype), relaxed.values)


class GumbelSoftmax(Relaxation):
    """y = softmax((theta + g) / tau), g ~ Gumbel(0, 1) (Jang et al. 2017, arXiv:1611.01144; Maddison et al. 2017,
    arXiv:1611.00712). The reward sees a mixture of embeddings; biased for tau > 0, variance grows as tau -> 0.
    With tau_backward: forward softmax((theta + g)/tau), gradient of softmax((theta + g)/tau_backward)."""

    name = "soft"

    def __call__(self, logits: torch.Tensor, tau: float) -> Relaxed:
        perturbed = logits + sample_gumbel(logits.shape, logits.device, logits.dtype)
        soft = F.softmax(perturbed / tau, dim=-1)
        if self.tau_backward and self.tau_backward != tau:
            soft = with_gradient_of(soft, F.softmax(perturbed / self.tau_backward, dim=-1))
        return Relaxed(soft, perturbed.argmax(-1))


class StraightThroughGumbel(Relaxation):
    """Forward: the one-hot Gumbel-max sample D = argmax(theta + g); backward: the gradient of
    softmax((theta + g)/tau) (Jang et al. 2017, section 2.2). The reward sees real tokens; the gradient is biased
    (first-order accurate at best, Liu et al. 2023) and its variance grows as tau -> 0."""

    name = "ste"

    def __call__(self, logits: torch.Tensor, tau: float) -> Relaxed:
        perturbed = logits + sample_gumbel(logits.shape, logits.device, logits.dtype)
        return Relaxed(F.softmax(perturbed / self.backward_tau(tau), dim=-1), perturbed.argmax(-1), straight_through=True)


class ReinMax(Relaxation):
    """ReinMax (Liu et al., NeurIPS 2023, arXiv:2304.08612, Algorithm 2): forward the one-hot sample D ~ softmax(theta);
    backward the gradient of

        pi_0 = softmax(theta),   pi_1 = (D + softmax(theta / tau)) / 2,   pi_1 <- softmax(sg(log pi_1 - theta) + theta),
        value = 2 pi_1 - pi_0 / 2

    i.e. d/dtheta = 2 J(pi_1) - J(pi_0) / 2 with J(p) = diag(p) - p p^T: Heun's method (second order) where
    straight-through is Euler's (first order), at the cost of one more softmax. No Gumbel noise in the backward;
    its tau smooths the gradient the other way round from ST-Gumbel's (larger tau, smoother; the paper uses 1-2)."""

    name = "reinmax"

    def __call__(self, logits: torch.Tensor, tau: float) -> Relaxed:
        hard = (logits.detach() + sample_gumbel(logits.shape, logits.device, logits.dtype)).argmax(-1)  # D ~ softmax(theta)
        one_hot = F.one_hot(hard, logits.shape[-1]).to(logits.dtype)
        pi_0 = F.softmax(logits, dim=-1)
        pi_1 = (one_hot + F.softmax(logits.detach() / self.backward_tau(tau), dim=-1)) / 2
        pi_1 = F.softmax((pi_1.log() - logits).detach() + logits, dim=-1)  # value pi_1, Jacobian J(pi_1)
        return Relaxed(2 * pi_1 - pi_0 / 2, hard, straight_through=True)


class GumbelRao(Relaxation):
    """Gumbel-Rao (Paulus, Maddison, Krause, ICLR 2021, arXiv:2010.04838): forward the one-hot Gumbel-max sample D;
    backward the straight-through Gumbel-softmax gradient averaged over `rao_samples` = K draws of the noise
    conditioned on D (`conditional_gumbel`):

        value = (1/K) sum_k softmax((theta + sg(g_k)) / tau),   g_k ~ Gumbel | argmax(theta + g_k) = D

    A Rao-Blackwellisation of ST-Gumbel: the same mean, a lower variance (K = 1 is ST-Gumbel in distribution), for K
    softmaxes of the step's (B, K) logits in time and saved memory (use relax_top_k at full vocabularies)."""

    name = "rao"

    def __init__(self, tau_backward: float = 0.0, rao_samples: int = 8):
        super().__init__(tau_backward)
        self.rao_samples = rao_samples

    def __call__(self, logits: torch.Tensor, tau: float) -> Relaxed:
        hard = (logits.detach() + sample_gumbel(logits.shape, logits.device, logits.dtype)).argmax(-1)
        noise = conditional_gumbel(logits.detach(), hard, self.rao_samples) - logits.detach()  # (K, B, V) g_k given D
        values = F.softmax((logits + noise) / self.backward_tau(tau), dim=-1).mean(0)
        return Relaxed(values, hard, straight_through=True)


class GappedStraightThrough(Relaxation):
    """Gapped straight-through (Fan et al., ICML 2022, arXiv:2206.07235): forward the one-hot sample D; backward the
    gradient of softmax((theta + sg(m1 - m2)) / tau), a deterministic perturbation that makes D the argmax by a
    margin `gap` (the paper's kappa, 1.0):

        m1 = (max(theta) - theta_D) D,     m2 = relu(theta - max(theta) + gap) (1 - D)

    Chosen as the fifth estimator because it targets ST-Gumbel's variance without extra draws: the noise of the
    backward is replaced by the smallest change of the logits consistent with the sample, so the gradient varies only
    through D, at ST's cost (one softmax)."""

    name = "gapped"

    def __init__(self, tau_backward: float = 0.0, gap: float = 1.0):
        super().__init__(tau_backward)
        self.gap = gap

    def __call__(self, logits: torch.Tensor, tau: float) -> Relaxed:
        hard = (logits.detach() + sample_gumbel(logits.shape, logits.device, logits.dtype)).argmax(-1)
        with torch.no_grad():
            is_hard = F.one_hot(hard, logits.shape[-1]).to(logits.dtype)
            top = logits.max(-1, keepdim=True).values
            m1 = (top - logits.gather(-1, hard.unsqueeze(-1))) * is_hard
            m2 = (logits - top + self.gap).clamp(min=0.0) * (1 - is_hard)
        return Relaxed(F.softmax((logits + m1 - m2) / self.backward_tau(tau), dim=-1), hard, straight_through=True)


RELAXATIONS: dict[str, type[Relaxation]] = {
    cls.name: cls for cls in (GumbelSoftmax, StraightThroughGumbel, ReinMax, GumbelRao, GappedStraightThrough)
}


def build_relaxation(estimator: str, tau_backward: float = 0.0, rao_samples: int = 8, gap: float = 1.0) -> Relaxation:
    """The estimator named `estimator` with the options that apply to it."""
    if estimator == "rao":
        return GumbelRao(tau_backward, rao_samples)
    if estimator == "gapped":
        return GappedStraightThrough(tau_backward, gap)
    return RELAXATIONS[estimator](tau_backward)


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
