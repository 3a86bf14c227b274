"""The trainers as a library (README example) and the reward inside TRL's own GRPOTrainer."""

import gc
import warnings
from types import SimpleNamespace

import pytest
import torch
from datasets import Dataset
from transformers import TrainerCallback

from grade_trl import GumbelGRADEConfig, GumbelGRADETrainer, SentimentReward, SentimentRewardModel
from grade_trl.methods import METHODS
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
    """The README's "Using the trainer in your own TRL project" block, run in an empty folder: it trains and saves,
    without torch's warning that it has no accelerator to pin memory for (a fresh-clone trial, 2026-12-07: the configs
    now turn `dataloader_pin_memory` off where there is none, as the runner's `use_cpu` does)."""
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
    assert torch.accelerator.is_available() or "pin_memory" not in done.stderr, done.stderr[-3000:]


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


def _live_tensor_bytes() -> int:
    """Bytes of every tensor storage Python can still reach, each storage once (views share theirs)."""
    gc.collect()
    storages = {}
    with warnings.catch_warnings():  # isinstance on a deprecated alias (torch.distributed.reduce_op) warns
        warnings.simplefilter("ignore")
        for obj in gc.get_objects():
            if isinstance(obj, torch.Tensor) and not obj.is_meta:
                storages[obj.untyped_storage().data_ptr()] = obj.untyped_storage().nbytes()
    return sum(storages.values())


class _LiveBytesAfterSteps(TrainerCallback):
    """The live tensor bytes at the end of the given steps only: each count is a full garbage collection and a walk over
    every Python object, 0.7 s in a fresh process and more in a test worker that has run other files."""

    def __init__(self, steps):
        self.steps, self.after_step = steps, {}

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step in self.steps:
            self.after_step[state.global_step] = _live_tensor_bytes()


@pytest.mark.parametrize("method", list(METHODS))
def test_training_keeps_nothing_from_one_step_to_the_next(tmp_path, method, sentiment_reward, tokenizer):
    """Steps 2 and 5 end with the same live tensor bytes, within 4 KiB: what one step kept would be there 3 times over
    (AdamW's state appears at step 1; TRL's GRPO holds 128 bytes more after its second step than after the others: a
    small metric tensor; steps 2 to 5 were each counted until 2026-12-07, equal in every method). With a forward
    hook on every block's LayerNorms, as DeepSpeed ZeRO-3 hooks every submodule: that made GRADE's blocks run module by
    module, whose steps kept their graph, KV cache and deferred gradients alive (about 0.5 GB a step at gpt2-small)
    until `ChunkedLayer.drop_gradient_edges` (3eb1d21). Allocator-independent, unlike resident memory."""
    from grade_trl.build import build_trainer
    from grade_trl.recipe import build_recipe

    length = {"max_completion_length": 6, "num_generations": 4} if METHODS[method].batch_counts == "completions" else {"max_new_tokens": 6}
    recipe = build_recipe({"method": method, "model_name_or_path": "embedded", "output_dir": str(tmp_path), "report_to": "none", "use_cpu": True,
                           "bf16": False, "max_steps": 5, "logging_steps": 1, "per_device_train_batch_size": 4, "save_strategy": "no", **length})
    dataset = Dataset.from_dict({"prompt": ["This movie was", "The acting in this film"] * 16})
    trainer = build_trainer(recipe, SimpleNamespace(reward_funcs=[sentiment_reward], train_dataset=dataset), tokenizer)
    hooked = 0
    for name, module in trainer.accelerator.unwrap_model(trainer.model).named_modules():
        if isinstance(module, torch.nn.LayerNorm) and ".h." in name:
            module.register_forward_hook(lambda module, args, output: None)
            hooked += 1
    assert hooked == 8  # the embedded model: 4 blocks x 2 LayerNorms
    watch = _LiveBytesAfterSteps((2, 5))
    trainer.add_callback(watch)
    trainer.train()
    assert trainer.state.global_step == 5 and sorted(watch.after_step) == [2, 5], watch.after_step
    assert abs(watch.after_step[5] - watch.after_step[2]) <= 4096, watch.after_step


# ---- the trainers imported into a TRL project: what a TRL user expects of them ------------------------------------


def _library_args(cls, tmp_path, **overrides):
    common = dict(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2, gradient_accumulation_steps=1, max_new_tokens=4,
                  min_new_tokens=4, logging_steps=1, use_cpu=True, disable_tqdm=True, report_to="none")
    return cls(**{**common, **overrides})


