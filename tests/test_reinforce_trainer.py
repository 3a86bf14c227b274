"""REINFORCE trainer: a smoke run with the sampling settings that broke users' KL, and its selection rules."""

import math

import pytest
import torch
from datasets import Dataset

from grade_trl.rewards.length import LengthReward
from grade_trl.trainers import REINFORCEConfig, REINFORCETrainer
from grade_trl.trainers.reinforce import best_of_group_mask


def test_best_of_group_mask_by_hand():
    rewards = torch.tensor([0.1, 0.9, 0.5, 0.7, 0.7, 0.2])
    assert best_of_group_mask(rewards, 3).tolist() == [False, True, False, True, False, False]


def test_config_refuses_leave_one_out_with_one_sample():
    with pytest.raises(ValueError, match=r"^num_samples_per_prompt: baseline leave_one_out .* needs num_samples_per_prompt >= 2"):
        REINFORCEConfig(output_dir="unused", baseline="leave_one_out", use_cpu=True)


@pytest.mark.parametrize(
    "settings",
    [
        dict(baseline="ema", normalize_advantages=True),
        dict(baseline="leave_one_out", num_samples_per_prompt=2, best_of_n=True, kl_estimator="k1", logprob_reduction="sum"),
    ],
    ids=["ema", "rloo-best-of-n"],
)
def test_reinforce_smoke_run_with_top_p_and_temperature(tmp_path, settings):
    # Shrunk: 3 steps of 4 prompts, 8 new tokens; top-p 0.9 + temperature 0.7 as in the users' negative-KL run.
    dataset = Dataset.from_dict({"prompt": ["This movie was", "The acting in this film", "I expected", "Worst"] * 8})
    args = REINFORCEConfig(
        output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4, gradient_accumulation_steps=1, max_new_tokens=8,
        min_new_tokens=2, temperature=0.7, top_p=0.9, learning_rate=1e-4, logging_steps=1, use_cpu=True, disable_tqdm=True, **settings,
    )
    trainer = REINFORCETrainer(model="embedded", reward_funcs=[LengthReward(eos_token_id=0)], args=args, train_dataset=dataset)
    before = trainer.model.lm_head.weight.detach().clone()
    trainer.train()
    assert not torch.equal(before, trainer.model.lm_head.weight.detach())
    logs = [h for h in trainer.state.log_history if "kl" in h]
    assert len(logs) == 3
    for h in logs:
        assert {"reward", "reward_std", "entropy", "completions/mean_length", "rewards/length/mean", "grad_norm_mean"} <= set(h)
        assert 2 <= h["completions/mean_length"] <= 8
        assert h["kl"] >= 0  # the logged KL is k3's, >= 0 per token, whichever estimator the penalty uses
    if args.best_of_n:
        assert all(h["samples/kept_fraction"] == 0.5 for h in logs)


@pytest.mark.parametrize("estimator", ["k1", "k3"])
def test_the_penalty_uses_kl_estimator_and_the_logged_kl_is_k1(tmp_path, estimator):
    """The shaped reward is R - beta * KL_penalty / |y| with the configured estimator (k1 by default), and the logged
    `kl` is k1's whichever it is (a review: nothing tested this wiring). With no baseline and no normalisation the
    logged advantages' mean is reward - beta * KL_penalty / L for completions of one length L; top-p 0.9 makes the KL
    positive from the first step, and k3's value differs from k1's there."""
    dataset = Dataset.from_dict({"prompt": ["This movie was", "The acting in this film", "I expected", "Worst"] * 2})
    extra = {} if estimator == "k1" else {"kl_estimator": "k3"}
    args = REINFORCEConfig(
        output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=4, gradient_accumulation_steps=1, max_new_tokens=4, min_new_tokens=4,
        top_p=0.9, beta=0.5, baseline="none", normalize_advantages=False, logging_steps=1, use_cpu=True, disable_tqdm=True, report_to="none", **extra,
    )
    assert args.kl_estimator == estimator
    trainer = REINFORCETrainer(model="embedded", reward_funcs=[LengthReward(eos_token_id=0)], args=args, train_dataset=dataset)
    trainer.train()
    row = next(h for h in trainer.state.log_history if "kl" in h)
    assert row["completions/mean_length"] == 4 and row["kl"] > 0.1  # -log(nucleus mass) per token, summed
    with_k1_penalty = row["reward"] - 0.5 * row["kl"] / 4
    if estimator == "k1":
        assert row["advantages/mean"] == pytest.approx(with_k1_penalty, rel=1e-5, abs=1e-6)
    else:
        assert row["advantages/mean"] > with_k1_penalty + 1e-3  # k3's smaller value under top-p: a smaller penalty


def test_gradient_checkpointing_samples_with_the_kv_cache(tmp_path):
    """Found while checking chunked_scoring with `gradient_checkpointing: true`: in train mode transformers turns the KV
    cache off under gradient checkpointing, so REINFORCE's sampler decoded each token from that token alone; the loss's
    full forward then scored tokens outside the nucleus, KL -inf and a NaN gradient. Sampling runs in eval mode now
    (as PPO's did), and the step is the one without checkpointing."""
    from .conftest import one_logged_step

    logs = []
    for checkpointing in (True, False):
        log, trainer = one_logged_step(REINFORCEConfig, REINFORCETrainer, tmp_path / str(checkpointing), activation_checkpointing=checkpointing)
        assert trainer.model.training and trainer.model.is_gradient_checkpointing == checkpointing
        logs.append(log)
    checkpointed, plain = logs
    assert math.isfinite(checkpointed["kl"]) and math.isfinite(checkpointed["grad_norm"])
    for key in ("kl", "reward", "grad_norm", "entropy"):
        assert checkpointed[key] == pytest.approx(plain[key], rel=1e-4), key
