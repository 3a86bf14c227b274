"""GRADE: reward gradients backpropagated through a relaxed generation (Gumbel-softmax / straight-through).

One optimizer step, top to bottom (`compute_loss`):
  1. tokenize the prompts (left padding, at most `max_prompt_length` tokens);
  2. soft rollout: y_t = relax(logits_t, tau), next input y_t @ E, KV cache (core.soft_rollout);
  3. reference logits on the same soft inputs; exact KL per position, masked after the first hard EOS;
  4. differentiable reward R(y) from every reward's `score_soft`;
  5. loss = -mean_b (R_b - beta * KL_b)  (`grade_loss`), backpropagated through 4, 3 and 2.

Legend: B batch, P prompt length, T generated positions, V vocabulary.
"""

from __future__ import annotations

import copy
import logging
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from transformers import Trainer

from ..core import exact_kl, masked_mean, masked_sum, reference_logits, soft_rollout
from ..models import load_causal_lm, load_tokenizer, prepare_tokenizer
from ..rewards.base import check_finite_scores, require_differentiable, reward_name
from .grade_config import GumbelGRADEConfig
from .metrics import GradNormWindowMixin, MetricWindow
from .relaxations import RELAXATIONS, tau_at

logger = logging.getLogger(__name__)


def identity(features):
    """No collation: the trainer tokenizes prompts itself (as TRL's GRPOTrainer does)."""
    return features


def grade_loss(rewards: torch.Tensor, kl: torch.Tensor, beta: float) -> torch.Tensor:
    """GRADE objective: maximise J = E[R(y) - beta * KL(pi_theta || pi_ref)(y)], so

        loss = -(1/B) sum_b (R_b - beta * KL_b)

    rewards: (B,) differentiable rewards of the relaxed samples; kl: (B,) exact per-token KL summed over
    each completion. Both carry gradients back through the relaxed rollout (arXiv:2601.11574).
    """
    return -(rewards - beta * kl).mean()


