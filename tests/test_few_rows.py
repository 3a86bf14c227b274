"""The decode step's LM-head product in its faster CPU layout (grade_trl/core/few_rows.py): the same values and
gradients as F.linear, used where a decode loop multiplies few rows, and the sampler draws what it drew before."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.testing import assert_close

from grade_trl.core import SamplingSettings, sample
from grade_trl.core.deferred_grads import replaced_forwards
from grade_trl.core.few_rows import FEW_ROWS, few_row_output_head, times_transposed, uses_transposed_layout


@pytest.mark.parametrize("shape", [(3, 16), (2, 1, 16), (FEW_ROWS, 16), (FEW_ROWS + 1, 16), (4, 20, 16)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_times_transposed_is_f_linear_with_its_gradients(shape, with_bias):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, dtype=torch.float64, generator=generator, requires_grad=True)
    weight = torch.randn(40, 16, dtype=torch.float64, generator=generator, requires_grad=True)
    bias = torch.randn(40, dtype=torch.float64, generator=generator, requires_grad=True) if with_bias else None
    rows = x.numel() // shape[-1]
    assert uses_transposed_layout(x) == (rows <= FEW_ROWS)  # both paths are exercised across the cases
    out = times_transposed(x, weight, bias)
    expected = F.linear(x, weight, bias)
    assert out.shape == expected.shape and out.is_contiguous()
    assert_close(out, expected, rtol=1e-12, atol=1e-12)
    upstream = torch.randn_like(expected)
    inputs = [x, weight] + ([bias] if with_bias else [])
    assert_close(torch.autograd.grad(out, inputs, upstream), torch.autograd.grad(expected, inputs, upstream), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("with_bias", [False, True])
def test_under_bf16_autocast_times_transposed_has_f_linears_dtype_and_values(with_bias):
    """Under CPU autocast F.linear casts x, W and b to bfloat16 and returns bfloat16; so must the transposed layout (a
    float32 bias added after a bfloat16 product would promote the output to float32: the decode step's keys and values
    would then differ in dtype from the prompt's)."""
    generator = torch.Generator().manual_seed(0)
    x, weight = torch.randn(4, 1, 16, generator=generator), torch.randn(40, 16, generator=generator)
    bias = torch.randn(40, generator=generator) if with_bias else None
    assert uses_transposed_layout(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, expected = times_transposed(x, weight, bias), F.linear(x, weight, bias)
    assert out.dtype == expected.dtype == torch.bfloat16
    assert_close(out, expected, rtol=1e-2, atol=1e-2)  # bfloat16 rounding; the same rounding of the same sum


def test_operands_of_different_dtypes_raise_as_f_linear_does():
    x, weight = torch.randn(4, 16), torch.randn(40, 16)
    with pytest.raises(RuntimeError):
        F.linear(x, weight, torch.randn(40, dtype=torch.float64))
    with pytest.raises(RuntimeError):
        times_transposed(x, weight, torch.randn(40, dtype=torch.float64))


def test_the_output_head_takes_the_layout_within_the_block_only(policy):
    policy = copy.deepcopy(policy).double()
    head = policy.get_output_embeddings()
    hidden = torch.randn(3, 1, head.in_features, dtype=torch.float64)
    with replaced_forwards(few_row_output_head(policy)):
        assert vars(head)["forward"].__code__ is not nn.Linear.forward.__code__
        inside = head(hidden)
    assert "forward" not in vars(head)
    assert_close(inside, F.linear(hidden, head.weight, head.bias), rtol=1e-12, atol=1e-12)

    pinned = nn.Linear.forward.__get__(head)  # a head whose forward something else replaced is left alone
    head.forward = pinned
    with replaced_forwards(few_row_output_head(policy)):
        assert vars(head)["forward"] is pinned
    del head.forward


def test_the_sampler_draws_what_it_drew_with_the_heads_own_product(policy, tokenizer, prompts):
    """In float64, with the same seed, `sample` draws the same tokens with the same log-probs whether the LM head
    runs in the transposed layout (the default on CPU) or as its own nn.Linear (pinned, which the block leaves alone)."""
    policy = copy.deepcopy(policy).double()
    encoded = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    ids, mask = encoded["input_ids"], encoded["attention_mask"]
    settings = SamplingSettings(max_new_tokens=8, min_new_tokens=2, top_p=0.9)
    head = policy.get_output_embeddings()
    calls = []
    hook = head.register_forward_hook(lambda module, args, out: calls.append(vars(module).get("forward")))
    torch.manual_seed(0)
    transposed = sample(policy, ids, mask, settings, eos_token_id=0)
    hook.remove()
    assert calls and all(forward is not None for forward in calls)  # every step's head ran the replaced forward
    head.forward = nn.Linear.forward.__get__(head)
    try:
        torch.manual_seed(0)
        own = sample(policy, ids, mask, settings, eos_token_id=0)
    finally:
        del head.forward
    assert torch.equal(transposed.completion_ids, own.completion_ids)
    assert_close(transposed.logprobs, own.logprobs, rtol=0, atol=1e-12)
