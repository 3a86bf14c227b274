"""GRADE: reward gradients backpropagated through a relaxed generation (Gumbel-softmax / straight-through).

One optimizer step, top to bottom (`compute_loss`):
  1. tokenize the prompts (left padding, at most `max_prompt_length` tokens);
  2. soft rollout: y_t = relax(logits_t, tau), next input y_t @ E (E[token] for straight-through), KV cache
     (core.soft_rollout; its memory options: rollout_cache, rollout_checkpointing, relax_top_k);
  3. reference logits on the same soft inputs; exact KL per position, masked after the first hard EOS;
  4. differentiable reward R(y) from every reward's `score_soft`;
  5. loss = -mean_b (R_b - kl_coef * KL_b)  (`grade_loss`), backpropagated through 4, 3 and 2.
In `Trainer.evaluate()` the same step also samples one completion per prompt and scores its text, so `eval_reward`
measures what every other method's does; the relaxed rollout's reward is `eval_reward_soft`.

Legend: B batch, P prompt length, T generated positions, V vocabulary.
"""

from __future__ import annotations

import logging
from functools import partial

import torch
import torch.nn.functional as F

from torch.utils.checkpoint import checkpoint

from ..core import SoftTokens, exact_kl, exact_kl_and_entropy, leave_one_out_baseline, masked_mean, masked_sum, reference_logits, soft_rollout
from ..core.sampling import SamplingSettings, sample
from ..core.sharding import is_fsdp2
from ..core.soft_rollout import transformer_blocks
from ..rewards.base import RewardFunctionError, check_finite_scores, combine_scores, require_differentiable, reward_name, soft_scores
from ..safety import diverged_logits_error
from .base import RolloutTrainer
from .grade_config import GumbelGRADEConfig
from .relaxations import StraightThroughGumbel, build_relaxation, tau_at

logger = logging.getLogger(__name__)


