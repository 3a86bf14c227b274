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


def masked_var(values: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance over all positions where mask is 1: masked_mean((x - masked_mean(x))^2).

    With ``unbiased`` the result is Bessel-corrected by n / (n - 1), n = mask.sum(), when n > 1
    (as TRL's old ``masked_var``); n <= 1 gives the plain (biased) value, 0, never NaN.
    values, mask: (B, T). Returns a scalar.
    """
    mean = masked_mean(values, mask)
    variance = masked_mean((values - mean) ** 2, mask)
    count = mask.sum()
    if unbiased and count > 1:
        variance = variance * count / (count - 1)
    return variance


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """Whiten over the masked entries: (x - mean) / sqrt(var + 1e-8), var Bessel-corrected.

    ``shift_mean=False`` adds the mean back, (x - mean) / std + mean: the spread is rescaled
    but the mean (and so its sign) is kept, as TRL's old PPO ``masked_whiten`` and OpenAI's
    lm-human-preferences ``whiten`` (https://github.com/openai/lm-human-preferences,
    lm_human_preferences/utils/core_torch.py) do for rewards. Masked-out entries come back as 0.
    values, mask: (B, T). Returns (B, T).
    """
    mean, var = masked_mean(values, mask), masked_var(values, mask)
    whitened = (values - mean) * torch.rsqrt(var + 1e-8)  # (B, T)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask
