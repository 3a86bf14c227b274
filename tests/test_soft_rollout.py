"""The relaxed rollout: agreement with a plain forward pass, masks, KL, where the gradient goes, and the memory
options: each exact one gives the same gradient as the plain path, and the saved memory follows its growth law."""

import copy
import importlib
import sys

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from grade_trl.core import Relaxed, SoftTokens, exact_kl, masked_sum, reference_logits, soft_rollout
from grade_trl.core.soft_tokens import embed_step
from grade_trl.memory import SavedTensorAccount
from grade_trl.trainers.grade import grade_loss, soft_reward_inputs
from grade_trl.trainers.relaxations import GumbelSoftmax, StraightThroughGumbel


def _encode(tokenizer, prompts):
    return tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)


def forced_relax(forced_tokens):
    """Straight-through relaxation whose forward tokens are fixed in advance (the test's ground truth)."""

    def relax(logits, step):
        return Relaxed(F.softmax(logits, -1), forced_tokens[:, step], straight_through=True)

    return relax


def test_straight_through_rollout_with_fixed_tokens_reproduces_a_plain_forward(policy, tokenizer, prompts):
    enc = _encode(tokenizer, prompts)  # left-padded: rows have 3, 9 and 1 real prompt tokens
    assert (enc["attention_mask"] == 0).any(), "the test needs left padding"
    vocab = policy.config.vocab_size
    torch.manual_seed(0)
    forced = torch.randint(1, vocab, (len(prompts), 6))  # no EOS (id 0), so all 6 steps run
    rollout = soft_rollout(policy, enc["input_ids"], enc["attention_mask"], forced_relax(forced), max_new_tokens=6, eos_token_id=0)
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
    for recompute in (False, True, "blocks"):
        ref_logits = reference_logits(ref, rollout, min_new_tokens=3, eos_token_id=0, recompute=recompute)
        assert_close(ref_logits, rollout.logits.detach(), rtol=1e-4, atol=1e-4)
    kl = masked_sum(exact_kl(rollout.logits, ref_logits), rollout.mask, dim=1)
    assert (kl >= 0).all() and kl.max() < 1e-4


def test_min_new_tokens_forbids_eos_and_mask_stops_after_first_eos(policy, tokenizer):
    enc = _encode(tokenizer, ["The end."])

    def eos_whenever_allowed(logits, step):  # picks EOS as soon as it is not forbidden
        allowed = logits[0, 0] > -1e30
        return Relaxed(F.softmax(logits, -1), torch.tensor([0 if allowed else 5]), straight_through=True)

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
    assert all(g is not None and g.layout == torch.strided for g in policy_grads)  # the deferred/sparse parts end dense
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


# ---- the KL's custom backward against autograd on the plain expression ------------------------------------


def test_exact_kl_gradients_match_the_plain_expression_full_and_top_k():
    torch.manual_seed(0)
    zp, zq = torch.randn(3, 5, 11, dtype=torch.float64, requires_grad=True), torch.randn(3, 5, 11, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: exact_kl(a, b), (zp, zq))

    def plain(a, b, indices=None):
        logp, logq = F.log_softmax(a, -1), F.log_softmax(b, -1)
        logq = logq if indices is None else logq.gather(-1, indices)
        return (logp.exp() * (logp - logq)).sum(-1)

    assert_close(exact_kl(zp, zq), plain(zp, zq))
    values, indices = zp.detach().topk(4, -1)
    values.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: exact_kl(a, b, indices), (values, zq))
    weights = torch.randn(3, 5, dtype=torch.float64)
    ours = torch.autograd.grad((exact_kl(values, zq, indices) * weights).sum(), (values, zq))
    theirs = torch.autograd.grad((plain(values, zq, indices) * weights).sum(), (values, zq))
    assert all(torch.allclose(a, b) for a, b in zip(ours, theirs))
    assert (exact_kl(values, zq, indices) >= 0).all()  # the truncated policy against the full reference


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_exact_kl_keeps_the_log_softmaxes_or_the_low_precision_logits_with_the_same_gradient(dtype):
    """float32 logits: _ExactKL keeps the log-softmaxes for backward; bfloat16 logits: it keeps the logits (half the
    bytes) and recomputes in float32. Either way the gradient is the plain float32 expression's, twice over a retained
    graph (backward must not write into what it saved), and what is saved is two logits-sized tensors."""
    torch.manual_seed(0)
    zp = torch.randn(2, 3, 50, dtype=dtype, requires_grad=True)
    zq = torch.randn(2, 3, 50, dtype=dtype, requires_grad=True)
    weights = torch.randn(2, 3)

    def plain(a, b):
        logp, logq = F.log_softmax(a.float(), -1), F.log_softmax(b.float(), -1)
        return (logp.exp() * (logp - logq)).sum(-1)

    theirs = torch.autograd.grad((plain(zp, zq) * weights).sum(), (zp, zq))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        loss = (exact_kl(zp, zq) * weights).sum()
    assert sum(t.numel() * t.element_size() for t in saved if t.dim() == 3) == 2 * zp.numel() * zp.element_size()
    for _ in range(2):
        ours = torch.autograd.grad(loss, (zp, zq), retain_graph=True)
        for a, b in zip(ours, theirs):
            assert a.dtype == dtype
            assert_close(a.float(), b.float(), rtol=1e-5, atol=1e-6)


def one_forward_reference_logits(ref, rollout, min_new_tokens, eos):
    """The plain expression: one forward of the reference over [prompt; y_1 .. y_{T-1}], every position with gradient."""
    from grade_trl.core.soft_rollout import forbid_eos, position_ids_from_mask

    t = rollout.tokens.shape[1]
    embeds = rollout.soft_tokens.drop_last().with_prefix(rollout.prompt_ids).embed(ref.get_input_embeddings().weight)
    mask = torch.cat([rollout.prompt_mask.long(), torch.ones(len(rollout.tokens), t - 1, dtype=torch.long)], dim=1)  # (B, P+T-1)
    logits = ref(inputs_embeds=embeds, attention_mask=mask, position_ids=position_ids_from_mask(mask)).logits[:, -t:]
    return torch.cat([forbid_eos(logits[:, :min_new_tokens], eos), logits[:, min_new_tokens:]], dim=1)


