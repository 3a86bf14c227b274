"""Advantages, baselines and KL-coefficient controllers for REINFORCE and PPO.

Legend: B batch (sequences), T completion tokens, G group size (samples of one prompt),
N number of prompts (B = N * G).
"""

from __future__ import annotations

import math

import torch

from .precision import at_least_float32


# ---------------------------------------------------------------- token-level (PPO)


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation (Schulman et al. 2016, https://arxiv.org/abs/1506.02438).

        delta_t = r_t + gamma * V_{t+1} - V_t
        A_t     = delta_t + gamma * lam * A_{t+1}
        R_t     = A_t + V_t                        (the value targets)

    rewards, values: (B, T) per-token; mask: (B, T) completion mask, right-padded (1 for real
    tokens, 0 after). V_{t+1} and A_{t+1} count as 0 past the last real token (the episode ends
    there, bootstrap 0), so whatever sits in the padding is ignored. Masked positions get A = R = 0.
    The inputs are detached: advantages and returns are targets, never a path for gradients.
    Returns (advantages, returns), both (B, T).
    """
    rewards, values, mask = rewards.detach(), values.detach(), mask.detach()
    T = rewards.shape[1]
    advantages = torch.zeros_like(rewards)  # (B, T)
    next_value = torch.zeros_like(rewards[:, 0])  # (B,) V_{t+1}, already masked
    next_advantage = torch.zeros_like(rewards[:, 0])  # (B,) A_{t+1}, already masked
    for t in reversed(range(T)):
        delta = rewards[:, t] + gamma * next_value - values[:, t]  # (B,)
        advantages[:, t] = (delta + gamma * lam * next_advantage) * mask[:, t]
        next_value = values[:, t] * mask[:, t]
        next_advantage = advantages[:, t]
    returns = (advantages + values) * mask  # (B, T)
    return advantages, returns


# ---------------------------------------------------------------- sequence-level baselines (REINFORCE)


class EMABaseline:
    """Exponential moving average of the batch-mean reward, b <- momentum * b + (1 - momentum) * mean(r).

    Order within ``update``: the baseline returned for a batch is the EMA of the *previous*
    batches, so a sample's own reward never enters its baseline. The first batch has no history:
    it gets the leave-one-out baseline b_i = mean of the batch's other rewards (none for a batch of
    one), for the same reason, and its mean initialises the EMA. (Using the batch's own mean there
    would put each r_i into its own baseline with weight 1/B: a biased first step.) Then the EMA
    is updated with this batch's mean. ``value`` is None before the first update.
    Williams 1992 (REINFORCE with a baseline), https://doi.org/10.1007/BF00992696.
    """

    def __init__(self, momentum: float = 0.9):
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"EMABaseline momentum must be in [0, 1), got {momentum}.")
        self.momentum = momentum
        self.value: float | None = None

    def update(self, rewards: torch.Tensor) -> float | torch.Tensor:
        """rewards: (B,). Returns the baseline for this batch (a float; the first batch's (B,) leave-one-out
        tensor), then folds the batch's mean into the EMA."""
        baseline = self.peek(rewards)
        batch_mean = at_least_float32(rewards.detach()).mean().item()
        if not math.isfinite(batch_mean):  # an overflowed reward or KL: that step stops the run or is skipped (nonfinite:
            return baseline  # skip), and must not leave a NaN baseline to every later step
        self.value = batch_mean if self.value is None else self.momentum * self.value + (1.0 - self.momentum) * batch_mean
        return baseline

    def peek(self, rewards: torch.Tensor) -> float | torch.Tensor:
        """The baseline `update` would return for this batch, leaving the EMA as it is (an evaluation's batch, whose
        rewards must not move the training baseline)."""
        rewards = rewards.detach()
        if self.value is None:
            n = rewards.numel()
            return (rewards.sum() - rewards) / (n - 1) if n > 1 else torch.zeros_like(rewards)
        return self.value


def batch_mean_baseline(rewards: torch.Tensor) -> torch.Tensor:
    """b_i = mean_j r_j over the batch. rewards: (B,). Returns (B,)."""
    return rewards.mean().expand_as(rewards)


def leave_one_out_baseline(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """RLOO baseline: b_i = (sum_{j in group(i)} r_j - r_i) / (G - 1), the mean of the other G - 1 samples.

    rewards: (B,) ordered as consecutive groups of ``group_size`` samples of the same prompt.
    Returns (B,). Kool et al. 2019 (https://openreview.net/forum?id=r1lgTGL5DE);
    Ahmadian et al. 2024 (https://arxiv.org/abs/2402.14740).
    """
    if group_size < 2:
        raise ValueError(f"leave_one_out_baseline needs group_size >= 2, got {group_size}.")
    if rewards.numel() % group_size != 0:
        raise ValueError(
            f"{rewards.numel()} rewards do not split into groups of {group_size}; "
            "pass a batch of (number of prompts) * group_size samples."
        )
    grouped = rewards.view(-1, group_size)  # (N, G)
    others = (grouped.sum(dim=1, keepdim=True) - grouped) / (group_size - 1)  # (N, G)
    return others.view_as(rewards)


def advantages_from_baseline(rewards: torch.Tensor, baseline: torch.Tensor | float, normalize: bool) -> torch.Tensor:
    """A_i = r_i - b_i; with ``normalize``, A_i / (std_j(A_j) + 1e-8), std over the batch.

    Normalising divides only; it does NOT re-centre. Re-centring, (A - mean(A)) / std(A) as in
    the published GRADE code after subtracting its EMA baseline, gives r_i - mean(r), so any
    baseline b that is constant over the batch (EMA, batch mean) cancels: the baseline would have
    no effect. Here, if every reward is below the baseline, every advantage stays negative.
    rewards: (B,); baseline: (B,) or a scalar. Returns (B,), detached.
    """
    advantages = (rewards - baseline).detach()  # (B,)
    if normalize and advantages.numel() > 1:
        advantages = advantages / (advantages.std() + 1e-8)
    return advantages


# ---------------------------------------------------------------- KL coefficient controllers


class AdaptiveKLController:
    """Adaptive KL coefficient (Ziegler et al. 2019, https://arxiv.org/abs/1909.08593, Sec. 2.2;
    as TRL's old PPO ``AdaptiveKLController``):

        e      = clip(KL / target - 1, -0.2, 0.2)
        beta  <- beta * (1 + e * n_steps / horizon)
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: float):
        if target <= 0 or horizon <= 0:
            raise ValueError(f"AdaptiveKLController needs target > 0 and horizon > 0, got {target}, {horizon}.")
        self.value = init_kl_coef
        self.target = target
        self.horizon = horizon

    def update(self, current_kl: float, n_steps: int) -> None:
        if not math.isfinite(float(current_kl)):  # a rollout whose KL overflowed (inf) or is NaN: its step stops the run or
            return  # is skipped (nonfinite: skip); keep beta
        proportional_error = min(max(float(current_kl) / self.target - 1, -0.2), 0.2)
        self.value *= 1 + proportional_error * n_steps / self.horizon


class FixedKLController:
    """Constant KL coefficient, with the same interface as ``AdaptiveKLController``."""

    def __init__(self, kl_coef: float):
        self.value = kl_coef

    def update(self, current_kl: float, n_steps: int) -> None:
        pass
