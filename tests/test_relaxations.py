"""Relaxation estimators and tau schedules."""

import pytest
import torch
from torch.testing import assert_close

from grade_trl.trainers.relaxations import GumbelSoftmax, StraightThroughGumbel, straight_through, tau_at


def test_gumbel_softmax_is_a_distribution_that_sharpens_as_tau_falls():
    torch.manual_seed(0)
    logits = torch.randn(64, 10)
    for tau in (2.0, 0.5):
        y = GumbelSoftmax()(logits, tau)
        assert_close(y.values.sum(-1), torch.ones(64))
        assert torch.equal(y.hard, y.values.argmax(-1)) and not y.straight_through
    torch.manual_seed(0)
    hot = GumbelSoftmax()(logits, 2.0).values.max(-1).values.mean()
    torch.manual_seed(0)
    cold = GumbelSoftmax()(logits, 0.1).values.max(-1).values.mean()
    assert cold > hot


def test_gumbel_max_samples_follow_the_softmax():
    """argmax(y) is the Gumbel-max sample: its frequencies match softmax(logits)."""
    torch.manual_seed(0)
    logits = torch.tensor([1.0, 0.0, -1.0, 2.0])
    y = GumbelSoftmax()(logits.expand(200_000, 4), 1.0)
    freq = torch.bincount(y.hard, minlength=4).float() / 200_000
    assert_close(freq, torch.softmax(logits, -1), atol=5e-3, rtol=0)


def test_straight_through_forward_is_one_hot_and_backward_is_the_soft_gradient():
    torch.manual_seed(0)
    logits = torch.randn(5, 7, requires_grad=True)
    weights = torch.randn(7)
    torch.manual_seed(1)
    y_ste = StraightThroughGumbel().dense(logits, 0.7)  # the forward value with its gradient path
    assert ((y_ste == 0) | (y_ste == 1)).all() and (y_ste.sum(-1) == 1).all()
    (y_ste @ weights).sum().backward()
    grad_ste = logits.grad.clone()
    logits.grad = None
    torch.manual_seed(1)  # same noise
    y_soft = GumbelSoftmax().dense(logits, 0.7)
    (y_soft @ weights).sum().backward()
    assert_close(grad_ste, logits.grad)
    assert_close(y_ste.argmax(-1), y_soft.argmax(-1))


def test_straight_through_helper():
    soft = torch.tensor([0.2, 0.8], requires_grad=True)
    hard = torch.tensor([0.0, 1.0])
    out = straight_through(hard, soft)
    assert_close(out, hard)
    (out * torch.tensor([3.0, 5.0])).sum().backward()
    assert_close(soft.grad, torch.tensor([3.0, 5.0]))


@pytest.mark.parametrize(
    "step,expected", [(0, 2.0), (500, 1.25), (1000, 0.5), (5000, 0.5)]
)
def test_linear_tau_schedule(step, expected):
    assert tau_at(step, 2.0, 0.5, 1000) == pytest.approx(expected)


def test_constant_tau_schedule():
    assert tau_at(700, 1.5, 0.5, 1000, "constant") == 1.5
