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


@pytest.mark.parametrize("method", ["grpo", "reinforce"])
def test_models_load_without_hub_kernels_unless_asked(tmp_path, method):
    """transformers turns hub kernels on by default when `kernels` is installed (it is one of its requirements) and
    fetches them at the model's first .train()/.eval() on a GPU: offline, that call failed on an H200. Every model
    grade_trl loads has them off (the policy, TRL's reference through model_init_kwargs); a recipe's
    model_init_kwargs can turn them back on."""
    from types import SimpleNamespace

    from grade_trl.build import build_trainer
    from grade_trl.models import load_causal_lm
    from grade_trl.recipe import build_recipe
    from grade_trl.rewards.length import LengthReward

    assert load_causal_lm("embedded").use_kernels is False
    dataset = Dataset.from_dict({"prompt": ["This movie was", "The acting in this film"] * 4})
    tokenizer = load_tokenizer("embedded")
    task = SimpleNamespace(reward_funcs=[LengthReward(tokenizer.eos_token_id)], train_dataset=dataset)
    common = {"method": method, "model_name_or_path": "embedded", "output_dir": str(tmp_path), "report_to": "none", "use_cpu": True}
    trainer = build_trainer(build_recipe(common), task, tokenizer)
    assert trainer.args.model_init_kwargs["use_kernels"] is False
    assert trainer.accelerator.unwrap_model(trainer.model).use_kernels is False
    asked = build_trainer(build_recipe({**common, "model_init_kwargs": {"use_kernels": True}}), task, tokenizer)
    assert asked.args.model_init_kwargs["use_kernels"] is True
    assert asked.accelerator.unwrap_model(asked.model).use_kernels is True  # on CPU no kernel is fetched
