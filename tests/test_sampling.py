"""Hard-token sampling: the processed distribution by hand, sampler/scorer agreement, and the negative-KL bug."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from grade_trl.core import (
    SampledBatch,
    SamplingSettings,
    entropy_from_logits,
    exact_kl,
    masked_sum,
    process_logits,
    sample,
    token_logprobs,
)
from grade_trl.core.soft_rollout import position_ids_from_mask

EOS = 0
NEG = torch.finfo(torch.float32).min / 2


def _encode(tokenizer, prompts):
    enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    assert (enc["attention_mask"] == 0).any(), "the test needs left padding"
    return enc["input_ids"], enc["attention_mask"]


def _kept(processed):
    return set(torch.nonzero(processed > NEG / 2).flatten().tolist())


# --- process_logits by hand on a 5-token vocabulary (token 0 is EOS) ---------------------------


def test_settings_validation():
    for bad in ({"temperature": 0.0}, {"top_p": 0.0}, {"top_p": 1.5}, {"top_k": -1}, {"min_new_tokens": 5, "max_new_tokens": 4}, {"min_new_tokens": -1}):
        with pytest.raises(ValueError):
            SamplingSettings(**bad)


def test_temperature_divides_the_logits():
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0]])
    assert_close(process_logits(logits, SamplingSettings(temperature=2.0), 0), torch.tensor([[1.0, 0.5, 0.25, 0.0, -0.5]]))
    assert_close(process_logits(logits, SamplingSettings(), 0), logits)  # all defaults: identity


def test_top_k_keeps_the_two_largest():
    processed = process_logits(torch.tensor([[0.0, 1.0, 0.8, 0.6, -2.0]]), SamplingSettings(top_k=2), 0)
    assert _kept(processed[0]) == {1, 2}
    assert processed[0, 0] == NEG and processed[0, 3] == NEG and processed[0, 4] == NEG  # finite, never -inf
    assert_close(processed[0, 1:3], torch.tensor([1.0, 0.8]))


def test_top_p_keeps_the_smallest_nucleus():
    # exp(logits) = 1, 2.718, 2.226, 1.822, 0.135 (sum 7.901) -> p = 0.127, 0.344, 0.282, 0.231, 0.017.
    # Sorted: token 1 (cum 0.344 < 0.7), token 2 (cum 0.626 < 0.7), token 3 (cum 0.857 >= 0.7): keep {1, 2, 3}.
    logits = torch.tensor([[0.0, 1.0, 0.8, 0.6, -2.0]])
    processed = process_logits(logits, SamplingSettings(top_p=0.7), 0)
    assert _kept(processed[0]) == {1, 2, 3}
    assert_close(F.softmax(processed, -1)[0, 1:4], F.softmax(logits[0, 1:4], -1))  # renormalised on the nucleus
    # The top token is always kept, even when it alone exceeds top_p.
    assert _kept(process_logits(torch.tensor([[0.0, 9.0, 0.0, 0.0, 0.0]]), SamplingSettings(top_p=0.01), 0)[0]) == {1}
    # top-k first, then top-p on what remains: k=2 leaves {1, 2} with p = 0.55, 0.45 -> both kept at 0.5.
    assert _kept(process_logits(logits, SamplingSettings(top_k=2, top_p=0.5), 0)[0]) == {1}
    assert _kept(process_logits(logits, SamplingSettings(top_k=2, top_p=0.6), 0)[0]) == {1, 2}


def test_eos_forbidden_before_min_new_tokens():
    settings = SamplingSettings(min_new_tokens=2, max_new_tokens=4)
    logits = torch.tensor([[3.0, 1.0, 0.8, 0.6, -2.0]])
    assert process_logits(logits, settings, 1, eos_token_id=EOS)[0, 0] == NEG
    assert process_logits(logits, settings, 2, eos_token_id=EOS)[0, 0] == 3.0
    # (B, T, V) with steps (T,): banned at steps 0 and 1 only, the other tokens untouched.
    seq = process_logits(logits.expand(3, 5).unsqueeze(0), settings, torch.arange(3), eos_token_id=EOS)
    assert seq[0, :, 0].tolist() == [NEG, NEG, 3.0]
    assert_close(seq[0, :, 1:], logits[:, 1:].expand(3, 4))
    # The EOS ban happens before top-p: the nucleus is computed without EOS. Step 0, EOS banned:
    # exp = 2.718, 2.226, 1.822, 0.135 (sum 6.901) -> p = 0.394, 0.323, ... cum 0.717 >= 0.7 -> keep {1, 2}.
    # Step 1, EOS allowed: p(EOS) = 20.09 / 26.99 = 0.744 >= 0.7 -> EOS alone.
    assert _kept(process_logits(logits, SamplingSettings(top_p=0.7, min_new_tokens=1), 0, eos_token_id=EOS)[0]) == {1, 2}
    assert _kept(process_logits(logits, SamplingSettings(top_p=0.7, min_new_tokens=1), 1, eos_token_id=EOS)[0]) == {0}


def test_sampling_frequencies_match_the_processed_distribution():
    logits = torch.tensor([0.0, 1.0, 0.8, 0.6, -2.0, 0.3])
    processed = process_logits(logits.unsqueeze(0), SamplingSettings(temperature=0.7, top_p=0.9), 0)[0]
    probs = F.softmax(processed, -1)
    assert _kept(processed) == {1, 2, 3, 5}
    generator = torch.Generator().manual_seed(0)
    draws = torch.multinomial(probs, 100_000, replacement=True, generator=generator)
    freq = torch.bincount(draws, minlength=6).double() / 100_000
    assert freq[0] == 0 and freq[4] == 0  # never outside the nucleus
    assert_close(freq, probs.double(), atol=5e-3, rtol=0)


def test_entropy_of_processed_logits_is_finite_and_ignores_removed_tokens():
    processed = process_logits(torch.tensor([[[0.0, 2.0, 2.0, 1.0, -1.0]]]), SamplingSettings(top_k=2), torch.arange(1))
    assert_close(entropy_from_logits(processed, torch.ones(1, 1)), torch.tensor(math.log(2)))
    assert entropy_from_logits(processed, torch.zeros(1, 1)) == 0  # empty mask: 0, not NaN


def test_chunked_scorers_give_the_whole_tensors_numbers():
    """chunked_logprobs and entropy_from_logits go a few positions at a time (no float32 B x T x V copy); each
    position's processing (temperature, EOS ban by step, top-k, top-p) and softmax read only its own row, so the
    numbers are those of the whole tensor at once, whatever the chunk."""
    from grade_trl.core.masks import masked_mean
    from grade_trl.core.sampling import chunked_logprobs, logprobs_from_logits, position_chunks, token_entropy

    torch.manual_seed(0)
    logits = torch.randn(3, 7, 11) * 3
    ids = torch.randint(1, 11, (3, 7))
    mask = torch.ones(3, 7)
    mask[1, 4:] = 0
    for settings in (SamplingSettings(temperature=0.7, top_p=0.9, top_k=6, min_new_tokens=3), SamplingSettings(min_new_tokens=2)):
        for truncate in (True, False):
            whole, processed = logprobs_from_logits(logits, ids, mask, settings, EOS, truncate)
            batch = SampledBatch(prompt_ids=ids[:, :1], prompt_mask=torch.ones(3, 1), completion_ids=ids, completion_mask=mask, logprobs=whole, eos_token_id=EOS, pad_token_id=EOS)
            for chunk_elements in (1, 3 * 11 * 2, 3 * 11 * 3, 10**9):  # one position, two, three (a short last chunk), all
                assert_close(chunked_logprobs(logits, batch, settings, truncate, chunk_elements), whole, atol=1e-6, rtol=0)
                assert_close(entropy_from_logits(processed, mask, chunk_elements), masked_mean(token_entropy(processed), mask), atol=1e-6, rtol=0)
    # with a gradient: the whole tensor's gradient (a chunked metric is also usable as a bonus)
    leaf = logits.clone().requires_grad_(True)
    entropy_from_logits(leaf, mask, 3 * 11 * 2).backward()
    whole_leaf = logits.clone().requires_grad_(True)
    masked_mean(token_entropy(whole_leaf), mask).backward()
    assert_close(leaf.grad, whole_leaf.grad, atol=1e-6, rtol=0)
    parts = position_chunks(logits, 3 * 11 * 3)
    assert [(p.start, p.stop) for p in parts] == [(0, 3), (3, 6), (6, 7)]
    # temperature 1: the float32 logits themselves, no copy of B x T x V for a division by one
    assert process_logits(logits, SamplingSettings(), torch.arange(7), EOS) is logits


# --- the sampler and the scorer on the tiny model ----------------------------------------------


def test_token_logprobs_reproduce_the_sampler(policy, tokenizer, prompts):
    prompt_ids, prompt_mask = _encode(tokenizer, prompts)  # rows of 3, 9 and 1 real prompt tokens
    settings = SamplingSettings(temperature=0.7, top_p=0.9, min_new_tokens=3, max_new_tokens=12)
    torch.manual_seed(0)
    batch = sample(policy, prompt_ids, prompt_mask, settings, eos_token_id=EOS, pad_token_id=tokenizer.pad_token_id)
    assert isinstance(batch, SampledBatch) and batch.completion_ids.shape[0] == len(prompts)
    assert not batch.logprobs.requires_grad

    logprobs, processed = token_logprobs(policy, batch, settings, with_grad=False)
    assert not logprobs.requires_grad and processed.shape == (*batch.completion_ids.shape, policy.config.vocab_size)
    assert_close(logprobs, batch.logprobs, atol=1e-4, rtol=0)

    # Sampled tokens lie inside the processed support; no EOS before min_new_tokens.
    real = batch.completion_mask.bool()
    assert (logprobs[real] > -1e4).all() and torch.isfinite(logprobs).all()
    assert (batch.completion_ids[:, : settings.min_new_tokens] != EOS).all()

    # Each row alone, unpadded, plain forward + process_logits: the ground truth for the left-padded batch.
    for row in range(len(prompts)):
        prompt = prompt_ids[row][prompt_mask[row].bool()]
        n = int(batch.lengths[row])
        ids = torch.cat([prompt, batch.completion_ids[row, :n]]).unsqueeze(0)
        with torch.no_grad():
            plain = policy(input_ids=ids).logits[:, len(prompt) - 1 : -1]
        expected = F.log_softmax(process_logits(plain, settings, torch.arange(n), EOS), -1)[0].gather(-1, ids[0, len(prompt) :, None])[:, 0]
        assert_close(batch.logprobs[row, :n], expected, atol=1e-4, rtol=0)

    # return_logits=False (the reference's scoring: chunked, no processed logits): the same values
    chunked, none = token_logprobs(policy, batch, settings, with_grad=False, return_logits=False)
    assert none is None and not chunked.requires_grad
    assert_close(chunked, logprobs, atol=1e-6, rtol=0)

    # with_grad=True: the same values, and a gradient that reaches the policy.
    logprobs_grad, _ = token_logprobs(policy, batch, settings, with_grad=True)
    assert_close(logprobs_grad.detach(), logprobs, atol=1e-5, rtol=0)
    logprobs_grad.sum().backward()
    grads = [p.grad for p in policy.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


class _EosBias(torch.nn.Module):
    """The tiny policy with +bias added to the EOS logit of chosen rows: forces an EOS as soon as it is allowed."""

    def __init__(self, model, bias):
        super().__init__()
        self.model, self.bias = model, bias  # bias (B,)

    def forward(self, **kwargs):
        out = self.model(**kwargs)
        out.logits[..., EOS] += self.bias.view(-1, *[1] * (out.logits.dim() - 2))
        return out


def test_masks_stop_after_the_first_eos_and_padding_follows(policy, tokenizer, prompts):
    prompt_ids, prompt_mask = _encode(tokenizer, prompts)
    model = _EosBias(policy, torch.tensor([50.0, 0.0, 0.0]))  # row 0 ends right at min_new_tokens
    settings = SamplingSettings(temperature=0.7, top_p=0.9, min_new_tokens=3, max_new_tokens=8)
    torch.manual_seed(0)
    batch = sample(model, prompt_ids, prompt_mask, settings, eos_token_id=EOS, pad_token_id=7)
    assert batch.completion_ids[0, 3] == EOS and (batch.completion_ids[:, :3] != EOS).all()
    assert batch.completion_mask[0].tolist()[:4] == [1, 1, 1, 1] and not batch.completion_mask[0, 4:].any()
    assert (batch.completion_ids[0, 4:] == 7).all() and (batch.logprobs[0, 4:] == 0).all()
    assert batch.completion_ids.shape[1] > 4, "another row must continue, so row 0 is padded"
    assert_close(batch.attention_mask, torch.cat([prompt_mask, batch.completion_mask.long()], 1))
    logprobs, _ = token_logprobs(model, batch, settings, with_grad=False)
    assert_close(logprobs, batch.logprobs, atol=1e-4, rtol=0)

    # When every row ends, sampling stops early.
    torch.manual_seed(0)
    short = sample(_EosBias(policy, torch.full((3,), 50.0)), prompt_ids, prompt_mask, settings, eos_token_id=EOS)
    assert short.completion_ids.shape[1] == 4 and (short.completion_ids[:, 3] == EOS).all() and short.completion_mask.all()


def test_sampling_through_distributed_data_parallel(policy, tokenizer, prompts, tmp_path):
    import torch.distributed as dist

    prompt_ids, prompt_mask = _encode(tokenizer, prompts)
    settings = SamplingSettings(temperature=0.7, top_p=0.9, min_new_tokens=2, max_new_tokens=5)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        ddp = torch.nn.parallel.DistributedDataParallel(policy)
        torch.manual_seed(0)
        wrapped = sample(ddp, prompt_ids, prompt_mask, settings, eos_token_id=EOS)
        logprobs, _ = token_logprobs(ddp, wrapped, settings, with_grad=True)
        logprobs.sum().backward()
    finally:
        dist.destroy_process_group()
    torch.manual_seed(0)
    plain = sample(policy, prompt_ids, prompt_mask, settings, eos_token_id=EOS)
    assert torch.equal(wrapped.completion_ids, plain.completion_ids)
    assert_close(logprobs.detach(), plain.logprobs, atol=1e-4, rtol=0)


# --- the negative-KL bug (BACKGROUND.md sections 2-3) ------------------------------------------


def test_kl_is_non_negative_only_when_scored_under_the_sampling_distribution(policy, tokenizer):
    texts = ["This movie was", "I watched it last night and honestly the acting", "Worst", "The plot of this film"]
    prompt_ids, prompt_mask = _encode(tokenizer, texts * 8)  # batch of 32
    settings = SamplingSettings(temperature=0.7, top_p=0.9, min_new_tokens=3, max_new_tokens=16)
    reference = copy.deepcopy(policy).requires_grad_(False)
    torch.manual_seed(0)
    batch = sample(policy, prompt_ids, prompt_mask, settings, eos_token_id=EOS)
    mask = batch.completion_mask

    # Right: p = the processed distribution the tokens came from; q = the reference with temperature
    # and the EOS ban only (untruncated, so it covers p's support).
    logp, p_logits = token_logprobs(policy, batch, settings, with_grad=False, truncate=True)
    logq, q_logits = token_logprobs(reference, batch, settings, with_grad=False, truncate=False)
    k1_right = masked_sum(logp - logq, mask, dim=1)  # (B,)
    exact = masked_sum(exact_kl(p_logits, q_logits), mask, dim=1)  # (B,)
    assert k1_right.mean() >= 0 and (exact >= 0).all()
    # Here p is q restricted to its nucleus, so log p - log q = -log(nucleus mass) = the exact KL, token by token.
    assert_close(k1_right, exact, atol=1e-4, rtol=1e-4)

    # Wrong (the users' bug): sample with temperature/top-p/min_new_tokens, score the policy with the
    # plain softmax of its raw logits. Against itself, the "KL" comes out negative.
    attention_mask = batch.attention_mask
    with torch.no_grad():
        raw = policy(input_ids=batch.sequences, attention_mask=attention_mask, position_ids=position_ids_from_mask(attention_mask)).logits
    raw = raw[:, prompt_ids.shape[1] - 1 : -1]
    logp_raw = F.log_softmax(raw, -1).gather(-1, batch.completion_ids.unsqueeze(-1)).squeeze(-1)
    k1_wrong = masked_sum(logp_raw - logq, mask, dim=1)
    print(f"mean per-sequence k1 KL vs itself: right {k1_right.mean():.4f} (exact {exact.mean():.4f}), wrong {k1_wrong.mean():.4f}")
    assert k1_wrong.mean() < 0


def test_sampler_runs_gpt2s_gelu_as_one_kernel_and_samples_what_the_models_own_would(policy, tokenizer, prompts):
    """`sample` runs GPT-2's `gelu_new` as torch's one-kernel tanh GELU (as GRADE's rollout does), for its own forwards
    only. In float64, with the same seed, it draws the same tokens with the same log-probs as with the model's own
    activation (its modules' forward pinned, which the replacement leaves alone)."""
    from transformers.activations import NewGELUActivation

    from grade_trl.core.soft_rollout import tanh_gelu_modules

    policy = copy.deepcopy(policy).double()
    activations = tanh_gelu_modules(policy)
    seen = []
    hook = activations[0].register_forward_hook(lambda module, args, out: seen.append(vars(module).get("forward")))
    ids, mask = _encode(tokenizer, prompts)
    settings = SamplingSettings(max_new_tokens=8, min_new_tokens=2, top_p=0.9)
    torch.manual_seed(0)
    fused = sample(policy, ids, mask, settings, eos_token_id=0)
    assert seen and all(f is not None and f.__name__ == "_tanh_gelu" for f in seen)
    assert not any("forward" in vars(m) for m in activations)
    hook.remove()
    for m in activations:
        m.forward = NewGELUActivation.forward.__get__(m)
    try:
        torch.manual_seed(0)
        own = sample(policy, ids, mask, settings, eos_token_id=0)
    finally:
        for m in activations:
            del m.forward
    assert torch.equal(fused.completion_ids, own.completion_ids)
    assert_close(fused.logprobs, own.logprobs, rtol=0, atol=1e-12)