@pytest.mark.parametrize("one_token_prompts", [False, True], ids=["prompts", "one_token_prompts"])
@pytest.mark.parametrize("estimator", [StraightThroughGumbel(), GumbelSoftmax()], ids=["ste", "soft"])
def test_reference_over_the_cached_prompt_equals_one_forward_over_the_whole_sequence(policy, tokenizer, prompts, estimator, one_token_prompts):
    """reference_logits runs the prompt once without gradient and the completion over its cache, EOS banned by an
    index_put: the same logits and the same gradient (through the soft tokens into the policy) as one forward over the
    whole left-padded sequence with `forbid_eos`, for prompts of several tokens and of one."""
    enc = _encode(tokenizer, prompts)
    if one_token_prompts:  # each prompt's last token alone
        enc = {"input_ids": enc["input_ids"][:, -1:], "attention_mask": torch.ones_like(enc["input_ids"][:, -1:])}
    policy = copy.deepcopy(policy).double()  # float64: the two ways agree to rounding, so any real difference would show
    ref = copy.deepcopy(policy).requires_grad_(False)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.01 * torch.randn_like(p))

    def kl_gradient(reference):
        torch.manual_seed(2)
        policy.zero_grad(set_to_none=True)
        rollout = soft_rollout(policy, enc["input_ids"], enc["attention_mask"], lambda l, s: estimator(l, 0.7), max_new_tokens=7, min_new_tokens=2, eos_token_id=0)
        ref_logits = reference(rollout)
        masked_sum(exact_kl(rollout.logits, ref_logits), rollout.mask, dim=1).sum().backward()
        return ref_logits.detach(), [p.grad.clone() for p in policy.parameters()]

    plain_logits, plain_grads = kl_gradient(lambda r: one_forward_reference_logits(ref, r, 2, 0))
    assert any(g.abs().sum() > 0 for g in plain_grads)
    for recompute in (False, True, "blocks"):
        logits, grads = kl_gradient(lambda r: reference_logits(ref, r, 2, 0, recompute=recompute))
        assert_close(logits, plain_logits, rtol=1e-10, atol=1e-10)
        for ours, theirs in zip(grads, plain_grads):
            assert_close(ours, theirs, rtol=1e-9, atol=1e-9)
    if one_token_prompts:
        return
    # control: a prompt cache that each run extends (DynamicCache's update) fails the block-by-block recomputation,
    # whose blocks' recomputed attention would then read their own completion's keys a second time
    soft_rollout_module = sys.modules["grade_trl.core.soft_rollout"]

    class ExtendedCache(soft_rollout_module.PromptCache):
        read_only = property(lambda self: False, lambda self, value: None)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(soft_rollout_module, "PromptCache", ExtendedCache)
        with pytest.raises(RuntimeError, match="size"):  # SDPA: the mask's P + T - 1 positions against P + 2 (T - 1) keys
            kl_gradient(lambda r: reference_logits(ref, r, 2, 0, recompute="blocks"))


# ---- the memory options: same gradient, and their growth law ----------------------------------------------


def rollout_gradient(policy, ref, enc, estimator, **options):
    """The gradient of KL + a reward-like function of the embedded relaxed tokens, with fixed Gumbel noise."""
    torch.manual_seed(1)
    policy.zero_grad(set_to_none=True)
    rollout = soft_rollout(policy, enc["input_ids"], enc["attention_mask"], lambda l, s: estimator(l, 0.7), max_new_tokens=6, min_new_tokens=2, eos_token_id=0, **options)
    ref_logits = reference_logits(ref, rollout, 2, 0, recompute=options.get("checkpoint_steps", False))
    kl = masked_sum(exact_kl(rollout.logits, ref_logits, rollout.logit_indices), rollout.mask, dim=1)
    direction = torch.randn(policy.config.n_embd, generator=torch.Generator().manual_seed(3))
    loss = kl.sum() + (rollout.soft_tokens.embed(ref.get_input_embeddings().weight) @ direction).tanh().sum()
    loss.backward()
    return rollout.tokens, loss.detach(), [p.grad.clone() for p in policy.parameters()]


@pytest.mark.parametrize("estimator", [StraightThroughGumbel(), GumbelSoftmax()], ids=["ste", "soft"])
def test_memory_options_give_the_plain_gradient(policy, tokenizer, prompts, estimator):
    enc = _encode(tokenizer, prompts)  # left-padded
    ref = copy.deepcopy(policy).requires_grad_(False)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.01 * torch.randn_like(p))  # a reference that differs, so the KL's gradient is not 0
    plain = rollout_gradient(policy, ref, enc, estimator, cache="dynamic", defer_weight_grads=False)
    for options in ({"cache": "chunked", "defer_weight_grads": False}, {"cache": "chunked"}, {"cache": "chunked", "checkpoint_steps": True}):
        tokens, loss, grads = rollout_gradient(policy, ref, enc, estimator, **options)
        assert torch.equal(tokens, plain[0]) and loss == plain[1], options
        for ours, theirs in zip(grads, plain[2]):  # float32 rounding: the chunked cache writes the decode steps' attention gradient out
            assert_close(ours, theirs, rtol=1e-5, atol=1e-6 * theirs.abs().max().item(), msg=str(options))


