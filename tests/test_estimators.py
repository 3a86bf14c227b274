"""GRADE's estimators against their papers and against an exact gradient (benchmarks/estimator_toy.py).

References: ReinMax (Liu et al. 2023, arXiv:2304.08612, Algorithm 2, written here as the authors' hand-coded
backward), Gumbel-Rao (Paulus et al. 2021, arXiv:2010.04838: the conditional noise reproduces the sample and is
Gumbel marginally; same mean as ST-Gumbel, lower variance), gapped straight-through (Fan et al. 2022,
arXiv:2206.07235: deterministic given the sample), decoupled temperatures (Shah et al. 2024, arXiv:2410.13331),
and the unbiased limits one can derive: the score function everywhere, ReinMax at tau = 1 on a linear reward."""

import importlib.util
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from grade_trl.core import soft_rollout
from grade_trl.trainers.relaxations import (
    RELAXATIONS,
    GappedStraightThrough,
    GumbelRao,
    GumbelSoftmax,
    ReinMax,
    StraightThroughGumbel,
    build_relaxation,
    conditional_gumbel,
)

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "estimator_toy.py"


def _toy():
    spec = importlib.util.spec_from_file_location("estimator_toy", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _jacobian(p):  # softmax Jacobian at p: diag(p) - p p^T, (B, K, K)
    return torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2)


class _AuthorsReinMax(torch.autograd.Function):
    """ReinMax as Liu et al. write its backward by hand (their Algorithm 2), independent of our autograd form:
    grad_theta = 2 J(pi_1) g - 1/2 J(pi_0) g, pi_0 = softmax(theta), pi_1 = (D + softmax(theta / tau)) / 2."""

    @staticmethod
    def forward(ctx, logits, one_hot, tau):
        ctx.save_for_backward(logits, one_hot)
        ctx.tau = tau
        return one_hot.clone()

    @staticmethod
    def backward(ctx, g):
        logits, one_hot = ctx.saved_tensors
        pi_0 = logits.softmax(-1)
        pi_1 = 0.5 * ((logits / ctx.tau).softmax(-1) + one_hot)
        grad_1 = 2 * g * pi_1
        grad_1 = grad_1 - pi_1 * grad_1.sum(-1, keepdim=True)
        grad_0 = -0.5 * g * pi_0
        grad_0 = grad_0 - pi_0 * grad_0.sum(-1, keepdim=True)
        return grad_0 + grad_1, None, None


@pytest.mark.parametrize("tau", [0.5, 1.0, 2.0])
def test_reinmax_matches_the_authors_algorithm(tau):
    torch.manual_seed(0)
    logits = torch.randn(16, 7, dtype=torch.float64) * 2
    upstream = torch.randn(16, 7, dtype=torch.float64)
    ours_logits = logits.clone().requires_grad_(True)
    relaxed = ReinMax()(ours_logits, tau)
    forward = relaxed.forward_value(7)
    assert torch.equal(forward.detach(), F.one_hot(relaxed.hard, 7).double())  # the forward is the one-hot sample
    (ours,) = torch.autograd.grad((forward * upstream).sum(), ours_logits)
    ref_logits = logits.clone().requires_grad_(True)
    (reference,) = torch.autograd.grad((_AuthorsReinMax.apply(ref_logits, F.one_hot(relaxed.hard, 7).double(), tau) * upstream).sum(), ref_logits)
    assert_close(ours, reference, rtol=1e-10, atol=1e-12)


def _exact_expectation_over_samples(relaxation, logits, upstream, tau, rows=4000):
    """E_D[grad] for an estimator whose gradient is a function of the sample D only: the gradient of every row with
    the same D is the same (asserted), so the expectation is sum_D pi(D) grad(D), exactly."""
    torch.manual_seed(1)
    batch = logits.expand(rows, -1).clone().requires_grad_(True)
    relaxed = relaxation(batch, tau)
    (grads,) = torch.autograd.grad((relaxed.forward_value(logits.shape[-1]) * upstream).sum(), batch)
    probs = logits.softmax(-1)
    expectation = torch.zeros_like(logits)
    for token in range(logits.shape[-1]):
        rows_d = grads[relaxed.hard == token]
        assert len(rows_d) > 0, "every token must be drawn"
        assert_close(rows_d, rows_d[:1].expand_as(rows_d))  # deterministic given D
        expectation += probs[token] * rows_d[0]
    return expectation


