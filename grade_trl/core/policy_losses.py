"""Policy-gradient losses: PPO's clipped surrogate and value loss, REINFORCE, and their diagnostics.

Legend: B batch (sequences), T completion tokens.
"""

from __future__ import annotations

import torch

from .masks import masked_mean, masked_sum, masked_var


def ppo_clip_loss(
    logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, clip: float
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO clipped surrogate (Schulman et al. 2017, https://arxiv.org/abs/1707.06347, eq. 7), as a loss:

        rho  = exp(log pi(a|s) - log pi_old(a|s))
        loss = masked_mean(max(-A * rho, -A * clip(rho, 1 - clip, 1 + clip)))

    logps: (B, T) current log-probs of the sampled tokens (with grad); old_logps, advantages:
    (B, T), detached here (they are constants of the update); mask: (B, T).
    Stats (detached scalars): ``clipfrac`` (fraction of tokens where the clipped term is the
    larger, so its gradient is 0), ``approxkl`` = 0.5 * masked_mean((logps - old_logps)^2) (as
    TRL's old PPO), ``ratio_mean``.
    """
    old_logps, advantages = old_logps.detach(), advantages.detach()
    log_ratio = logps - old_logps  # (B, T)
    ratio = torch.exp(log_ratio)  # (B, T)
    pg_loss1 = -advantages * ratio  # (B, T)
    pg_loss2 = -advantages * torch.clamp(ratio, 1.0 - clip, 1.0 + clip)  # (B, T)
    loss = masked_mean(torch.max(pg_loss1, pg_loss2), mask)
    stats = {
        "clipfrac": masked_mean((pg_loss2 > pg_loss1).float(), mask).detach(),
        "approxkl": 0.5 * masked_mean(log_ratio.detach() ** 2, mask),
        "ratio_mean": masked_mean(ratio.detach(), mask),
    }
    return loss, stats


def value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, clip: float | None
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO value loss, plain or clipped around the rollout's values (as TRL's old PPO / OpenAI baselines).

        plain:   0.5 * masked_mean((V - R)^2)
        clipped: V_clip = V_old + clip(V - V_old, -clip, clip)
                 0.5 * masked_mean(max((V - R)^2, (V_clip - R)^2))

    values: (B, T) current predictions (with grad); old_values, returns: (B, T), detached here;
    mask: (B, T); clip: None for the plain loss. Stats (detached scalars): ``vf_clipfrac``
    (fraction of tokens where the clipped term is the larger; 0 for the plain loss),
    ``value_error`` = masked_mean((V - R)^2).
    """
    old_values, returns = old_values.detach(), returns.detach()
    vf_losses1 = (values - returns) ** 2  # (B, T)
    if clip is None:
        loss = 0.5 * masked_mean(vf_losses1, mask)
        vf_clipfrac = torch.zeros((), device=values.device)
    else:
        values_clipped = old_values + torch.clamp(values - old_values, -clip, clip)  # (B, T)
        vf_losses2 = (values_clipped - returns) ** 2  # (B, T)
        loss = 0.5 * masked_mean(torch.max(vf_losses1, vf_losses2), mask)
        vf_clipfrac = masked_mean((vf_losses2 > vf_losses1).float(), mask)
    stats = {"vf_clipfrac": vf_clipfrac.detach(), "value_error": masked_mean(vf_losses1.detach(), mask)}
    return loss, stats


def sequence_logprob(token_logps: torch.Tensor, mask: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Log-prob of each completion from its tokens': mean (default) or sum over the real tokens.

    "sum" is the exact log pi(y|x), but its size grows with the length, so a REINFORCE update
    built on it weights long completions more (length bias; see docs/background.md section 2);
    "mean" divides by each completion's own length.
    token_logps, mask: (B, T). Returns (B,).
    """
    if reduction == "mean":
        return masked_mean(token_logps, mask, dim=1)
    if reduction == "sum":
        return masked_sum(token_logps, mask, dim=1)
    raise ValueError(f"Unknown reduction={reduction!r}; expected 'mean' or 'sum'.")


def reinforce_loss(seq_logps: torch.Tensor, advantages: torch.Tensor) -> torch.Tensor:
    """REINFORCE with a baseline (Williams 1992, https://doi.org/10.1007/BF00992696), as a loss:

        loss = -mean_i(A_i * log pi(y_i | x_i))

    seq_logps: (B,) with grad; advantages: (B,), detached so no gradient reaches the rewards or
    the baseline. Returns a scalar.
    """
    return -(advantages.detach() * seq_logps).mean()


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """1 - Var(R - V) / Var(R) over the masked entries: 1 for perfect values, 0 for the mean, < 0 worse.

    NaN when the returns have no variance (as CleanRL). values, returns, mask: (B, T). Returns a scalar.
    """
    values, returns = values.detach(), returns.detach()
    var_returns = masked_var(returns, mask)
    if var_returns == 0:
        return torch.full((), float("nan"), device=values.device)
    return 1 - masked_var(returns - values, mask) / var_returns