def test_chunked_attention_gradient_buffer_survives_repeated_and_partial_backward_passes(policy, tokenizer, prompts):
    """The chunked cache hands each step's earlier positions their gradient through a per-layer buffer
    (core/chunked_cache.py), and the deferred weight gradients collect records until the weight's alias runs
    (core/deferred_grads.py). A second backward over the same graph (retain_graph), and a full one after a partial
    pass (autograd.grad to an inner tensor, which stops short of the first steps and of the aliases), must each
    give the gradient that the DynamicCache path without deferral gives."""
    enc = _encode(tokenizer, prompts)
    est = StraightThroughGumbel()

    def rollout(cache):
        torch.manual_seed(1)
        return soft_rollout(policy, enc["input_ids"], enc["attention_mask"], lambda l, s: est(l, 0.7), max_new_tokens=6, min_new_tokens=6, eos_token_id=0, cache=cache)

    def objective(r):
        return r.logits.float().logsumexp(-1).sum() + r.soft_tokens.embed(policy.get_input_embeddings().weight).pow(2).mean()

    policy.zero_grad(set_to_none=True)
    torch.manual_seed(1)
    objective(soft_rollout(policy, enc["input_ids"], enc["attention_mask"], lambda l, s: est(l, 0.7), max_new_tokens=6, min_new_tokens=6,
                           eos_token_id=0, cache="dynamic", defer_weight_grads=False)).backward()
    plain = [p.grad.clone() for p in policy.parameters()]
    r = rollout("chunked")
    loss = objective(r)
    # a partial pass: from step 3's logits to step 1's relaxed values runs the attention of forwards 3 and 2 only
    torch.autograd.grad(r.logits[:, 3].sum(), r.soft_tokens.steps[1].values, retain_graph=True)
    for _ in range(2):
        policy.zero_grad(set_to_none=True)
        loss.backward(retain_graph=True)
        for ours, theirs in zip((p.grad for p in policy.parameters()), plain):
            assert_close(ours, theirs, rtol=1e-5, atol=1e-6 * theirs.abs().max().item())


class _Attention(torch.nn.Module):
    """What transformers' sdpa_attention_forward reads of an attention module."""

    def __init__(self, groups):
        super().__init__()
        self.num_key_value_groups, self.is_causal = groups, True


@pytest.mark.parametrize("kv_heads", [4, 2, 1], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("mask", ["none", "bool", "bool_per_head", "float"])
@pytest.mark.parametrize("scaling", [None, 0.3])
def test_written_out_decode_attention_gradient_is_sdpas(kv_heads, mask, scaling):
    """core/chunked_cache.py differentiates a decode step's sdpa attention by its written-out gradient. Reference:
    autograd through transformers' own sdpa_attention_forward (torch's kernel), in float64."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from grade_trl.core.chunked_cache import SdpaDecode, _sdpa_decode_grads

    g = torch.Generator().manual_seed(0)
    batch, heads, length, size = 3, 4, 7, 8
    query = torch.randn(batch, heads, 1, size, dtype=torch.float64, generator=g, requires_grad=True)
    keys = torch.randn(batch, kv_heads, length, size, dtype=torch.float64, generator=g, requires_grad=True)
    values = torch.randn(batch, kv_heads, length, size, dtype=torch.float64, generator=g, requires_grad=True)
    visible = torch.rand(batch, 1, 1, length, generator=g) > 0.3
    visible[..., -1] = True  # the query's own position
    attention_mask = {
        "none": None, "bool": visible, "bool_per_head": (torch.rand(batch, heads, 1, length, generator=g) > 0.3) | visible,
        "float": torch.where(visible, torch.randn(batch, 1, 1, length, dtype=torch.float64, generator=g), float("-inf")),
    }[mask]
    output, _ = sdpa_attention_forward(_Attention(heads // kv_heads), query, keys, values, attention_mask, dropout=0.0, scaling=scaling)
    grad_output = torch.randn(output.shape, dtype=torch.float64, generator=g)  # (B, 1, h, d)
    expected = torch.autograd.grad(output, (query, keys, values), grad_output)
    ours = _sdpa_decode_grads(SdpaDecode(attention_mask, scaling), query.detach(), keys.detach(), values.detach(), grad_output)
    for name, a, b in zip(("query", "keys", "values"), ours, expected):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        assert_close(a, b, rtol=1e-12, atol=1e-12, msg=name)
    assert expected[1].abs().sum() > 0


def test_written_out_decode_attention_gradient_is_taken_only_where_it_is_sdpas():
    """Only transformers' sdpa with one query position, no dropout and no position bias; everything else recomputes."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from grade_trl.core.chunked_cache import sdpa_decode

    one, two = torch.zeros(1, 2, 1, 4), torch.zeros(1, 2, 2, 4)
    assert sdpa_decode(sdpa_attention_forward, one, None, {"dropout": 0.0, "scaling": 0.5}) == (None, 0.5)
    assert sdpa_decode(sdpa_attention_forward, two, None, {"dropout": 0.0}) is None  # the prompt: several positions
    assert sdpa_decode(sdpa_attention_forward, one, None, {"dropout": 0.1}) is None
    assert sdpa_decode(sdpa_attention_forward, one, None, {"position_bias": torch.zeros(1)}) is None
    assert sdpa_decode(lambda *a, **k: None, one, None, {}) is None  # flash, flex or a user's function


def test_chunked_cache_gives_the_plain_gradient_on_a_grouped_query_model(tokenizer, prompts):
    """A Qwen2-shaped policy (2 key heads for 4 query heads, left-padded prompts): the chunked cache with the
    written-out decode gradient against transformers' DynamicCache differentiated by autograd."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True, attn_implementation="sdpa")
    policy = Qwen2ForCausalLM(config).eval()
    enc = _encode(tokenizer, prompts)
    est = StraightThroughGumbel()

    def gradient(**options):
        torch.manual_seed(1)
        policy.zero_grad(set_to_none=True)
        r = soft_rollout(policy, enc["input_ids"], enc["attention_mask"], lambda l, s: est(l, 0.7), max_new_tokens=6, min_new_tokens=6, eos_token_id=0, **options)
        (r.logits.float().logsumexp(-1).sum() + r.soft_tokens.embed(policy.get_input_embeddings().weight).pow(2).mean()).backward()
        return r.tokens, [p.grad.clone() for p in policy.parameters()]

    plain_tokens, plain = gradient(cache="dynamic", defer_weight_grads=False)
    tokens, grads = gradient(cache="chunked")
    assert torch.equal(tokens, plain_tokens)
    for ours, theirs in zip(grads, plain):
        assert_close(ours, theirs, rtol=1e-5, atol=1e-6 * theirs.abs().max().item())


def test_reference_recomputed_block_by_block_on_a_grouped_query_model(tokenizer, prompts):
    """The reference's forward recomputed a block at a time (GRADE's way under FSDP2) on a Qwen2-shaped model (its
    decoder layers found by `_no_split_modules`, rotary positions, 2 key heads for 4 query heads): the logits and the
    gradient through the soft tokens of no recomputation and of the whole one, in float64."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from grade_trl.core.soft_rollout import transformer_blocks

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True, attn_implementation="sdpa")
    policy = Qwen2ForCausalLM(config).double().eval()
    ref = copy.deepcopy(policy).requires_grad_(False)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p))
    assert len(transformer_blocks(ref)) == 2
    enc = _encode(tokenizer, prompts)
    est = StraightThroughGumbel()

    def kl_gradient(recompute):
        torch.manual_seed(1)
        policy.zero_grad(set_to_none=True)
        r = soft_rollout(policy, enc["input_ids"], enc["attention_mask"], lambda l, s: est(l, 0.7), max_new_tokens=5, min_new_tokens=2, eos_token_id=0)
        ref_logits = reference_logits(ref, r, 2, 0, recompute=recompute)
        masked_sum(exact_kl(r.logits, ref_logits), r.mask, dim=1).sum().backward()
        return ref_logits.detach(), [p.grad.clone() for p in policy.parameters()]

    plain_logits, plain = kl_gradient(False)
    assert any(g.abs().sum() > 0 for g in plain)
    for recompute in (True, "blocks"):
        logits, grads = kl_gradient(recompute)
        assert_close(logits, plain_logits, rtol=1e-10, atol=1e-10)
        for ours, theirs in zip(grads, plain):
            assert_close(ours, theirs, rtol=1e-9, atol=1e-9)