def grade_loss(rewards: torch.Tensor, kl: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """GRADE objective: maximise J = E[R(y) - kl_coef * KL(pi_theta || pi_ref)(y)], so

        loss = -(1/B) sum_b (R_b - kl_coef * KL_b)

    rewards: (B,) differentiable rewards of the relaxed samples; kl: (B,) exact per-token KL summed over
    each completion. Both carry gradients back through the relaxed rollout (arXiv:2601.11574).
    """
    return -(rewards - kl_coef * kl).mean()


def soft_reward_inputs(reward_func, rollout, eos_token_id: int | None) -> tuple[SoftTokens, torch.Tensor]:
    """Relaxed tokens and mask a reward scores: the completion (without its EOS, like decoded text) or prompt + completion.

    A reward with `scores_eos = True` (the length reward, which reads the EOS mass) keeps the EOS position.
    """
    mask = rollout.mask
    if eos_token_id is not None and not getattr(reward_func, "scores_eos", False):
        mask = mask * (rollout.tokens != eos_token_id)
    soft = rollout.soft_tokens
    if getattr(reward_func, "include_prompt", False):
        soft = soft.with_prefix(rollout.prompt_ids)
        mask = torch.cat([rollout.prompt_mask.to(mask.dtype), mask], dim=1)
    return soft, mask


class GumbelGRADETrainer(RolloutTrainer):
    """Trainer for GRADE. The constructor mirrors `trl.GRPOTrainer`'s (see `RolloutTrainer`);
    every reward must be differentiable (`score_soft`)."""

    _tag_names = ["trl", "grade", "grade_trl"]
    config_class = GumbelGRADEConfig

    @property
    def reference_recompute(self) -> bool | str:
        """How the reference's forward on the soft tokens is recomputed in backward (`reference_logits`' recompute):
        not at all with `recompute_reference_and_reward: false`; else whole, or a transformer block at a time for a
        frozen reference sharded by FSDP2 (`prepared_reference`). There FSDP2 does not reshard a unit after a forward
        inside a backward (`FSDPParamGroup.post_forward` skips it), so a whole recomputation would leave every block
        gathered until its gradient arrived: the whole reference at once, more than a replicated copy (measured on 2 CPU
        processes: all 5.3M elements of the tiny reference, against 2.2M, E's unit and one block, block by block)."""
        if not self.args.recompute_reference_and_reward:
            return False
        frozen_sharded = self.ref_model is not None and is_fsdp2(self.ref_model)
        return "blocks" if frozen_sharded and transformer_blocks(self.ref_model) else True  # a model naming no block class: whole

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        a = self.args
        self.relaxation = build_relaxation(a.estimator, a.tau_backward, a.rao_samples, a.gapped_margin)
        if getattr(a, "checkpointing_from", None) and self.accelerator.is_main_process:  # results.json shows it False, rollout_checkpointing True
            logger.info("%s: true means rollout_checkpointing for GRADE: each decode step is recomputed in backward, the KV cache kept", a.checkpointing_from)

    def check_rewards(self, reward_funcs) -> None:
        require_differentiable(reward_funcs)

    @property
    def tau(self) -> float:
        a = self.args
        return tau_at(self.state.global_step, a.tau_start, a.tau_end, a.tau_anneal_steps, a.tau_schedule)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        args, device = self.args, self.accelerator.device
        eos = self.processing_class.eos_token_id
        enc = self.tokenize_prompts(inputs)
        tau = self.tau

        # Under bf16/fp16 everything below runs in autocast (fp32 master weights); the relaxation, the exact KL and
        # its log-softmaxes compute in float32 whatever the logits' dtype.
        with self.accelerator.autocast():
            # 2. relaxed rollout: every generated position is a differentiable function of the policy
            rollout = soft_rollout(
                model,
                enc["input_ids"],
                enc["attention_mask"],
                relax=lambda logits, step: self.relaxation(logits, tau),
                max_new_tokens=args.max_new_tokens,
                min_new_tokens=args.min_new_tokens,
                eos_token_id=eos,
                top_k=args.relax_top_k,
                cache=args.rollout_cache,
                checkpoint_steps=args.rollout_checkpointing,
            )

            # 3. exact KL to the frozen reference, inside the objective
            ref_model, ref_context = self.reference_context(model)
            ref_logits = reference_logits(ref_model, rollout, args.min_new_tokens, eos, recompute=self.reference_recompute, context=ref_context)  # (B, T, V)
            # (B, T) each; the policy's entropy (a metric) comes from the KL's own log-softmax, not a pass of its own
            kl_per_token, entropy_per_token = exact_kl_and_entropy(rollout.logits, ref_logits, rollout.logit_indices)
            kl = masked_sum(kl_per_token, rollout.mask, dim=1)  # (B,)

            # 4. differentiable rewards
            scores = self.soft_reward_scores(rollout, require_gradient=True)  # (B, F)
        rewards = scores @ self.reward_weights.to(device, scores.dtype)  # (B,)

        # 5. the loss
        loss = grade_loss(rewards, kl, args.kl_coef)

        self._log_step_metrics(rollout, rewards, scores, kl, entropy_per_token, tau, evaluating=not model.training)
        if not model.training:  # Trainer.evaluate(): the reward of sampled text, as every other method's evaluation logs it
            self._log_sampled_text_rewards(model, inputs, enc)
        return loss

    def soft_reward_scores(self, rollout, require_gradient: bool = False) -> torch.Tensor:
        """Each reward function's differentiable score of each relaxed completion. (B, F)

        require_gradient: the training loss's call, where a score without a gradient (while the rollout has one) is a
        reward that GRADE cannot train through (the bias probe's hard one-hot samples have none, by design)."""
        eos = self.processing_class.eos_token_id
        scores = []
        for func in self.reward_funcs:
            soft, mask = soft_reward_inputs(func, rollout, eos)
            # soft_scores wraps the call, not the function: a non-reentrant checkpoint stops its recomputation in
            # backward with an internal exception that must pass through untouched.
            score_soft = partial(checkpoint, func.score_soft, use_reentrant=False) if self.args.recompute_reference_and_reward else func.score_soft
            score = soft_scores(func, score_soft, soft, mask)
            try:
                scores.append(check_finite_scores(func, score, rollout.tokens.shape[0]))
            except RewardFunctionError:
                if not bool(torch.isfinite(rollout.logits).all()):  # read on this path only: no host sync per step
                    # the reward only passed on what the policy's diverged weights gave it (the gradient of the step
                    # before was finite, so the guard let the update through: a too large learning rate, say)
                    raise diverged_logits_error(self.state.global_step + 1) from None
                raise
            if require_gradient and torch.is_grad_enabled() and rollout.logits.requires_grad and not scores[-1].requires_grad:
                # a detached or constant score would train on the KL term alone, without a word
                raise RewardFunctionError(
                    f"reward function '{reward_name(func)}' returned a score_soft with no gradient (detached, or not computed from "
                    "soft_tokens): GRADE trains through the reward; compute the score from soft_tokens with differentiable operations"
                )
        return torch.stack(scores, dim=1)

    @torch.no_grad()
    def _log_step_metrics(self, rollout, rewards, scores, kl, entropy_per_token, tau, evaluating: bool = False):
        """The step's metrics. evaluating (Trainer.evaluate()): the relaxed rollout's reward is `reward_soft`, and
        `reward`, `reward_std` and each function's mean come from sampled text (`_log_sampled_text_rewards`)."""
        if evaluating:  # the same on every process, so the gathers below still pair up
            reward_metrics = {"reward_soft": self.gathered_mean(rewards)}
        else:
            reward_metrics = {
                "reward": self.gathered_mean(rewards),
                "reward_std": self.gathered_std(rewards),
                **{f"rewards/{reward_name(f)}/mean": self.gathered_mean(scores[:, i]) for i, f in enumerate(self.reward_funcs)},
            }
        self.metrics.add(
            self.global_count(kl.shape[0]),
            **reward_metrics,
            kl=self.gathered_mean(kl),
            kl_per_token=self.gathered_sum(kl) / max(self.gathered_sum(rollout.lengths), 1.0),
            tau=tau,
            entropy=self.gathered_mean(masked_mean(entropy_per_token, rollout.mask)),
            **{"completions/mean_length": self.gathered_mean(rollout.lengths)},
        )

    @torch.no_grad()
    def _log_sampled_text_rewards(self, model, inputs, enc) -> None:
        """`reward`, `reward_std` and each function's mean of one completion per prompt sampled from the policy (from the
        distribution GRADE's hard tokens are drawn from: the raw logits, EOS banned before min_new_tokens), decoded and
        scored by each reward's text path: the same measure as every other method's, where the relaxed rollout's
        score_soft is a surrogate (logged as `reward_soft`)."""
        tok, args = self.processing_class, self.args
        settings = SamplingSettings(max_new_tokens=args.max_new_tokens, min_new_tokens=args.min_new_tokens)
        with self.accelerator.autocast():
            batch = sample(model, enc["input_ids"], enc["attention_mask"], settings, tok.eos_token_id, tok.pad_token_id)
        scores = self.sampled_text_scores(inputs, batch)  # (B, F)
        rewards = combine_scores(scores, self.reward_weights)  # (B,)
        samples = self.global_count(rewards.shape[0])
        self.metrics.add(samples, reward=self.gathered_mean(rewards), reward_std=self.gathered_std(rewards))
        self.add_reward_function_means(self.reward_function_means(scores))
        self.log_reward_metrics(samples)

    # The registry's hook for the bias probe -------------------------------------------------------------------
    def score_function_loss(self, rows: list[dict], samples_per_prompt: int = 4) -> torch.Tensor:
        """A surrogate whose gradient is an UNBIASED estimate of the gradient of GRADE's hard objective

            J(theta) = E_{y ~ pi_theta}[ f(y; theta) ],   f = R(y) - kl_coef * sum_t KL(pi_theta(.|y<t) || pi_ref(.|y<t))

        (real tokens, the trainer's reward, kl_coef and reference, the same EOS ban), by the score function:

            grad J = E[ (f(y) - b) grad log pi(y) + grad_theta f(y; theta) ],   loss = -mean_i [A_i log pi(y_i) + f_i]

        with A_i = f_i - b_i (stop-gradient), b_i the leave-one-out mean over the r samples of the same prompt
        (unbiased, Kool et al. 2019), and grad_theta f = -kl_coef grad KL at fixed tokens (the reward of fixed tokens
        has no theta path). Built from GRADE's own rollout, reference, exact KL and reward, with the relaxation
        replaced by an exact, non-differentiable Gumbel-max sample. The probe's `grade_bias` compares GRADE's mean
        gradient with it.
        """
        args, eos, model = self.args, self.processing_class.eos_token_id, self.model
        enc = self.tokenize_prompts([row for row in rows for _ in range(samples_per_prompt)])
        gumbel_max = StraightThroughGumbel()
        rollout = soft_rollout(
            model, enc["input_ids"], enc["attention_mask"], relax=lambda logits, step: gumbel_max(logits.detach(), 1.0),  # one-hot, no gradient
            max_new_tokens=args.max_new_tokens, min_new_tokens=args.min_new_tokens, eos_token_id=eos,
        )
        ref_model, ref_context = self.reference_context(model)
        with ref_context():
            ref_logits = reference_logits(ref_model, rollout, args.min_new_tokens, eos)  # (B, T, V)
        kl = masked_sum(exact_kl(rollout.logits, ref_logits), rollout.mask, dim=1)  # (B,) with its pathwise gradient
        scores = self.soft_reward_scores(rollout)
        f = scores @ self.reward_weights.to(kl.device, scores.dtype) - args.kl_coef * kl  # (B,)
        token_logps = F.log_softmax(rollout.logits, dim=-1).gather(-1, rollout.tokens.unsqueeze(-1)).squeeze(-1)  # (B, T)
        logp = masked_sum(token_logps, rollout.mask, dim=1)  # (B,) log pi(y) up to and including the first EOS
        advantages = f.detach() - leave_one_out_baseline(f.detach(), samples_per_prompt)  # (B,)
        return -(advantages * logp + f).mean()
