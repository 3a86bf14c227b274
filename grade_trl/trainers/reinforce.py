"""REINFORCE with a KL penalty and a baseline, on the shared sampling core.

One optimizer step, top to bottom (`compute_loss`):
  1. tokenize the prompts; repeat each `num_samples_per_prompt` times;
  2. sample completions under no_grad from the processed distribution (temperature, top-k, top-p, EOS ban);
  3. score them with every reward callable (text path, TRL's signature);
  4. log-probs of the sampled tokens from the SAME processed distribution (policy, with grad) and the
     reference's (no grad); per-token KL estimate, summed, divided by the length;
  5. shaped reward R - beta * KL / |y|, minus a baseline -> advantages (optionally scaled, never re-centred);
  6. optional filtering (reward threshold, best of N); loss = -mean A * log pi(y|x)  (`reinforce_loss`).

Legend: B samples (prompts x samples per prompt), T completion tokens.
"""

from __future__ import annotations

import torch

from ..core import (
    EMABaseline,
    advantages_from_baseline,
    completion_scores,
    leave_one_out_baseline,
    masked_mean,
    masked_sum,
    penalty_and_logged_kl,
    reinforce_loss,
    sample,
    sequence_logprob,
)
from ..rewards.base import combine_scores
from .base import RolloutTrainer
from .reinforce_config import REINFORCEConfig


def best_of_group_mask(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """1 for the highest-reward sample of each consecutive group of `group_size` (first one on ties). (B,)"""
    grouped = rewards.view(-1, group_size)  # (N, G)
    keep = torch.zeros_like(grouped, dtype=torch.bool)
    keep[torch.arange(grouped.shape[0]), grouped.argmax(1)] = True
    return keep.view(-1)


class REINFORCETrainer(RolloutTrainer):
    """REINFORCE trainer. The constructor mirrors `trl.GRPOTrainer`'s (see `RolloutTrainer`)."""

    _tag_names = ["trl", "reinforce", "grade_trl"]
    config_class = REINFORCEConfig

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.ema_baseline = EMABaseline(self.args.ema_momentum)

    def training_state(self) -> dict:
        return {**super().training_state(), "ema_baseline": self.ema_baseline}

    def baseline(self, shaped: torch.Tensor) -> torch.Tensor | float:
        """The baseline for this batch; EMA and batch mean use the mean over every process's samples."""
        kind = self.args.baseline
        if kind == "ema":
            # an evaluation (Trainer's evaluate, eval_strategy) reads the baseline without moving it
            ema = self.ema_baseline.update if self.model.training else self.ema_baseline.peek
            baseline = ema(self.accelerator.gather(shaped.detach()))
            if isinstance(baseline, torch.Tensor):  # the first batch: leave-one-out over every process's samples
                start = self.accelerator.process_index * shaped.shape[0]
                baseline = baseline[start : start + shaped.shape[0]]
            return baseline
        if kind == "batch_mean":
            return self.accelerator.gather(shaped.detach()).mean()
        if kind == "leave_one_out":
            return leave_one_out_baseline(shaped.detach(), self.args.num_samples_per_prompt)
        return 0.0

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        args = self.args
        tok, group = self.processing_class, args.num_samples_per_prompt
        settings = args.sampling

        # 1-2. sample G completions per prompt from the processed distribution
        enc = self.tokenize_prompts(inputs)
        prompt_ids = enc["input_ids"].repeat_interleave(group, 0)  # (B, P)
        prompt_mask = enc["attention_mask"].repeat_interleave(group, 0)
        module = self.accelerator.unwrap_model(model)
        was_training = module.training
        module.eval()  # dropout is already off; in train mode gradient checkpointing turns the KV cache off (each decode step saw its new token alone)
        try:
            batch = sample(model, prompt_ids, prompt_mask, settings, tok.eos_token_id, tok.pad_token_id)
        finally:
            module.train(was_training)
        mask = batch.completion_mask  # (B, T)

        # 3. rewards on the text, as every method sees them
        scores = self.sampled_text_scores(inputs, batch, group)  # (B, F)
        rewards = combine_scores(scores, self.reward_weights)  # (B,) over the functions that apply to each sample

        # 4. log-probs from the same processed distribution; KL to the reference under no_grad
        # (B, T) each; with chunked_scoring inside the LM head, a chunk of positions at a time (core/head_scoring.py)
        logps, token_entropy = completion_scores(model, batch, settings, with_grad=True, entropy="detached", in_head=args.chunked_scoring)
        entropy = masked_mean(token_entropy, mask)  # a metric over this process's tokens
        ref_model, ref_context = self.reference_context(model)
        with ref_context():
            ref_logps, _ = completion_scores(ref_model, batch, settings, with_grad=False, truncate=False, in_head=args.chunked_scoring)
        penalty_tokens, logged_tokens = penalty_and_logged_kl(logps.detach(), ref_logps, args.kl_estimator)  # (B, T) each: kl_estimator's, k1's
        kl_penalty, kl = masked_sum(penalty_tokens, mask, dim=1), masked_sum(logged_tokens, mask, dim=1)  # (B,)

        # 5. advantages: the baseline is subtracted; normalisation only scales
        shaped = rewards - args.beta * kl_penalty / batch.lengths.clamp(min=1)  # (B,) the penalty per token of each completion
        advantages = advantages_from_baseline(shaped, self.baseline(shaped), args.normalize_advantages)  # (B,)

        # 6. which samples train, and the loss
        keep = torch.ones_like(rewards, dtype=torch.bool)
        if args.reward_threshold is not None:
            keep &= rewards > args.reward_threshold
        if args.best_of_n:
            keep &= best_of_group_mask(rewards, group)
        seq_logps = sequence_logprob(logps, mask, args.logprob_reduction)  # (B,)
        # An empty selection still backpropagates a zero, so every process joins the gradient all-reduce.
        loss = reinforce_loss(seq_logps[keep], advantages[keep]) if keep.any() else 0.0 * seq_logps.sum()

        samples = self.global_count(rewards.shape[0])
        self.metrics.add(
            samples,
            reward=self.gathered_mean(rewards),
            reward_std=self.gathered_std(rewards),
            kl=self.gathered_mean(kl),
            kl_per_token=self.gathered_sum(kl) / max(self.gathered_sum(batch.lengths), 1.0),
            entropy=self.gathered_mean(entropy),
            **{
                "completions/mean_length": self.gathered_mean(batch.lengths),
                "advantages/mean": self.gathered_mean(advantages),
                "samples/kept_fraction": self.gathered_mean(keep.float()),
            },
        )
        self.add_reward_function_means(self.reward_function_means(scores))
        self.log_reward_metrics(samples)
        return loss