def saved_rollout_bytes(policy, enc, new_tokens, **options) -> int:
    account = SavedTensorAccount({"policy": policy})
    torch.manual_seed(0)
    est = StraightThroughGumbel()
    with account:
        soft_rollout(policy, enc["input_ids"], enc["attention_mask"], lambda l, s: est(l, 1.0), max_new_tokens=new_tokens, min_new_tokens=new_tokens, eos_token_id=0, **options)
    return account.total


def test_saved_memory_is_linear_in_the_new_tokens_with_the_chunked_cache_and_quadratic_without(policy, tokenizer, prompts):
    enc = _encode(tokenizer, prompts)
    for cache, law in (("chunked", "linear"), ("dynamic", "quadratic")):
        s8, s16, s24 = (saved_rollout_bytes(policy, enc, t, cache=cache) for t in (8, 16, 24))
        first, second = s16 - s8, s24 - s16  # bytes per 8 more tokens, early and late
        if law == "linear":
            assert second == pytest.approx(first, rel=0.02), (cache, s8, s16, s24)
        else:  # every step keeps a copy of the whole cache: the increments grow
            assert second > 1.2 * first, (cache, s8, s16, s24)
    chunked = saved_rollout_bytes(policy, enc, 24) - saved_rollout_bytes(policy, enc, 16)
    checkpointed = saved_rollout_bytes(policy, enc, 24, checkpoint_steps=True) - saved_rollout_bytes(policy, enc, 16, checkpoint_steps=True)
    assert checkpointed < 0.5 * chunked  # per generated token: only the steps' inputs and outputs stay


def test_top_k_relaxation_samples_inside_the_top_k_and_keeps_k_columns(policy, tokenizer, prompts):
    enc = _encode(tokenizer, prompts)
    torch.manual_seed(0)
    est = StraightThroughGumbel()
    rollout = soft_rollout(policy, enc["input_ids"], enc["attention_mask"], lambda l, s: est(l, 1.0), max_new_tokens=5, eos_token_id=0, top_k=16)
    assert rollout.logits.shape[-1] == 16 and rollout.logit_indices.shape == (3, rollout.tokens.shape[1], 16)
    assert (rollout.logit_indices == rollout.tokens.unsqueeze(-1)).any(-1).all()  # every hard token is one of its step's top 16
    assert all(step.values.shape == (3, 16) for step in rollout.soft_tokens.steps)
    ref = copy.deepcopy(policy).requires_grad_(False)
    kl = exact_kl(rollout.logits, reference_logits(ref, rollout), rollout.logit_indices)
    assert (kl >= 0).all() and kl.max() > 0  # the truncated policy differs from the full reference
    kl.sum().backward()
    assert policy.transformer.h[0].attn.c_attn.weight.grad.abs().sum() > 0


def test_soft_tokens_read_the_same_values_every_way(policy, tokenizer, prompts):
    enc = _encode(tokenizer, prompts)
    weight = policy.get_input_embeddings().weight.detach().double()
    for est, top_k in ((StraightThroughGumbel(), 0), (GumbelSoftmax(), 0), (StraightThroughGumbel(), 16), (GumbelSoftmax(), 16)):
        torch.manual_seed(2)
        rollout = soft_rollout(policy, enc["input_ids"], enc["attention_mask"], lambda l, s: est(l, 0.7), max_new_tokens=5, eos_token_id=0, top_k=top_k)
        soft = rollout.soft_tokens
        dense = soft.dense()  # (B, T, V)
        assert_close(soft.embed(weight.float()).double(), dense.double() @ weight, rtol=1e-5, atol=1e-5)
        assert_close(soft.probability(7), dense[..., 7])
        stepwise = torch.stack([embed_step(step, weight.float()) for step in soft.steps], 1)
        assert_close(soft.embed(weight.float()), stepwise)
        if est.name == "ste":
            assert torch.equal(dense.argmax(-1), rollout.tokens) and ((dense == 0) | (dense == 1)).all()
    one_hot = F.one_hot(torch.tensor([[3, 4]]), 10).float()
    assert torch.equal(SoftTokens.from_dense(one_hot).dense(), one_hot)