def test_a_long_prompt_keeps_its_end_with_a_warning(tmp_path, caplog):
    """A prompt past max_prompt_length keeps its last tokens (its question, "Answer:"), as TRL's GRPOTrainer cut them;
    it used to keep its first ones, silently."""
    from grade_trl import REINFORCEConfig, REINFORCETrainer

    tokenizer = load_tokenizer("embedded")
    trainer = REINFORCETrainer(model="embedded", reward_funcs=length_only, args=_library_args(REINFORCEConfig, tmp_path, max_prompt_length=6), processing_class=tokenizer)
    long_prompt = "one two three four five six seven eight nine ten. How many? Answer:"
    with caplog.at_level("WARNING"):
        enc = trainer.tokenize_prompts([{"prompt": long_prompt}, {"prompt": "Short"}])
    assert enc["input_ids"].shape[1] == 6
    assert tokenizer.decode(enc["input_ids"][0]).endswith("Answer:")
    n = len(tokenizer("Short", add_special_tokens=False)["input_ids"])  # a short prompt is left-padded, not cut
    assert enc["attention_mask"][1].tolist() == [0] * (6 - n) + [1] * n and tokenizer.decode(enc["input_ids"][1][-n:]) == "Short"
    assert sum("keep only their last 6 tokens" in r.getMessage() for r in caplog.records) == 1


@pytest.mark.parametrize("method", ["reinforce", "ppo"])
def test_train_resume_from_checkpoint_is_exact_without_the_runner(tmp_path, method):
    """`trainer.train(resume_from_checkpoint=True)` on a trainer used on its own restores what Trainer's checkpoints
    lack (REINFORCE's EMA baseline, PPO's rollout buffer and shuffle generator): the weights equal an uninterrupted run's.
    Before, only the recipe runner attached the callback that does it, and these weights differed by ~2e-3."""
    from transformers import set_seed

    from grade_trl import PPOConfig, PPOTrainer, REINFORCEConfig, REINFORCETrainer

    cls, config = (REINFORCETrainer, REINFORCEConfig) if method == "reinforce" else (PPOTrainer, PPOConfig)
    import shutil

    extra = {"baseline": "ema"} if method == "reinforce" else {"num_mini_batches": 2, "ppo_epochs": 2}
    dataset = Dataset.from_dict({"prompt": ["This movie was", "The acting", "I watched it", "Worst"] * 4})

    def run(output_dir, resume=None):
        set_seed(0)
        args = _library_args(config, output_dir, max_steps=3, save_strategy="steps", save_steps=1, seed=0, **extra)
        trainer = cls(model="embedded", reward_funcs=length_only, args=args, train_dataset=dataset, processing_class=load_tokenizer("embedded"))
        trainer.train(resume_from_checkpoint=resume)
        return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}, trainer.state.log_history

    straight, _ = run(tmp_path / "straight")
    # another method's trainer refuses the checkpoint in one line (a user trial: REINFORCE's went on as GRADE silently, and
    # failed in torch's optimizer load as PPO)
    other_cls, other_config = (PPOTrainer, PPOConfig) if method == "reinforce" else (REINFORCETrainer, REINFORCEConfig)
    other = other_cls(model="embedded", reward_funcs=length_only, args=_library_args(other_config, tmp_path / "other", max_steps=3, num_mini_batches=1)
                      if other_cls is PPOTrainer else _library_args(other_config, tmp_path / "other", max_steps=3), train_dataset=dataset)
    with pytest.raises(ValueError, match=rf"^resume_from_checkpoint: .*checkpoint-1' was saved by a run with {config.__name__}, not this trainer's {other_config.__name__}"):
        other.train(resume_from_checkpoint=str(tmp_path / "straight" / "checkpoint-1"))
    (tmp_path / "stopped").mkdir()  # a run stopped after its first checkpoint
    shutil.copytree(tmp_path / "straight" / "checkpoint-1", tmp_path / "stopped" / "checkpoint-1")
    resumed, history = run(tmp_path / "stopped", resume=True)
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    # train_loss: Trainer's mean over this launch's steps (2 and 3), not the whole run's loss total divided by them
    losses = [row["loss"] for row in history if "loss" in row and row["step"] > 1]
    assert history[-1]["train_loss"] == pytest.approx(sum(losses) / len(losses), abs=1e-3)
    # a checkpoint saved before the trainers kept their state beside it still resumes (Trainer's part), with a warning
    (tmp_path / "stopped" / "checkpoint-1" / "grade_trl_state_rank0.pt").unlink()
    shutil.rmtree(tmp_path / "stopped" / "checkpoint-2"), shutil.rmtree(tmp_path / "stopped" / "checkpoint-3")
    run(tmp_path / "stopped", resume=True)


