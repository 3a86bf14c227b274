"""KL divergence between the policy and the frozen reference.

Legend: B batch, T positions, V vocabulary.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable


class _ExactKL(torch.autograd.Function):
    """KL(p || q) per position from logits, and the policy's entropy H(p) from the same pass (no gradient: a metric,
    `exact_kl_and_entropy`), saving two B x T x V tensors, not the four (log p, log q, p and
    log p - log q, in float32) that the plain expression would keep: the log-softmaxes when the logits are float32 or
    float64 (the same bytes as the logits, and nothing to recompute in backward), the logits themselves when they are
    in a lower precision (half the bytes; the log-softmaxes are then recomputed in float32 in backward). The gradients
    are the analytic ones:

        dKL/dz_p = p * (log p - log q - KL),     dKL/dz_q = q - p           (full support)
        dKL/dz_p = p * (log p - log q_I - KL),   dKL/dz_q = q - scatter(p)  (support I: the policy's top-k)

    with z the logits, p = softmax(z_p) and q = softmax(z_q); where the clamp at 0 acted (float round-off around
    0), the gradient is 0, as for clamp."""

    @staticmethod
    def forward(ctx, policy_logits, ref_logits, indices):
        kl, logp, _, logq, p = _kl_terms(policy_logits, ref_logits, indices)
        entropy = -p.mul_(logp).sum(-1)  # H(p) = -sum_v p_v log p_v, from the KL's own p (a temporary) and log p
        ctx.mark_non_differentiable(entropy)
        ctx.kept_log_softmax = logp.dtype == policy_logits.dtype and logq.dtype == ref_logits.dtype
        if ctx.kept_log_softmax:
            ctx.save_for_backward(logp, logq, indices, kl)
        else:
            ctx.save_for_backward(policy_logits, ref_logits, indices)
        ctx.dtypes = policy_logits.dtype, ref_logits.dtype
        return kl.clamp(min=0.0), entropy

    @staticmethod
    @once_differentiable  # its backward is not itself differentiable (saved log-softmaxes carry no graph): say so
    def backward(ctx, grad, _entropy_grad):  # the entropy is not differentiable: its gradient is never used
        if ctx.kept_log_softmax:
            logp, logq, indices, kl = ctx.saved_tensors
            logq_support = logq if indices is None else logq.gather(-1, indices)
            p = logp.exp()
        else:
            policy_logits, ref_logits, indices = ctx.saved_tensors
            kl, logp, logq_support, logq, p = _kl_terms(policy_logits, ref_logits, indices)
        scale = (grad * (kl >= 0)).unsqueeze(-1)  # (B, T, 1): no gradient where the clamp acted
        grad_policy = grad_ref = None
        # In place where a (B, T, V) temporary can be reused (these tensors are the step's largest); never in the
        # saved tensors (a second backward over a retained graph reads them again).
        if ctx.needs_input_grad[0]:
            grad_policy = (logp - logq_support).sub_(kl.unsqueeze(-1)).mul_(p).mul_(scale).to(ctx.dtypes[0])  # p (log p - log q - KL)
        if ctx.needs_input_grad[1]:
            support_p = p if indices is None else torch.zeros_like(logq).scatter_add(-1, indices, p)
            q = logq.exp() if ctx.kept_log_softmax else logq.exp_()  # log q is a saved tensor, or this backward's own
            grad_ref = q.sub_(support_p).mul_(scale).to(ctx.dtypes[1])  # (q - p)
        return grad_policy, grad_ref, None


def _kl_terms(policy_logits, ref_logits, indices):
    """(KL (B, T), log p (B, T, K), log q on p's support (B, T, K), log q (B, T, V), p (B, T, K)), in at least float32."""
    dtype = torch.promote_types(policy_logits.dtype, torch.float32)  # at least float32, float64 kept
    logp = F.log_softmax(policy_logits.to(dtype), dim=-1)
    logq = F.log_softmax(ref_logits.to(dtype), dim=-1)
    logq_support = logq if indices is None else logq.gather(-1, indices)
    p = logp.exp()
    # p (log p - log q) written over log p - log q, a temporary of this function: one (B, T, K) tensor fewer than
    # `(p * (log p - log q)).sum(-1)`, the same values bit for bit
    return (logp - logq_support).mul_(p).sum(-1), logp, logq_support, logq, p


def exact_kl(policy_logits: torch.Tensor, ref_logits: torch.Tensor, indices: torch.Tensor | None = None) -> torch.Tensor:
    """Exact per-position KL(p || q) = sum_v p_v (log p_v - log q_v), over the whole vocabulary.

    policy_logits, ref_logits: (B, T, V). Returns (B, T), >= 0 (the clamp removes float round-off
    around 0 only; it does not hide a sign error, since the exact sum cannot be negative).
    Gradients flow into both arguments' graphs; the reference's parameters are frozen, but its
    inputs (the policy's soft tokens) are not, and that path is part of the relaxed objective.

    indices (B, T, k): `policy_logits` (B, T, k) are the policy's logits at these vocabulary ids only (a top-k
    relaxation), and p is the policy restricted to them and renormalised, the distribution the top-k rollout
    samples from: KL(p || q) = sum_{v in I} p_v (log p_v - log q_v), with q still the reference's full softmax.
    It is >= 0 too (p is a distribution; q restricted to I sums to <= 1). Computed in float32 (float64 kept)
    whatever the logits' dtype; memory: only the two logits tensors are kept for backward (`_ExactKL`).
    """
    return _ExactKL.apply(policy_logits, ref_logits, indices)[0]


def exact_kl_and_entropy(policy_logits: torch.Tensor, ref_logits: torch.Tensor, indices: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(`exact_kl`, the policy's entropy H(p) = -sum_v p_v log p_v per position (B, T), without gradient), from one
    pass: the entropy reuses the KL's p and log p instead of a log-softmax of its own over (B, T, V) (GRADE logs it
    every step; `sampling.token_entropy` computes the same values from the logits alone). With top-k `indices`, p is
    the truncated, renormalised policy, as in the KL."""
    return _ExactKL.apply(policy_logits, ref_logits, indices)


# Sample-based per-token estimators of KL(p || q), p the policy, q the reference, from the
# log-probs of the tokens actually sampled from p (Schulman 2020, "Approximating KL Divergence",
# http://joschu.net/blog/kl-approx.html). With r = q(x) / p(x), x ~ p, k1 is unbiased for the KL's VALUE wherever q
# covers p's support; k3 also needs E_p[r] = 1, which fails where top-p/top-k truncate p and not q.
# Their use as a detached reward penalty differs (Tang & Munos 2025, arXiv:2506.09477): the score-function
# gradient E_p[k grad log p] is grad KL(p || q) for k1, but grad [KL(p || q) - KL(q || p)] for k3 (since
# E_p[grad k3] = grad KL(q || p)), which vanishes to second order at p = q. And where top-p/top-k truncate p but not
# q, E_p[r] = q(nucleus) < 1, so k3's mean falls short of the KL while k1's does not. So REINFORCE and PPO shape
# their rewards with k1 by default and log k1 (tests/test_pg_math.py checks the gradients by enumeration).


def kl_k1(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k1 = log p(x) - log q(x) = -log r. Unbiased, but a single token's value can be negative.

    logp, ref_logp: (B, T) log-probs of the sampled tokens. Returns (B, T).
    """
    return logp - ref_logp


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k3 = (r - 1) - log r, r = exp(log q(x) - log p(x)). >= 0 for every token; unbiased where E_p[r] = 1 (not where
    p is truncated and q is not: then its mean is KL - (1 - q(support of p))).

    logp, ref_logp: (B, T) log-probs of the sampled tokens. Returns (B, T).
    """
    log_ratio = ref_logp - logp  # (B, T) log r
    return torch.exp(log_ratio) - log_ratio - 1


KL_ESTIMATORS = {"k1": kl_k1, "k3": kl_k3}


def penalty_and_logged_kl(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(the KL penalty's per-token estimate by `kind`, the logged one), each (B, T), for REINFORCE and PPO: the penalty
    is `kind`'s (k1 by default: as a detached reward its score-function gradient is grad KL(p || q)); the logged KL is
    k1's whichever the penalty uses, unbiased also where top-p/top-k truncate p and not q, where k3's mean falls short
    of the KL by 1 - q(nucleus) per token. The same tensor twice when `kind` is k1."""
    logged = kl_k1(logp, ref_logp)
    return (logged if kind == "k1" else kl_estimate(logp, ref_logp, kind)), logged


def kl_estimate(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-token KL(p || q) estimate with the estimator named by ``kind`` ("k1" or "k3"). Returns (B, T)."""
    if kind not in KL_ESTIMATORS:
        raise ValueError(f"Unknown KL estimator kind={kind!r}; expected one of {sorted(KL_ESTIMATORS)}.")
    return KL_ESTIMATORS[kind](logp, ref_logp)