def test_deferral_replaces_forwards_only_within_its_block_and_leaves_replaced_ones_alone(policy):
    """`deferred_weight_grads` routes the modules with trainable weights through the deferred Functions by replacing
    their `forward` on the instance, for the block only (also when it raises, and a nested block leaves the outer
    one's in place); a module whose forward something else replaced already (Accelerate's hooks do) is left alone."""
    from grade_trl.core.deferred_grads import DeferredWeightGrads, deferred_weight_grads

    hooked = policy.transformer.h[0].mlp.c_fc

    def hook_forward(x):
        return type(hooked).forward(hooked, x)

    hooked.forward = hook_forward
    store = DeferredWeightGrads()
    try:
        with deferred_weight_grads(policy, store):
            patched = [module for module, _ in store.patches(policy)]
            assert policy.lm_head in patched and policy.transformer.h[0].attn.c_attn in patched and hooked not in patched
            assert all("forward" in vars(module) for module in patched) and hooked.forward is hook_forward
        assert not any("forward" in vars(module) for module in patched) and hooked.forward is hook_forward
        with pytest.raises(RuntimeError, match="inside"):
            with deferred_weight_grads(policy, store):
                raise RuntimeError("inside")
        assert not any("forward" in vars(module) for module in patched)
        with deferred_weight_grads(policy, store):
            with deferred_weight_grads(policy, store):  # nested: the inner block leaves the outer one's forwards in place
                pass
            assert all("forward" in vars(module) for module in patched)
        assert not any("forward" in vars(module) for module in patched)
        late = policy.lm_head  # its forward replaced by something else after the store found its modules: left alone too
        late.forward = hook_forward
        with deferred_weight_grads(policy, store):
            assert late.forward is hook_forward and "forward" in vars(policy.transformer.h[0].attn.c_attn)
        assert late.forward is hook_forward
        del late.forward
    finally:
        del hooked.forward


def test_rollout_runs_gpt2s_gelu_as_one_kernel_with_the_gradient_of_the_models_own(policy, tokenizer, prompts):
    """`soft_rollout` replaces GPT-2's `gelu_new` (8 tensor operations) by torch's one-kernel tanh GELU, for its own
    forwards only. The same function: in float64 the rollout's tokens and gradient equal those of a rollout that runs
    the model's own activation (its modules' forward pinned, which the replacement leaves alone)."""
    from transformers.activations import NewGELUActivation

    from grade_trl.core.soft_rollout import tanh_gelu_in_one_kernel, tanh_gelu_modules

    policy = copy.deepcopy(policy).double()
    x = torch.linspace(-8, 8, 1001, dtype=torch.float64)
    activations = tanh_gelu_modules(policy)
    assert len(activations) == policy.config.n_layer and all(type(m) is NewGELUActivation for m in activations)
    with tanh_gelu_in_one_kernel(activations):
        assert activations[0].forward.__name__ == "_tanh_gelu"
        fused = activations[0](x)
    assert not any("forward" in vars(m) for m in activations)
    assert_close(fused, activations[0](x), rtol=1e-14, atol=1e-15)

    enc = _encode(tokenizer, prompts)
    est = StraightThroughGumbel()
    direction = torch.randn(policy.config.n_embd, dtype=torch.float64, generator=torch.Generator().manual_seed(3))

    def gradient():
        torch.manual_seed(1)
        policy.zero_grad(set_to_none=True)
        r = soft_rollout(policy, enc["input_ids"], enc["attention_mask"], lambda l, s: est(l, 0.7), max_new_tokens=6, min_new_tokens=2, eos_token_id=0)
        (r.logits.logsumexp(-1).sum() + (r.soft_tokens.embed(policy.get_input_embeddings().weight) @ direction).tanh().sum()).backward()
        return r.tokens, [p.grad.clone() for p in policy.parameters()]

    tokens, grads = gradient()
    assert not any("forward" in vars(m) for m in activations)
    for m in activations:
        m.forward = NewGELUActivation.forward.__get__(m)  # the model's own gelu_new, left alone by the rollout
    try:
        own_tokens, own = gradient()
    finally:
        for m in activations:
            del m.forward
    assert torch.equal(tokens, own_tokens)
    for ours, theirs in zip(grads, own):
        assert_close(ours, theirs, rtol=1e-10, atol=1e-12 * theirs.abs().max().item())


def test_chunked_cache_layer_reads_its_chunks_from_one_buffer_as_their_concatenation():
    """Each layer writes every chunk's rows once into a buffer grown by doubling, and attention reads views of its
    first rows instead of concatenating the chunks at every step (core/chunked_cache.py): those views must equal the
    concatenation of the first n chunks for every n, across regrowths, and a chunk the buffer cannot hold (another
    dtype) must fall back to the concatenation."""
    from grade_trl.core.chunked_cache import ChunkedLayer

    torch.manual_seed(0)
    layer = ChunkedLayer()
    widths = [5, 1, 1, 3, 1, 1, 1, 7, 1, 1]  # a prompt, then decode steps and a few wider chunks: three regrowths
    for width in widths:
        layer.append(torch.randn(2, 3, width, 4), torch.randn(2, 3, width, 4))
        for n in range(1, len(layer.key_chunks) + 1):
            keys, values = layer.keys_and_values(n)
            assert torch.equal(keys, torch.cat(layer.key_chunks[:n], dim=-2)) and torch.equal(values, torch.cat(layer.value_chunks[:n], dim=-2))
            assert keys.data_ptr() == layer.key_buffer.data_ptr() and values.data_ptr() == layer.value_buffer.data_ptr()  # views, no copy
    assert layer.buffered == sum(widths) and layer.key_buffer.shape[-2] == 40  # 5 -> 10 -> 20 -> 40
    layer.append(torch.randn(2, 3, 1, 4, dtype=torch.float64), torch.randn(2, 3, 1, 4, dtype=torch.float64))
    assert layer.key_buffer is None
    keys, values = layer.keys_and_values(len(layer.key_chunks))
    assert torch.equal(keys, torch.cat(layer.key_chunks, dim=-2)) and torch.equal(values, torch.cat(layer.value_chunks, dim=-2))
    # a reader outside the chunked attention that is differentiated gets the concatenation, with its gradient edges
    layer.reset()
    first = torch.randn(2, 3, 2, 4, requires_grad=True)
    keys, _ = layer.update(first, torch.randn(2, 3, 2, 4))
    keys, _ = layer.update(torch.randn(2, 3, 1, 4), torch.randn(2, 3, 1, 4))
    keys.sum().backward()
    assert torch.equal(first.grad, torch.ones_like(first))
    # ... and so does one whose query alone needs a gradient: what it saved is not written by the next step
    layer.reset()
    query = torch.randn(2, 3, 2, 4, requires_grad=True)
    keys, values = layer.update(torch.randn(2, 3, 2, 4), torch.randn(2, 3, 2, 4))
    output = F.scaled_dot_product_attention(query, keys, values)
    layer.update(torch.randn(2, 3, 1, 4), torch.randn(2, 3, 1, 4))
    output.sum().backward()
    assert query.grad is not None