def test_evaluate_leaves_the_ema_baseline_alone(tmp_path):
    from grade_trl import REINFORCEConfig, REINFORCETrainer

    dataset = Dataset.from_dict({"prompt": ["This movie was", "The acting"] * 4})
    trainer = REINFORCETrainer(model="embedded", reward_funcs=length_only, args=_library_args(REINFORCEConfig, tmp_path, max_steps=1, baseline="ema"),
                               train_dataset=dataset, eval_dataset=dataset, processing_class=load_tokenizer("embedded"))
    trainer.train()
    before = trainer.ema_baseline.value
    trainer.evaluate()
    assert before is not None and trainer.ema_baseline.value == before


def test_rewards_get_trls_trainer_state_and_log_metric(tmp_path):
    """TRL's GRPOTrainer passes `trainer_state`, `log_metric` and `log_extra` to every reward; ours do too."""
    from grade_trl import REINFORCEConfig, REINFORCETrainer

    seen = []

    def by_step(prompts, completions, trainer_state, log_metric, log_extra, **kwargs):
        seen.append(trainer_state.global_step)
        log_metric("my_metric", 2.5)
        log_metric("kl", 1000.0)  # a method's own metric's name: averaged with it, as TRL appends both (it was a TypeError)
        log_extra("my_column", list(completions))
        return [1.0] * len(completions)

    dataset = Dataset.from_dict({"prompt": ["This movie was", "The acting"] * 4})
    trainer = REINFORCETrainer(model="embedded", reward_funcs=by_step, args=_library_args(REINFORCEConfig, tmp_path), train_dataset=dataset,
                               processing_class=load_tokenizer("embedded"))
    trainer.train()
    assert seen == [0, 1]
    assert [row["my_metric"] for row in trainer.state.log_history if "my_metric" in row] == [2.5, 2.5]
    assert all(500 <= row["kl"] < 600 for row in trainer.state.log_history if "kl" in row)  # (the step's KL + 1000) / 2


def test_a_score_soft_without_a_gradient_is_refused(tmp_path, tokenizer):
    from grade_trl.rewards.base import RewardFunctionError

    class Detached:
        differentiable = True

        def __call__(self, prompts, completions, **kwargs):
            return [0.0] * len(completions)

        def score_soft(self, soft_tokens, attention_mask):
            return torch.zeros(attention_mask.shape[0])

    trainer = GumbelGRADETrainer(model="embedded", reward_funcs=Detached(), args=_library_args(GumbelGRADEConfig, tmp_path, estimator="ste"),
                                 processing_class=tokenizer)
    with pytest.raises(RewardFunctionError, match="reward function 'Detached' returned a score_soft with no gradient"):
        trainer.compute_loss(trainer.model, [{"prompt": "This movie was"}])
    with torch.no_grad():  # evaluation: no gradient is expected
        trainer.compute_loss(trainer.model, [{"prompt": "This movie was"}])