def test_reinmax_is_unbiased_at_tau_1_on_a_linear_reward():
    """f(D) = <c, D>: the exact gradient is J(pi_0) c. With pi_1 = (D + pi_0)/2, E_D[J(pi_1)] = 3/4 J(pi_0), so
    E[2 J(pi_1) - J(pi_0)/2] c = J(pi_0) c: ReinMax is exact here (straight-through Gumbel is not)."""
    logits = torch.tensor([0.3, -1.2, 2.0, 0.5], dtype=torch.float64)
    c = torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=torch.float64)
    exact = _jacobian(logits.softmax(-1).unsqueeze(0))[0] @ c
    assert_close(_exact_expectation_over_samples(ReinMax(), logits, c, 1.0), exact, rtol=1e-10, atol=1e-12)
    biased = _exact_expectation_over_samples(ReinMax(), logits, c, 2.0)  # other temperatures are not exact
    assert (biased - exact).norm() > 1e-3 * exact.norm()


def test_gapped_straight_through_is_deterministic_given_the_sample_and_moves_it_to_the_top_by_the_gap():
    logits = torch.tensor([[0.3, -1.2, 2.0, 1.7]], dtype=torch.float64)
    c = torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=torch.float64)
    _exact_expectation_over_samples(GappedStraightThrough(gap=1.0), logits[0], c, 0.7)  # asserts determinism
    # By hand for D = 1 (theta_1 = -1.2): m1 lifts it to max = 2.0; the others above 2.0 - 1 = 1.0 drop to 1.0.
    perturbed = torch.tensor([0.3, 2.0, 1.0, 1.0], dtype=torch.float64)
    theta = logits.clone().requires_grad_(True)
    torch.manual_seed(0)
    for _ in range(200):  # draw until D = 1
        relaxed = GappedStraightThrough(gap=1.0)(theta, 0.7)
        if relaxed.hard.item() == 1:
            break
    assert relaxed.hard.item() == 1
    assert_close(relaxed.values.detach()[0], F.softmax(perturbed / 0.7, -1))
    (grad,) = torch.autograd.grad((relaxed.forward_value(4) * c).sum(), theta)
    p = F.softmax(perturbed / 0.7, -1)
    assert_close(grad[0], _jacobian(p.unsqueeze(0))[0] @ c / 0.7)


def test_conditional_gumbel_reproduces_the_sample_in_every_draw():
    torch.manual_seed(0)
    logits = torch.cat([torch.randn(64, 50) * 3, torch.randn(8, 50) * 30])  # including extreme logits
    logits[0, 0] = 80.0  # a near-certain token; row 1 asks for its least likely token below
    hard = torch.distributions.Categorical(logits=logits).sample()
    hard[1] = logits[1].argmin()
    perturbed = conditional_gumbel(logits, hard, samples=64)  # (64, B, V)
    assert torch.isfinite(perturbed).all()
    assert torch.equal(perturbed.argmax(-1), hard.expand(64, -1))


def test_conditional_gumbel_is_gumbel_when_the_sample_is_drawn_from_the_policy():
    """Averaged over D ~ softmax(theta), g | D is the unconditional Gumbel(0, 1): mean Euler's gamma, variance pi^2/6."""
    torch.manual_seed(0)
    logits = torch.tensor([[1.0, -0.5, 0.2, 2.0]]).expand(200_000, -1)
    hard = torch.distributions.Categorical(logits=logits).sample()
    noise = conditional_gumbel(logits.double(), hard, samples=1)[0] - logits.double()
    assert_close(noise.mean(0), torch.full((4,), 0.5772156649, dtype=torch.float64), atol=0.015, rtol=0)
    assert_close(noise.var(0), torch.full((4,), math.pi**2 / 6, dtype=torch.float64), atol=0.05, rtol=0)


def test_gumbel_rao_keeps_the_straight_through_mean_and_its_variance_falls_with_k():
    toy = _toy()
    problem = toy.toy_problem(vocab=4, length=2, seed=3)
    exact = toy.exact_gradient(problem)[1]
    n = 20_000
    ste = toy.sample_gradients(problem, "ste", 1.0, n, seed=0)
    rao_1 = toy.sample_gradients(problem, "rao", 1.0, n, seed=1, rao_samples=1)
    rao_4 = toy.sample_gradients(problem, "rao", 1.0, n, seed=2, rao_samples=4)
    rao_16 = toy.sample_gradients(problem, "rao", 1.0, n, seed=3, rao_samples=16)
    variance = {name: g.var(0).sum().item() for name, g in (("ste", ste), ("rao_1", rao_1), ("rao_4", rao_4), ("rao_16", rao_16))}
    assert 0.9 < variance["rao_1"] / variance["ste"] < 1.1  # K = 1 is ST-Gumbel in distribution
    # what remains at large K is the variance of the sample D itself, which no averaging of the noise removes
    assert variance["rao_16"] < 0.95 * variance["rao_4"] < 0.95 * 0.9 * variance["rao_1"]
    # same mean: the difference of the means is within the Monte-Carlo noise of both
    noise = math.sqrt((variance["ste"] + variance["rao_16"]) / n)
    assert (ste.mean(0) - rao_16.mean(0)).norm() < 4 * noise
    assert (ste.mean(0) - exact).norm() > 4 * noise  # ... and that mean is biased (so the test above can fail)


