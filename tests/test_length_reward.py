"""The length reward: hard formula and the differentiable expected-length surrogate."""

import torch
import torch.nn.functional as F
from torch.testing import assert_close

from grade_trl.rewards.length import LengthReward


def test_hard_reward_is_two_minus_words_over_sixteen():
    reward = LengthReward(eos_token_id=0)
    assert reward(["p", "p"], ["one two three four", ""]) == [2 - 4 / 16, 2.0]


def test_expected_tokens_by_hand():
    reward = LengthReward(eos_token_id=0, words_per_token=1.0)
    # 3 positions, EOS mass 0.5 at position 0, 0.5 at position 1: alive = 1, 0.5, 0.25 -> 1.75 tokens
    soft = torch.zeros(1, 3, 4)
    soft[0, :, 0] = torch.tensor([0.5, 0.5, 0.0])
    soft[0, :, 1] = 1 - soft[0, :, 0]
    assert_close(reward.expected_tokens(soft, torch.ones(1, 3)), torch.tensor([1.75]))
    assert_close(reward.score_soft(soft, torch.ones(1, 3)), torch.tensor([2 - 1.75 / 16]))


def test_one_hot_tokens_count_up_to_and_including_eos():
    reward = LengthReward(eos_token_id=0, words_per_token=1.0)
    tokens = torch.tensor([[5, 6, 0, 7, 7], [5, 6, 7, 8, 9]])
    one_hot = F.one_hot(tokens, 10).float()
    assert_close(reward.expected_tokens(one_hot, torch.ones(2, 5)), torch.tensor([3.0, 5.0]))


def test_gradient_raises_early_eos_mass():
    reward = LengthReward(eos_token_id=0)
    logits = torch.zeros(1, 4, 5, requires_grad=True)
    reward.score_soft(torch.softmax(logits, -1), torch.ones(1, 4)).sum().backward()
    eos_grad = logits.grad[0, :, 0]
    assert (eos_grad[:-1] > 0).all() and eos_grad[0] > eos_grad[2]  # earlier EOS shortens more