def test_construction_refuses_what_would_fail_at_the_first_step(tmp_path):
    from transformers import TrainingArguments

    from grade_trl import PPOConfig, PPOTrainer, REINFORCEConfig, REINFORCETrainer
    from grade_trl.models import load_causal_lm

    args = _library_args(REINFORCEConfig, tmp_path)
    cases = [
        (dict(reward_funcs="someorg/reward-model"), ValueError, r"reward_funcs\[0\]: the hub id or path 'someorg/reward-model' is TRL GRPOTrainer's way"),
        (dict(reward_funcs=[length_only, load_causal_lm("embedded")]), ValueError, r"reward_funcs\[1\]: a GPT2LMHeadModel is TRL"),
        (dict(reward_funcs=None), ValueError, r"reward_funcs: give at least one reward function"),
        (dict(reward_funcs=[length_only, 3]), ValueError, r"reward_funcs\[1\]: int 3 is not callable"),
        (dict(reward_funcs=[ColumnScore]), ValueError, r"^reward_funcs\[0\]: the class ColumnScore itself; pass an instance of it, ColumnScore\(...\)$"),
        (dict(reward_funcs=length_only, train_dataset=Dataset.from_dict({"text": ["x"]})), ValueError, r"train_dataset: no `prompt` column \(it has text\)"),
        (dict(reward_funcs=length_only, eval_dataset={"b": Dataset.from_dict({"q": ["x"]})}), ValueError, r"eval_dataset\['b'\]: no `prompt` column \(it has q\)"),
        (dict(reward_funcs=length_only, args=TrainingArguments(output_dir=str(tmp_path))), TypeError, r"args: REINFORCETrainer takes a REINFORCEConfig"),
        # found by a journey audit: each failed deep in the model or the sampler at the first step
        (dict(reward_funcs=length_only, train_dataset=Dataset.from_dict({"prompt": ["", "", "x"]})), ValueError,
         r"^train_dataset: `prompt` has 2 empty in its 3 rows; every prompt must be non-empty text or chat messages"),
        (dict(reward_funcs=length_only, eval_dataset=Dataset.from_dict({"prompt": [None, "x"]})), ValueError, r"^eval_dataset: `prompt` has 1 null in its 2 rows"),
        # found by a user trial (2026-12-08): numbers failed at the first step in the tokenizer, lists of strings trained
        # on their concatenation, and messages without `content` reached the reward as a list (blamed on the reward)
        (dict(reward_funcs=length_only, train_dataset={"prompt": ["x"]}), ValueError, r"^train_dataset: a dict; pass a datasets.Dataset"),
        (dict(reward_funcs=length_only, train_dataset=Dataset.from_dict({"prompt": []})), ValueError, r"^train_dataset: the data set has no rows$"),
        (dict(reward_funcs=length_only, train_dataset=Dataset.from_dict({"prompt": [1, 2]})), ValueError,
         r"^train_dataset: `prompt` has 2 neither text nor chat messages \(\[\{role, content\}, ...\]\) in its 2 rows"),
        (dict(reward_funcs=length_only, train_dataset=Dataset.from_dict({"prompt": [["a", "b"]]})), ValueError, r"^train_dataset: `prompt` has 1 neither text nor chat"),
        (dict(reward_funcs=length_only, train_dataset=Dataset.from_dict({"prompt": [[{"role": "user", "text": "hi"}]]})), ValueError,
         r"^train_dataset: `prompt` has 1 neither text nor chat messages .*struct<role: string, text: string>"),
        (dict(reward_funcs=length_only, args=_library_args(REINFORCEConfig, tmp_path, max_new_tokens=300, min_new_tokens=1)), ValueError,
         r"^max_new_tokens: max_prompt_length 32 \+ max_new_tokens 300 = 332 tokens, but the model has 256 positions; lower one of them$"),
    ]
    for kwargs, error, message in cases:
        with pytest.raises(error, match=message):
            REINFORCETrainer(**{"model": "embedded", "args": args, **kwargs})
    with pytest.raises(TypeError, match=r"args: PPOTrainer takes a PPOConfig .*, got a REINFORCEConfig"):
        PPOTrainer(model="embedded", reward_funcs=length_only, args=args)
    for config, values, message in [
        (REINFORCEConfig, {"max_prompt_length": 0}, "max_prompt_length: expected an integer >= 1"),
        (REINFORCEConfig, {"num_samples_per_prompt": 0}, "num_samples_per_prompt must be >= 1"),
        (REINFORCEConfig, {"ema_momentum": 1.5}, r"ema_momentum must be in \[0, 1\)"),
        (GumbelGRADEConfig, {"tau_anneal_steps": -5}, "tau_anneal_steps must be >= 0"),
        (PPOConfig, {"model_init_kwargs": "float32"}, "model_init_kwargs: expected a mapping"),
        # found by a user trial (2026-12-08): each failed later, in a comparison or at the first step, without the key
        (REINFORCEConfig, {"max_new_tokens": "32"}, r"^max_new_tokens: expected an integer, got '32' \(str\)$"),
        (REINFORCEConfig, {"max_new_tokens": 4.5}, r"^max_new_tokens: expected an integer, got 4.5 \(float\)$"),
        (REINFORCEConfig, {"beta": "0.1"}, r"^beta: expected a number, got '0.1'"),
        (GumbelGRADEConfig, {"tau_start": "2"}, r"^tau_start: expected a number, got '2'"),
        (REINFORCEConfig, {"max_prompt_length": None}, r"^max_prompt_length: expected an integer, got None"),
        (REINFORCEConfig, {"reward_weights": 1.0}, r"^reward_weights: expected a list of numbers or None, got 1.0"),
        (REINFORCEConfig, {"reward_weights": "1.0"}, r"^reward_weights: expected a list of numbers or None, got '1.0'"),
        (REINFORCEConfig, {"reward_weights": [None]}, r"^reward_weights: expected a list of numbers or None, got \[None\]"),
        (REINFORCEConfig, {"reward_weights": [float("nan")]}, r"^reward_weights: expected finite numbers, got \[nan\]"),
    ]:
        with pytest.raises(ValueError, match=message):
            config(output_dir=str(tmp_path), use_cpu=True, **values)


