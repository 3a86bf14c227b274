"""Math shared by every trainer: masks and masked statistics, KL, advantages, policy losses, the soft rollout."""

from .advantages import (
    AdaptiveKLController,
    EMABaseline,
    FixedKLController,
    advantages_from_baseline,
    batch_mean_baseline,
    gae,
    leave_one_out_baseline,
)
from .head_scoring import completion_scores, output_head, scored_in_head, scores_in_head
from .kl import exact_kl, exact_kl_and_entropy, kl_estimate, kl_k1, kl_k3, penalty_and_logged_kl
from .masks import completion_mask, masked_mean, masked_sum, masked_var, masked_whiten
from .precision import at_least_float32
from .policy_losses import explained_variance, ppo_clip_loss, reinforce_loss, sequence_logprob, value_loss
from .sampling import (
    SampledBatch,
    SamplingSettings,
    entropy_from_logits,
    logprobs_from_logits,
    process_logits,
    sample,
    token_entropy,
    token_logprobs,
)
from .soft_rollout import SoftRollout, reference_logits, soft_rollout
from .soft_tokens import Relaxed, SoftTokens

__all__ = [
    "AdaptiveKLController",
    "EMABaseline",
    "FixedKLController",
    "Relaxed",
    "SampledBatch",
    "SamplingSettings",
    "SoftRollout",
    "SoftTokens",
    "advantages_from_baseline",
    "at_least_float32",
    "batch_mean_baseline",
    "completion_mask",
    "completion_scores",
    "entropy_from_logits",
    "exact_kl",
    "exact_kl_and_entropy",
    "explained_variance",
    "gae",
    "kl_estimate",
    "kl_k1",
    "kl_k3",
    "penalty_and_logged_kl",
    "leave_one_out_baseline",
    "logprobs_from_logits",
    "masked_mean",
    "masked_sum",
    "masked_var",
    "masked_whiten",
    "output_head",
    "ppo_clip_loss",
    "process_logits",
    "reference_logits",
    "reinforce_loss",
    "sample",
    "scored_in_head",
    "scores_in_head",
    "sequence_logprob",
    "soft_rollout",
    "token_entropy",
    "token_logprobs",
    "value_loss",
]
