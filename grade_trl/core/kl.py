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