def test_configs_parse_from_the_command_line_as_trls_do(tmp_path):
    """HfArgumentParser reads `--model_init_kwargs '{"dtype": "float32"}'` as a mapping, as it does for TRL's GRPOConfig."""
    from transformers import HfArgumentParser

    (config,) = HfArgumentParser(GumbelGRADEConfig).parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--use_cpu", "true", "--model_init_kwargs", '{"dtype": "float32"}'])
    assert config.model_init_kwargs == {"dtype": "float32"}


@pytest.mark.parametrize("method", ["reinforce", "ppo"])
def test_rewards_that_apply_to_some_samples_train_as_in_trl(tmp_path, method):
    """Two rewards, each returning None where it does not apply (TRL's multi-task convention): the step's reward is
    their weighted sum over the ones that apply, and each function's logged mean is over its own samples."""
    from grade_trl import PPOConfig, PPOTrainer, REINFORCEConfig, REINFORCETrainer

    def short_task(prompts, completions, task, **kwargs):
        return [1.0 if t == "a" else None for t in task]

    def long_task(prompts, completions, task, **kwargs):
        return [3.0 if t == "b" else None for t in task]

    cls, config = (REINFORCETrainer, REINFORCEConfig) if method == "reinforce" else (PPOTrainer, PPOConfig)
    extra = {} if method == "reinforce" else {"num_mini_batches": 1}
    dataset = Dataset.from_dict({"prompt": ["This movie was", "The acting"] * 4, "task": ["a", "b"] * 4})
    trainer = cls(model="embedded", reward_funcs=[short_task, long_task], args=_library_args(config, tmp_path, max_steps=1, reward_weights=[1.0, 0.5], per_device_train_batch_size=8, **extra),
                  train_dataset=dataset, processing_class=load_tokenizer("embedded"))
    trainer.train()
    (row,) = [r for r in trainer.state.log_history if "reward" in r]
    assert row["rewards/short_task/mean"] == 1.0 and row["rewards/long_task/mean"] == 3.0
    assert row["reward"] == pytest.approx((1.0 + 1.5) / 2)  # the batch of 8 is the data set: 4 prompts of each task
    # a batch where a function scored nothing leaves it out of that step: the window's mean stays over its own samples
    trainer._metrics["train"].flush()
    trainer.add_reward_function_means(trainer.reward_function_means(torch.tensor([[1.0, float("nan")], [1.0, float("nan")]])))
    trainer.add_reward_function_means(trainer.reward_function_means(torch.tensor([[float("nan"), 3.0], [5.0, float("nan")]])))
    # short_task: 3 samples (1, 1, 5), weighted by its own count, not the batches' (an audit): (2 x 1 + 1 x 5) / 3
    assert trainer._metrics["train"].flush() == {"rewards/short_task/mean": pytest.approx(7 / 3), "rewards/long_task/mean": 3.0}


def test_grpo_is_exported_and_takes_the_embedded_model(tmp_path):
    from grade_trl import GRPOConfig, GRPOTrainer

    args = GRPOConfig(output_dir=str(tmp_path), use_cpu=True, per_device_train_batch_size=2, num_generations=2, max_completion_length=4, report_to="none")
    trainer = GRPOTrainer(model="embedded", reward_funcs=length_only, args=args, train_dataset=Dataset.from_dict({"prompt": ["This movie was"] * 4}))
    assert trainer.model.config.vocab_size == load_tokenizer("embedded").vocab_size