def test_rollout_attention_reads_the_buffered_keys_and_values(policy, tokenizer, prompts):
    """A chunked rollout's attention reads each layer's buffer: the concatenation of the prompt's and the steps' chunks
    is never formed (test_memory_options_give_the_plain_gradient checks the values and gradients)."""
    enc = _encode(tokenizer, prompts)
    est = StraightThroughGumbel()
    cats = []
    original_cat = torch.cat

    def counting_cat(tensors, *args, **kwargs):
        cats.append(len(tensors))
        return original_cat(tensors, *args, **kwargs)

    torch.manual_seed(0)
    torch.cat = counting_cat
    try:
        rollout = soft_rollout(policy, enc["input_ids"], enc["attention_mask"], lambda l, s: est(l, 0.7), max_new_tokens=5, min_new_tokens=5, eos_token_id=0)
    finally:
        torch.cat = original_cat
    assert rollout.logits.shape[1] == 5
    assert cats and max(cats) == 2  # the attention mask's growth and the like; no concatenation of the prompt's and t steps' chunks


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_eos_ban_writes_the_value_and_passes_the_gradient_through(dtype):
    """forbid_eos_before writes finfo.min / 2 at EOS for the first positions, whatever was there (-inf, NaN), like
    forbid_eos, and hands the gradient through unchanged: the exact KL's gradient equals the one through forbid_eos."""
    from grade_trl.core.soft_rollout import forbid_eos, forbid_eos_before

    torch.manual_seed(0)
    policy_logits = torch.randn(2, 4, 9).to(dtype)
    ref_logits = torch.randn(2, 4, 9).to(dtype)
    ref_logits[0, 0, 3], ref_logits[1, 1, 3] = float("-inf"), float("nan")  # what a bad reference could hand over
    policy_logits = torch.cat([forbid_eos(policy_logits[:, :3], 3), policy_logits[:, 3:]], dim=1).requires_grad_(True)
    ours_ref = ref_logits.clone().requires_grad_(True)
    theirs_ref = ref_logits.clone().requires_grad_(True)
    ours = forbid_eos_before(ours_ref, 3, 3)
    theirs = torch.cat([forbid_eos(theirs_ref[:, :3], 3), theirs_ref[:, 3:]], dim=1)
    assert torch.equal(ours[:, :3], theirs[:, :3]) and (ours[:, :3, 3] == torch.finfo(dtype).min / 2).all()
    assert torch.equal(ours[:, 3:], ref_logits[:, 3:])
    weights = torch.randn(2, 4)
    grads_ours = torch.autograd.grad((exact_kl(policy_logits, ours)[:, :3] * weights[:, :3]).sum(), (policy_logits, ours_ref))
    grads_theirs = torch.autograd.grad((exact_kl(policy_logits, theirs)[:, :3] * weights[:, :3]).sum(), (policy_logits, theirs_ref))
    assert all(torch.isfinite(g).all() for g in grads_ours)
    for a, b in zip(grads_ours, grads_theirs):
        assert torch.equal(a, b)
    assert forbid_eos_before(ref_logits, 0, 3) is ref_logits and forbid_eos_before(ref_logits, 3, None) is ref_logits
    assert torch.equal(forbid_eos_before(ours_ref.detach(), 99, 3)[:, :, 3], torch.full((2, 4), torch.finfo(dtype).min / 2, dtype=dtype))


# ---- GPT-2's decode step as one node (core/gpt2_decode_block.py) ---------------------------------------------


def graph_node_names(tensor) -> list[str]:
    """The names of every autograd node `tensor` depends on."""
    seen, stack, names = set(), [tensor.grad_fn], []
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.append(type(node).__name__)
        stack.extend(next_node for next_node, _ in node.next_functions)
    return names


def fused_and_per_module_gradients(policy, enc, estimator, monkeypatch, **options):
    """(tokens, loss, parameter gradients, the graph's node names) of one relaxed rollout with the KL to a perturbed
    reference and a reward-like term, with GPT-2's decode steps as one node each, then per module (the path before)."""
    rollout_module = importlib.import_module("grade_trl.core.soft_rollout")  # the module (the package exports its function by that name)
    ref = copy.deepcopy(policy).requires_grad_(False)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(5), dtype=p.dtype))
    direction = torch.randn(policy.config.n_embd, dtype=policy.dtype, generator=torch.Generator().manual_seed(3))

    def run():
        torch.manual_seed(1)
        policy.zero_grad(set_to_none=True)
        r = soft_rollout(policy, enc["input_ids"], enc["attention_mask"], lambda l, s: estimator(l, 0.7), max_new_tokens=6, min_new_tokens=2,
                         eos_token_id=0, **options)
        kl = masked_sum(exact_kl(r.logits, reference_logits(ref, r, 2, 0), r.logit_indices), r.mask, dim=1)
        loss = kl.sum() + (r.soft_tokens.embed(ref.get_input_embeddings().weight) @ direction).tanh().sum()
        names = graph_node_names(loss)
        loss.backward()
        return r.tokens, loss.detach(), [None if p.grad is None else p.grad.clone() for p in policy.parameters()], names

    fused = run()
    with monkeypatch.context() as patch:
        patch.setattr(rollout_module, "gpt2_decode_blocks", lambda model, store: [])
        per_module = run()
    return fused, per_module


