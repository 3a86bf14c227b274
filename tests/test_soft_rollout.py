"""The relaxed rollout: agreement with a plain forward pass, masks, KL, and where the gradient goes."""

import copy

import torch
import torch.nn.functional as F
from torch.testing import assert_close

from grade_trl.core import exact_kl, masked_sum, reference_logits, soft_rollout
from grade_trl.trainers.grade import grade_loss, soft_reward_inputs
from grade_trl.trainers.relaxations import StraightThroughGumbel, straight_through


def _encode(tokenizer, prompts):
    return tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)


def forced_relax(forced_tokens, vocab_size):
    """Straight-through relaxation whose forward tokens are fixed in advance (the test's ground truth)."""

    def relax(logits, step):
        soft = F.softmax(logits, -1)
        return straight_through(F.one_hot(forced_tokens[:, step], vocab_size).to(soft.dtype), soft)

    return relax


def test_straight_through_rollout_with_fixed_tokens_reproduces_a_plain_forward(policy, tokenizer, prompts):
    enc = _encode(tokenizer, prompts)  # left-padded: rows have 3, 9 and 1 real prompt tokens
    assert (enc["attention_mask"] == 0).any(), "the test needs left padding"
    vocab = policy.config.vocab_size
    torch.manual_seed(0)
    forced = torch.randint(1, vocab, (len(prompts), 6))  # no EOS (id 0), so all 6 steps run
    rollout = soft_rollout(policy, enc["input_ids"], enc["attention_mask"], forced_relax(forced, vocab), max_new_tokens=6, eos_token_id=0)
    assert torch.equal(rollout.tokens, forced)

    for row in range(len(prompts)):  # each row alone, unpadded: the ground truth
        prompt = enc["input_ids"][row][enc["attention_mask"][row].bool()]
        ids = torch.cat([prompt, forced[row]]).unsqueeze(0)
        with torch.no_grad():
            plain = policy(input_ids=ids).logits[0, len(prompt) - 1 : -1]  # logits that predict each forced token
        assert_close(rollout.logits[row].detach(), plain, rtol=1e-4, atol=1e-4)


def test_reference_logits_equal_the_policy_logits_when_reference_is_the_policy(policy, tokenizer, prompts):
    enc = _encode(tokenizer, prompts)
    torch.manual_seed(0)
    est = StraightThroughGumbel()
    rollout = soft_rollout(policy, enc["input_ids"], enc["attention_mask"], lambda l, s: est(l, 1.0), max_new_tokens=8, min_new_tokens=3, eos_token_id=0)
    ref = copy.deepcopy(policy).requires_grad_(False)
    ref_logits = reference_logits(ref, rollout, min_new_tokens=3, eos_token_id=0)
    assert_close(ref_logits, rollout.logits.detach(), rtol=1e-4, atol=1e-4)
    kl = masked_sum(exact_kl(rollout.logits, ref_logits), rollout.mask, dim=1)
    assert (kl >= 0).all() and kl.max() < 1e-4


def test_min_new_tokens_forbids_eos_and_mask_stops_after_first_eos(policy, tokenizer):
    enc = _encode(tokenizer, ["The end."])
    vocab = policy.config.vocab_size

    def eos_whenever_allowed(logits, step):  # picks EOS as soon as it is not forbidden
        allowed = logits[0, 0] > -1e30
        token = torch.tensor([0 if allowed else 5])
        return straight_through(F.one_hot(token, vocab).float(), F.softmax(logits, -1))

    rollout = soft_rollout(policy, enc["input_ids"], enc["attention_mask"], eos_whenever_allowed, max_new_tokens=10, min_new_tokens=4, eos_token_id=0)
    assert rollout.tokens[0].tolist() == [5, 5, 5, 5, 0]  # stopped early: every row has emitted EOS
    assert rollout.mask[0].tolist() == [1, 1, 1, 1, 1]
    assert (rollout.logits[0, :4, 0] < -1e30).all() and (rollout.logits[0, 4, 0] > -1e30)


def test_grade_gradient_reaches_the_policy_only(policy, tokenizer, prompts, reward_model, sentiment_reward):
    enc = _encode(tokenizer, prompts)
    ref = copy.deepcopy(policy).requires_grad_(False)
    torch.manual_seed(0)
    est = StraightThroughGumbel()
    rollout = soft_rollout(policy, enc["input_ids"], enc["attention_mask"], lambda l, s: est(l, 1.0), max_new_tokens=6, eos_token_id=0)
    kl = masked_sum(exact_kl(rollout.logits, reference_logits(ref, rollout)), rollout.mask, dim=1)
    soft, mask = soft_reward_inputs(sentiment_reward, rollout, eos_token_id=0)
    loss = grade_loss(sentiment_reward.score_soft(soft, mask), kl, kl_coef=0.1)
    loss.backward()
    policy_grads = [p.grad for p in policy.parameters()]
    assert all(g is not None for g in policy_grads)
    assert sum(g.abs().sum() for g in policy_grads) > 0
    assert all(p.grad is None for p in ref.parameters())
    assert all(p.grad is None for p in reward_model.parameters())


def test_kl_term_alone_has_a_gradient(policy, tokenizer, prompts):
    """The KL is inside the objective (the published code computed it under no_grad)."""
    enc = _encode(tokenizer, prompts)
    ref = copy.deepcopy(policy).requires_grad_(False)
    with torch.no_grad():  # move the policy away from the reference so the KL is not at its minimum
        for p in policy.parameters():
            p.add_(0.01 * torch.randn_like(p))
    torch.manual_seed(0)
    est = StraightThroughGumbel()
    rollout = soft_rollout(policy, enc["input_ids"], enc["attention_mask"], lambda l, s: est(l, 1.0), max_new_tokens=4, eos_token_id=0)
    kl = masked_sum(exact_kl(rollout.logits, reference_logits(ref, rollout)), rollout.mask, dim=1)
    assert kl.min() > 0
    kl.sum().backward()
    assert policy.lm_head.weight.grad.abs().sum() > 0
