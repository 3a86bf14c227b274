"""Policy-gradient math (GAE, baselines, KL estimators and controllers, PPO / REINFORCE losses)
against hand-computed or independent references. Every number written out is derived in a comment."""

import math

import pytest
import torch
from torch.testing import assert_close

from grade_trl.core import (
    AdaptiveKLController,
    EMABaseline,
    FixedKLController,
    advantages_from_baseline,
    batch_mean_baseline,
    explained_variance,
    gae,
    kl_estimate,
    kl_k1,
    kl_k3,
    leave_one_out_baseline,
    masked_mean,
    masked_var,
    masked_whiten,
    ppo_clip_loss,
    reinforce_loss,
    sequence_logprob,
    value_loss,
)

# ---------------------------------------------------------------- GAE

# Row 0: three real tokens. Row 1: mask [1, 1, 0]; its padding holds junk (reward 5, value 9)
# that must be ignored.
GAE_REWARDS = torch.tensor([[0.0, 0.0, 1.0], [0.0, 2.0, 5.0]])
GAE_VALUES = torch.tensor([[0.5, 0.4, 0.6], [1.0, 0.5, 9.0]])
GAE_MASK = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])


def test_gae_by_hand_with_a_padded_row():
    # gamma = 0.9, lam = 0.8, gamma * lam = 0.72; V after the last real token is 0.
    # Row 0:  t=2: delta = 1 + 0.9*0   - 0.6 =  0.4    A2 = 0.4
    #         t=1: delta = 0 + 0.9*0.6 - 0.4 =  0.14   A1 = 0.14 + 0.72*0.4   =  0.428
    #         t=0: delta = 0 + 0.9*0.4 - 0.5 = -0.14   A0 = -0.14 + 0.72*0.428 =  0.16816
    #         returns = A + V = [0.66816, 0.828, 1.0]
    # Row 1:  t=2 is padding: A2 = 0, and V2 = 9 is not bootstrapped from.
    #         t=1: delta = 2 + 0.9*0   - 0.5 =  1.5    A1 = 1.5
    #         t=0: delta = 0 + 0.9*0.5 - 1.0 = -0.55   A0 = -0.55 + 0.72*1.5   =  0.53
    #         returns = [0.53 + 1.0, 1.5 + 0.5, 0] = [1.53, 2.0, 0]
    advantages, returns = gae(GAE_REWARDS, GAE_VALUES, GAE_MASK, gamma=0.9, lam=0.8)
    assert_close(advantages, torch.tensor([[0.16816, 0.428, 0.4], [0.53, 1.5, 0.0]]))
    assert_close(returns, torch.tensor([[0.66816, 0.828, 1.0], [1.53, 2.0, 0.0]]))


def test_gae_with_gamma_lam_one_is_reward_to_go_minus_value():
    # The deltas telescope: A_t = sum_{k >= t} r_k - V_t, and returns = reward-to-go.
    # Row 0: reward-to-go [1, 1, 1] - V [0.5, 0.4, 0.6] = [0.5, 0.6, 0.4]
    # Row 1: reward-to-go [2, 2, -] - V [1.0, 0.5, -]   = [1.0, 1.5, 0]
    advantages, returns = gae(GAE_REWARDS, GAE_VALUES, GAE_MASK, gamma=1.0, lam=1.0)
    assert_close(advantages, torch.tensor([[0.5, 0.6, 0.4], [1.0, 1.5, 0.0]]))
    assert_close(returns, torch.tensor([[1.0, 1.0, 1.0], [2.0, 2.0, 0.0]]))


def _gae_by_sums(rewards, values, lengths, gamma, lam):
    """Independent O(T^2) reference: A_t = sum_{l=0}^{L-1-t} (gamma*lam)^l delta_{t+l}."""
    B, T = rewards.shape
    advantages = torch.zeros(B, T, dtype=torch.float64)
    for b in range(B):
        L = lengths[b]
        v = [values[b, t].item() if t < L else 0.0 for t in range(T + 1)]  # 0 past the end
        delta = [rewards[b, t].item() + gamma * v[t + 1] - v[t] for t in range(L)]
        for t in range(L):
            advantages[b, t] = sum((gamma * lam) ** l * delta[t + l] for l in range(L - t))
    return advantages


