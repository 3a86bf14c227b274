"""Completion masks and masked statistics.

Legend: B batch, T generated positions.
"""

from __future__ import annotations

import torch


def completion_mask(tokens: torch.Tensor, eos_token_id: int | None) -> torch.Tensor:
    """1 for real completion tokens: everything up to and including the first EOS, 0 after it.

    tokens: (B, T) generated token ids. Returns a float mask (B, T).
    """
    if eos_token_id is None:
        return torch.ones_like(tokens, dtype=torch.float32)
    is_eos = tokens == eos_token_id  # (B, T)
    # Number of EOS strictly before each position; a position is real while that count is 0.
    eos_before = torch.cumsum(is_eos.int(), dim=1) - is_eos.int()
    return (eos_before == 0).float()


def masked_sum(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    return (values * mask).sum() if dim is None else (values * mask).sum(dim)


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean over positions where mask is 1 (0 where the mask is empty, never NaN)."""
    count = mask.sum() if dim is None else mask.sum(dim)
    return masked_sum(values, mask, dim) / count.clamp(min=1.0)
