"""Reward evaluation with hard (real) samples, identical for every method.

Every method is judged the same way: sample completions with fixed generation settings and
a fixed seed per evaluation, score them with the task's reward callables (the text path, not
the relaxed one), report mean and std. Prompts are sharded over processes and gathered.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

import torch
from transformers import TrainerCallback

from .rewards.base import compute_rewards


@dataclass
class GenerationSettings:
    max_new_tokens: int = 48
    min_new_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 0.9
    batch_size: int = 32


@torch.no_grad()
def generate_completions(model, tokenizer, prompts: list[str], settings: GenerationSettings, seed: int, max_prompt_length: int = 32) -> list[str]:
    """Sample one completion per prompt; reproducible from `seed` without touching the global RNG state."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    completions: list[str] = []
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        for start in range(0, len(prompts), settings.batch_size):
            enc = tokenizer(
                prompts[start : start + settings.batch_size],
                return_tensors="pt",
                padding=True,
                truncation=True,
                max_length=max_prompt_length,
                add_special_tokens=False,
            ).to(device)
            out = model.generate(
                **enc,
                do_sample=True,
                temperature=settings.temperature,
                top_p=settings.top_p,
                top_k=0,
                max_new_tokens=settings.max_new_tokens,
                min_new_tokens=settings.min_new_tokens,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
            completions.extend(tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True))
    model.train(was_training)
    return completions


def evaluate_reward(model, tokenizer, prompts, reward_funcs, settings: GenerationSettings, seed: int, accelerator=None, weights=None) -> dict:
    """Mean/std of the (weighted) reward of sampled completions, plus the per-sample values and texts.

    With an `accelerator`, each process generates for its shard of the prompts and the results are
    gathered, so every process returns the same dict.
    """
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    shard = list(range(rank, len(prompts), world))
    shard_prompts = [prompts[i] for i in shard]
    completions = generate_completions(model, tokenizer, shard_prompts, settings, seed + rank) if shard_prompts else []
    scores = compute_rewards(reward_funcs, shard_prompts, completions) if shard_prompts else torch.zeros(0, len(reward_funcs))
    w = torch.tensor(weights or [1.0] * len(reward_funcs))
    rows = list(zip(shard, completions, (scores @ w).tolist()))
    if world > 1:
        from accelerate.utils import gather_object

        rows = gather_object(rows)
    rows.sort(key=lambda r: r[0])
    values = [r[2] for r in rows]
    return {
        "mean": statistics.fmean(values),
        "std": statistics.pstdev(values),
        "rewards": values,
        "completions": [r[1] for r in rows],
        "prompts": [prompts[r[0]] for r in rows],
    }


class RewardEvaluationCallback(TrainerCallback):
    """Logs `val_reward`, `val_reward_std`, `best_val_reward`, `best_val_step` every `eval_steps` and at step 0.

    Every evaluation uses the same prompts and the same seed, so methods and steps see the same
    conditions. Attach the trainer (`callback.trainer = trainer`) so the values reach its loggers.
    """

    def __init__(self, prompts, reward_funcs, settings: GenerationSettings, eval_steps: int, seed: int = 0, weights=None):
        self.prompts, self.reward_funcs, self.settings = list(prompts), reward_funcs, settings
        self.eval_steps, self.seed, self.weights = int(eval_steps), seed, weights
        self.trainer = None
        self.best_reward, self.best_step = float("-inf"), None
        self.results: dict[int, dict] = {}

    def evaluate(self, step: int) -> dict:
        trainer = self.trainer
        model = trainer.accelerator.unwrap_model(trainer.model)
        result = evaluate_reward(model, trainer.processing_class, self.prompts, self.reward_funcs, self.settings, self.seed, trainer.accelerator, self.weights)
        self.results[step] = result
        if result["mean"] > self.best_reward:
            self.best_reward, self.best_step = result["mean"], step
        return {"val_reward": result["mean"], "val_reward_std": result["std"], "best_val_reward": self.best_reward, "best_val_step": self.best_step}

    def on_train_begin(self, args, state, control, **kwargs):
        if self.trainer is not None and state.global_step == 0:
            self._log(state, self.evaluate(0))

    def on_step_end(self, args, state, control, **kwargs):
        if self.trainer is not None and self.eval_steps > 0 and state.global_step % self.eval_steps == 0:
            self._log(state, self.evaluate(state.global_step))

    def on_train_end(self, args, state, control, **kwargs):
        if self.trainer is not None and state.global_step not in self.results:
            self._log(state, self.evaluate(state.global_step))

    def _log(self, state, metrics: dict) -> None:
        # Straight to the history and the reporters (W&B, TensorBoard, progress bar), not through
        # trainer.log: a trainer's log() may flush its own metric window (TRL's GRPOTrainer does).
        trainer = self.trainer
        logs = {**metrics, "epoch": state.epoch, "step": state.global_step}
        state.log_history.append(logs)
        should_log = trainer.control.should_log  # on_log resets it; this step's training log must still happen
        trainer.control = trainer.callback_handler.on_log(trainer.args, state, trainer.control, dict(metrics))
        trainer.control.should_log = should_log