def test_decoupled_temperatures():
    torch.manual_seed(0)
    logits = torch.randn(5, 9, dtype=torch.float64)
    upstream = torch.randn(5, 9, dtype=torch.float64)

    def run(estimator, tau, seed=0):
        torch.manual_seed(seed)
        theta = logits.clone().requires_grad_(True)
        relaxed = estimator(theta, tau)
        forward = relaxed.forward_value(9)
        (grad,) = torch.autograd.grad((forward * upstream).sum(), theta)
        return forward.detach(), grad

    # soft: the forward at tau, the gradient at tau_backward
    forward, grad = run(GumbelSoftmax(tau_backward=0.5), 2.0)
    assert_close(forward, run(GumbelSoftmax(), 2.0)[0])
    assert_close(grad, run(GumbelSoftmax(), 0.5)[1])
    # straight-through family: tau_backward replaces tau in the backward
    for cls in (StraightThroughGumbel, ReinMax, GappedStraightThrough):
        assert_close(run(cls(tau_backward=0.5), 2.0)[1], run(cls(), 0.5)[1])
        assert (run(cls(), 2.0)[1] - run(cls(), 0.5)[1]).abs().max() > 1e-3


def test_exact_gradient_of_the_toy_problem_is_the_softmax_jacobian_for_one_token():
    toy = _toy()
    problem = toy.toy_problem(vocab=5, length=1, seed=0)
    value, grad = toy.exact_gradient(problem)
    p = problem["theta0"].softmax(-1)
    assert math.isclose(value, (p * problem["table"]).sum().item(), rel_tol=1e-12)
    assert_close(grad[:5], _jacobian(p.unsqueeze(0))[0] @ problem["table"])
    assert torch.equal(grad[5:], torch.zeros(25, dtype=torch.float64))  # W is never used with one token


def test_score_function_is_unbiased_and_the_relaxations_are_not_on_the_toy_problem():
    toy = _toy()
    problem = toy.toy_problem(vocab=4, length=3, seed=1)
    exact = toy.exact_gradient(problem)[1]
    n = 40_000
    score = toy.sample_gradients(problem, "score", None, n, seed=0)
    # n |mean - exact|^2 / tr(Cov) has expectation 1 for an unbiased estimator
    assert n * (score.mean(0) - exact).pow(2).sum() / score.var(0).sum() < 5
    stats = toy.summarise(toy.sample_gradients(problem, "ste", 1.0, n, seed=1), exact)
    assert stats["relative_bias"] > 5 * stats["relative_bias_noise_floor"]
    # Gumbel-softmax's bias falls as tau -> 0 (its relaxed objective tends to E[R]) and its variance grows
    soft_cold = toy.summarise(toy.sample_gradients(problem, "soft", 0.25, n, seed=2), exact)
    soft_warm = toy.summarise(toy.sample_gradients(problem, "soft", 1.0, n, seed=3), exact)
    assert soft_cold["relative_bias"] < soft_warm["relative_bias"] and soft_cold["relative_variance"] > soft_warm["relative_variance"]


@pytest.mark.parametrize("estimator", sorted(RELAXATIONS))
def test_every_estimator_composes_with_top_k_in_the_rollout(estimator, policy, tokenizer, prompts):
    enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    relaxation = build_relaxation(estimator, rao_samples=3)
    torch.manual_seed(0)
    rollout = soft_rollout(policy, enc["input_ids"], enc["attention_mask"], lambda logits, step: relaxation(logits, 1.0),
                           max_new_tokens=4, eos_token_id=0, top_k=16)
    for row in range(len(prompts)):  # each hard token is one of its step's k columns
        for step in range(4):
            assert rollout.tokens[row, step] in rollout.logit_indices[row, step]
    dense = rollout.soft_tokens.dense()
    loss = (dense * torch.randn_like(dense)).sum()
    loss.backward()
    grad = policy.transformer.h[0].mlp.c_fc.weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_rao_and_gapped_options_reach_the_estimator():
    assert build_relaxation("rao", rao_samples=5).rao_samples == 5
    assert build_relaxation("gapped", gap=2.5).gap == 2.5
    assert isinstance(build_relaxation("reinmax", tau_backward=1.5), ReinMax) and build_relaxation("reinmax", tau_backward=1.5).tau_backward == 1.5
    assert isinstance(build_relaxation("rao"), GumbelRao)
