"""PPO: the loss against a hand computation, the repeat sampler, and short runs on the tiny model."""

import math

import pytest
import torch
from accelerate.data_loader import BatchSamplerShard
from datasets import Dataset
from safetensors.torch import load_file
from torch.testing import assert_close
from torch.utils.data import BatchSampler
from transformers import AutoModelForCausalLM

from grade_trl.core import sample, token_entropy, token_logprobs
from grade_trl.rewards.length import LengthReward
from grade_trl.trainers.ppo import PolicyWithValueHead, PPOTrainer, RepeatRolloutSampler, ppo_loss, scores_and_values
from grade_trl.trainers.ppo_config import PPOConfig

PROMPTS = ["This movie was", "I watched it last night and", "The acting in this film", "Worst", "A quiet, slow", "My kids", "Honestly the plot", "It is"]
LOSS_SETTINGS = dict(cliprange=0.2, cliprange_value=0.2, vf_coef=0.1, ent_coef=0.01, logratio_clamp=2.0)


# ---------------------------------------------------------------- the loss, by hand


def test_ppo_loss_matches_hand_computation():
    # Three tokens: one whose ratio 1.5 is clipped (A = +1), one with ratio 1.1 inside the clip range (A = -2),
    # and a masked one with absurd values that must not count.
    old_logps = torch.tensor([[-1.0, -2.0, -3.0]])
    logps = (old_logps + torch.tensor([[math.log(1.5), math.log(1.1), 5.0]])).requires_grad_()
    advantages = torch.tensor([[1.0, -2.0, 100.0]])
    values = torch.tensor([[0.5, 1.5, 9.0]], requires_grad=True)
    old_values = torch.tensor([[0.0, 1.4, 0.0]])
    returns = torch.tensor([[1.0, 1.0, 0.0]])
    entropy = torch.tensor([[2.0, 1.0, 50.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])

    loss, stats = ppo_loss(logps, values, entropy, old_logps, old_values, advantages, returns, mask, **LOSS_SETTINGS)

    # policy: token 1 max(-1 * 1.5, -1 * 1.2) = -1.2 (clipped); token 2 max(2 * 1.1, 2 * 1.1) = 2.2
    pg = (-1.2 + 2.2) / 2
    # value: token 1 max((0.5 - 1)^2, (0 + 0.2 - 1)^2) = 0.64 (clipped); token 2 (1.5 - 1)^2 = 0.25 either way
    vf = 0.5 * (0.64 + 0.25) / 2
    expected = pg + 0.1 * vf - 0.01 * (2.0 + 1.0) / 2
    assert_close(loss, torch.tensor(expected))
    assert_close(stats["loss/policy"], torch.tensor(pg))
    assert_close(stats["loss/value"], torch.tensor(vf))
    assert_close(stats["policy/clipfrac"], torch.tensor(0.5))
    assert_close(stats["value/clipfrac"], torch.tensor(0.5))
    assert_close(stats["policy/approxkl"], torch.tensor(0.5 * (math.log(1.5) ** 2 + math.log(1.1) ** 2) / 2))

    loss.backward()
    # the clipped token gets no gradient; the unclipped one d/dlogp (1/2)(-A e^{logp - old}) = (1/2) * 2 * 1.1
    assert_close(logps.grad, torch.tensor([[0.0, 1.1, 0.0]]))


def test_ppo_loss_clamps_the_log_ratio():
    # A token that left the nucleus after an update has an old log-prob ~ finfo.min / 2: the ratio is capped at e^2.
    old_logps = torch.tensor([[torch.finfo(torch.float32).min / 2]])
    logps = torch.tensor([[-1.0]])
    zeros, mask = torch.zeros(1, 1), torch.ones(1, 1)
    loss, stats = ppo_loss(logps, zeros, zeros, old_logps, zeros, -torch.ones(1, 1), zeros, mask, **{**LOSS_SETTINGS, "ent_coef": 0.0})
    assert_close(loss, torch.tensor(math.exp(2.0)))  # max(1 * e^2, 1 * 1.2), value loss 0
    assert_close(stats["policy/ratio_mean"], torch.tensor(math.exp(2.0)))


@pytest.mark.parametrize("in_head", [True, False], ids=["chunked_scoring", "whole-logits"])
def test_minibatch_scores_match_the_core_scorer(policy, tokenizer, in_head):
    # The trainer scores old/new log-probs from the wrapped model's single forward; they must equal core.token_logprobs,
    # scored inside the LM head (chunked_scoring) or from the whole logits.
    settings = PPOConfig(output_dir="unused", use_cpu=True, max_new_tokens=6, min_new_tokens=2).sampling  # 6 tokens: enough
    enc = tokenizer(PROMPTS[:4], return_tensors="pt", padding=True, add_special_tokens=False)
    torch.manual_seed(0)
    batch = sample(policy, enc["input_ids"], enc["attention_mask"], settings, tokenizer.eos_token_id, tokenizer.pad_token_id)
    expected, processed = token_logprobs(policy, batch, settings, with_grad=False)
    with torch.no_grad():
        logps, entropy, values = scores_and_values(PolicyWithValueHead(policy), batch.prompt_ids, batch.prompt_mask, batch.completion_ids,
                                                   batch.completion_mask, settings, tokenizer.eos_token_id, entropy_grad=False, in_head=in_head)
    assert_close(logps, expected, atol=1e-5, rtol=0)
    assert_close(logps, batch.logprobs, atol=1e-4, rtol=1e-4)  # the sampler's own log-probs (KV cache vs one forward)
    assert_close(entropy, token_entropy(processed), atol=1e-5, rtol=0)
    assert values.shape == logps.shape and torch.all(values == 0)  # zero-initialised value head


# ---------------------------------------------------------------- the sampler


def shard(sampler, batch_size, num_processes, process_index):
    """What Accelerate hands process `process_index` from the Trainer's DataLoader."""
    return list(BatchSamplerShard(BatchSampler(sampler, batch_size, drop_last=False), num_processes=num_processes, process_index=process_index))


def test_repeat_sampler_serves_each_global_batch_repeat_count_times_to_two_processes():
    per_device, world, repeats = 2, 2, 3  # ppo_epochs * num_mini_batches = 3
    per_process = [shard(RepeatRolloutSampler(12, per_device * world, repeats, seed=0), per_device, world, rank) for rank in range(world)]
    assert all(len(batches) == 3 * repeats for batches in per_process)  # 12 prompts / global batch 4 = 3 rollouts
    seen = []
    for rollout in range(3):
        block = [batches[rollout * repeats : (rollout + 1) * repeats] for batches in per_process]
        for rank in range(world):
            assert all(b == block[rank][0] for b in block[rank])  # the same prompts on every micro-step of a rollout
        assert not set(block[0][0]) & set(block[1][0])  # the two processes get different prompts
        seen += block[0][0] + block[1][0]
    assert sorted(seen) == list(range(12))  # one pass covers the data exactly once

    # A last partial global batch is dropped (as with drop_last): 10 prompts make 2 rollouts of 4.
    assert len(RepeatRolloutSampler(10, 4, repeats)) == 2 * 4 * repeats


# ---------------------------------------------------------------- the trainer


def length_config(tmp_path, **overrides):
    settings = dict(
        output_dir=str(tmp_path), max_steps=4,  # 4 mini-batch updates = 2 rollouts of 2 mini-batches
        per_device_train_batch_size=8, num_mini_batches=2, ppo_epochs=1,  # rollouts of 8 prompts, mini-batches of 4
        max_new_tokens=8, min_new_tokens=2,  # short completions (the users' run: 32 new tokens)
        temperature=0.7, top_p=0.9,  # the users' sampling, the case whose KL went negative
        logging_steps=1, use_cpu=True, disable_tqdm=True, report_to="none",
    )
    return PPOConfig(**{**settings, **overrides})


def test_ppo_smoke_run_on_the_length_reward(tmp_path):
    torch.manual_seed(0)
    args = length_config(tmp_path)
    dataset = Dataset.from_dict({"prompt": PROMPTS * 2})  # 16 prompts: the 2 rollouts are one epoch
    trainer = PPOTrainer(model="embedded", reward_funcs=[LengthReward(eos_token_id=0)], args=args, train_dataset=dataset)
    module = trainer.model
    assert isinstance(module, PolicyWithValueHead)
    body_before = module.policy.transformer.h[0].attn.c_attn.weight.detach().clone()
    ref_before = trainer.ref_model.transformer.h[0].attn.c_attn.weight.detach().clone()
    trainer.train()

    assert not torch.equal(body_before, module.policy.transformer.h[0].attn.c_attn.weight)  # the policy learned
    assert module.value_head.weight.abs().sum() > 0  # the value head left its zero initialisation
    assert torch.equal(ref_before, trainer.ref_model.transformer.h[0].attn.c_attn.weight)  # the reference is frozen

    logs = [h for h in trainer.state.log_history if "kl" in h]
    assert len(logs) == 4
    expected = {
        "reward", "reward_std", "kl", "completions/mean_length", "rewards/length/mean", "kl_coef",
        "kl_per_token", "objective/entropy", "policy/approxkl", "policy/clipfrac", "entropy",
        "loss/policy", "loss/value", "value/explained_variance", "value/error", "value/clipfrac", "returns/mean", "advantages/mean",
    }
    for log in logs:
        assert expected <= log.keys(), expected - log.keys()
        # Sampled with top-p 0.9 and temperature 0.7 but scored without the truncation on the reference side:
        # KL(p || q) >= 0. Scoring the policy without top-p is what gave the users -3 to -30.
        assert log["kl"] >= 0 and log["kl_per_token"] >= 0 and "objective/kl" not in log  # one key per quantity
        assert log["kl_per_token"] == pytest.approx(log["kl"] / log["completions/mean_length"], rel=1e-5)  # one rollout per window
        # the rewards were shaped with the k1 penalty (the default) that `kl` logs: -kl_coef * KL per completion
        assert args.kl_estimator == "k1" and log["objective/non_score_reward"] == pytest.approx(-log["kl_coef"] * log["kl"], rel=1e-5, abs=1e-9)
        assert log["completions/mean_length"] <= 8
    # The first mini-batch sees the rollout policy: its old log-probs are the sampler's (a cached decode), so the
    # ratio is 1 up to the float difference between that decode and one full forward.
    assert logs[0]["policy/approxkl"] < 1e-9 and logs[0]["policy/ratio_mean"] == pytest.approx(1.0, abs=1e-5)

    # Adaptive KL: at the start p is the reference truncated to its 0.9 nucleus, so the per-token KL is
    # -log(nucleus mass) <= -log 0.9 ~ 0.105 and the sequence KL <= 8 * 0.105 < kl_target 6. The error
    # KL / 6 - 1 is therefore clipped at -0.2 and, after the first rollout (8 samples, horizon 10,000),
    # the coefficient becomes 1 * (1 - 0.2 * 8 / 10000). The first rollout's rewards used the initial 1.
    assert [log["kl_coef"] for log in logs[:2]] == [1.0, 1.0]
    assert logs[2]["kl_coef"] == pytest.approx(1 - 0.2 * 8 / 10000) and logs[3]["kl_coef"] == logs[2]["kl_coef"]

    out = tmp_path / "model"
    trainer.save_model(str(out))
    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert_close(loaded.transformer.h[0].attn.c_attn.weight, module.policy.transformer.h[0].attn.c_attn.weight)
    assert_close(load_file(out / "value_head.safetensors")["weight"], module.value_head.weight.detach())
    assert (out / "tokenizer_config.json").exists()
    # readable as the umask allows, as config.json is, not safetensors 0.8's 0600 (another user could not load the model)
    assert {path.name: path.stat().st_mode & 0o777 for path in out.glob("*.safetensors")} == dict.fromkeys(("model.safetensors", "value_head.safetensors"), (out / "config.json").stat().st_mode & 0o777)
    # a PPO run started from the saved folder starts from its critic (a user trial found the head back at zero), by the
    # path or by the model loaded from it (the runner's way); the embedded model has none: zero
    for model in (str(out), AutoModelForCausalLM.from_pretrained(out)):
        continued = PPOTrainer(model=model, reward_funcs=[LengthReward(eos_token_id=0)], args=length_config(tmp_path / "continued"), train_dataset=dataset)
        assert torch.equal(continued.model.value_head.weight, module.value_head.weight.detach()) and module.value_head.weight.abs().sum() > 0
    fresh = PPOTrainer(model="embedded", reward_funcs=[LengthReward(eos_token_id=0)], args=length_config(tmp_path / "fresh"), train_dataset=dataset)
    assert fresh.model.value_head.weight.abs().sum() == 0


def test_target_kl_skips_the_rest_of_the_rollout(tmp_path):
    args = length_config(
        tmp_path, per_device_train_batch_size=4, ppo_epochs=2,  # one rollout = 2 epochs x 2 mini-batches = the 4 steps
        max_new_tokens=4,  # shorter still: only the schedule matters here
        target_kl=1e-9,  # any update trips it: mini-batch 1 sees the rollout policy (approx KL 0), mini-batch 2 does not
    )
    trainer = PPOTrainer(model="embedded", reward_funcs=[LengthReward(eos_token_id=0)], args=args, train_dataset=Dataset.from_dict({"prompt": PROMPTS[:4]}))
    trainer.train()
    logs = [h for h in trainer.state.log_history if "kl" in h]
    assert [log["policy/early_stopped"] for log in logs] == [0.0, 0.0, 1.0, 1.0]
    assert logs[1]["policy/approxkl"] > 1e-9
    assert logs[2]["loss"] == 0.0 and logs[3]["loss"] == 0.0  # skipped mini-batches contribute a zero loss


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(per_device_train_batch_size=6, num_mini_batches=4), "not divisible by num_mini_batches=4"),
        (dict(gradient_accumulation_steps=3), "would mix two rollouts"),

        (dict(kl_estimator="k2"), "kl_estimator='k2'"),
        (dict(top_p=0.0), "top_p=0.0"),
    ],
)
def test_config_rejects_settings_with_the_fix(overrides, message):
    with pytest.raises(ValueError, match=message):
        PPOConfig(output_dir="unused", use_cpu=True, **overrides)