@pytest.mark.parametrize("estimator", [StraightThroughGumbel(), GumbelSoftmax()], ids=["ste", "soft"])
@pytest.mark.parametrize("top_k", [0, 5], ids=["full", "top5"])
def test_gpt2_decode_step_as_one_node_gives_the_per_module_gradient(policy, tokenizer, prompts, estimator, top_k, monkeypatch):
    """In float64, left-padded prompts (a bool attention mask), an EOS ban and the KL through the reference: the same
    tokens, loss and gradient of every parameter (weights and biases deferred, layer norms per step) to 1e-10 as the
    per-module path, and the rollout's graph has one `_GPT2DecodeStepBackward` per layer and fed-back step."""
    policy = copy.deepcopy(policy).double()
    enc = _encode(tokenizer, prompts)
    assert (enc["attention_mask"] == 0).any(), "the test needs left padding"
    fused, per_module = fused_and_per_module_gradients(policy, enc, estimator, monkeypatch, top_k=top_k)
    steps = fused[0].shape[1]
    assert fused[3].count("_GPT2DecodeStepBackward") == policy.config.n_layer * (steps - 1)
    assert "_GPT2DecodeStepBackward" not in per_module[3]
    assert fused[3].count("NativeLayerNormBackward0") < per_module[3].count("NativeLayerNormBackward0")
    assert torch.equal(fused[0], per_module[0])
    assert_close(fused[1], per_module[1], rtol=1e-12, atol=0)
    for ours, theirs in zip(fused[2], per_module[2]):
        assert_close(ours, theirs, rtol=1e-10, atol=1e-12 * theirs.abs().max().item())


def test_gpt2_decode_step_is_taken_only_where_it_computes_what_the_block_would(policy, tokenizer, prompts, monkeypatch):
    """A block with a frozen part, or whose forward something else replaced, runs per module (the others stay one node,
    with the per-module gradient); so does every block under autocast and with the checkpointed or dynamic-cache
    rollout, and the prompt's forward."""
    from grade_trl.core.gpt2_decode_block import gpt2_decode_blocks
    from grade_trl.core.deferred_grads import DeferredWeightGrads

    policy = copy.deepcopy(policy).double()
    store = DeferredWeightGrads()
    assert len(gpt2_decode_blocks(policy, store)) == policy.config.n_layer
    blocks = policy.transformer.h
    blocks[0].ln_2.weight.requires_grad_(False)
    blocks[1].attn.c_proj.forward = blocks[1].attn.c_proj.forward  # replaced on the instance (as Accelerate's hooks do)
    try:
        assert [b for b, _ in gpt2_decode_blocks(policy, store)] == list(blocks[2:])
        enc = _encode(tokenizer, prompts)
        fused, per_module = fused_and_per_module_gradients(policy, enc, StraightThroughGumbel(), monkeypatch)
        assert fused[3].count("_GPT2DecodeStepBackward") == (policy.config.n_layer - 2) * (fused[0].shape[1] - 1)
        for ours, theirs in zip(fused[2], per_module[2]):
            if theirs is not None:
                assert_close(ours, theirs, rtol=1e-10, atol=1e-12 * theirs.abs().max().item())
    finally:
        blocks[0].ln_2.weight.requires_grad_(True)
        del blocks[1].attn.c_proj.forward
    for options in ({"checkpoint_steps": True}, {"cache": "dynamic"}, {"defer_weight_grads": False}):
        fused, _ = fused_and_per_module_gradients(policy, enc, StraightThroughGumbel(), monkeypatch, **options)
        assert "_GPT2DecodeStepBackward" not in fused[3], options
    policy = policy.float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        r = soft_rollout(policy, enc["input_ids"], enc["attention_mask"], lambda l, s: StraightThroughGumbel()(l, 0.7), max_new_tokens=3)
    assert "_GPT2DecodeStepBackward" not in graph_node_names(r.logits)


def test_gpt2_decode_step_as_one_node_saves_no_more_than_per_module_and_respects_module_hooks(policy, tokenizer, prompts, monkeypatch):
    """The one-node step keeps what the modules kept for backward (no more bytes: a `SavedTensorAccount` with no
    models, so no module hooks); a hook on a module inside a block (here the account's own, by model) would be
    skipped by it, so those blocks run per module."""
    enc = _encode(tokenizer, prompts)
    est = StraightThroughGumbel()
    rollout_module = importlib.import_module("grade_trl.core.soft_rollout")

    def saved(models):
        account = SavedTensorAccount(models)
        torch.manual_seed(0)
        with account:
            r = soft_rollout(policy, enc["input_ids"], enc["attention_mask"], lambda l, s: est(l, 1.0), max_new_tokens=12, min_new_tokens=12, eos_token_id=0)
        return account.total, graph_node_names(r.logits)

    fused, names = saved({})
    assert names.count("_GPT2DecodeStepBackward") == policy.config.n_layer * 11
    with monkeypatch.context() as patch:
        patch.setattr(rollout_module, "gpt2_decode_blocks", lambda model, store: [])
        per_module, _ = saved({})
    assert fused <= per_module
    _, hooked_names = saved({"policy": policy})
    assert "_GPT2DecodeStepBackward" not in hooked_names


