"""Scoring inside the LM head, a chunk of positions at a time (core/head_scoring.py, `chunked_scoring`): the same
log-probs, entropy and gradients as the whole logits, without holding them; where it does not apply, the whole logits."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch.testing import assert_close

from grade_trl.core import SamplingSettings, completion_scores, output_head, sample, token_logprobs
from grade_trl.core import head_scoring
from grade_trl.core.masks import masked_mean
from grade_trl.core.sampling import token_entropy

SETTINGS = SamplingSettings(temperature=0.7, top_p=0.9, top_k=50, min_new_tokens=3, max_new_tokens=10)
# (B, T, V) = (3, 10, 8,192): 245,760 logits; these chunk sizes give chunks of 1, 2 and 4 positions, and one chunk
CHUNKS = (1, 3 * 8192 * 2, 3 * 8192 * 4, 2**26)


@pytest.fixture
def batch(policy, tokenizer):
    enc = tokenizer(["This movie was", "I watched it last night and the", "Worst"], return_tensors="pt", padding=True)
    torch.manual_seed(0)
    return sample(policy, enc["input_ids"], enc["attention_mask"], SETTINGS, tokenizer.eos_token_id, tokenizer.pad_token_id)


def _gradients(model) -> dict[str, torch.Tensor]:
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


def _whole(policy, batch, entropy_in_loss: bool, truncate: bool = True):
    """The reference numbers: token_logprobs' whole processed logits, a loss of log-probs (+ entropy), its gradients."""
    logps, processed = token_logprobs(policy, batch, SETTINGS, with_grad=True, truncate=truncate)
    entropy = token_entropy(processed)
    loss = logps.sum() + (masked_mean(entropy, batch.completion_mask) if entropy_in_loss else 0.0)
    loss.backward()
    return logps.detach(), entropy.detach(), _gradients(policy)


@pytest.mark.parametrize("chunk", CHUNKS, ids=["1-position", "2-positions", "4-positions", "one-chunk"])
def test_scores_and_gradients_equal_the_whole_logits(policy, batch, chunk, monkeypatch):
    """The loss's log-probs under the processed distribution (temperature, top-k, top-p, EOS ban by step), the detached
    entropy metric, and the policy's gradient: the whole logits' numbers, whatever the chunk (float summation order)."""
    monkeypatch.setattr(head_scoring, "CHUNK_ELEMENTS", chunk)
    assert output_head(policy) is policy.lm_head
    want_logps, want_entropy, want_grads = _whole(policy, batch, entropy_in_loss=False)
    logps, entropy = completion_scores(policy, batch, SETTINGS, with_grad=True, entropy="detached")
    assert not entropy.requires_grad
    logps.sum().backward()
    assert_close(logps.detach(), want_logps, atol=1e-5, rtol=0)
    assert_close(entropy, want_entropy, atol=1e-5, rtol=0)
    grads = _gradients(policy)
    assert grads.keys() == want_grads.keys()
    for name in grads:
        assert_close(grads[name], want_grads[name], atol=1e-4, rtol=1e-4, msg=name)


def test_the_entropy_bonus_keeps_its_gradient(policy, batch, monkeypatch):
    """PPO's entropy bonus: entropy="grad" gives the whole logits' gradient of log-probs + entropy, in several chunks."""
    monkeypatch.setattr(head_scoring, "CHUNK_ELEMENTS", 3 * 8192 * 3)
    _, _, want = _whole(policy, batch, entropy_in_loss=True)
    logps, entropy = completion_scores(policy, batch, SETTINGS, with_grad=True, entropy="grad")
    (logps.sum() + masked_mean(entropy, batch.completion_mask)).backward()
    got = _gradients(policy)
    for name in want:
        assert_close(got[name], want[name], atol=1e-4, rtol=1e-4, msg=name)


def test_the_reference_without_gradient(policy, batch, monkeypatch):
    """The reference's scoring (no grad, truncate=False): the chunked whole-logit scorer's numbers, no graph."""
    monkeypatch.setattr(head_scoring, "CHUNK_ELEMENTS", 3 * 8192 * 2)
    want, _ = token_logprobs(policy, batch, SETTINGS, with_grad=False, truncate=False, return_logits=False)
    got, none = completion_scores(policy, batch, SETTINGS, with_grad=False, truncate=False)
    assert none is None and not got.requires_grad
    assert_close(got, want, atol=1e-5, rtol=0)
    assert "forward" not in vars(policy.lm_head)  # the head's own forward is back


def test_under_bf16_autocast(policy, batch, monkeypatch):
    """Under bf16 autocast (the GPU recipes'), the head's product runs in bf16 as the model's own would, the scoring in
    float32: the chunks give the whole logits' numbers, and the recompute in backward sees the same autocast."""
    monkeypatch.setattr(head_scoring, "CHUNK_ELEMENTS", 3 * 8192 * 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want_logps, _, want_grads = _whole(policy, batch, entropy_in_loss=False)
        logps, _ = completion_scores(policy, batch, SETTINGS, with_grad=True)
        logps.sum().backward()
    assert logps.dtype == torch.float32
    assert_close(logps.detach(), want_logps, atol=1e-5, rtol=0)
    grads = _gradients(policy)
    for name in want_grads:  # each chunk's weight gradient is a bf16 product of its own: rounded per chunk, not once
        relative = (grads[name] - want_grads[name]).norm() / want_grads[name].norm()
        assert relative < 1e-2, (name, relative)


def _saved_bytes(fn) -> int:
    """Bytes autograd saves for backward while fn() runs (each tensor storage once)."""
    storages = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())


