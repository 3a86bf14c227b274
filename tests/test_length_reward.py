"""The length reward: hard formula and the differentiable expected-length surrogate."""

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from grade_trl.rewards.length import LengthReward


def test_hard_reward_is_two_minus_words_over_sixteen():
    reward = LengthReward(eos_token_id=0)
    assert reward(["p", "p"], ["one two three four", ""]) == [2 - 4 / 16, 2.0]


def test_expected_tokens_by_hand():
    reward = LengthReward(eos_token_id=0, words_per_token=1.0)
    # 3 positions, EOS mass 0.5 at position 0, 0.5 at position 1: a text token (no EOS at or before it) with
    # probability 0.5, 0.25, 0.25 -> 1.0 tokens
    soft = torch.zeros(1, 3, 4)
    soft[0, :, 0] = torch.tensor([0.5, 0.5, 0.0])
    soft[0, :, 1] = 1 - soft[0, :, 0]
    assert_close(reward.expected_tokens(soft, torch.ones(1, 3)), torch.tensor([1.0]))
    assert_close(reward.score_soft(soft, torch.ones(1, 3)), torch.tensor([2 - 1.0 / 16]))


def test_one_hot_tokens_count_the_tokens_before_eos_like_the_text():
    reward = LengthReward(eos_token_id=0, words_per_token=1.0)
    tokens = torch.tensor([[5, 6, 0, 7, 7], [5, 6, 7, 8, 9], [0, 3, 3, 3, 3]])
    one_hot = F.one_hot(tokens, 10).float()
    # the GRADE mask: up to and including the first EOS
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]).float()
    assert_close(reward.expected_tokens(one_hot, mask), torch.tensor([2.0, 5.0, 0.0]))
    assert_close(reward.expected_tokens(one_hot, torch.ones(3, 5)), torch.tensor([2.0, 5.0, 0.0]))  # after EOS nothing counts


def test_soft_and_hard_length_agree_on_one_hot_tokens_of_real_text(tokenizer):
    """On one-hot tokens the soft reward is the hard one, up to the documented words-per-token factor: with that
    factor set to the text's own words / tokens, they are equal."""
    eos = tokenizer.eos_token_id
    for text in ["This movie was a complete waste of time", "Great", "I loved the acting , but the plot was thin ."]:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        tokens = torch.tensor([ids + [eos, 11, 12]])  # the EOS and what follows it are not text
        mask = torch.tensor([[1.0] * (len(ids) + 1) + [0.0, 0.0]])
        words = len(tokenizer.decode(ids).split())
        reward = LengthReward(eos_token_id=eos, words_per_token=words / len(ids))
        hard = reward(["p"], [tokenizer.decode(tokens[0].tolist(), skip_special_tokens=True)])[0]
        soft = reward.score_soft(F.one_hot(tokens, tokenizer.vocab_size).double(), mask)
        assert soft.item() == pytest.approx(hard, abs=1e-12)


def test_length_reward_keeps_float64_and_passes_gradcheck():
    reward = LengthReward(eos_token_id=0)
    logits = torch.randn(2, 4, 5, dtype=torch.float64, requires_grad=True)
    mask = torch.ones(2, 4, dtype=torch.float64)
    assert reward.score_soft(torch.softmax(logits, -1), mask).dtype == torch.float64
    assert torch.autograd.gradcheck(lambda x: reward.score_soft(torch.softmax(x, -1), mask), (logits,))


def test_gradient_raises_early_eos_mass():
    reward = LengthReward(eos_token_id=0)
    logits = torch.zeros(1, 4, 5, requires_grad=True)
    reward.score_soft(torch.softmax(logits, -1), torch.ones(1, 4)).sum().backward()
    eos_grad = logits.grad[0, :, 0]
    assert (eos_grad[:-1] > 0).all() and eos_grad[0] > eos_grad[2]  # earlier EOS shortens more