def test_gae_loop_matches_sum_of_discounted_deltas_on_random_tensors():
    torch.manual_seed(0)
    B, T, gamma, lam = 5, 7, 0.95, 0.9
    rewards, values = torch.randn(B, T, dtype=torch.float64), torch.randn(B, T, dtype=torch.float64)
    lengths = [7, 1, 4, 6, 2]
    mask = (torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]).double()  # (B, T) right-padded
    advantages, returns = gae(rewards, values, mask, gamma, lam)
    reference = _gae_by_sums(rewards, values, lengths, gamma, lam)
    assert_close(advantages, reference)
    assert_close(returns, (reference + values) * mask)


def test_gae_outputs_carry_no_gradient():
    values = GAE_VALUES.clone().requires_grad_(True)
    advantages, returns = gae(GAE_REWARDS, values, GAE_MASK, gamma=0.9, lam=0.8)
    assert not advantages.requires_grad and not returns.requires_grad


# ---------------------------------------------------------------- masked variance and whitening


def test_masked_var_by_hand():
    values = torch.tensor([[1.0, 2.0], [3.0, 99.0]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    # Over [1, 2, 3]: mean 2, squared deviations 1 + 0 + 1 = 2; biased 2/3, Bessel-corrected 2/2 = 1.
    assert masked_var(values, mask).item() == pytest.approx(1.0)
    assert masked_var(values, mask, unbiased=False).item() == pytest.approx(2.0 / 3.0)
    one = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    assert masked_var(values, one).item() == 0.0  # a single entry: no Bessel correction, no NaN


def test_masked_whiten_has_zero_mean_unit_std_and_zeros_where_masked():
    torch.manual_seed(0)
    values = torch.randn(4, 6, dtype=torch.float64) * 3 + 5
    mask = torch.ones(4, 6, dtype=torch.float64)
    mask[1, 3:] = 0
    mask[3, 1:] = 0
    whitened = masked_whiten(values, mask)
    assert masked_mean(whitened, mask).item() == pytest.approx(0.0, abs=1e-10)
    assert masked_var(whitened, mask).item() == pytest.approx(1.0, abs=1e-6)
    assert (whitened[mask == 0] == 0).all()
    # The statistics ignore the masked entries: changing them changes nothing.
    assert_close(masked_whiten(values + 100 * (1 - mask), mask), whitened)


def test_masked_whiten_without_shift_keeps_the_mean():
    values = torch.tensor([[1.0, 2.0, 3.0, -50.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    # Over [1, 2, 3]: mean 2, unbiased std 1: (x - 2) / 1 + 2 = [1, 2, 3]; the padding becomes 0.
    assert_close(masked_whiten(values, mask, shift_mean=False), torch.tensor([[1.0, 2.0, 3.0, 0.0]]))
    # [10, 20, 30]: mean 20, std 10: (x - 20) / 10 + 20 = [19, 20, 21]; with the shift, [-1, 0, 1].
    scaled = masked_whiten(values * 10, mask, shift_mean=False)
    assert_close(scaled, torch.tensor([[19.0, 20.0, 21.0, 0.0]]))
    assert masked_mean(scaled, mask).item() == pytest.approx(20.0)  # the mean is kept
    assert_close(masked_whiten(values * 10, mask), torch.tensor([[-1.0, 0.0, 1.0, 0.0]]))
    # [-10, -20, -30]: mean -20, std 10: (x + 20) / 10 - 20 = [-19, -20, -21], negative like the mean.
    negative = masked_whiten(values * -10, mask, shift_mean=False)
    assert_close(negative, torch.tensor([[-19.0, -20.0, -21.0, 0.0]]))
    assert (negative[mask == 1] < 0).all()


# ---------------------------------------------------------------- PPO losses


def test_ppo_clip_loss_by_hand():
    # clip = 0.2, so the ratio is clipped to [0.8, 1.2]. Six real tokens and one masked junk token.
    ratios = torch.tensor([[1.1, 1.1, 1.5, 1.5, 0.5, 0.5, 3.0]])
    advantages = torch.tensor([[1.0, -1.0, 1.0, -1.0, 1.0, -1.0, 5.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0]])
    old_logps = torch.full((1, 7), -2.0)
    logps = (old_logps + ratios.log()).requires_grad_(True)
    #  ratio  A   pg_loss1 = -A*r   pg_loss2 = -A*clip(r)   max    clipped term larger?
    #  1.1   +1       -1.1               -1.1               -1.1   no (inside the range)
    #  1.1   -1        1.1                1.1                1.1   no
    #  1.5   +1       -1.5               -1.2               -1.2   yes
    #  1.5   -1        1.5                1.2                1.5   no (pessimistic: unclipped)
    #  0.5   +1       -0.5               -0.8               -0.5   no
    #  0.5   -1        0.5                0.8                0.8   yes
    # loss = (-1.1 + 1.1 - 1.2 + 1.5 - 0.5 + 0.8) / 6 = 0.6 / 6 = 0.1; clipfrac = 2 / 6.
    loss, stats = ppo_clip_loss(logps, old_logps, advantages, mask, clip=0.2)
    assert loss.item() == pytest.approx(0.1, abs=1e-6)
    assert stats["clipfrac"].item() == pytest.approx(2.0 / 6.0)
    assert stats["ratio_mean"].item() == pytest.approx((1.1 + 1.1 + 1.5 + 1.5 + 0.5 + 0.5) / 6, rel=1e-6)
    expected_kl = 0.5 * 2 * (math.log(1.1) ** 2 + math.log(1.5) ** 2 + math.log(0.5) ** 2) / 6
    assert stats["approxkl"].item() == pytest.approx(expected_kl, rel=1e-6)
    # Gradient: d/dlogp of -A*r is -A*r / 6 on the tokens where the unclipped term won, 0 elsewhere.
    loss.backward()
    expected_grad = torch.tensor([[-1.1, 1.1, 0.0, 1.5, -0.5, 0.0, 0.0]]) / 6
    assert_close(logps.grad, expected_grad)


def test_value_loss_by_hand_clipped_and_plain():
    # clip = 0.2. The last token is masked junk.
    values = torch.tensor([[1.0, 1.5, 1.5, 0.0, 0.5, 100.0]])
    old_values = torch.tensor([[0.9, 1.0, 1.0, 1.0, 1.0, 0.0]])
    returns = torch.tensor([[2.0, 2.0, 1.0, 3.0, 0.0, -100.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0, 1.0, 0.0]])
    #  V    V_old  R    V_clip   (V-R)^2   (V_clip-R)^2   max    clipped larger?
    #  1.0  0.9    2.0  1.0      1.0       1.0            1.0    no (inside the range)
    #  1.5  1.0    2.0  1.2      0.25      0.64           0.64   yes
    #  1.5  1.0    1.0  1.2      0.25      0.04           0.25   no
    #  0.0  1.0    3.0  0.8      9.0       4.84           9.0    no
    #  0.5  1.0    0.0  0.8      0.25      0.64           0.64   yes
    # clipped: 0.5 * (1 + 0.64 + 0.25 + 9 + 0.64) / 5 = 0.5 * 11.53 / 5 = 1.153
    # plain:   0.5 * (1 + 0.25 + 0.25 + 9 + 0.25) / 5 = 0.5 * 10.75 / 5 = 1.075; value_error = 2.15
    loss, stats = value_loss(values, old_values, returns, mask, clip=0.2)
    assert loss.item() == pytest.approx(1.153, rel=1e-6)
    assert stats["vf_clipfrac"].item() == pytest.approx(2.0 / 5.0)
    assert stats["value_error"].item() == pytest.approx(2.15, rel=1e-6)
    loss, stats = value_loss(values, old_values, returns, mask, clip=None)
    assert loss.item() == pytest.approx(1.075, rel=1e-6)
    assert stats["vf_clipfrac"].item() == 0.0
    assert stats["value_error"].item() == pytest.approx(2.15, rel=1e-6)


def test_explained_variance():
    torch.manual_seed(0)
    returns = torch.randn(3, 5, dtype=torch.float64)
    mask = torch.ones(3, 5, dtype=torch.float64)
    mask[2, 2:] = 0
    assert explained_variance(returns.clone(), returns, mask).item() == pytest.approx(1.0)
    mean_values = torch.full_like(returns, masked_mean(returns, mask).item())
    assert explained_variance(mean_values, returns, mask).item() == pytest.approx(0.0, abs=1e-12)
    # By hand: R = [1, 2, 3], V = [1, 2, 2]: Var(R - V) = Var([0, 0, 1]) = 1/3, Var(R) = 1 -> 2/3.
    ev = explained_variance(torch.tensor([[1.0, 2.0, 2.0]]), torch.tensor([[1.0, 2.0, 3.0]]), torch.ones(1, 3))
    assert ev.item() == pytest.approx(2.0 / 3.0)


# ---------------------------------------------------------------- REINFORCE


def test_sequence_logprob_mean_and_sum():
    token_logps = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.5, -9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    # Row 0: sum -6, mean -2. Row 1: the padding's -9 is dropped: sum -1, mean -0.5.
    assert_close(sequence_logprob(token_logps, mask), torch.tensor([-2.0, -0.5]))
    assert_close(sequence_logprob(token_logps, mask, reduction="sum"), torch.tensor([-6.0, -1.0]))
    with pytest.raises(ValueError, match="reduction"):
        sequence_logprob(token_logps, mask, reduction="max")


def test_reinforce_loss_by_hand():
    seq_logps = torch.tensor([-2.0, -0.5], requires_grad=True)
    advantages = torch.tensor([1.0, -2.0], requires_grad=True)
    # loss = -(1 * -2 + -2 * -0.5) / 2 = -(-2 + 1) / 2 = 0.5; d loss / d logp_i = -A_i / 2 = [-0.5, 1].
    loss = reinforce_loss(seq_logps, advantages)
    assert loss.item() == pytest.approx(0.5)
    loss.backward()
    assert_close(seq_logps.grad, torch.tensor([-0.5, 1.0]))
    assert advantages.grad is None  # advantages are constants of the update


# ---------------------------------------------------------------- baselines


def test_ema_baseline_sequence_by_hand():
    ema = EMABaseline(momentum=0.9)
    assert ema.value is None
    # Batch 1, mean 2: no history, so each sample's baseline is the mean of the others: [3, 1]; EMA = 2.
    assert_close(ema.update(torch.tensor([1.0, 3.0])), torch.tensor([3.0, 1.0]))
    assert ema.value == pytest.approx(2.0)
    # Batch 2, mean 7: baseline is the previous EMA, 2; then EMA = 0.9*2 + 0.1*7 = 2.5.
    assert ema.update(torch.tensor([6.0, 8.0])) == pytest.approx(2.0)
    assert ema.value == pytest.approx(2.5)
    # Batch 3, mean 0: baseline 2.5; then EMA = 0.9*2.5 + 0.1*0 = 2.25.
    assert ema.update(torch.tensor([0.0, 0.0])) == pytest.approx(2.5)
    assert ema.value == pytest.approx(2.25)


def test_ema_baseline_never_contains_the_samples_own_reward():
    """Moving one sample's reward by +10 must not move that sample's baseline, on the first batch as on later ones."""
    rewards = torch.tensor([0.2, 0.9, 0.4, 0.7])
    shifted = rewards.clone()
    shifted[2] += 10.0
    first, first_shifted = EMABaseline(0.9).update(rewards), EMABaseline(0.9).update(shifted)
    assert_close(first_shifted[2], first[2])  # its own baseline: unchanged (to round-off)
    assert_close(first_shifted[[0, 1, 3]] - first[[0, 1, 3]], torch.full((3,), 10.0 / 3))  # the others' means moved
    ema, ema_shifted = EMABaseline(0.9), EMABaseline(0.9)
    ema.update(rewards), ema_shifted.update(rewards)
    assert ema.update(rewards) == ema_shifted.update(shifted)  # later batches: the past only
    assert_close(EMABaseline(0.9).update(torch.tensor([5.0])), torch.tensor([0.0]))  # one sample, no history: no baseline


def test_batch_mean_and_leave_one_out_baselines_by_hand():
    assert_close(batch_mean_baseline(torch.tensor([1.0, 2.0, 6.0])), torch.tensor([3.0, 3.0, 3.0]))
    rewards = torch.tensor([1.0, 2.0, 6.0, 0.0, 3.0, 3.0])  # two prompts, G = 3
    # Group 1 sum 9: [(9-1)/2, (9-2)/2, (9-6)/2] = [4, 3.5, 1.5]
    # Group 2 sum 6: [(6-0)/2, (6-3)/2, (6-3)/2] = [3, 1.5, 1.5]
    expected = torch.tensor([4.0, 3.5, 1.5, 3.0, 1.5, 1.5])
    assert_close(leave_one_out_baseline(rewards, group_size=3), expected)
    with pytest.raises(ValueError, match="group_size >= 2"):
        leave_one_out_baseline(rewards, group_size=1)
    with pytest.raises(ValueError, match="groups of 4"):
        leave_one_out_baseline(rewards, group_size=4)


def test_normalised_advantages_keep_the_baseline_effect():
    rewards, baseline = torch.tensor([1.0, 2.0, 3.0]), 10.0
    # r - b = [-9, -8, -7], std (unbiased) = 1, so normalising leaves [-9, -8, -7]: all negative.
    assert_close(advantages_from_baseline(rewards, baseline, normalize=False), torch.tensor([-9.0, -8.0, -7.0]))
    normalised = advantages_from_baseline(rewards, baseline, normalize=True)
    assert_close(normalised, torch.tensor([-9.0, -8.0, -7.0]), atol=1e-6, rtol=1e-6)
    assert (normalised < 0).all()
    # The published code re-centred: (A - mean A) / std A = [-1, 0, 1], mean 0, the baseline cancelled.
    raw = rewards - baseline
    buggy = (raw - raw.mean()) / (raw.std() + 1e-8)
    assert_close(buggy, torch.tensor([-1.0, 0.0, 1.0]), atol=1e-6, rtol=1e-6)
    assert buggy.mean().item() == pytest.approx(0.0, abs=1e-6)
    assert not torch.allclose(normalised, buggy)


# ---------------------------------------------------------------- KL estimators and controllers


def test_kl_k1_k3_by_hand_for_one_token():
    logp, ref_logp = torch.tensor([math.log(0.25)]), torch.tensor([math.log(0.5)])
    # k1 = log 0.25 - log 0.5 = -log 2 (negative for this token).
    # k3: log r = log 0.5 - log 0.25 = log 2, r = 2: (2 - 1) - log 2 = 1 - log 2.
    assert kl_k1(logp, ref_logp).item() == pytest.approx(-math.log(2))
    assert kl_k3(logp, ref_logp).item() == pytest.approx(1 - math.log(2))
    assert_close(kl_estimate(logp, ref_logp, "k1"), kl_k1(logp, ref_logp))
    assert_close(kl_estimate(logp, ref_logp, "k3"), kl_k3(logp, ref_logp))
    with pytest.raises(ValueError, match="k2"):
        kl_estimate(logp, ref_logp, "k2")


def test_kl_k3_is_nonnegative_on_random_inputs():
    torch.manual_seed(0)
    logp, ref_logp = -torch.rand(8, 16) * 10, -torch.rand(8, 16) * 10
    assert (kl_k3(logp, ref_logp) >= 0).all()
    assert (kl_k1(logp, ref_logp) < 0).any()  # k1 is not: a single token can be negative


def test_kl_k1_and_k3_are_unbiased_for_a_small_categorical():
    p = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    q = torch.tensor([0.4, 0.3, 0.2, 0.1], dtype=torch.float64)
    exact = (p * (p / q).log()).sum().item()  # about 0.456
    generator = torch.Generator().manual_seed(0)
    tokens = torch.multinomial(p, 400_000, replacement=True, generator=generator)  # x ~ p
    logp, ref_logp = p.log()[tokens], q.log()[tokens]
    # Per-token standard deviations are below 1, so the standard error of each mean is < 0.002.
    assert kl_k1(logp, ref_logp).mean().item() == pytest.approx(exact, abs=0.01)
    assert kl_k3(logp, ref_logp).mean().item() == pytest.approx(exact, abs=0.01)


def test_under_a_truncated_policy_k1_stays_unbiased_and_k3_falls_short_by_the_mass_outside():
    """Top-p truncates the policy to its nucleus S and not the reference (which must cover every sampled token): then
    E_p[q / p] = q(S) < 1 and E_p[k3] = KL(p || q) - (1 - q(S)), while E_p[k1] = KL(p || q) (a review found the logged
    k3 biased low under the recipes' top-p 0.9). By enumeration over S."""
    q = torch.tensor([0.5, 0.3, 0.1, 0.06, 0.04], dtype=torch.float64)
    p = torch.tensor([0.5, 0.3, 0.1, 0.0, 0.0], dtype=torch.float64) / 0.9  # q's nucleus at 0.9, renormalised
    support = p > 0
    kl = (p[support] * (p[support] / q[support]).log()).sum()  # = -log 0.9
    logp, logq = p[support].log(), q[support].log()
    assert (p[support] * kl_k1(logp, logq)).sum().item() == pytest.approx(kl.item())
    assert (p[support] * kl_k3(logp, logq)).sum().item() == pytest.approx(kl.item() - (1 - 0.9))


def _score_function_gradient(theta: torch.Tensor, logp: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """E_p[w(x) grad log p(x)] by enumeration over every outcome x (p = exp(logp)), w held fixed: what a detached reward
    w contributes to REINFORCE's or PPO's gradient in expectation."""
    return torch.autograd.grad((logp.exp().detach() * weights.detach() * logp).sum(), theta, retain_graph=True)[0]


def test_k1_as_a_detached_reward_gives_the_kl_gradient_and_k3_does_not():
    """Enumerating a categorical p_theta against a fixed q: the score-function gradient of the k1 penalty equals autograd's
    grad KL(p || q); k3's equals grad [KL(p || q) - KL(q || p)] (E_p[grad k3] = grad KL(q || p); Tang & Munos 2025,
    arXiv:2506.09477), which near p = q is second order: k3 as a reward hardly pulls the policy back."""
    for scale, k3_ratio_below in ((1.0, None), (0.01, 0.05)):  # far from q, and close to it
        generator = torch.Generator().manual_seed(0)
        q = torch.softmax(torch.randn(6, generator=generator, dtype=torch.float64), 0)
        theta = (q.log() + scale * torch.randn(6, generator=generator, dtype=torch.float64)).requires_grad_(True)
        logp = torch.log_softmax(theta, 0)
        p = logp.exp()
        grad_reverse = torch.autograd.grad((p * (logp - q.log())).sum(), theta, retain_graph=True)[0]  # grad KL(p || q)
        grad_forward = torch.autograd.grad((q * (q.log() - logp)).sum(), theta, retain_graph=True)[0]  # grad KL(q || p)
        k1, k3 = kl_k1(logp, q.log()), kl_k3(logp, q.log())
        assert_close(_score_function_gradient(theta, logp, k1), grad_reverse)
        assert_close(_score_function_gradient(theta, logp, k3), grad_reverse - grad_forward)
        if k3_ratio_below is not None:
            ratio = _score_function_gradient(theta, logp, k3).norm() / grad_reverse.norm()
            assert ratio < k3_ratio_below, ratio  # about 0.01 here: O(distance to q)


def test_summed_per_token_k1_as_a_sequence_reward_gives_the_sequence_kl_gradient():
    """REINFORCE's penalty: the per-token estimates summed over a completion, times grad log p(y) of the whole sequence.
    Enumerating every 2-token sequence of a 3-token vocabulary (tabular autoregressive p_theta and q): with k1 the
    expected gradient equals grad KL(p(y1, y2) || q(y1, y2)); with k3 it is that minus each token's grad KL(q_t || p_t)
    averaged over the policy's prefixes (a review found an earlier claim, a sequence-level KL(q || p), wrong)."""
    generator = torch.Generator().manual_seed(1)
    q_logits = torch.randn(4, 3, generator=generator, dtype=torch.float64)  # row 0: the first token; row 1 + y1: the second
    theta = (q_logits + 0.5 * torch.randn(4, 3, generator=generator, dtype=torch.float64)).requires_grad_(True)
    logp_rows, logq_rows = torch.log_softmax(theta, -1), torch.log_softmax(q_logits, -1)
    pairs = [(a, b) for a in range(3) for b in range(3)]
    logp_first, logp_second = torch.stack([logp_rows[0, a] for a, _ in pairs]), torch.stack([logp_rows[1 + a, b] for a, b in pairs])
    logq_first, logq_second = torch.stack([logq_rows[0, a] for a, _ in pairs]), torch.stack([logq_rows[1 + a, b] for a, b in pairs])
    logp = logp_first + logp_second  # (9,) log p(y1, y2)
    sequence_kl = (logp.exp() * (logp - (logq_first + logq_second))).sum()
    exact = torch.autograd.grad(sequence_kl, theta, retain_graph=True)[0]
    # k3's: grad KL_seq(p || q) - sum_t E_{y<t ~ p}[grad KL(q_t || p_t)], the prefixes' probabilities held fixed
    # (E_p[grad k3_t | y<t] = grad KL(q_t || p_t)); not grad of a sequence-level KL(q || p), whose prefixes come from q
    p_first = logp_rows[0].exp().detach()
    forward_terms = (logq_rows[0].exp() * (logq_rows[0] - logp_rows[0])).sum()
    forward_terms = forward_terms + sum(p_first[a] * (logq_rows[1 + a].exp() * (logq_rows[1 + a] - logp_rows[1 + a])).sum() for a in range(3))
    k3_expected = exact - torch.autograd.grad(forward_terms, theta, retain_graph=True)[0]
    for estimator, expected in ((kl_k1, exact), (kl_k3, k3_expected)):
        summed = estimator(logp_first, logq_first) + estimator(logp_second, logq_second)  # (9,) the completion's KL estimate
        value = (logp.exp() * summed).sum()
        assert value.item() == pytest.approx(sequence_kl.item())  # both unbiased for the value
        assert_close(_score_function_gradient(theta, logp, summed), expected)
    assert not torch.allclose(k3_expected, exact)


def test_a_non_finite_batch_moves_neither_the_ema_baseline_nor_the_kl_controller():
    """Found by a journey audit: under `nonfinite: skip`, one batch whose reward overflowed (mean inf) made the EMA
    baseline inf, so every later advantage was NaN and every later update was skipped. A batch whose mean is not
    finite (its step is skipped or stops the run) now leaves the EMA, and a KL that is not finite the adaptive coefficient,
    as they were."""
    ema = EMABaseline(0.5)
    ema.update(torch.tensor([1.0, 3.0]))  # value 2
    ema.update(torch.tensor([1e308, 1e308], dtype=torch.float64))  # mean overflows to inf
    assert ema.value == 2.0
    assert ema.update(torch.tensor([4.0, 4.0])) == 2.0 and ema.value == 3.0  # 0.5 * 2 + 0.5 * 4
    controller = AdaptiveKLController(0.5, target=6.0, horizon=1000.0)
    controller.update(float("nan"), 100)
    assert controller.value == 0.5
    controller.update(float("inf"), 100)
    assert controller.value == 0.5
    controller.update(12.0, 100)  # a finite KL far above the target: the clipped error (0.2) raises beta by 0.2 * 100 / 1000
    assert controller.value == pytest.approx(0.5 * 1.02)


def test_adaptive_kl_controller_by_hand():
    # target 6, horizon 1000, n_steps 100, so the step factor is n_steps / horizon = 0.1.
    cases = [
        (6.6, 1.01),  # error 6.6/6 - 1 = 0.1:          1 + 0.1 * 0.1 = 1.01
        (5.4, 0.99),  # error -0.1:                      1 - 0.1 * 0.1 = 0.99
        (30.0, 1.02),  # error 4, clipped to 0.2:        1 + 0.2 * 0.1 = 1.02
        (0.0, 0.98),  # error -1, clipped to -0.2:       1 - 0.2 * 0.1 = 0.98
    ]
    for kl, factor in cases:
        controller = AdaptiveKLController(init_kl_coef=0.5, target=6.0, horizon=1000)
        controller.update(kl, n_steps=100)
        assert controller.value == pytest.approx(0.5 * factor)
    controller = AdaptiveKLController(init_kl_coef=0.5, target=6.0, horizon=1000)
    controller.update(6.6, n_steps=100)
    controller.update(torch.tensor(30.0), n_steps=100)  # a tensor KL works too; updates compound
    assert controller.value == pytest.approx(0.5 * 1.01 * 1.02)


def test_fixed_kl_controller_never_changes():
    controller = FixedKLController(kl_coef=0.05)
    controller.update(100.0, n_steps=100)
    controller.update(-5.0, n_steps=100)
    assert controller.value == 0.05
