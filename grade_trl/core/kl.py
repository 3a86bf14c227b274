"""KL divergence between the policy and the frozen reference.

Legend: B batch, T positions, V vocabulary.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def exact_kl(policy_logits: torch.Tensor, ref_logits: torch.Tensor) -> torch.Tensor:
    """Exact per-position KL(p || q) = sum_v p_v (log p_v - log q_v), summed over the whole vocabulary.

    policy_logits, ref_logits: (B, T, V). Returns (B, T), >= 0 (the clamp removes float round-off
    around 0 only; it does not hide a sign error, since the exact sum cannot be negative).
    Gradients flow into both arguments' graphs; the reference's parameters are frozen, but its
    inputs (the policy's soft tokens) are not, and that path is part of the relaxed objective.
    """
    dtype = torch.promote_types(policy_logits.dtype, torch.float32)  # at least float32, float64 kept
    logp = F.log_softmax(policy_logits.to(dtype), dim=-1)
    logq = F.log_softmax(ref_logits.to(dtype), dim=-1)
    return (logp.exp() * (logp - logq)).sum(-1).clamp(min=0.0)


# Sample-based per-token estimators of KL(p || q), p the policy, q the reference, from the
# log-probs of the tokens actually sampled from p (Schulman 2020, "Approximating KL Divergence",
# http://joschu.net/blog/kl-approx.html). With r = q(x) / p(x), x ~ p, both are unbiased.


def kl_k1(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k1 = log p(x) - log q(x) = -log r. Unbiased, but a single token's value can be negative.

    logp, ref_logp: (B, T) log-probs of the sampled tokens. Returns (B, T).
    """
    return logp - ref_logp


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k3 = (r - 1) - log r, r = exp(log q(x) - log p(x)). Unbiased and >= 0 for every token.

    logp, ref_logp: (B, T) log-probs of the sampled tokens. Returns (B, T).
    """
    log_ratio = ref_logp - logp  # (B, T) log r
    return torch.exp(log_ratio) - log_ratio - 1


KL_ESTIMATORS = {"k1": kl_k1, "k3": kl_k3}


def kl_estimate(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-token KL(p || q) estimate with the estimator named by ``kind`` ("k1" or "k3"). Returns (B, T)."""
    if kind not in KL_ESTIMATORS:
        raise ValueError(f"Unknown KL estimator kind={kind!r}; expected one of {sorted(KL_ESTIMATORS)}.")
    return KL_ESTIMATORS[kind](logp, ref_logp)
