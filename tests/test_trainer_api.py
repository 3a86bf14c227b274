"""The trainers as a library (README example) and the reward inside TRL's own GRPOTrainer."""

import pytest
import torch
from datasets import Dataset

from grade_trl import GumbelGRADEConfig, GumbelGRADETrainer, SentimentReward, SentimentRewardModel
from grade_trl.models import load_tokenizer


def length_only(prompts, completions, **kwargs):  # a TRL reward with no score_soft
    return [float(len(c)) for c in completions]


def test_readme_example_trains(tmp_path):
    # The README's example, with an untrained head instead of the quickstart's, 2 steps, 8 new tokens.
    tokenizer = load_tokenizer("embedded")
    torch.manual_seed(0)
    reward = SentimentReward(SentimentRewardModel.from_backbone("embedded"), tokenizer)
    dataset = Dataset.from_dict({"prompt": ["This movie was", "The acting in this film"] * 32})
    args = GumbelGRADEConfig(
        output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=8, gradient_accumulation_steps=1,
        max_new_tokens=8, min_new_tokens=2, logging_steps=1, use_cpu=True, disable_tqdm=True,
    )
    trainer = GumbelGRADETrainer(model="embedded", reward_funcs=reward, args=args, train_dataset=dataset, processing_class=tokenizer)
    before = trainer.model.lm_head.weight.detach().clone()
    trainer.train()
    assert not torch.equal(before, trainer.model.lm_head.weight.detach())
    logs = [h for h in trainer.state.log_history if "kl" in h]
    assert len(logs) == 2 and all(h["kl"] >= 0 for h in logs)
    assert logs[0]["tau"] == pytest.approx(2.0) and logs[0]["completions/mean_length"] <= 8
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in trainer.ref_model.parameters())


@pytest.mark.parametrize("estimator", ["soft", "ste"])
def test_grade_loss_carries_the_reward_gradient(tmp_path, estimator):
    """Before the first update the policy is its reference, so the KL's gradient is exactly 0: all of it is the reward's."""
    tokenizer = load_tokenizer("embedded")
    torch.manual_seed(0)
    reward = SentimentReward(SentimentRewardModel.from_backbone("embedded"), tokenizer)
    args = GumbelGRADEConfig(output_dir=str(tmp_path), max_new_tokens=6, min_new_tokens=6, estimator=estimator, use_cpu=True)
    trainer = GumbelGRADETrainer(model="embedded", reward_funcs=reward, args=args, train_dataset=Dataset.from_dict({"prompt": ["x"]}), processing_class=tokenizer)
    loss = trainer.compute_loss(trainer.model, [{"prompt": "This movie was"}, {"prompt": "The acting in this film"}])
    loss.backward()
    grad_norm = torch.sqrt(sum(p.grad.pow(2).sum() for p in trainer.model.parameters() if p.grad is not None))
    assert grad_norm > 1e-3  # a reward scored without its gradient (e.g. under no_grad) leaves ~1e-6 here


def test_grade_refuses_a_non_differentiable_reward_at_start_up():
    with pytest.raises(ValueError, match="reward function 'length_only' is not differentiable"):
        GumbelGRADETrainer(model="embedded", reward_funcs=[length_only], args=GumbelGRADEConfig(output_dir="unused", use_cpu=True))


def test_sentiment_reward_runs_unchanged_in_trl_grpo(tmp_path, sentiment_reward):
    from trl import GRPOConfig, GRPOTrainer

    dataset = Dataset.from_dict({"prompt": ["This movie was", "The acting in this film"] * 8})
    args = GRPOConfig(
        output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=4, num_generations=4, max_completion_length=8,
        logging_steps=1, use_cpu=True, bf16=False, gradient_checkpointing=False, report_to="none", disable_tqdm=True,
    )
    from grade_trl.models import load_causal_lm

    trainer = GRPOTrainer(
        model=load_causal_lm("embedded"), reward_funcs=[sentiment_reward], args=args, train_dataset=dataset, processing_class=load_tokenizer("embedded")
    )
    trainer.train()
    log = trainer.state.log_history[0]
    assert "rewards/sentiment/mean" in log and 0 <= log["rewards/sentiment/mean"] <= 1


def test_the_readme_snippet_runs_as_written_from_any_directory(tmp_path):
    """The README's "Using the trainer in your own TRL project" block, run in an empty folder: it trains and saves."""
    import re
    import subprocess
    import sys

    from .conftest import REPO

    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("### Using the trainer in your own TRL project"):]
    code = re.search(r"```python\n(.*?)```", section, flags=re.S).group(1)
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "grade-demo" / "model" / "model.safetensors").exists()