@pytest.mark.parametrize("method", ["reinforce", "ppo", "grade_ste"])
def test_chat_message_prompts_go_through_the_chat_template_as_in_trl(tmp_path, method):
    """TRL's conversational format: `prompt` holds messages, rendered with the tokenizer's chat template and the
    generation prompt; the rewards get the messages and one assistant message per completion, as TRL hands them."""
    from grade_trl import PPOConfig, PPOTrainer, REINFORCEConfig, REINFORCETrainer

    tokenizer = load_tokenizer("embedded")
    tokenizer.chat_template = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ 'assistant:' }}{% endif %}"
    seen = []

    def words(prompts, completions, **kwargs):
        seen.append((prompts[0], completions[0]))
        return [float(len(c[0]["content"].split())) for c in completions]

    messages = [[{"role": "user", "content": "Was the movie good?"}], [{"role": "user", "content": "Tell me about the acting."}]]
    dataset = Dataset.from_dict({"prompt": messages * 4})
    if method == "grade_ste":
        from grade_trl import LengthReward

        trainer = GumbelGRADETrainer(model="embedded", reward_funcs=LengthReward(tokenizer.eos_token_id), processing_class=tokenizer,
                                     args=_library_args(GumbelGRADEConfig, tmp_path, max_steps=1, estimator="ste", max_prompt_length=16), train_dataset=dataset)
    else:
        cls, config = (REINFORCETrainer, REINFORCEConfig) if method == "reinforce" else (PPOTrainer, PPOConfig)
        extra = {} if method == "reinforce" else {"num_mini_batches": 1}
        trainer = cls(model="embedded", reward_funcs=words, args=_library_args(config, tmp_path, max_steps=1, max_prompt_length=16, **extra),
                      train_dataset=dataset, processing_class=tokenizer)
    enc = trainer.tokenize_prompts([{"prompt": messages[0]}])
    assert tokenizer.decode(enc["input_ids"][0]) == "user: Was the movie good?\nassistant:"
    trainer.train()
    if method != "grade_ste":
        prompt, completion = seen[0]
        assert prompt in messages and completion[0]["role"] == "assistant" and isinstance(completion[0]["content"], str)
    plain = REINFORCETrainer(model="embedded", reward_funcs=words, args=_library_args(REINFORCEConfig, tmp_path), processing_class=load_tokenizer("embedded"))
    with pytest.raises(ValueError, match="prompt: the prompts are chat messages, but the tokenizer has no chat template"):
        plain.tokenize_prompts([{"prompt": messages[0]}])


def test_grade_evaluate_logs_the_reward_of_sampled_text_and_the_relaxed_one_apart(tmp_path, tokenizer):
    """GRADE's Trainer.evaluate() logged its relaxed rollout's score_soft as eval_reward, a surrogate no other method's
    eval_reward measures. Now eval_reward is the text reward of completions sampled from the policy (each scored once:
    here the word count, whose mean equals the mean of the texts' own counts) and the surrogate is eval_reward_soft."""
    texts = []

    class TextAndSoft:
        differentiable = True

        def __call__(self, prompts, completions, log_metric, **kwargs):
            texts.extend(completions)
            log_metric("scored", len(completions))
            return [float(len(c.split())) for c in completions]

        def score_soft(self, soft_tokens, attention_mask):
            return 0.25 + 0.0 * soft_tokens.probability(0).sum(-1)  # a constant with a gradient path

    dataset = Dataset.from_dict({"prompt": ["This movie was", "The acting"] * 2})
    trainer = GumbelGRADETrainer(model="embedded", reward_funcs=TextAndSoft(), args=_library_args(GumbelGRADEConfig, tmp_path, estimator="soft",
                                 per_device_eval_batch_size=2), eval_dataset=dataset, processing_class=tokenizer)
    logs = trainer.evaluate()
    assert logs["eval_reward_soft"] == pytest.approx(0.25)
    assert len(texts) == 4 and logs["eval_reward"] == pytest.approx(sum(len(t.split()) for t in texts) / 4, rel=1e-6)
    assert logs["eval_scored"] == 2.0 and "eval_kl" in logs


def test_each_data_set_of_a_dict_eval_dataset_gets_its_own_metrics(tmp_path):
    """Found by a journey audit: with eval_dataset={"a": ..., "b": ...} the rows were `eval_a_loss`, `eval_b_loss`
    without reward or KL, and the window's values leaked into the next evaluate(). Each row now carries its own data
    set's means under its prefix, and nothing is left over."""
    from grade_trl import REINFORCEConfig, REINFORCETrainer

    short = Dataset.from_dict({"prompt": ["This movie was"] * 2})
    longer = Dataset.from_dict({"prompt": ["The acting"] * 4})
    args = _library_args(REINFORCEConfig, tmp_path, max_steps=1, per_device_eval_batch_size=2)
    trainer = REINFORCETrainer(model="embedded", reward_funcs=length_only, args=args, train_dataset=short, eval_dataset={"a": short, "b": longer},
                               processing_class=load_tokenizer("embedded"))
    logs = trainer.evaluate()
    assert {"eval_a_reward", "eval_a_kl", "eval_b_reward", "eval_b_kl"} <= set(logs), sorted(logs)
    assert not any(trainer._metrics["eval"].values.values())  # flushed into the rows, none left for the next evaluate
    rows = [row for row in trainer.state.log_history if "eval_a_loss" in row or "eval_b_loss" in row]
    assert [sorted(k for k in row if k.endswith("_reward")) for row in rows] == [["eval_a_reward"], ["eval_b_reward"]], rows