def soft_reward_inputs(reward_func, rollout, eos_token_id: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Soft tokens and mask a reward scores: the completion (without its EOS, like decoded text) or prompt + completion."""
    mask = rollout.mask
    if eos_token_id is not None:
        mask = mask * (rollout.tokens != eos_token_id)
    soft = rollout.soft_tokens
    if getattr(reward_func, "include_prompt", False):
        prompt_one_hot = F.one_hot(rollout.prompt_ids, soft.shape[-1]).to(soft.dtype)  # (B, P, V)
        soft = torch.cat([prompt_one_hot, soft], dim=1)
        mask = torch.cat([rollout.prompt_mask.to(mask.dtype), mask], dim=1)
    return soft, mask


class GumbelGRADETrainer(GradNormWindowMixin, Trainer):
    """Trainer for GRADE. Mirrors `trl.GRPOTrainer`'s constructor.

    Args:
        model: hub id, local path, `"embedded"`, or a `PreTrainedModel` (causal LM).
        reward_funcs: a differentiable reward or a list of them (each with `score_soft`).
        args: a `GumbelGRADEConfig`.
        train_dataset / eval_dataset: datasets with a `prompt` column.
        processing_class: the tokenizer (loaded from the model when None).
        peft_config: a `peft.LoraConfig` to train adapters; the reference is then the model with adapters disabled.
    """

    _tag_names = ["trl", "grade", "grade_trl"]

    def __init__(
        self,
        model,
        reward_funcs,
        args: GumbelGRADEConfig | None = None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        callbacks=None,
        optimizers=(None, None),
        peft_config=None,
    ):
        args = args or GumbelGRADEConfig(output_dir="grade_output")
        if isinstance(model, str):
            init_kwargs = dict(args.model_init_kwargs or {})
            init_kwargs.setdefault("dtype", torch.float32)
            model = load_causal_lm(model, **init_kwargs)
        processing_class = prepare_tokenizer(processing_class or load_tokenizer(model.config._name_or_path))
        self.reward_funcs = reward_funcs if isinstance(reward_funcs, (list, tuple)) else [reward_funcs]
        require_differentiable(self.reward_funcs)
        weights = args.reward_weights or [1.0] * len(self.reward_funcs)
        if len(weights) != len(self.reward_funcs):
            raise ValueError(f"reward_weights has {len(weights)} entries for {len(self.reward_funcs)} reward functions")
        self.reward_weights = torch.tensor(weights, dtype=torch.float32)

        if peft_config is not None:
            from peft import get_peft_model

            model = get_peft_model(model, peft_config)
            ref_model = None  # reference = the same model with its adapters disabled
        else:
            ref_model = copy.deepcopy(model).requires_grad_(False).eval()

        super().__init__(
            model=model,
            args=args,
            data_collator=identity,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            callbacks=callbacks,
            optimizers=optimizers,
        )
        self.ref_model = None if ref_model is None else self.accelerator.prepare_model(ref_model, evaluation_mode=True)
        for func in self.reward_funcs:
            if hasattr(func, "to"):
                func.to(self.accelerator.device)
        self.relaxation = RELAXATIONS[args.estimator]()
        self._metrics = {"train": MetricWindow(), "eval": MetricWindow()}

    # Trainer plumbing -------------------------------------------------------------------------------------
    def _set_signature_columns_if_needed(self):
        if self._signature_columns is None:
            self._signature_columns = ["prompt"]

    @property
    def tau(self) -> float:
        a = self.args
        return tau_at(self.state.global_step, a.tau_start, a.tau_end, a.tau_anneal_steps, a.tau_schedule)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "train" if self.model.training else "eval"
        if "loss" in logs or "eval_loss" in logs:  # a training/eval log, not a callback's own metrics
            metrics = self._metrics[mode].flush()
            logs.update(metrics if mode == "train" else {f"eval_{k}": v for k, v in metrics.items()})
        super().log(logs, start_time)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        with torch.no_grad():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    # The algorithm ----------------------------------------------------------------------------------------
    def _reference_context(self):
        if self.ref_model is not None:
            return self.ref_model, nullcontext()
        unwrapped = self.accelerator.unwrap_model(self.model)
        return unwrapped, unwrapped.disable_adapter()

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        args, device = self.args, self.accelerator.device
        eos = self.processing_class.eos_token_id
        prompts = [example["prompt"] for example in inputs]
        enc = self.processing_class(
            prompts, return_tensors="pt", padding=True, truncation=True, max_length=args.max_prompt_length, add_special_tokens=False
        ).to(device)
        tau = self.tau

        # 2. relaxed rollout: every generated position is a differentiable function of the policy
        rollout = soft_rollout(
            model,
            enc["input_ids"],
            enc["attention_mask"],
            relax=lambda logits, step: self.relaxation(logits, tau),
            max_new_tokens=args.max_new_tokens,
            min_new_tokens=args.min_new_tokens,
            eos_token_id=eos,
        )

        # 3. exact KL to the frozen reference, inside the objective
        ref_model, ref_context = self._reference_context()
        with ref_context:
            ref_logits = reference_logits(ref_model, rollout, args.min_new_tokens, eos)  # (B, T, V)
        kl_per_token = exact_kl(rollout.logits, ref_logits)  # (B, T)
        kl = masked_sum(kl_per_token, rollout.mask, dim=1)  # (B,)

        # 4. differentiable rewards
        scores = []
        for func in self.reward_funcs:
            soft, mask = soft_reward_inputs(func, rollout, eos)
            scores.append(check_finite_scores(func, func.score_soft(soft, mask).float()))
        scores = torch.stack(scores, dim=1)  # (B, F)
        rewards = scores @ self.reward_weights.to(device)  # (B,)

        # 5. the loss
        loss = grade_loss(rewards, kl, args.beta)

        self._log_step_metrics(rollout, rewards, scores, kl, tau)
        return loss

    @torch.no_grad()
    def _log_step_metrics(self, rollout, rewards, scores, kl, tau):
        gather = self.accelerator.gather
        logp = F.log_softmax(rollout.logits.float(), dim=-1)
        entropy = masked_mean(-(logp.exp() * logp).sum(-1), rollout.mask)
        window = self._metrics["train" if self.model.training else "eval"]
        all_rewards = gather(rewards.detach())
        window.add(
            reward=all_rewards.mean(),
            reward_std=all_rewards.std() if all_rewards.numel() > 1 else 0.0,
            kl=gather(kl.detach()).mean(),
            tau=tau,
            entropy=gather(entropy.reshape(1)).mean(),
            **{"completions/mean_length": gather(rollout.lengths).float().mean()},
            **{f"rewards/{reward_name(f)}/mean": gather(scores[:, i].detach()).mean() for i, f in enumerate(self.reward_funcs)},
        )