def test_several_chunks_save_no_logits_for_backward(policy, batch, monkeypatch):
    """The point of it: with several chunks autograd keeps no B x T x V tensor (the chunks' hidden states only), while the
    whole logits' scoring keeps at least their log-softmax (B x T x V float32). Counted by saved_tensors_hooks, which
    sees what non-reentrant checkpointing keeps (its inputs) and not what it recomputes."""
    logits_bytes = 4 * batch.completion_ids.numel() * policy.config.vocab_size
    whole = _saved_bytes(lambda: token_logprobs(policy, batch, SETTINGS, with_grad=True))
    monkeypatch.setattr(head_scoring, "CHUNK_ELEMENTS", 3 * 8192 * 2)
    chunked = _saved_bytes(lambda: completion_scores(policy, batch, SETTINGS, with_grad=True, entropy="detached"))
    assert whole >= logits_bytes
    assert whole - chunked >= logits_bytes, (whole, chunked)


def test_ddp_with_unused_parameter_search(policy, batch, tmp_path, monkeypatch):
    """Through DistributedDataParallel (find_unused_parameters walks the graph from the forward's output, which is the
    head's returned scores): the same gradient as without the wrapper."""
    import torch.distributed as dist

    monkeypatch.setattr(head_scoring, "CHUNK_ELEMENTS", 3 * 8192 * 2)
    plain = copy.deepcopy(policy)
    logps, _ = completion_scores(plain, batch, SETTINGS, with_grad=True)
    logps.sum().backward()
    want = _gradients(plain)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        ddp = torch.nn.parallel.DistributedDataParallel(policy, find_unused_parameters=True)
        assert output_head(ddp) is policy.lm_head
        logps, _ = completion_scores(ddp, batch, SETTINGS, with_grad=True)
        logps.sum().backward()
    finally:
        dist.destroy_process_group()
    got = _gradients(policy)
    for name in want:
        assert_close(got[name], want[name], atol=1e-5, rtol=1e-5, msg=name)


class _ScaledLogits(torch.nn.Module):
    """A model whose forward changes what its head returned (as a softcapping model's does), with no config key saying so."""

    def __init__(self, model):
        super().__init__()
        self.model, self.config = model, model.config

    def get_output_embeddings(self):
        return self.model.get_output_embeddings()

    def forward(self, **kwargs):
        out = self.model(**kwargs)
        out.logits = out.logits * 0.5
        return out


def test_where_it_does_not_apply_the_whole_logits_score(policy, batch, monkeypatch):
    """A head whose forward is replaced, a config that scales the logits, a model without a head: whole logits. A forward
    that changes the head's output anyway is caught: scored again from the whole logits, once warned."""
    assert output_head(torch.nn.Linear(2, 2)) is None  # no get_output_embeddings
    scaled_config = copy.deepcopy(policy)
    scaled_config.config.final_logit_softcapping = 30.0
    assert output_head(scaled_config) is None
    replaced = copy.deepcopy(policy)
    replaced.lm_head.forward = replaced.lm_head.forward  # e.g. Accelerate's hooks
    assert output_head(replaced) is None

    monkeypatch.setattr(head_scoring, "CHUNK_ELEMENTS", 3 * 8192 * 2)
    model = _ScaledLogits(policy)
    want, _ = token_logprobs(model, batch, SETTINGS, with_grad=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        head_scoring._WARNED.discard(_ScaledLogits)
        got, _ = completion_scores(model, batch, SETTINGS, with_grad=True)
    assert any("changes its LM head's output" in str(w.message) for w in caught)
    assert_close(got.detach(), want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", ["reinforce", "ppo"])
def test_a_training_step_is_the_same_with_and_without(method, tmp_path, monkeypatch):
    """REINFORCE's and PPO's step with chunked_scoring (several chunks) and with the whole logits, from the same seed:
    the same logged numbers and the same weights after it. With SGD: AdamW's first update, lr g / (|g| + eps), turns a
    gradient entry within float rounding of 0 into +-lr either way (PPO's 4 updates moved 2 of the head's 2.1M entries
    by 2e-5 under AdamW, 2026-12-07), which says nothing of the scoring; SGD's update is linear in the gradient (at lr 1
    PPO's moves 40k of the head's entries by more than 1e-5, up to 0.09)."""
    from grade_trl.trainers import PPOConfig, PPOTrainer, REINFORCEConfig, REINFORCETrainer

    from .conftest import one_logged_step

    monkeypatch.setattr(head_scoring, "CHUNK_ELEMENTS", 4 * 8192 * 2)
    classes = (REINFORCEConfig, REINFORCETrainer) if method == "reinforce" else (PPOConfig, PPOTrainer)
    extra = {"optim": "sgd", "learning_rate": 1.0} | ({} if method == "reinforce" else {"ent_coef": 0.01})
    runs = []
    for chunked in (True, False):
        log, trainer = one_logged_step(*classes, tmp_path / str(chunked), chunked_scoring=chunked, **extra)
        runs.append((log, trainer.accelerator.unwrap_model(trainer.model).get_output_embeddings().weight.detach().clone()))
    (chunked_log, chunked_head), (whole_log, whole_head) = runs
    for key in ("loss", "reward", "kl", "entropy", "grad_norm"):
        if key in whole_log:
            assert chunked_log[key] == pytest.approx(whole_log[key], rel=1e-4, abs=1e-6), key
    assert_close(chunked_head, whole_head, atol=1e-5, rtol=1e-4)
