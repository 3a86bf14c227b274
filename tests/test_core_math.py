"""Masks, masked statistics and the exact KL against hand-computed or independent references."""

import math

import pytest
import torch
from torch.testing import assert_close

from grade_trl.core import completion_mask, exact_kl, exact_kl_and_entropy, masked_mean, masked_sum, token_entropy


def test_completion_mask_keeps_first_eos_and_drops_the_rest():
    eos = 0
    tokens = torch.tensor([[5, 6, 0, 7, 0], [5, 6, 7, 8, 9], [0, 1, 2, 3, 4]])
    expected = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.float32)
    assert_close(completion_mask(tokens, eos), expected)


def test_masked_mean_and_sum_by_hand():
    values = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    assert_close(masked_sum(values, mask, dim=1), torch.tensor([3.0, 0.0]))
    assert_close(masked_mean(values, mask, dim=1), torch.tensor([1.5, 0.0]))  # an empty row is 0, not NaN
    assert masked_mean(values, mask).item() == pytest.approx(1.5)


def test_exact_kl_matches_hand_computed_two_token_case():
    p, q = torch.tensor([0.25, 0.75]), torch.tensor([0.5, 0.5])
    expected = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    kl = exact_kl(p.log().view(1, 1, 2), q.log().view(1, 1, 2))
    assert kl.item() == pytest.approx(expected, rel=1e-6)


def test_exact_kl_matches_torch_distributions_and_is_nonnegative():
    torch.manual_seed(0)
    logits_p, logits_q = torch.randn(3, 5, 11) * 3, torch.randn(3, 5, 11) * 3
    reference = torch.distributions.kl_divergence(
        torch.distributions.Categorical(logits=logits_p), torch.distributions.Categorical(logits=logits_q)
    )
    kl = exact_kl(logits_p, logits_q)
    assert_close(kl, reference, rtol=1e-5, atol=1e-6)
    assert (kl >= 0).all()
    assert_close(exact_kl(logits_p, logits_p.clone()), torch.zeros(3, 5), atol=1e-6, rtol=0)


def test_exact_kl_gradient_matches_finite_differences():
    torch.manual_seed(1)
    logits_p = torch.randn(1, 1, 4, dtype=torch.float64, requires_grad=True)
    logits_q = torch.randn(1, 1, 4, dtype=torch.float64)
    torch.autograd.gradcheck(lambda x: exact_kl(x, logits_q).double(), (logits_p,))


def test_entropy_from_the_kl_pass_matches_torch_distributions_full_and_top_k():
    """`exact_kl_and_entropy` (GRADE's step metric) against torch.distributions: the policy's entropy per position,
    over the whole vocabulary and over a top-k support (the truncated, renormalised policy); the same values bit for
    bit as the separate pass it replaces (`token_entropy`), the KL the same as `exact_kl`'s and as the plain expression's;
    the entropy carries no gradient and asking for it leaves the KL's gradient unchanged."""
    torch.manual_seed(2)
    logits_p, logits_q = torch.randn(3, 5, 11) * 3, torch.randn(3, 5, 11) * 3
    kl, entropy = exact_kl_and_entropy(logits_p, logits_q)
    assert_close(entropy, torch.distributions.Categorical(logits=logits_p).entropy(), rtol=1e-5, atol=1e-6)
    assert torch.equal(entropy, token_entropy(logits_p))
    assert torch.equal(kl, exact_kl(logits_p, logits_q))
    logp, logq = torch.log_softmax(logits_p, -1), torch.log_softmax(logits_q, -1)
    assert torch.equal(kl, (logp.exp() * (logp - logq)).sum(-1).clamp(min=0.0))
    values, indices = logits_p.topk(4, -1)
    _, top_k_entropy = exact_kl_and_entropy(values, logits_q, indices)
    assert_close(top_k_entropy, torch.distributions.Categorical(logits=values).entropy(), rtol=1e-5, atol=1e-6)

    policy = logits_p.clone().requires_grad_(True)
    kl, entropy = exact_kl_and_entropy(policy, logits_q)
    assert not entropy.requires_grad
    (grad,) = torch.autograd.grad(kl.sum(), policy)
    assert torch.equal(grad, torch.autograd.grad(exact_kl(policy, logits_q).sum(), policy)[0])


def test_kl_and_entropy_stay_in_float32_under_autocast():
    """Under bf16 autocast (GRADE's `bf16: true`) the KL and the entropy compute from float32 logits in float32: the
    same values as without autocast."""
    torch.manual_seed(3)
    logits_p, logits_q = torch.randn(4, 6, 500), torch.randn(4, 6, 500)
    kl, entropy = exact_kl_and_entropy(logits_p, logits_q)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        kl_autocast, entropy_autocast = exact_kl_and_entropy(logits_p, logits_q)
    assert kl_autocast.dtype == entropy_autocast.dtype == torch.float32
    assert torch.equal(kl_autocast, kl) and torch.equal(entropy_autocast, entropy)
