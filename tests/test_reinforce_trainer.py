"""REINFORCE trainer: a smoke run with the sampling settings that broke users' KL, and its selection rules."""

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