class ColumnScore:
    """A reward that is a dataset column (`score`), marked differentiable with a constant soft path so GRADE takes it."""

    differentiable = True

    def __call__(self, prompts, completions, score, **kwargs):
        return [float(s) for s in score]

    def score_soft(self, soft_tokens, attention_mask):
        return 0.0 * soft_tokens.probability(0).sum(-1)


@pytest.mark.parametrize("method", ["reinforce", "ppo", "grade_ste"])
def test_evaluate_logs_the_mean_over_prompts_when_the_last_batch_is_short(tmp_path, method):
    """Found by a user trial (2026-12-08): 3 eval prompts scoring 0, 0 and 3 in batches of 2 logged eval_reward 1.5, the
    mean of the batches' means (0 and 3), not the mean over prompts (1.0) that the metrics table promises. The logging
    window now weights each batch's means by its samples (`MetricWindow`)."""
    entry = METHODS[method]
    data = Dataset.from_dict({"prompt": ["This movie was", "The acting", "I did not"], "score": [0.0, 0.0, 3.0]})
    args = _library_args(entry.config_class, tmp_path, per_device_eval_batch_size=2, remove_unused_columns=False, **({"num_mini_batches": 1} if method == "ppo" else {}))
    trainer = entry.trainer_class(model="embedded", reward_funcs=ColumnScore(), args=args, eval_dataset=data, processing_class=load_tokenizer("embedded"))
    assert trainer.evaluate()["eval_reward"] == pytest.approx(1.0)


@pytest.mark.parametrize("method", ["reinforce", "grade_ste"])
def test_the_steps_after_the_last_logging_step_are_logged_without_the_runner(tmp_path, method):
    """Found by a journey audit: a trainer used on its own (not through the runner) with max_steps 3 and Trainer's
    default logging_steps (10) logged no training row at all; the runner had the callback, the trainers did not."""
    entry = METHODS[method]
    args = _library_args(entry.config_class, tmp_path, max_steps=3, logging_steps=10, **({"max_new_tokens": 4} if method == "reinforce" else {}))
    trainer = entry.trainer_class(model="embedded", reward_funcs=length_only if method == "reinforce" else _length_reward(), args=args,
                                  train_dataset=Dataset.from_dict({"prompt": ["This movie was"] * 8}), processing_class=load_tokenizer("embedded"))
    trainer.train()
    rows = [row for row in trainer.state.log_history if "loss" in row]
    assert [row["step"] for row in rows] == [3] and "reward" in rows[0] and "kl" in rows[0], trainer.state.log_history


def _length_reward():
    from grade_trl.rewards import LengthReward

    return LengthReward(load_tokenizer("embedded").eos_token_id)


@pytest.mark.parametrize("method", ["reinforce", "ppo"])
def test_a_streamed_dataset_trains(tmp_path, method):
    """Found by a journey audit: an IterableDataset (streaming) failed in Accelerate's batch dispatch ("Can only find
    the batch size of tensors but got <class 'str'>"); TRL's GRPOTrainer sets dispatch_batches=False, and so do we."""
    entry = METHODS[method]
    stream = Dataset.from_dict({"prompt": ["This movie was", "The acting"] * 8}).to_iterable_dataset()
    args = _library_args(entry.config_class, tmp_path, max_steps=2, **({"num_mini_batches": 1} if method == "ppo" else {}))
    trainer = entry.trainer_class(model="embedded", reward_funcs=length_only, args=args, train_dataset=stream, processing_class=load_tokenizer("embedded"))
    trainer.train()
    assert trainer.state.global_step == 2 and [row["step"] for row in trainer.state.log_history if "reward" in row] == [1, 2]


