"""Math shared by every trainer: masks and masked statistics, KL, the soft rollout."""

from .kl import exact_kl
from .masks import completion_mask, masked_mean, masked_sum
from .soft_rollout import SoftRollout, reference_logits, soft_rollout

__all__ = [
    "SoftRollout",
    "completion_mask",
    "exact_kl",
    "masked_mean",
    "masked_sum",
    "reference_logits",
    "soft_rollout",
]