def test_gpt2_decode_step_records_under_the_tensors_a_call_swaps_in(policy, tokenizer, prompts, monkeypatch):
    """`torch.func.functional_call` hands the blocks other tensors than their parameters for the call: the one-node step
    records their gradients under those tensors (they reach them), as per module."""
    from torch.func import functional_call

    policy = copy.deepcopy(policy).double()
    enc = _encode(tokenizer, prompts)
    rollout_module = importlib.import_module("grade_trl.core.soft_rollout")

    class Swapped(torch.nn.Module):  # the rollout calls the model several times: each call with `params`
        def __init__(self, model, params):
            super().__init__()
            self.model, self.params, self.config = model, params, model.config

        def get_input_embeddings(self):
            return self.model.get_input_embeddings()

        def forward(self, **kwargs):
            return functional_call(self.model, self.params, args=(), kwargs=kwargs)

    def gradients():
        params = {name: p.detach().clone().requires_grad_(True) for name, p in policy.named_parameters()}
        torch.manual_seed(1)
        r = soft_rollout(Swapped(policy, params), enc["input_ids"], enc["attention_mask"], lambda l, s: StraightThroughGumbel()(l, 0.7), max_new_tokens=5)
        names = graph_node_names(r.logits)
        return names, torch.autograd.grad(r.logits.logsumexp(-1).pow(2).sum(), list(params.values()), allow_unused=True)

    names, fused = gradients()
    assert names.count("_GPT2DecodeStepBackward") == policy.config.n_layer * 4
    with monkeypatch.context() as patch:
        patch.setattr(rollout_module, "gpt2_decode_blocks", lambda model, store: [])
        _, per_module = gradients()
    for ours, theirs in zip(fused, per_module):
        assert_close(ours, theirs, rtol=1e-10, atol=1e-12 * theirs.abs().max().item())


def test_gpt2_decode_step_leaves_alone_what_it_would_skip_and_keeps_transformers_idle_recorders(policy):
    """Not plain, so per module: dropout replaced by something else than Identity or p = 0, a subclass or a patched class
    inside the block, a hook on any module inside it (a dropout's too). transformers' output recorders, installed for
    good by one `output_hidden_states=True` or `output_attentions=True` call, do not count (idle unless a call asks)."""
    from grade_trl.core.deferred_grads import DeferredWeightGrads
    from grade_trl.core.gpt2_decode_block import gpt2_decode_blocks
    from transformers.models.gpt2.modeling_gpt2 import GPT2MLP

    def plain_blocks(model):
        return [block for block, _ in gpt2_decode_blocks(model, DeferredWeightGrads())]

    model = copy.deepcopy(policy)
    blocks = list(model.transformer.h)
    assert plain_blocks(model) == blocks
    blocks[0].attn.resid_dropout = torch.nn.Identity()  # plain: dropout off another way
    blocks[1].mlp.dropout = torch.nn.Dropout(0.1)
    handle = blocks[2].attn.attn_dropout.register_forward_hook(lambda module, args, output: output * 0.5)

    class ScaledMLP(GPT2MLP):
        def forward(self, hidden_states):
            return 2 * super().forward(hidden_states)

    scaled = ScaledMLP(4 * model.config.n_embd, model.config)
    scaled.load_state_dict(blocks[3].mlp.state_dict())
    blocks[3].mlp = scaled
    assert plain_blocks(model) == [blocks[0]]
    handle.remove()
    with torch.no_grad():
        model(input_ids=torch.tensor([[5, 6, 7]]), output_hidden_states=True, output_attentions=True)
    assert plain_blocks(model) == [blocks[0], blocks[2]]
    original = GPT2MLP.forward
    try:
        GPT2MLP.forward = lambda self, hidden_states: original(self, hidden_states)
        assert plain_blocks(model) == []
    finally:
        GPT2MLP.forward = original


def test_rollout_refuses_the_models_activation_checkpointing_in_train_mode(policy, tokenizer, prompts):
    enc = _encode(tokenizer, prompts)
    model = copy.deepcopy(policy)
    model.activation_checkpointing_enable()  # formerly gradient_checkpointing_enable
    model.train()
    with pytest.raises(ValueError, match="activation_checkpointing_disable.*checkpoint_steps"):
        soft_rollout(model, enc["input_ids"], enc["attention_mask"], lambda l, s: StraightThroughGumbel()(l, 0.7), max_new_tokens=2)


@pytest.mark.parametrize("hooked", ["none", "attention", "layer_norm", "mlp_pre_hook"])
def test_a_rollout_leaves_nothing_alive_after_its_backward(policy, tokenizer, prompts, hooked):
    """Each rollout's chunked cache and deferred-gradient store die with its step, also when a module inside a block
    has a hook (which runs that block per module; ZeRO-3 hooks every module, and benchmarks/step_cost.py's saved-bytes
    account hooks the attention, MLP and norms). They did not: a chunk kept in the cache carried its autograd edges,
    which lead through the step's graph to the attention nodes whose context holds the cache's layer, a cycle through
    autograd's graph that Python's collector did not free once a hook was in the path; every step's cache, store and
    graph stayed alive (about 0.5 GB a step on the gpt2-small shape). Now the cache drops the chunks' edges once the
    rollout's forward is done (the steps took theirs already)."""
    import gc

    from grade_trl.core.chunked_cache import ChunkedLayer
    from grade_trl.core.deferred_grads import DeferredWeightGrads

    block = policy.transformer.h[0]
    register = {"none": lambda: [], "attention": lambda: [block.attn.register_forward_hook(lambda module, args, output: None)],
                "layer_norm": lambda: [block.ln_1.register_forward_hook(lambda module, args, output: None)],
                "mlp_pre_hook": lambda: [block.mlp.register_forward_pre_hook(lambda module, args: None)]}
    handles = register[hooked]()  # only this case's hook
    enc = _encode(tokenizer, prompts)
    est = StraightThroughGumbel()

    def alive() -> tuple[int, int]:
        gc.collect()
        objects = gc.get_objects()
        return sum(isinstance(o, ChunkedLayer) for o in objects), sum(isinstance(o, DeferredWeightGrads) for o in objects)

    try:
        before = alive()
        for _ in range(3):
            r = soft_rollout(policy, enc["input_ids"], enc["attention_mask"], lambda logits, step: est(logits, 0.7), max_new_tokens=5,
                             min_new_tokens=5, eos_token_id=0)
            r.logits.float().logsumexp(-1).sum().backward()
            del r
        policy.zero_grad(set_to_none=True)
        assert alive() == before
    finally:
        for handle in handles:
            handle.remove()