def test_save_steps_saves_checkpoints_as_in_trl_and_the_runner_saves_none_unless_asked(tmp_path):
    """Found by a journey audit: our configs defaulted to save_strategy "no", so `save_steps=2` alone wrote nothing and
    `train(resume_from_checkpoint=True)` failed; TRL's GRPOConfig (TrainingArguments) saves every save_steps. A recipe
    of our methods that leaves the key out still saves none (the runner writes model/ itself)."""
    from grade_trl import REINFORCEConfig, REINFORCETrainer
    from grade_trl.recipe import parse_recipe

    from .conftest import REPO

    args = _library_args(REINFORCEConfig, tmp_path, max_steps=2, save_steps=1)
    trainer = REINFORCETrainer(model="embedded", reward_funcs=length_only, args=args, train_dataset=Dataset.from_dict({"prompt": ["This movie was"] * 4}),
                               processing_class=load_tokenizer("embedded"))
    trainer.train()
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    assert str(parse_recipe([str(REPO / "recipes" / "quickstart.yaml")]).config.save_strategy) in ("no", "SaveStrategy.NO")
    assert str(parse_recipe([str(REPO / "recipes" / "quickstart.yaml"), "--save_strategy", "steps"]).config.save_strategy) in ("steps", "SaveStrategy.STEPS")
    # save_steps alone saves in the runner too (a review: it was silently ignored), and checkpointing is no training setting
    assert str(parse_recipe([str(REPO / "recipes" / "quickstart.yaml"), "--save_steps", "20"]).config.save_strategy) in ("steps", "SaveStrategy.STEPS")
    from grade_trl.comparison import run_settings

    assert run_settings({"method": "reinforce"}) == run_settings({"method": "reinforce", "save_strategy": "no", "save_steps": 7})


def _gpt2_tokenizer():
    """GPT-2's own tokenizer (50,257 tokens): the embedded model's vocabulary is 8,192, so a mismatch."""
    from transformers import GPT2TokenizerFast

    from .conftest import SHARED

    folder = SHARED / "tokenizers" / "gpt2"
    if not folder.is_dir():
        pytest.skip("needs ../shared/tokenizers/gpt2 (GPT-2's tokenizer files), absent from a clone without the shared folder")
    return GPT2TokenizerFast.from_pretrained(str(folder))  # a bare vocab.json + merges.txt folder: no config for AutoTokenizer


def test_load_tokenizer_reads_a_bare_gpt2_folder():
    """Found by a user trial (2026-12-08): `load_tokenizer` on a folder of GPT-2's vocab.json and merges.txt alone said
    there were no "vocab.json and merges.txt for GPT-2" (AutoTokenizer cannot tell a class without a config). It reads
    it as GPT-2's byte-level BPE now, the same tokens as GPT2TokenizerFast, left-padded with a pad token."""
    from grade_trl.models import is_bare_bpe_folder

    from .conftest import REPO, SHARED

    reference = _gpt2_tokenizer()  # skips without the shared folder
    folder = str(SHARED / "tokenizers" / "gpt2")
    assert is_bare_bpe_folder(folder) and not is_bare_bpe_folder(str(REPO / "grade_trl" / "assets" / "tiny-imdb-gpt2"))
    tokenizer = load_tokenizer(folder)
    text = "The movie was surprisingly good, 10/10 – would watch again."
    assert tokenizer(text)["input_ids"] == reference(text)["input_ids"] and len(tokenizer) == 50257
    assert tokenizer.padding_side == "left" and tokenizer.pad_token == "<|endoftext|>"


def test_another_models_tokenizer_is_refused_at_construction(tmp_path):
    """Found by a journey audit: GPT-2's tokenizer with the embedded model (8,192 tokens) failed in the sampler with
    `index 50256 is out of bounds for dimension 0 with size 8192`."""
    from grade_trl import REINFORCEConfig, REINFORCETrainer

    with pytest.raises(ValueError, match=r"^processing_class: the tokenizer has 50,257 tokens but the model's input embedding has 8,192 rows; pass the model's own tokenizer"):
        REINFORCETrainer(model="embedded", reward_funcs=length_only, args=_library_args(REINFORCEConfig, tmp_path), processing_class=_gpt2_tokenizer())


def test_the_callers_tokenizer_is_left_as_it_was(tmp_path):
    """Found by a journey audit: the trainers set the caller's tokenizer's padding_side to left (and its pad token) in
    place; TRL's GRPOTrainer passes padding_side per call and leaves it. Ours pads a copy."""
    from grade_trl import REINFORCEConfig, REINFORCETrainer

    tokenizer = load_tokenizer("embedded")
    tokenizer.padding_side = "right"
    trainer = REINFORCETrainer(model="embedded", reward_funcs=length_only, args=_library_args(REINFORCEConfig, tmp_path), processing_class=tokenizer)
    assert tokenizer.padding_side == "right" and trainer.processing_class.padding_side == "left"
